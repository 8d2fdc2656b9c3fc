"""The storage contract. Every method is synchronous and transactional; the engine calls
them from worker threads so that the event loop never waits on the database."""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from nextbest.bandit.attribution import Conversion, Credit, Touch
from nextbest.bandit.decision_log import DecisionContext, LoggedDecision, Outcome
from nextbest.bandit.features import Feature, feature
from nextbest.bandit.spec import CampaignSpec, PlacementSpec


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """A placement as stored: its spec, arm versions and which model generation serves it."""

    spec: PlacementSpec
    arm_versions: dict[str, int]
    generation: int = 1
    model_since_seq: int = 0  # a model without snapshot learns rewards with learn_seq above this


@dataclass(frozen=True, slots=True)
class Close:
    """Closes a decision's reward window with an explicit or the default reward."""

    event_id: str
    outcome: Outcome
    reward: float
    at: float
    reward_cost: float = 0.0
    budgets: tuple[tuple[str, str], ...] = ()
    slot: int = 0
    cost: float = 0.0  # the impression cost, still held when a deferred decision was never activated
    # The decision it acts on, as the closer knows it: the row must be of this placement (and,
    # unless None, held by this server). A window in one server's memory never acts on a row
    # that carries its (event_id, slot) but is another decision (issue #29: a token of one
    # placement rewarding another placement's decision). None: unbound (offline tools only).
    placement: str | None = None
    owner: str | None = None
    # How the rewards gathered in the window make the learned one ("sum", "max", "average",
    # "earliest"), decided on the row: the first reward on it and the "agg" reward events of
    # every server, read in the close's transaction. None: the close's own reward or the row's first.
    aggregation: str | None = None

    @property
    def incurred(self) -> bool:
        """A positive explicit reward spends the reserved reward cost."""
        return self.outcome == Outcome.REWARD and self.reward > 0

    @property
    def learnable(self) -> bool:
        return self.outcome in (Outcome.REWARD, Outcome.DEFAULT)


@dataclass(frozen=True, slots=True)
class Activation:
    """A deferred decision was shown: its impression counts and its reward window starts."""

    event_id: str
    at: float
    deadline: float
    cost: float = 0.0  # impression cost moved from held to spent
    budgets: tuple[tuple[str, str], ...] = ()
    slot: int = 0
    placement: str | None = None  # bound to the decision as the activator knows it (see Close)
    owner: str | None = None


# The kind of a RewardEvent that is a window's first reward under learn_at: window_close: it is
# stored on the decision's row (not in reward_events), where every server and every close see it.
FIRST = "first"


@dataclass(frozen=True, slots=True)
class RewardEvent:
    """A reward kept beside the learned one: "late", one of several to aggregate ("agg"), or a
    window's first reward, learned when it closes (FIRST)."""

    event_id: str
    slot: int
    reward: float
    at: float
    kind: str
    reward_id: str | None = None  # the caller's key: one row per (event, slot, key)
    # FIRST and "agg" events are stored only on an open, activated decision of this placement
    # (and, unless None, held by this server); "late" ones are kept whatever the window's state.
    placement: str | None = None
    owner: str | None = None


class Recorded(enum.Enum):
    """What became of a reward event in the store."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # its key (reward_id) is stored already, or the window has its first reward
    CLOSED = "closed"  # no open, activated window of that decision: nothing stored


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A saved model of a placement (by its name: "", a variant id, "shadow:<id>"), the settings
    it was built with, and the position in the learn sequence it includes. A model is
    snapshotted when it is created, so a restart always finds where each model starts."""

    placement: str
    name: str  # the model's name, snapshots.model_name (a "slot" is a position of a multi-slot decision)
    key: tuple[str, bool, int]
    learned: int
    learn_seq: int
    model: bytes


@dataclass(slots=True)
class ArmTally:
    """Counts of one arm's decisions by outcome. A reward counts once it is acknowledged:
    ``rewards``, ``reward_sum`` and ``spend`` include those of windows still open (a first
    reward on the decision's row under ``learn_at: window_close``, the running aggregate of the
    rewards recorded for an aggregating placement), which the ``*_awaiting_close`` fields count
    apart; the rest were closed with their reward (learned, or in the learn order)."""

    arm_id: str
    impressions: int = 0
    rewards: int = 0
    reward_sum: float = 0.0
    default_rewards: int = 0
    late_rewards: int = 0
    pending: int = 0  # windows still open, with or without an acknowledged reward
    spend: float = 0.0
    rewards_learned: int = 0  # closed with an explicit reward
    reward_sum_learned: float = 0.0
    rewards_awaiting_close: int = 0
    reward_sum_awaiting_close: float = 0.0
    spend_awaiting_close: float = 0.0  # reward costs of positive rewards, still held in the budget


@dataclass(slots=True)
class Awaiting:
    """The acknowledged rewards of one (variant, arm)'s open windows: how many windows hold
    one, their sum, and the reward costs of the positive ones."""

    variant: str
    arm_id: str
    count: int = 0
    reward_sum: float = 0.0
    spend: float = 0.0


@dataclass(frozen=True, slots=True)
class IneligibleTally:
    """How many decisions of a placement left an arm out for one reason ("why does X never show")."""

    arm_id: str
    reason: str
    decisions: int


@dataclass(slots=True)
class VariantTally:
    """Counts of one experiment variant's decisions."""

    variant: str
    decisions: int = 0
    impressions: int = 0
    rewards: int = 0  # acknowledged explicit rewards, also those awaiting their window's close
    reward_sum: float = 0.0
    learned_sum: float = 0.0  # explicit and default rewards of closed decisions
    closed: int = 0
    rewards_awaiting_close: int = 0
    reward_sum_awaiting_close: float = 0.0


@dataclass(frozen=True, slots=True)
class AccountRow:
    """A budget account as stored."""

    key: str
    period: str
    leased: float
    spent: float
    reserved: float


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """What a lease got: the amount granted and the limit stored for the account (the caller's
    own limit where none is stored), which tells a server that its configuration is stale."""

    granted: float
    limit: float


@dataclass(frozen=True, slots=True)
class RecentImpression:
    """An impression for rebuilding contact history after a restart."""

    customer_id: str
    arm_id: str
    placement: str
    event_id: str
    at: float
    outcome: Outcome
    reward: float | None


@dataclass(frozen=True, slots=True)
class LearnRow:
    """What the learner needs of a closed decision. The features stay JSON text: the learner
    usually has the example's VW text from the Choose still in memory and never parses them."""

    event_id: str
    slot: int
    learn_seq: int
    arms: tuple[tuple[str, int], ...]
    chosen: int
    probability: float
    reward: float
    features_json: str
    context_json: str | None = None  # decisions.context: each arm's decision-time features (history)
    placement: str = ""  # whose decision: a model group's learner reads several placements' rows

    def features(self) -> tuple[Feature, ...]:
        return features_of(orjson.loads(self.features_json))

    def arm_features(self) -> tuple[tuple[Feature, ...], ...]:
        """Each arm's decision-time features, following ``arms`` (empty: none)."""
        if self.context_json is None:
            return ()
        context = DecisionContext.from_json(orjson.loads(self.context_json))
        return context.arm_features if context is not None else ()


def features_of(triples: Sequence[Sequence[Any]]) -> tuple[Feature, ...]:
    """Features as the decision log keeps them: ``[[namespace, name, value], ...]``."""
    return tuple(feature(ns, name, v if isinstance(v, str) else float(v)) for ns, name, v in triples)


@dataclass(frozen=True, slots=True)
class ContactRow:
    """One impression to record in the shared contact history."""

    customer_id: str
    at: float
    placement: str
    arm_id: str
    event_id: str
    slot: int = 0


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Per close in a batch: whether it closed an open window, and the close as stored (None if
        it closed nothing: a DEFAULT close of a window holding a first reward is stored as that
        REWARD); per activation: whether it activated an open decision; per reward event: whether
        it was stored (a "first" one only where the window was open and had no first reward); per
    decision: whether it was inserted (False: its (event_id, slot) belongs to another decision)."""

    closed: Sequence[bool] = field(default_factory=tuple)
    activated: Sequence[bool] = field(default_factory=tuple)
    stored: Sequence[Close | None] = field(default_factory=tuple)
    recorded: Sequence[Recorded] = field(default_factory=tuple)
    inserted: Sequence[bool] = field(default_factory=tuple)  # per decision: False for an (event_id, slot) taken


@dataclass(frozen=True, slots=True)
class Profile:
    """A customer's stored profile (issue #30): features in the namespaces and types of a
    ChooseRequest's (``customer.plan`` = text, ``customer.arpu`` = number), as of a time the
    source gives (last writer by ``as_of`` wins), unused and swept after ``expires_at`` if set."""

    customer_id: str
    features: tuple[Feature, ...]
    as_of: float
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ProfilesPut:
    """What a put_profiles did: ``stored`` profiles written (new, or as of a time at or after
    the stored one's), ``stale`` ignored (the stored profile is as of a later time)."""

    stored: int = 0
    stale: int = 0


@dataclass(frozen=True, slots=True)
class Erased:
    """What erasing a customer removed (Store.erase_customer)."""

    profiles: int = 0
    decisions: int = 0  # decision rows whose customer id and features were blanked
    contacts: int = 0  # contact-history rows deleted
    conversions: int = 0  # conversions whose customer id was blanked (their credits and values stay)


@dataclass(frozen=True, slots=True)
class VariantConversions:
    """Conversions of the customers one variant (or the holdout) of a placement decided in a
    period (Store.conversion_tally), for uplift on real purchases: every conversion of those
    customers counts, attributed or not, from their first decision there on. ``value_sum`` and
    ``value_sq_sum`` are the sum of each customer's conversion value (0 for those who did not
    convert) and of its square: mean and variance of value per customer, for an interval."""

    variant: str
    customers: int = 0  # distinct known customers decided
    converting: int = 0  # of them, those with a conversion
    value_sum: float = 0.0
    value_sq_sum: float = 0.0


@dataclass(frozen=True, slots=True)
class TouchRange:
    """The impressions a conversion may credit (Store.touches_of): the customer's activated
    decisions that served one of ``arms``, created in [since, until)."""

    customer_id: str
    arms: frozenset[str]
    since: float
    until: float


class Store(Protocol):
    """The one storage interface of the engine, with one implementation: the SQL store
    (server/storage/sql.py) on SQLite and on PostgreSQL. tests/storage/test_store_contract.py
    checks each implementation on both databases; a method naming a test there is checked by it.
    "Unavailable" is nextbest.bandit.errors.Unavailable: the database away or failing (for a
    refused record too; its ``__cause__`` tells which, see storage/refusal.py)."""

    def load_placements(self) -> list[PlacementRecord]:
        """MUST return every stored placement by id, its arms (retired ones too) in stored order,
        with arm versions, generation and model_since_seq (test_placements_round_trip).
        Database errors raise SQLAlchemyError here, not Unavailable."""
        ...

    def arm_features(self) -> dict[tuple[str, str, int], dict[str, float | str | bool]]:
        """MUST return the features of every stored arm version by (placement, arm, version)
        (test_placements_round_trip). Database errors raise SQLAlchemyError here, not Unavailable."""
        ...

    def save_placements(
        self,
        records: Sequence[PlacementRecord],
        new_arm_versions: Sequence[tuple[str, str, int, dict[str, float | str | bool]]],
        campaigns: Sequence[CampaignSpec] = (),
        snapshots: Sequence[Snapshot] = (),
    ) -> None:
        """MUST write snapshots, campaigns, new arm versions and placements (their arms replaced)
        in one transaction, all or nothing, committed on return (test_placements_round_trip);
        an arm version already stored fails the whole call. In the same transaction it stores
        the limits of the budgets of the records' arms and of the campaigns (on their accounts
        too) and advances the configuration serial (test_leases_are_taken_against_the_stored_limit,
        test_servers_confirm_the_configuration_serial). Raises Unavailable."""
        ...

    def load_campaigns(self) -> list[CampaignSpec]:
        """MUST return every stored campaign, by id. Raises Unavailable."""
        ...

    def shared_secret(self, name: str, candidate: str) -> str:
        """MUST return the value stored under ``name``, storing ``candidate`` first when there
        is none (insert if absent, committed, then read): every caller on one database, at once
        or after a restart, gets the first value stored, and a fresh database keeps its own
        (test_a_shared_secret_is_stored_once_and_read_by_every_store). Raises Unavailable."""
        ...

    def lease(self, key: str, period: str, limit: float, amount: float) -> float:
        """MUST be take_lease's grant: at most ``amount``, never letting all servers' leases pass
        the limit stored for the account (``limit`` only where none is stored); creates a missing
        account; 0.0 when nothing is left or its UPDATE kept losing races
        (test_leases_are_taken_against_the_stored_limit). Committed on return. Raises Unavailable."""
        ...

    def release(self, key: str, period: str, amount: float) -> float:
        """MUST give back at most ``amount``, and never more than this server (its registered id;
        "" before one) was granted and has not given back or seen move to another server with a
        window, committed on return; returns what was given back; an unknown account stays
        unknown (nothing written) (test_a_server_gives_back_only_its_own_lease). Raises Unavailable."""
        ...

    def take_lease(self, key: str, period: str, limit: float, amount: float) -> LeaseGrant:
        """MUST grant this server at most ``amount`` and never let all servers' leases pass the
        limit stored for the account by the last save_placements naming its budget (``limit``
        only where none is stored), checked atomically with the limit's change, even when one
        is committed concurrently; creates a missing account; returns the grant and the limit
        checked (test_leases_are_taken_against_the_stored_limit). Committed on return. Unavailable."""
        ...

    def server_leases(self) -> list[AccountRow]:
        """MUST return this server's own leases per account (in ``leased``; the other figures 0),
        as release would bound them (test_a_server_gives_back_only_its_own_lease). Raises Unavailable."""
        ...

    def config_serial(self) -> int:
        """MUST return the configuration serial: 0 before any save_placements, then one more
        with each, as committed (test_servers_confirm_the_configuration_serial). Raises Unavailable."""
        ...

    def confirm_config(self, serial: int) -> None:
        """MUST record that this registered server has loaded the configuration up to ``serial``
        (never lowering it; kept when heartbeat signs it in again), committed on return
        (test_servers_confirm_the_configuration_serial). Raises Unavailable."""
        ...

    def unconfirmed_servers(self, serial: int, live_since: float) -> list[str]:
        """MUST return the ids of the other servers with a heartbeat at or after ``live_since``
        that have not confirmed ``serial``, by id (test_servers_confirm_the_configuration_serial).
        Raises Unavailable."""
        ...

    def listen_config(self, on_change: Callable[[int], None]) -> Callable[[], None] | None:
        """MUST, where the database can notify (PostgreSQL), call ``on_change(serial)`` from a
        thread of its own soon after any server commits a save_placements on this database and
        schema, and return a function that stops it; None where it cannot (SQLite: poll
        config_serial) (test_servers_confirm_the_configuration_serial). Never raises for the database."""
        ...

    def load_accounts(self, keys: Collection[tuple[str, str]] | None = None) -> list[AccountRow]:
        """MUST return every budget account as committed (or, given ``keys``, those of the
        (key, period) pairs named that exist), in no set order, as of one read, so that every
        server reads the same figures (test_slots_activation_and_aggregation_events,
        test_accounts_read_by_key). Raises Unavailable."""
        ...

    def recent_impressions(self, since: float) -> list[RecentImpression]:
        """MUST return the decisions created at or after ``since`` that served an arm to a known
        customer, oldest first, with their outcome and reward. Raises Unavailable."""
        ...

    def write(
        self,
        decisions: Sequence[LoggedDecision],
        closes: Sequence[Close],
        activations: Sequence[Activation] = (),
        events: Sequence[RewardEvent] = (),
        assign: bool = False,
    ) -> WriteResult:
        """MUST write all in one transaction, all or nothing, durable on return, decisions first;
        a reused (event_id, slot) keeps its first decision, the newcomer is not inserted (inserted
        False) and reserves nothing in budget_accounts (test_reused_event_id_does_not_fail_the_batch,
        test_a_refused_decision_reserves_nothing);
        a close or activation is True once, for an open window, else False, unknown ids too
        (test_decisions_closes_and_learn_order, test_slots_activation_and_aggregation_events); ``assign``
        claims in that commit (test_the_learners_closes_get_learn_positions_in_the_same_commit); a FIRST
        event sets the first reward of an open, activated decision that has none (STORED; DUPLICATE
        where it has one; CLOSED where it is not open), and a DEFAULT or REWARD close of a decision
        holding one stores it as REWARD, decided on the row as it is updated, so that no server's
        first reward is lost or replaced (test_a_first_reward_is_kept_on_the_row_and_taken_by_the_close);
        an "agg" event is stored only while its window is open (else CLOSED), once per key
        (DUPLICATE), and a close with ``aggregation`` stores the aggregate of the row's first reward
        and every stored "agg" event, whichever server stored them, taken in the close's own
        transaction after its row lock (test_aggregated_rewards_of_every_server_are_folded_in_at_close);
        every close, activation, FIRST and "agg" event with a ``placement`` acts only on a row of that
        placement (and ``owner``, unless None), else it is False or CLOSED
        (test_writes_are_bound_to_their_decision). Raises Unavailable."""
        ...

    def find_decision(self, event_id: str, slot: int = 0) -> LoggedDecision | None:
        """MUST return the decision as committed, with its outcome, reward, learn_seq and
        activation, or None for an unknown (event_id, slot) (test_decisions_closes_and_learn_order).
        Raises Unavailable."""
        ...

    def open_reward_events(self) -> list[RewardEvent]:
        """MUST return the "agg" reward events of windows still open, in the order stored, none of
        closed windows (test_slots_activation_and_aggregation_events). Raises Unavailable."""
        ...

    def learn_rows(self, placement: str | Sequence[str], variant: str | None, after_seq: int, limit: int) -> list[LearnRow]:
        """MUST return at most ``limit`` decisions of the placement, or of any of several (a model
        group's), and variant unless None, with a learn position above ``after_seq``, in learn
        order across them, each naming its placement, none closed but not yet claimed
        (test_decisions_closes_and_learn_order, test_variants_are_logged_and_tallied,
        test_learn_rows_of_several_placements_in_one_order). Raises Unavailable."""
        ...

    def max_learn_seq(self) -> int:
        """MUST return the highest learn position handed out, 0 before any
        (test_decisions_closes_and_learn_order). Raises Unavailable."""
        ...

    def contacts_open(self, customer_id: str, since: float) -> tuple[Any, list[RecentImpression]]:
        """MUST wait for a lock on the customer that every server respects (SQLite: one for all),
        then return a handle and their impressions at or after ``since``, oldest first, the outcome
        from the decision, OPEN without one (test_shared_contact_history_locks_reads_and_records).
        The caller passes the handle once to contacts_commit or contacts_abort, any thread. Unavailable."""
        ...

    def contacts_read(self, customer_ids: Sequence[str], since: float) -> dict[str, list[RecentImpression]]:
        """MUST return, for each customer, their impressions at or after ``since``, oldest first,
        as ``contacts_open`` reads them, in one read and without taking any lock
        (test_contacts_read_gives_each_customer_their_impressions_in_one_read). Unavailable."""
        ...

    def contacts_commit(self, handle: Any, rows: Sequence[ContactRow]) -> None:
        """MUST record the rows and release the lock, the lock even when it raises (PostgreSQL:
        rows commit in the lock's transaction; SQLite: in a short one after)
        (test_shared_contact_history_locks_reads_and_records). Raises Unavailable."""
        ...

    def contacts_abort(self, handle: Any) -> None:
        """MUST release the lock and record nothing (test_shared_contact_history_locks_reads_and_records);
        never raises for the database."""
        ...

    def contacts_insert(self, rows: Sequence[ContactRow]) -> None:
        """MUST record the impressions in one transaction, committed on return, without taking
        any customer's lock. Raises Unavailable."""
        ...

    def backfill_contacts(self, since: float) -> int:
        """MUST copy into the shared contact history every impression of the log (an activated
        decision with an arm, for a known customer) made at or after ``since`` that it lacks, none
        twice even when servers do it at once, and return how many it copied
        (test_contact_history_is_backfilled_from_the_log). Raises Unavailable."""
        ...

    def prune_contacts(self, before: float) -> int:
        """MUST delete the impressions older than ``before`` and return how many
        (test_shared_contact_history_locks_reads_and_records). Raises Unavailable."""
        ...

    def claim(self, placement: str, limit: int) -> int:
        """MUST give the next learn positions to at most ``limit`` closed, learnable decisions of
        the placement without one, in the order their windows closed, in one transaction; returns
        how many; none twice, never a window closed unactivated (test_decisions_closes_and_learn_order,
        test_slots_activation_and_aggregation_events). Only the learner-lock holder calls it. Unavailable."""
        ...

    def recent_rewards(self, placement: str, limit: int) -> list[float]:
        """MUST return the rewards of the placement's last ``limit`` learned decisions (by learn
        position), oldest first. Raises Unavailable."""
        ...

    def learned_count(self, placement: str, after_seq: int, upto_seq: int) -> int:
        """MUST return how many decisions of the placement have a learn position above
        ``after_seq`` and at most ``upto_seq``: a model group's member explores by its own
        learned decisions (test_learned_count_counts_a_placements_learn_positions). Raises Unavailable."""
        ...

    def config_version(self) -> tuple[float, int, float, int]:
        """MUST return (latest updated_at, count) of placements and of campaigns: it changes when
        save_placements adds one or stamps one with a later clock. Raises Unavailable."""
        ...

    def snapshot_versions(self, placement: str) -> dict[str, tuple[int, int]]:
        """MUST return (learned, learn_seq) of each saved model of the placement, by model name, without
        the model bytes; {} when none. Raises Unavailable."""
        ...

    def expired_open(self, cutoff: float, limit: int) -> list[LoggedDecision]:
        """MUST return at most ``limit`` open decisions of any server whose deadline is before
        ``cutoff``, in no set order, none once closed (test_decisions_closes_and_learn_order).
        Raises Unavailable."""
        ...

    def register_server(self, server_id: str, now: float) -> None:
        """MUST sign in a new server id, committed on return; decisions written after it are held
        by it (test_open_windows_move_only_from_servers_that_stopped). An id already signed in
        fails. Raises Unavailable."""
        ...

    def heartbeat(self, now: float) -> bool:
        """MUST record this registered server's sign of life, signing it in again if another
        server forgot it, and then return True: its windows and unused leases went to that server
        (test_open_windows_move_only_from_servers_that_stopped,
        test_a_stopped_servers_unused_lease_comes_back_with_its_windows). Raises Unavailable."""
        ...

    def server_alive(self, server_id: str, since: float) -> bool:
        """MUST say whether that server is signed in and beat at or after ``since``; False once it
        signed off or is unknown (test_servers_are_alive_while_they_beat). Raises Unavailable."""
        ...

    def unregister_server(self) -> None:
        """MUST mark this server stopped at once: another server's next adopt_open takes its
        windows (test_open_windows_move_only_from_servers_that_stopped). Raises Unavailable."""
        ...

    def adopt_open(self, live_since: float | None, unowned: bool = False) -> list[LoggedDecision]:
        """MUST in one transaction take the open windows of servers silent since ``live_since`` and
        forget them (None: of every other server), with ``unowned`` those no server holds, never a
        live server's; returns every window this server holds if it took any, else []
        (test_open_windows_move_only_from_servers_that_stopped). Racers get each window once; the
        unused leases (leased - used) of the servers it forgets come back in the same transaction
        (test_a_stopped_servers_unused_lease_comes_back_with_its_windows). Unavailable."""
        ...

    def try_learner_lock(self) -> bool:
        """MUST make at most one process per database the learner, without waiting; True while
        held (a second call too), until close or the process ends. Database errors raise
        SQLAlchemyError (PostgreSQL), not Unavailable."""
        ...

    def holds_learner_lock(self) -> bool:
        """MUST say whether this process still holds the learner lock: False once its PostgreSQL
        session is lost (the lock is dropped); never raises for the database."""
        ...

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """MUST replace the saved model of (placement, model name), committed on return
        (test_snapshots_and_late_rewards_and_tally). Raises Unavailable."""
        ...

    def load_snapshots(self, placement: str) -> dict[str, Snapshot]:
        """MUST return the last saved model of each model of the placement, by name, bytes intact, {} when
        none (test_snapshots_and_late_rewards_and_tally). Raises Unavailable."""
        ...

    def tally(self, placement: str) -> tuple[list[ArmTally], int, int]:
        """MUST return per-arm counts (a deferred decision counts once activated; a reward once
        acknowledged, those of open windows also apart), the number of decisions and how many
        served no arm (test_snapshots_and_late_rewards_and_tally,
        test_acknowledged_rewards_are_tallied_before_the_close). Unavailable."""
        ...

    def tally_variants(self, placement: str) -> list[VariantTally]:
        """MUST return per-variant counts of the placement, by variant name
        (test_variants_are_logged_and_tallied). Raises Unavailable."""
        ...

    def tally_ineligible(self, placement: str) -> list[IneligibleTally]:
        """MUST return, per arm and reason, how many of the placement's logged decisions (every
        slot's) recorded the arm as ineligible for that reason, most frequent first, from the
        database (the same on every server) (test_ineligible_arms_are_tallied_by_reason).
        Raises Unavailable."""
        ...

    def awaiting_close(self, placement: str) -> list[Awaiting]:
        """MUST return, per (variant, arm), the acknowledged rewards of the placement's open
        windows, valued as their close would learn them now (the placement's aggregation of the
        first reward on the row and those recorded; test_acknowledged_rewards_are_tallied_before_the_close);
        reads only. Raises Unavailable."""
        ...

    def learn_backlog(self, cursors: dict[str, int]) -> tuple[int, dict[str, int]]:
        """MUST return max_learn_seq and, per placement of ``cursors``, its closed windows not yet
        claimed plus those claimed above its cursor; reads only. Raises Unavailable."""
        ...

    def close(self) -> None:
        """MUST release the learner lock and the connection pool; the store is not used after it."""
        ...

    # -- customer profiles (issue #30; storage/profiles.py) --------------------------------------

    def put_profiles(self, profiles: Sequence[Profile], now: float) -> ProfilesPut:
        """MUST write all in one transaction, all or nothing, durable on return: a profile
        replaces the stored one of its customer only if its ``as_of`` is at or after the stored
        one's (else it is counted ``stale`` and changes nothing); within one call, the last of a
        customer's profiles with the highest ``as_of`` wins. Works for batches of any size
        (PostgreSQL: COPY into a temporary table, then one upsert) (test_profiles_last_writer_by_as_of_wins,
        test_a_profile_batch_is_all_or_nothing). Raises Unavailable."""
        ...

    def put_profile_table(self, table: Any, now: float) -> ProfilesPut:
        """MUST do as put_profiles with the profiles of ``table``, a pyarrow Table of columns
        customer_id (string), features (the JSON text of ``[[namespace, name, value], ...]``),
        as_of and expires_at (float64; null: never), in its row order: the bulk loader's path,
        no Python object per row (PostgreSQL: the table as CSV into COPY)
        (test_a_profile_table_is_put_as_its_profiles). Raises Unavailable."""
        ...

    def get_profiles(self, customer_ids: Collection[str], now: float) -> dict[str, Profile]:
        """MUST return the stored profiles of those customers by id, leaving out the missing and
        those with ``expires_at`` at or before ``now`` (test_expired_profiles_are_not_read_and_are_swept);
        one query for the whole collection. Raises Unavailable."""
        ...

    def delete_profiles(self, customer_ids: Collection[str]) -> int:
        """MUST delete those customers' profiles, committed on return, and return how many there
        were (test_profiles_can_be_deleted). Raises Unavailable."""
        ...

    def sweep_profiles(self, now: float, limit: int) -> int:
        """MUST delete at most ``limit`` profiles expired at ``now`` and return how many
        (test_expired_profiles_are_not_read_and_are_swept). Raises Unavailable."""
        ...

    def erase_customer(self, customer_id: str) -> Erased:
        """MUST in one transaction delete the customer's profile and contact history and blank the
        customer id and features of their logged decisions and the customer id of their
        conversions (arms, probabilities, rewards, conversion values and credits stay: estimators,
        budgets and uplift totals still add up) (test_a_customer_can_be_erased). Raises Unavailable."""
        ...

    # -- conversions from billing (issue #31; storage/conversions.py) ---------------------------

    def touches_of(self, ranges: Sequence[TouchRange]) -> list[list[Touch]]:
        """MUST return, for each range in order, the customer's activated decisions (each slot
        apart) that served one of its arms, created in [since, until), oldest first (ties by
        event id and slot); never an unactivated (deferred, not shown) one; [] for an empty
        customer, no arms or an empty range (test_touches_are_activated_impressions_in_range).
        A batch's ranges are read together on the index of a customer's impressions: one
        statement per 500 distinct (customer, arm) pairs, however many ranges name them, no scan
        of the log (test_touches_of_a_batch_are_read_together). Raises Unavailable."""
        ...

    def record_conversions(self, items: Sequence[tuple[Conversion, Sequence[Credit]]], now: float) -> list[bool]:
        """MUST in one transaction, durable on return, store each conversion (``received_at``
        ``now``, ``credited`` the number of its credits) with its credits, unless its
        conversion_id is stored already (or came earlier in the batch): then nothing of it is
        written and its entry is False (a duplicate); exactly once across servers racing on one
        id (test_recording_conversions_twice_stores_them_once, test_servers_racing_on_one_conversion_store_it_once).
        All or nothing: a value the database refuses writes none of the batch, Unavailable whose
        cause storage/refusal.py reads (test_a_refused_conversion_writes_nothing). Raises Unavailable."""
        ...

    def credits_of_conversions(self, ids: Collection[str]) -> dict[str, list[Credit]]:
        """MUST return the stored credits of each stored conversion of ``ids`` (what a duplicate
        report answers), in the time order of the credited decisions, [] for one that credited
        none; unknown ids left out (test_recording_conversions_twice_stores_them_once). Raises Unavailable."""
        ...

    def credits_of_decision(self, event_id: str, slot: int) -> list[tuple[str, Credit, float]]:
        """MUST return (conversion id, credit, occurred_at) of every conversion credited to the
        decision, by occurred_at (for Explain) (test_credits_of_a_decision). Raises Unavailable."""
        ...

    def conversion_tally(self, placement: str, since: float, until: float) -> list[VariantConversions]:
        """MUST return, per variant ("" none, "holdout" the control group) of the placement's
        decisions created in [since, until), by variant name: the distinct known customers
        decided; of them, those with any conversion (attributed or not, any arm or product)
        that occurred in [since, until) at or after their first decision there; the sum of each
        customer's conversion value and of its square. Set-based: one statement
        (test_conversion_tally_per_variant_with_a_holdout). Raises Unavailable."""
        ...

    def any_conversion(self, since: float, until: float) -> bool:
        """MUST return whether any conversion occurred in [since, until), on an index (GetStats
        reads the conversion tally only then) (test_any_conversion_in_a_period). Raises Unavailable."""
        ...

    def unattributed_by_product(self, since: float, until: float) -> dict[str, tuple[int, float]]:
        """MUST return (count, value sum) of the conversions that occurred in [since, until) and
        credited no decision, by product (by arm id for those naming an arm)
        (test_conversion_tally_per_variant_with_a_holdout). Raises Unavailable."""
        ...

"""Offline replay: what would a candidate policy have earned on the logged traffic?

The log is held column-wise (one row per closed decision, one *slot* per eligible arm of it)
so that the simple policies and the estimators are a few vectorised numpy passes. A policy
gives, for every event in time order, a distribution over that event's own arm set; VW
policies learn as they go (progressive validation), so no event is scored by a model that
has already learned it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import chain
from typing import Any, Protocol

import numpy as np
import pylibvw
from numpy.typing import NDArray
from vowpalwabbit import Workspace

from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature, arm_line, features_from_mapping, shared_line, shared_line_of_rows
from nextbest.bandit.offline.estimators import ESTIMATORS, Accumulator, Estimate, estimator_names
from nextbest.bandit.vw_options import REPLAY_OPTIONS, split_vw_args

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
ArmKey = tuple[str, int]

DEFAULT_REWARD_MODEL_ARGS = "-q UA"


@dataclass(frozen=True, eq=False)
class ReplayLog:
    """Closed decisions in time order; slot ``offsets[i] + j`` is arm ``j`` of event ``i``."""

    event_ids: Sequence[str]
    timestamps: FloatArray
    rewards: FloatArray
    logged_prob: FloatArray
    chosen: IntArray  # index into the event's arms; -1: pacing made no offer (reward 0)
    offsets: IntArray  # n + 1 entries
    arm_index: IntArray  # per slot: index into ``arms``
    arms: Sequence[ArmKey]  # the distinct (arm id, version) pairs
    logged_pmf: FloatArray  # per slot
    features: Sequence[tuple[Feature, ...]] | None = None  # context; needed by VW only
    arm_features: Mapping[ArmKey, tuple[Feature, ...]] = field(default_factory=dict)
    no_offer: FloatArray | None = None  # per event: logged probability of pacing's "no offer"
    contexts: Sequence[Sequence[Sequence[Any]]] | None = None  # the context as logged ([ns, name, value] lists), or features
    set_ids: IntArray | None = None  # per event: which of ``sets`` its arms are (a log has few arm sets)
    sets: Sequence[Sequence[int]] = ()  # arm sets, as indices into ``arms``

    def __post_init__(self) -> None:
        n = len(self.event_ids)
        counts = np.diff(self.offsets)
        if n and (counts.min() < 1 or self.chosen.min() < -1 or bool((self.chosen >= counts).any())):
            raise InvalidInput("log", "every event needs at least one arm and a chosen arm among them")
        none = self.chosen < 0
        if none.any() and (self.no_offer is None or bool((self.no_offer[none] <= 0.0).any())):
            raise InvalidInput("log", "an event without an offer needs a logged probability of 'no offer'")
        if self.features is not None and len(self.features) != n:
            raise InvalidInput("log", "one feature tuple per event is required")
        if self.contexts is not None and len(self.contexts) != n:
            raise InvalidInput("log", "one context line per event is required")

    @property
    def n(self) -> int:
        return len(self.event_ids)

    @property
    def counts(self) -> IntArray:
        return np.diff(self.offsets)

    @property
    def offered(self) -> NDArray[np.bool_]:
        """Per event: an arm was shown (else pacing chose "no offer")."""
        return self.chosen >= 0

    @property
    def chosen_slot(self) -> IntArray:
        """The chosen arm's slot; for an event without an offer, its first slot (mask with ``offered``)."""
        return self.offsets[:-1] + np.maximum(self.chosen, 0)

    @classmethod
    def build(
        cls,
        event_ids: Sequence[str],
        timestamps: Iterable[float],
        rewards: Iterable[float],
        probabilities: Iterable[float],
        chosen: Iterable[int],
        arm_lists: Sequence[Sequence[Sequence[Any]]],
        pmfs: Sequence[Sequence[float]],
        features: Sequence[tuple[Feature, ...]] | None = None,
        arm_features: Mapping[ArmKey, tuple[Feature, ...]] | None = None,
    ) -> ReplayLog:
        """Columns from plain rows. Identical arm lists (the same object) are coded once."""
        distinct: dict[int, int] = {}
        lists: list[Sequence[Sequence[Any]]] = []
        ids = []
        for lst in arm_lists:
            j = distinct.get(id(lst))
            if j is None:
                j = distinct[id(lst)] = len(lists)
                lists.append(lst)
            ids.append(j)
        n = len(event_ids)
        return cls.from_columns(
            event_ids,
            np.fromiter(timestamps, np.float64, n),
            np.fromiter(rewards, np.float64, n),
            np.fromiter(probabilities, np.float64, n),
            np.fromiter(chosen, np.int64, n),
            np.array(ids, dtype=np.int64),
            lists,
            np.fromiter(chain.from_iterable(pmfs), np.float64),
            np.fromiter(map(len, pmfs), np.int64, n),
            features=features,
            arm_features=arm_features,
        )

    @classmethod
    def from_columns(
        cls,
        event_ids: Sequence[str],
        timestamps: FloatArray,
        rewards: FloatArray,
        probabilities: FloatArray,
        chosen: IntArray,
        list_ids: IntArray,
        lists: Sequence[Sequence[Sequence[Any]]],
        pmf_flat: FloatArray,
        pmf_sizes: IntArray,
        features: Sequence[tuple[Feature, ...]] | None = None,
        arm_features: Mapping[ArmKey, tuple[Feature, ...]] | None = None,
        contexts: Sequence[Sequence[Sequence[Any]]] | None = None,
    ) -> ReplayLog:
        """Columns in bulk: event ``i``'s arms are ``lists[list_ids[i]]`` (the few distinct arm
        sets of a log, each ``(arm id, version)`` pairs), its PMF the next ``pmf_sizes[i]``
        values of ``pmf_flat``. Everything per slot is computed by numpy, not per event, because
        a replay reads millions of them."""
        n = len(event_ids)
        vocab: dict[ArmKey, int] = {}
        coded = [[vocab.setdefault((str(a[0]), int(a[1])), len(vocab)) for a in lst] for lst in lists]
        sizes = np.fromiter(map(len, coded), np.int64, len(coded))
        table = np.fromiter(chain.from_iterable(coded), np.int64, int(sizes.sum()))
        table_start = np.zeros(len(coded), np.int64)
        np.cumsum(sizes[:-1], out=table_start[1:])
        counts = sizes[list_ids] if n else np.zeros(0, np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        slots = int(offsets[-1])
        arm_index = table[np.repeat(table_start[list_ids] - offsets[:-1], counts) + np.arange(slots)]
        extra = pmf_sizes - counts
        if n and (int(extra.min()) < 0 or int(extra.max()) > 1) or len(pmf_flat) != int(pmf_sizes.sum()):
            raise InvalidInput("pmf", "each event needs one probability per arm, and at most one for 'no offer'")
        flat = pmf_flat
        no_offer = None
        if extra.any():  # pacing's "no offer" is the PMF's last entry: keep it apart from the arms
            last = np.cumsum(pmf_sizes) - 1
            paced = extra == 1
            no_offer = np.zeros(n, np.float64)
            no_offer[paced] = flat[last[paced]]
            flat = np.delete(flat, last[paced])
        return cls(
            event_ids=event_ids,
            timestamps=timestamps,
            rewards=rewards,
            logged_prob=probabilities,
            chosen=chosen,
            offsets=offsets,
            arm_index=arm_index,
            arms=list(vocab),
            logged_pmf=flat,
            features=features,
            arm_features=dict(arm_features or {}),
            no_offer=no_offer,
            contexts=contexts,
            set_ids=list_ids,
            sets=coded,
        )

    @classmethod
    def from_decisions(
        cls, decisions: Iterable[LoggedDecision], arm_features: Mapping[ArmKey, Mapping[str, float | str | bool]] | None = None
    ) -> ReplayLog:
        """The closed decisions (an arm and a reward, or pacing's "no offer") among ``decisions``,
        in their given order."""
        rows = [d for d in decisions if (d.chosen is not None and d.reward is not None) or paced_no_offer(d)]
        return cls.build(
            [d.event_id for d in rows],
            [d.timestamp for d in rows],
            [d.reward or 0.0 for d in rows],
            [d.probability for d in rows],
            [-1 if d.chosen is None else d.chosen for d in rows],
            [d.arms for d in rows],
            [d.pmf for d in rows],
            features=[d.features for d in rows],
            arm_features={k: features_from_mapping(v) for k, v in (arm_features or {}).items()},
        )

    def missing_arm_features(self) -> list[ArmKey]:
        """The arm versions of this log without stored features (VW sees only their ids)."""
        return [k for k in self.arms if k not in self.arm_features]

    def vw_examples(self) -> list[str]:
        """``vw_texts``: made once per chunk, as DR's reward model and VW candidates all read it."""
        return self.vw_texts

    @cached_property
    def vw_texts(self) -> list[str]:
        """Every event as cb_adf text, the chosen arm labelled ``0:-reward:probability`` (events
        without an offer are unlabelled: VW predicts on them and learns nothing).

        The arm lines around the chosen one are joined once per arm set and chosen position, not
        per event: only the context and the label differ from one event to the next."""
        if self.contexts is not None:  # as logged: VW text is made only here, for VW and DR
            contexts = list(map(shared_line_of_rows, self.contexts))
        elif self.features is not None:
            contexts = [shared_line(f) for f in self.features]
        else:
            raise InvalidInput("log", "VW needs the context features, and the log was read without them")
        lines = [arm_line(a, self.arm_features.get((a, v), ())) for a, v in self.arms]
        if self.set_ids is not None:
            set_ids, sets = self.set_ids.tolist(), self.sets
        else:  # each event its own set
            offsets, codes = self.offsets.tolist(), self.arm_index.tolist()
            set_ids, sets = list(range(self.n)), [codes[offsets[i] : offsets[i + 1]] for i in range(self.n)]
        blocks: dict[tuple[int, int], tuple[str, str]] = {}
        chosen, rewards, probs = self.chosen.tolist(), self.rewards.tolist(), self.logged_prob.tolist()
        out = []
        for i, context in enumerate(contexts):
            c = chosen[i]
            block = blocks.get((set_ids[i], c))
            if block is None:
                arms = [lines[k] for k in sets[set_ids[i]]]
                if c < 0:
                    block = ("\n".join(arms), "")
                else:
                    block = ("".join(a + "\n" for a in arms[:c]), "\n".join(arms[c:]))
                blocks[(set_ids[i], c)] = block
            if c < 0:
                out.append(f"{context}\n{block[0]}")
            else:
                out.append(f"{context}\n{block[0]}0:{-rewards[i]!r}:{probs[i]!r} {block[1]}")
        return out


def missing_arm_features_warning(missing: Iterable[ArmKey]) -> tuple[str, ...]:
    keys = sorted(set(missing))
    if not keys:
        return ()
    names = ", ".join(f"{a} v{v}" for a, v in keys[:5])
    return (f"missing_arm_features: no stored features for {len(keys)} arm version(s) ({names}); " + "VW saw only their ids",)


# --------------------------------------------------------------------------- policies


class Scorer(Protocol):
    """One run of a policy over a log read in chunks, in time order: state (a VW model that
    learns as it goes, counts behind a warning) lives here, not in the policy."""

    def distribution(self, chunk: ReplayLog) -> FloatArray:
        """The candidate's distribution over each event's arms, one value per slot of ``chunk``."""
        ...

    def finish(self) -> tuple[str, ...]:
        """The warnings about the whole run; frees what the run holds. Called once, also after an error."""
        ...


class Policy(Protocol):
    """A candidate policy: ``scorer()`` starts a run over a log (and fails fast on a bad policy)."""

    name: str
    needs_features: bool

    def scorer(self) -> Scorer: ...


def distribution(policy: Policy, log: ReplayLog) -> tuple[FloatArray, tuple[str, ...]]:
    """A policy's distribution over a whole log at once, and its warnings (a notebook's view)."""
    run = policy.scorer()
    try:
        target = run.distribution(log)
    except BaseException:
        run.finish()
        raise
    return target, run.finish()


def _logged(log: ReplayLog) -> FloatArray:
    target = log.logged_pmf.copy()
    offered = log.offered
    target[log.chosen_slot[offered]] = log.logged_prob[offered]
    return target


@dataclass
class LoggedPolicy:
    """The policy that served: the logged PMF, exact on the chosen arm (weights are 1)."""

    name: str = "logged"
    needs_features: bool = False

    def scorer(self) -> Scorer:
        return self

    def distribution(self, chunk: ReplayLog) -> FloatArray:
        return _logged(chunk)

    def finish(self) -> tuple[str, ...]:
        return ()


@dataclass
class UniformPolicy:
    name: str = "uniform"
    needs_features: bool = False

    def scorer(self) -> Scorer:
        return self

    def distribution(self, chunk: ReplayLog) -> FloatArray:
        counts = chunk.counts
        return np.repeat(1.0 / counts, counts)

    def finish(self) -> tuple[str, ...]:
        return ()


@dataclass
class ConstantPolicy:
    """Always this arm where it was eligible; elsewhere what was served stands in for it."""

    arm_id: str
    name: str = ""
    needs_features: bool = False

    def scorer(self) -> Scorer:
        return _ConstantRun(self.arm_id)


@dataclass
class _ConstantRun:
    arm_id: str
    events: int = 0
    missing: int = 0  # events where the arm was not eligible

    def distribution(self, chunk: ReplayLog) -> FloatArray:
        is_arm = np.array([a == self.arm_id for a, _ in chunk.arms], dtype=bool)
        hit = is_arm[chunk.arm_index] if len(is_arm) else np.zeros(len(chunk.arm_index), dtype=bool)
        target = hit.astype(np.float64)
        eligible = np.add.reduceat(hit, chunk.offsets[:-1]) > 0 if chunk.n else np.zeros(0, dtype=bool)
        missing = int(chunk.n - np.count_nonzero(eligible))
        self.events += chunk.n
        self.missing += missing
        if missing:
            fallback = np.repeat(~eligible, chunk.counts)
            target[fallback] = _logged(chunk)[fallback]
        return target

    def finish(self) -> tuple[str, ...]:
        if self.events and self.missing == self.events:
            raise InvalidInput("policy", f"constant:{self.arm_id}: arm {self.arm_id!r} is not in the log")
        if not self.missing:
            return ()
        return (
            f"not_eligible: arm {self.arm_id} was not eligible in {self.missing} of {self.events} events; "
            + "the logged policy stands in for them",
        )


def _vw_args(text: str, field_name: str) -> list[str]:
    """The allow list of ``nextbest.bandit.vw_options`` with the reductions a replay policy chooses:
    replay feeds VW the logged examples itself, and no option may name a file."""
    try:
        return split_vw_args(text, REPLAY_OPTIONS)
    except ValueError as e:
        raise InvalidInput(field_name, f"VW arguments rejected: {e}") from None


def _workspace(args: list[str], field_name: str) -> Workspace:
    try:
        return Workspace(arg_list=["--quiet", *args])
    except Exception as e:  # VW raises RuntimeError and others for bad options
        raise InvalidInput(field_name, f"Vowpal Wabbit rejected {' '.join(args)!r}: {e}") from None


class _VW:
    """VW's binding, called directly (the Python wrapper's checks cost a fifth of a replay)."""

    parse = pylibvw.vw._parse
    learn_multi = pylibvw.vw.learn_multi
    predict_multi = pylibvw.vw.predict_multi
    finish_example_multi_ex = pylibvw.vw._finish_example_multi_ex


@dataclass
class VwPolicy:
    """A VW cb_adf configuration (``vw:ARGS``) or a saved model (``model:PATH``).

    With ``--cb_explore_adf`` the PMF is VW's own; a plain ``--cb_adf`` model is greedy (ties
    share). ``vw:`` learns each event right after scoring it; a saved model only predicts.
    """

    name: str
    args: list[str]
    learn: bool
    needs_features: bool = True

    def scorer(self) -> Scorer:
        return _VwRun(self.name, self.args, self.learn)


class _VwRun:
    """A workspace over the whole run: the model scores each event, then learns it."""

    def __init__(self, name: str, args: list[str], learn: bool) -> None:
        self.name, self.ws, self.learn = name, _workspace(args, "policy"), learn
        self.missing: set[ArmKey] = set()
        kind = self.ws.get_prediction_type()
        if kind not in (self.ws.pACTION_PROBS, self.ws.pACTION_SCORES):
            self.ws.finish()
            raise InvalidInput("policy", f"{name}: needs a cb_adf or cb_explore_adf model, not {kind}")
        self.greedy = kind == self.ws.pACTION_SCORES

    def distribution(self, chunk: ReplayLog) -> FloatArray:
        """Each event scored, then learned. VW's own learn scores an example before it updates
        (the score it leaves on the example is the one progressive validation wants), so one
        call does both: the replay runs at VW's learn rate, not at predict plus learn. Called
        through VW's binding directly, as the server does."""
        texts = chunk.vw_examples()
        self.missing.update(chunk.missing_arm_features())
        ws, learn, greedy = self.ws, self.learn, self.greedy
        parse, learn_multi, predict_multi, finish = _VW.parse, _VW.learn_multi, _VW.predict_multi, _VW.finish_example_multi_ex
        target = np.empty(len(chunk.arm_index), np.float64)
        offsets, chosen = chunk.offsets.tolist(), chunk.chosen.tolist()
        for i, text in enumerate(texts):
            lo, hi = offsets[i], offsets[i + 1]
            ex = parse(ws, text)
            try:
                if learn and chosen[i] >= 0:  # nothing to learn where no offer was made
                    learn_multi(ws, ex)
                else:
                    predict_multi(ws, ex)
                out = ex[0].get_action_scores()
            finally:
                finish(ws, ex)
            if len(out) != hi - lo:
                raise InvalidInput("policy", f"{self.name}: VW returned {len(out)} values for {hi - lo} arms")
            if greedy:  # scores are costs: the lowest wins, ties share
                low = min(out)
                best = [float(x == low) for x in out]
                share = sum(best)
                target[lo:hi] = [b / share for b in best]
            else:
                target[lo:hi] = out
        return np.clip(target, 0.0, 1.0, out=target)

    def finish(self) -> tuple[str, ...]:
        self.ws.finish()
        return missing_arm_features_warning(self.missing)


def paced_no_offer(d: LoggedDecision) -> bool:
    """Pacing chose "no offer" although arms were eligible: its PMF has the extra last entry."""
    return d.chosen is None and len(d.arms) > 0 and len(d.pmf) == len(d.arms) + 1 and d.probability > 0.0


def parse_policy(spec: str) -> Policy:
    """``logged``, ``uniform``, ``constant:ARM``, ``vw:ARGS`` or ``model:PATH``."""
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    rest = rest.strip()
    if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "'\"":
        rest = rest[1:-1]
    if text in ("logged", "uniform"):
        return LoggedPolicy() if text == "logged" else UniformPolicy()
    if sep and kind == "constant" and rest:
        return ConstantPolicy(rest, name=f"constant:{rest}")
    if sep and kind == "vw" and rest:
        return VwPolicy(f"vw:{rest}", _vw_args(rest, "policy"), learn=True)
    if sep and kind == "model" and rest:
        return VwPolicy(f"model:{rest}", ["-i", rest], learn=False)
    raise InvalidInput("policy", f'{spec!r}: expected logged, uniform, constant:ARM_ID, vw:"ARGS" or model:PATH')


# --------------------------------------------------------------------------- reward model


class RewardModel:
    """DR's reward model, cross-fitted: event ``i`` (counted from the start of the log) falls in
    fold ``i % folds`` and is scored by the model that learned only the other folds, so DR's
    correction is not fooled by memorised rewards.

    Each model is VW's direct method (``--cb_adf --cb_type dm``): a regression of the chosen
    arm's reward on the context and arm features. ``learn`` takes the log's chunks in order (a
    first pass), then ``predict`` scores them (a second pass over the same chunks); memory holds
    the models, not the log.
    """

    def __init__(self, args: str = DEFAULT_REWARD_MODEL_ARGS, folds: int = 2) -> None:
        if folds < 2:
            raise InvalidInput("folds", f"must be at least 2, got {folds}")
        base = ["--cb_adf", "--cb_type", "dm", *_vw_args(args, "reward_model_args")]
        self.folds = folds
        self.models: list[Workspace] = []
        try:
            for _ in range(folds):
                self.models.append(_workspace(base, "reward_model_args"))
        except BaseException:
            self.close()
            raise

    def learn(self, chunk: ReplayLog, start: int) -> None:
        """Learn the chunk's events (the ``start``-th of the log first) in every other fold's model."""
        texts = chunk.vw_examples()
        folds = self.folds
        for i in np.flatnonzero(chunk.offered).tolist():
            own = (start + i) % folds
            for k, ws in enumerate(self.models):
                if k != own:
                    ex = ws.parse(texts[i])
                    ws.learn(ex)
                    ws.finish_example(ex)

    def predict(self, chunk: ReplayLog, start: int) -> FloatArray:
        """The predicted reward of every slot of the chunk, by its own fold's model."""
        texts = chunk.vw_examples()
        offsets = chunk.offsets.tolist()
        rhat = np.zeros(len(chunk.arm_index), np.float64)
        for i, text in enumerate(texts):  # predict ignores the label
            ws = self.models[(start + i) % self.folds]
            ex = ws.parse(text)
            rhat[offsets[i] : offsets[i + 1]] = ws.predict(ex)
            ws.finish_example(ex)
        return np.negative(rhat, out=rhat)  # VW predicts costs

    def close(self) -> None:
        for ws in self.models:
            ws.finish()
        self.models = []


def reward_model(log: ReplayLog, args: str = DEFAULT_REWARD_MODEL_ARGS, folds: int = 2) -> FloatArray:
    """Predicted reward of every slot of a whole log, cross-fitted (see RewardModel)."""
    model = RewardModel(args, folds)
    try:
        model.learn(log, 0)
        return model.predict(log, 0)
    finally:
        model.close()


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True)
class PolicyEstimate:
    """One estimator's value of one policy."""

    policy: str
    estimate: Estimate

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x  # NaN is not JSON

        return {
            "policy": self.policy,
            "estimator": e.estimator,
            "value": num(e.value),
            "ci_low": num(e.ci_low),
            "ci_high": num(e.ci_high),
            "n": e.n,
            "ess": num(e.ess),
            "clipped": e.clipped,
            "warnings": list(e.warnings),
        }


Chunks = Callable[[], Iterator[ReplayLog]]


@dataclass(frozen=True, slots=True)
class Replay:
    """What a replay found: the estimates, and the span of the log they came from."""

    results: list[PolicyEstimate]
    n: int
    first: float  # timestamp of the first event replayed
    last: float


def evaluate(
    log: ReplayLog,
    policies: Sequence[Policy],
    estimators: Sequence[str] = ESTIMATORS,
    *,
    clip: float | None = None,
    reward_model_args: str = DEFAULT_REWARD_MODEL_ARGS,
    folds: int = 2,
) -> list[PolicyEstimate]:
    """Every estimator of every policy on a log held in memory (see ``replay``)."""
    return replay(lambda: iter((log,)), policies, estimators, clip=clip, reward_model_args=reward_model_args, folds=folds).results


@dataclass
class _Candidate:
    policy: Policy
    run: Scorer
    acc: Accumulator
    unseen: float = 0.0  # the candidate's mass on arms the logging policy gave probability 0


def replay(
    chunks: Chunks,
    policies: Sequence[Policy],
    estimators: Sequence[str] = ESTIMATORS,
    *,
    clip: float | None = None,
    reward_model_args: str = DEFAULT_REWARD_MODEL_ARGS,
    folds: int = 2,
    progress: Callable[[str, int], None] | None = None,
) -> Replay:
    """Every estimator of every policy over a log read in chunks, in bounded memory.

    ``chunks()`` gives the log's chunks in time order, afresh at each call: DR's reward model
    learns the whole log in a first pass, then one pass scores every candidate and feeds the
    estimators' running sums, so memory holds a chunk, the models and a few sums per estimate,
    whatever the length of the log. ``progress(stage, events)`` hears after each chunk.
    """
    names = estimator_names(estimators)  # before the reward model is made
    model = RewardModel(reward_model_args, folds) if "dr" in names else None
    candidates: list[_Candidate] = []
    running = candidates  # the runs still to finish (the same list until the end)
    try:
        # Every policy starts before anything is read: a bad one fails before the (slow) reward model.
        for p in policies:
            candidates.append(_Candidate(p, p.scorer(), Accumulator(names, clip=clip)))
        if model is not None:
            start = 0
            with _reading(chunks) as stream:
                for chunk in stream:
                    model.learn(chunk, start)
                    start += chunk.n
                    if progress is not None:
                        progress("reward model", start)
        n = skipped = may_skip = 0
        paced_log = False
        first = last = math.nan
        with _reading(chunks) as stream:
            for chunk in stream:
                if not chunk.n:
                    continue
                rhat = model.predict(chunk, n) if model is not None else None
                slot, never, offered, starts = chunk.chosen_slot, chunk.logged_pmf <= 0.0, chunk.offered, chunk.offsets[:-1]
                for c in candidates:
                    target = c.run.distribution(chunk)
                    # The probability the candidate gives the logged action: the chosen arm, or "no offer".
                    none_mass = np.clip(1.0 - np.add.reduceat(target, starts), 0.0, 1.0)
                    target_logged = np.where(offered, target[slot], none_mass)
                    if never.any():
                        c.unseen += float(target[never].sum())
                    hat_logged = hat_target = None
                    if rhat is not None:
                        hat_logged = np.where(offered, rhat[slot], 0.0)  # "no offer" earns nothing, surely
                        hat_target = np.add.reduceat(target * rhat, starts)
                    c.acc.add(chunk.rewards, chunk.logged_prob, target_logged, hat_logged, hat_target)
                skipped += int(chunk.n - np.count_nonzero(offered))
                if chunk.no_offer is not None:
                    paced_log = True
                    may_skip += int(np.count_nonzero(chunk.no_offer))
                first = float(chunk.timestamps[0]) if n == 0 else first
                last = float(chunk.timestamps[-1])
                n += chunk.n
                if progress is not None:
                    progress("replay", n)
        done = []
        while running:  # each run finished once: one that raises is not finished again below
            c = running.pop(0)
            done.append((c, c.run.finish()))
    finally:
        for c in running:
            with suppress(Exception):  # the error that got here is the one to report
                c.run.finish()
        if model is not None:
            model.close()
    if n == 0:
        raise InvalidInput("log", "no closed decisions to evaluate")
    paced = _no_offer_warning(n, skipped, may_skip, paced_log)
    out = []
    for c, warn in done:
        warn += paced
        if c.unseen > 0.0:
            warn += (
                f"no_support: {c.unseen / n:.1%} of the candidate's mass is on arms the logging policy gave "
                + "probability 0; IPS and SNIPS count it as zero reward, DR trusts its reward model there",
            )
        for est in c.acc.estimates():
            out.append(PolicyEstimate(c.policy.name, replace(est, warnings=est.warnings + warn) if warn else est))
    return Replay(out, n, first, last)


@contextmanager
def _reading(chunks: Chunks) -> Iterator[Iterator[ReplayLog]]:
    """A pass over the chunks that closes its source (a cursor, a file) when it ends, also on an
    error, instead of whenever the abandoned generator is collected."""
    stream = chunks()
    try:
        yield stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _no_offer_warning(n: int, skipped: int, may_skip: int, paced_log: bool) -> tuple[str, ...]:
    if skipped:
        return (
            f"no_offer: in {skipped} of {n} events pacing made no offer; they count with reward 0, and a "
            + "candidate makes no offer with the probability its distribution leaves over (none, for one that "
            + "always offers)",
        )
    if paced_log:  # e.g. a DSJSON export: the events without an offer are not in it
        return (
            f"no_offer: in {may_skip} of {n} events pacing could also make no offer, and "
            + "this log has no event where it made none; if they were left out (a DSJSON export leaves them out), "
            + "IPS overstates candidates that always offer (SNIPS does not): replay from the database instead",
        )
    return ()

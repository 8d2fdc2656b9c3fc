"""The decision log as replay holds it: column-wise, one row per closed decision and one *slot*
per eligible arm of it, so that the simple policies and the estimators are a few vectorised
numpy passes over a chunk of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np
from numpy.typing import NDArray

from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature, arm_line, features_from_mapping, shared_line, shared_line_of_rows

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
ArmKey = tuple[str, int]


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
    # Per event, None or the decision's own arm-level features as logged (its DecisionContext's
    # ``arm_features``: per arm, [namespace, name, value] rows, e.g. interaction history), which
    # the model saw after the arm's own features; None for a log without any.
    event_arm_features: Sequence[Sequence[Sequence[Sequence[Any]]] | None] | None = None

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
        if self.event_arm_features is not None and len(self.event_arm_features) != n:
            raise InvalidInput("log", "one entry of decision-time arm features per event is required")

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
        event_arm_features: Sequence[Sequence[Sequence[Sequence[Any]]] | None] | None = None,
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
            event_arm_features=event_arm_features,
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
        event_arm_features: Sequence[Sequence[Sequence[Sequence[Any]]] | None] | None = None,
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
            event_arm_features=event_arm_features,
        )

    @classmethod
    def from_decisions(
        cls, decisions: Iterable[LoggedDecision], arm_features: Mapping[ArmKey, Mapping[str, float | str | bool]] | None = None
    ) -> ReplayLog:
        """The closed decisions (an arm and a reward, or pacing's "no offer") among ``decisions``,
        in their given order."""
        rows = [d for d in decisions if (d.chosen is not None and d.reward is not None) or paced_no_offer(d)]
        own = [d.context.arm_features if d.context is not None and any(d.context.arm_features) else None for d in rows]
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
            event_arm_features=own if any(own) else None,
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
        per event: only the context and the label differ from one event to the next, except for
        a decision that logged arm features of its own (interaction history, issue #30), whose
        arm lines are made for it: each arm's features, then that decision's."""
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
        own = self.event_arm_features
        out = []
        for i, context in enumerate(contexts):
            c = chosen[i]
            extra = own[i] if own is not None else None
            if extra:  # this decision's own arm features (history): its arm lines are its own
                block = _block(self._own_arm_lines(i, sets[set_ids[i]], extra), c)
            else:
                cached = blocks.get((set_ids[i], c))
                if cached is None:
                    cached = blocks[(set_ids[i], c)] = _block([lines[k] for k in sets[set_ids[i]]], c)
                block = cached
            if c < 0:
                out.append(f"{context}\n{block[0]}")
            else:
                out.append(f"{context}\n{block[0]}0:{-rewards[i]!r}:{probs[i]!r} {block[1]}")
        return out

    def _own_arm_lines(self, i: int, codes: Sequence[int], extra: Sequence[Sequence[Sequence[Any]]]) -> list[str]:
        """Event ``i``'s arm lines as the model saw them at decision time: each arm's own
        features, then the decision's arm-level features of that arm (``extra``, as logged)."""
        if len(extra) != len(codes):
            raise InvalidInput("log", f"event {self.event_ids[i]}: decision-time arm features for {len(extra)} arms, it has {len(codes)}")
        lines = []
        for k, rows in zip(codes, extra, strict=True):
            key = self.arms[k]
            feats = (
                *self.arm_features.get(key, ()),
                *((str(ns), str(name), v if isinstance(v, str) else float(v)) for ns, name, v in rows),
            )
            lines.append(arm_line(key[0], feats))
        return lines


def _block(arms: Sequence[str], c: int) -> tuple[str, str]:
    """An event's arm lines around its label: those before the chosen arm (each ending in a
    newline) and the chosen one with those after it; all in the first if nothing was chosen."""
    if c < 0:
        return ("\n".join(arms), "")
    return ("".join(a + "\n" for a in arms[:c]), "\n".join(arms[c:]))


def missing_arm_features_warning(missing: Iterable[ArmKey]) -> tuple[str, ...]:
    keys = sorted(set(missing))
    if not keys:
        return ()
    names = ", ".join(f"{a} v{v}" for a, v in keys[:5])
    return (f"missing_arm_features: no stored features for {len(keys)} arm version(s) ({names}); " + "VW saw only their ids",)


def paced_no_offer(d: LoggedDecision) -> bool:
    """Pacing chose "no offer" although arms were eligible: its PMF has the extra last entry."""
    return d.chosen is None and len(d.arms) > 0 and len(d.pmf) == len(d.arms) + 1 and d.probability > 0.0

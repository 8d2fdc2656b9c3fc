"""Reading a DSJSON export for replay at the speed of parsing it.

``nextbest.bandit.offline.dsjson.from_dsjson`` turns a line into a whole LoggedDecision, which
costs several times the JSON parse itself. A replay needs a few fields of each line, so this
reader takes only those from the parsed object (orjson) and does everything per action (the
PMF in the logged order, its checks) with numpy over a whole chunk of lines. Lines without
nextbest's exact block (written by another tool) go through ``from_dsjson``, as do lines the fast
path cannot read, so that every error names its line as before.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any, BinaryIO

import numpy as np
import orjson

from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature, features_from_mapping
from nextbest.bandit.offline.dsjson import FORMAT_VERSION, ArmKey, from_dsjson
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.telemetry.gc_pauses import gc_paused

ArmFeatureRows = dict[ArmKey, dict[str, float | str | bool]]


class LogOutOfOrder(InvalidInput):
    """A DSJSON file whose events are not in time order cannot be streamed: VW candidates and
    DR's folds follow the order. The replay then reads it whole and sorts it."""


@dataclass
class _Columns:
    """One chunk's lines: a tuple of fields per line (one append), taken apart in ``_log``."""

    rows: list[tuple[int, str, float, float, float, int, int, int]] = field(default_factory=list)
    actions: list[list[int]] = field(default_factory=list)  # "a" of each line
    values: list[list[float]] = field(default_factory=list)  # "p" of each line
    extra: list[float] = field(default_factory=list)  # pacing's "no offer" probability, per line that has one
    extra_at: list[int] = field(default_factory=list)  # ... and its line's position in the chunk
    contexts: list[list[list[Any]]] = field(default_factory=list)  # features as logged, with features only


class DsjsonReader:
    """The events of one DSJSON file in ReplayLog chunks, in file order, with the filters of
    ``nextbest replay``; ``shown`` names the file in errors."""

    def __init__(
        self,
        path: str,
        shown: str,
        placement: str | None,
        since: float | None,
        until: float | None,
        with_features: bool,
        chunk: int,
    ) -> None:
        self.path, self.shown, self.placement = path, shown, placement
        self.since, self.until, self.with_features, self.chunk = since, until, with_features, chunk
        self.arm_sets: dict[tuple[tuple[str, ...], tuple[int, ...]], int] = {}
        self.lists: list[list[tuple[str, int]]] = []
        self.arm_rows: ArmFeatureRows = {}
        self.arm_features: dict[ArmKey, tuple[Feature, ...]] = {}
        self.last: tuple[float, str] | None = None

    def chunks(self) -> Iterator[ReplayLog]:
        """One pass over the file, one chunk at a time, each built with the collector paused."""
        lines = self._chunks()
        try:
            while True:
                with gc_paused():
                    log = next(lines, None)
                if log is None:
                    return
                yield log
        finally:
            lines.close()  # the file

    def _chunks(self) -> Generator[ReplayLog, None, None]:
        """The loop is written out flat, with local names, because it runs once per line: each
        function call or attribute lookup in it costs a few percent of the whole replay."""
        self.last = None
        loads, version, placement, since, until = orjson.loads, FORMAT_VERSION, self.placement, self.since, self.until
        arm_sets, with_features, size = self.arm_sets, self.with_features, self.chunk
        cols = _Columns()
        rows_append, actions_append, values_append = cols.rows.append, cols.actions.append, cols.values.append
        count = arm_count = last_id = 0
        last_arms: Any = None
        last: tuple[float, str] | None = None
        with open_binary(self.path) as f:
            for number, line in enumerate(f, 1):
                try:
                    # The head and "_nb" only: "c" (VW's copy of the features, half the line) is
                    # skipped. A quote inside a JSON string is escaped, so these markers can only
                    # be the keys export-log writes; any other line fails a check here and is
                    # parsed whole by the slow path.
                    cut, tail = line.find(b',"c":'), line.rfind(b',"_nb":')
                    if cut < 0 or tail < cut:
                        raise ValueError("layout")
                    exact = line[tail + 7 : line.rindex(b"}")]
                    # Of "_nb", only the keys before "features" and then "arms" and "pmf_extra":
                    # "features" only for VW and DR, "extra" (the rest of the log row) never;
                    # all of it in one parse, as a list of the head and those two pieces.
                    at_features = exact.find(b', "features": ')
                    at_arms = exact.find(b', "arms": ', at_features)
                    at_extra = exact.rfind(b', "extra": ')
                    if 0 < at_features < at_arms < at_extra:
                        pieces = b"[" + line[:cut] + b"}," + exact[:at_features] + b"},{" + exact[at_arms + 2 : at_extra] + b"}]"
                        obj, nb, rest = loads(pieces)
                        nb.update(rest)
                        if with_features:
                            nb["features"] = loads(exact[at_features + 14 : at_arms])
                    else:
                        obj, nb = loads(line[:cut] + b"}"), loads(exact)
                    if nb["v"] != version:
                        raise ValueError("version")
                    where = nb["placement"]
                    if placement and where and where != placement:
                        continue
                    ts = float(nb["ts"])
                    if (since is not None and ts < since) or (until is not None and ts >= until):
                        continue
                    arms = nb["arms"]
                    if arms != last_arms:  # most lines repeat the arm set of the line before
                        ids, versions, feats = zip(*arms, strict=True) if arms else ((), (), ())
                        list_id = arm_sets.get((ids, versions))
                        if list_id is None:
                            list_id = self._new_arm_set((ids, versions), feats)
                        last_arms, last_id, arm_count = arms, list_id, len(ids)
                    list_id = last_id
                    actions, values, extra = obj["a"], obj["p"], nb["pmf_extra"]
                    event_id, chosen = str(obj["EventId"]), int(obj["_labelIndex"])
                    cost, prob = float(obj["_label_cost"]), float(obj["_label_probability"])
                    k = len(actions)
                    if len(values) != k or arm_count != k:
                        raise ValueError("sizes")  # the slow path names what is wrong
                    if with_features:
                        cols.contexts.append(nb["features"])
                except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # orjson's error is a ValueError
                    if not line.strip():
                        continue
                    self.last = last
                    if self._read_slowly(number, line, cols):
                        count += 1
                    last = self.last
                else:
                    key = (ts, event_id)
                    if last is not None and key < last:
                        raise LogOutOfOrder("--log", f"{self.shown}, line {number}: event {event_id} is older than the one before it")
                    last = key
                    if extra:
                        cols.extra.append(float(extra[0]))
                        cols.extra_at.append(count)
                    rows_append((number, event_id, ts, cost, prob, chosen, list_id, k))
                    actions_append(actions)
                    values_append(values)
                    count += 1
                if count >= size:
                    yield self._log(cols)
                    cols, count = _Columns(), 0
                    rows_append, actions_append, values_append = cols.rows.append, cols.actions.append, cols.values.append
        if count:
            yield self._log(cols)

    def _append(
        self,
        cols: _Columns,
        number: int,
        event_id: str,
        ts: float,
        cost: float,
        prob: float,
        chosen: int,
        list_id: int,
        actions: list[int],
        values: list[float],
        extra: list[float],
        features: tuple[Feature, ...] | None,
    ) -> None:
        """What the loop of ``chunks`` appends, for a line the slow path read."""
        key = (ts, event_id)
        if self.last is not None and key < self.last:
            raise LogOutOfOrder("--log", f"{self.shown}, line {number}: event {event_id} is older than the one before it")
        self.last = key
        if extra:
            cols.extra.append(float(extra[0]))
            cols.extra_at.append(len(cols.rows))
        cols.rows.append((number, event_id, ts, cost, prob, chosen, list_id, len(actions)))
        cols.actions.append(actions)
        cols.values.append(values)
        if features is not None:
            cols.contexts.append([list(f) for f in features])

    def _read_slowly(self, number: int, line: bytes, cols: _Columns) -> bool:
        """The full decoder: another tool's lines, and the exact error for a bad one. True if
        the line was taken (it may be another placement's or outside the period)."""
        try:
            dec, arm_rows = from_dsjson(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput("--log", f"{self.shown}, line {number}: not UTF-8 text") from None
        except InvalidInput as e:
            raise InvalidInput("--log", f"{self.shown}, line {number}: {e}") from None
        if self.placement and dec.placement and dec.placement != self.placement:
            return False
        if (self.since is not None and dec.timestamp < self.since) or (self.until is not None and dec.timestamp >= self.until):
            return False
        for k, v in arm_rows.items():
            if k not in self.arm_rows:
                self.arm_rows[k] = v
                self.arm_features[k] = features_from_mapping(v)
        key = (tuple(a for a, _ in dec.arms), tuple(v for _, v in dec.arms))
        list_id = self.arm_sets.get(key)
        if list_id is None:
            list_id = self._new_arm_set(key, None)
        features = dec.features if self.with_features else None
        self._append(cols, number, *_fields(dec), list_id, *_actions(dec), features)
        return True

    def _new_arm_set(self, key: tuple[tuple[str, ...], tuple[int, ...]], feats: tuple[Any, ...] | None) -> int:
        ids, versions = key
        arms = [(str(a), int(v)) for a, v in zip(ids, versions, strict=True)]
        if feats is not None:
            for arm, f in zip(arms, feats, strict=True):
                if arm not in self.arm_rows:
                    self.arm_rows[arm] = dict(f)
                    self.arm_features[arm] = features_from_mapping(f)
        self.arm_sets[key] = len(self.lists)
        self.lists.append(arms)
        return len(self.lists) - 1

    # ------------------------------------------------------------------ per chunk

    def _log(self, cols: _Columns) -> ReplayLog:
        n = len(cols.rows)
        lines, event_ids, times, costs, probs, chosen_col, list_ids, size_col = (list(map(itemgetter(k), cols.rows)) for k in range(8))
        sizes = np.fromiter(size_col, np.int64, n)
        starts = np.zeros(n, np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        total = int(sizes.sum())
        actions = np.fromiter(chain.from_iterable(cols.actions), np.int64, total) - 1
        owner = np.repeat(np.arange(n), sizes)
        chosen = np.fromiter(chosen_col, np.int64, n)
        # "a" must list each of the line's actions once, the chosen one first.
        inside = (actions >= 0) & (actions < sizes[owner])
        if not inside.all():
            self._refuse(lines, event_ids, int(owner[np.argmin(inside)]), "a", "a and p must list each action once")
        pos = starts[owner] + actions
        hits = np.bincount(pos, minlength=total)
        if total and int(hits.max()) > 1:
            self._refuse(lines, event_ids, int(owner[np.argmax(hits > 1)]), "a", "a and p must list each action once")
        first = actions[starts] if n else actions[:0]
        if not np.array_equal(first, chosen):
            self._refuse(lines, event_ids, int(np.argmax(first != chosen)), "a", "the chosen action must come first")
        rewards = -np.fromiter(costs, np.float64, n)
        probabilities = np.fromiter(probs, np.float64, n)
        bad = ~(np.isfinite(rewards) & (probabilities > 0.0) & (probabilities <= 1.0))
        if bad.any():
            self._refuse(lines, event_ids, int(np.argmax(bad)), "_label_cost", "need a finite cost and a probability in (0, 1]")
        pmf = np.empty(total, np.float64)
        pmf[pos] = np.fromiter(chain.from_iterable(cols.values), np.float64, total)
        pmf_sizes = sizes
        if cols.extra:  # pacing's "no offer" goes last in its event's PMF
            at = np.array(cols.extra_at, dtype=np.int64)
            pmf = np.insert(pmf, starts[at] + sizes[at], cols.extra)
            pmf_sizes = sizes.copy()
            pmf_sizes[at] += 1
        return ReplayLog.from_columns(
            event_ids,
            np.fromiter(times, np.float64, n),
            rewards,
            probabilities,
            chosen,
            np.fromiter(list_ids, np.int64, n),
            self.lists,
            pmf,
            pmf_sizes,
            arm_features=self.arm_features,
            contexts=cols.contexts if self.with_features else None,
        )

    def _refuse(self, lines: list[int], event_ids: list[str], i: int, name: str, why: str) -> None:
        raise InvalidInput("--log", f"{self.shown}, line {lines[i]}: {name}: {event_ids[i]}: {why}")


def _fields(dec: LoggedDecision) -> tuple[str, float, float, float, int]:
    assert dec.chosen is not None and dec.reward is not None  # from_dsjson gives closed decisions only
    if not math.isfinite(dec.reward):
        raise InvalidInput("_label_cost", f"{dec.event_id}: need a finite cost and a probability in (0, 1]")
    return dec.event_id, dec.timestamp, -dec.reward, dec.probability, dec.chosen


def _actions(dec: LoggedDecision) -> tuple[list[int], list[float], list[float]]:
    """``a`` and ``p`` as the line had them (1-based, chosen first), and the "no offer" entry."""
    k = len(dec.arms)
    assert dec.chosen is not None
    order = [dec.chosen] + [i for i in range(k) if i != dec.chosen]
    return [i + 1 for i in order], [dec.pmf[i] for i in order], list(dec.pmf[k:])


def open_binary(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise InvalidInput("--log", f"cannot read {path}: {e.strerror}") from None

"""Reading a DSJSON file for replay at the speed of parsing it.

Each line is parsed whole as JSON (orjson), whoever wrote it: any key order, any spacing. A
replay needs a few fields of each line; the loop takes only those from the parsed object, and
everything per action (the PMF in the logged order, its checks) is done with numpy over a whole
chunk of lines. Lines without nextbest's ``_nb`` block (written by another tool: decoded from
``c``) and lines the fast path cannot read go through ``nextbest.bandit.offline.dsjson``'s full
decoder, so that every error names its line.

Every line is checked before it counts (``nextbest.bandit.offline.dsjson.pmf_problem``): a
label probability in (0, 1], each ``p`` in [0, 1], a PMF that sums to 1 and gives the chosen
action the label's probability. A refused line is named by file and line number, in a message
of bounded size. A line longer than ``max_line`` bytes is refused after reading that many bytes
of it, so memory per line is bounded whatever the file holds.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Generator, Iterator, Sequence
from functools import partial
from operator import itemgetter
from typing import Any, BinaryIO

import numpy as np
import orjson

from nextbest.bandit.decision_log import LoggedDecision, logged_arm_rows
from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.features import Feature, features_from_mapping
from nextbest.bandit.offline.dsjson import FORMAT_VERSION, PMF_TOLERANCE, ArmKey, decode, from_dsjson
from nextbest.bandit.offline.replay_log import FloatArray, IntArray, ReplayLog
from nextbest.telemetry.gc_pauses import gc_paused

ArmFeatureRows = dict[ArmKey, dict[str, float | str | bool]]

MAX_LINE = 1 << 20  # bytes: the longest line read by default (``nextbest replay --max-line-bytes``)
_HEAD = itemgetter("EventId", "_labelIndex", "_label_cost", "_label_probability", "a", "p", "_nb")
_EXACT = itemgetter("v", "placement", "ts", "arms", "pmf_extra")
_SHOWN = 200  # characters of a line's own text (an event id) quoted in an error


class LogOutOfOrder(InvalidInput):
    """A DSJSON file whose events are not in time order, read by a replay that needs the order
    (VW candidates learn the log in it)."""


class _Columns:
    """One chunk's lines, a typed array per field (numpy reads them without a copy), appended
    to as each line is read: its parsed objects are freed with the line, not kept for the chunk."""

    __slots__ = (
        "actions",
        "chosen",
        "contexts",
        "costs",
        "event_ids",
        "extra",
        "extra_at",
        "lines",
        "list_ids",
        "own",
        "probs",
        "sizes",
        "times",
        "values",
    )

    def __init__(self) -> None:
        self.lines, self.chosen, self.list_ids, self.sizes = array("q"), array("q"), array("q"), array("q")
        self.times, self.costs, self.probs = array("d"), array("d"), array("d")
        self.event_ids: list[str] = []
        self.actions, self.values = array("q"), array("d")  # "a" and "p" of every line, one after the other
        self.extra: list[float] = []  # pacing's "no offer" probability, per line that has one
        self.extra_at: list[int] = []  # ... and its line's position in the chunk
        self.contexts: list[Any] = []  # features as logged, with features only
        self.own: list[Any] = []  # ... and the decision's own arm features (history) as logged, or None

    def appenders(self) -> tuple[Callable[[Any], None], ...]:
        """The loop's bound methods (a local name is faster than an attribute, once per line):
        "a"'s and "p"'s extend, then the appends of the label's index, cost and probability,
        and of the line number, event id, time, arm set and size."""
        return (
            self.actions.extend,
            self.values.extend,
            self.chosen.append,
            self.costs.append,
            self.probs.append,
            self.lines.append,
            self.event_ids.append,
            self.times.append,
            self.list_ids.append,
            self.sizes.append,
        )

    def truncate(self, n: int, slots: int) -> None:
        """Back to its first ``n`` lines (``slots`` actions): a line the fast path left half appended."""
        for col in (self.lines, self.chosen, self.list_ids, self.sizes, self.times, self.costs, self.probs):
            del col[n:]
        del self.event_ids[n:], self.actions[slots:], self.values[slots:], self.contexts[n:], self.own[n:]


class DsjsonReader:
    """The events of one DSJSON file in ReplayLog chunks, in file order, with the filters of
    ``nextbest replay``; ``shown`` names the file in errors. Calling it starts a pass over the
    file (so it is the ``chunks`` a replay takes); a pass that finds no event raises NotFound.

    With ``time_order`` an event older than the one before it raises LogOutOfOrder; without, the
    file is read in any order. ``first`` and ``last`` are the earliest and latest times of the
    events of the last pass (not the first and last lines' of a file out of order)."""

    def __init__(
        self,
        path: str,
        shown: str,
        placement: str | None,
        since: float | None,
        until: float | None,
        with_features: bool,
        chunk: int,
        *,
        time_order: bool = True,
        max_line: int = MAX_LINE,
    ) -> None:
        self.path, self.shown, self.placement = path, shown, placement
        self.since, self.until, self.with_features, self.chunk = since, until, with_features, chunk
        self.time_order, self.max_line = time_order, max_line
        self.arm_sets: dict[tuple[tuple[str, ...], tuple[int, ...]], int] = {}
        self.lists: list[list[tuple[str, int]]] = []
        self.arm_rows: ArmFeatureRows = {}
        self.arm_features: dict[ArmKey, tuple[Feature, ...]] = {}
        self.last_key: tuple[float, str] | None = None  # the order check's last event
        self.first, self.last = math.inf, -math.inf

    def __call__(self) -> Iterator[ReplayLog]:
        return self.chunks()

    def chunks(self) -> Iterator[ReplayLog]:
        """One pass over the file, one chunk at a time, each built with the collector paused."""
        lines = self._chunks()
        self.first, self.last = math.inf, -math.inf
        try:
            while True:
                with gc_paused():
                    log = next(lines, None)
                if log is None:
                    break
                yield log
        finally:
            lines.close()  # the file
        if self.first > self.last:
            where = f" of {self.placement!r}" if self.placement else ""
            raise NotFound(f"{self.shown} has no closed decisions{where} in the chosen period")

    def _chunks(self) -> Generator[ReplayLog, None, None]:
        """The loop is written out flat, with local names, because it runs once per line: each
        function call or attribute lookup in it costs a few percent of the whole replay."""
        self.last_key = None
        loads, version, placement, since, until = orjson.loads, FORMAT_VERSION, self.placement, self.since, self.until
        head, exact = _HEAD, _EXACT
        arm_sets, with_features, size, ordered, limit = self.arm_sets, self.with_features, self.chunk, self.time_order, self.max_line
        cols = _Columns()
        a_extend, p_extend, chosen_append, cost_append, prob_append, line_append, id_append, ts_append, set_append, k_append = (
            cols.appenders()
        )
        count = slots = arm_count = last_id = 0
        last_arms: Any = None
        last: tuple[float, str] | None = None
        with open_binary(self.path) as f:
            # readline(limit + 1) holds at most that much of a line: a longer one is refused unread.
            for number, line in enumerate(iter(partial(f.readline, limit + 1), b""), 1):
                if len(line) > limit and line[-1] != 10:  # 10: b"\n"
                    if count:  # an earlier line of the chunk may be refused first
                        self._log(cols)
                    raise self._error(number, f"longer than {limit:,} bytes (--max-line-bytes raises the limit)")
                obj = None
                try:
                    obj = loads(line)
                    event_id, chosen, cost, prob, actions, values, nb = head(obj)
                    v, where, ts, arms, extra = exact(nb)
                    if v != version or event_id.__class__ is not str:
                        raise ValueError("version")
                    if placement and where and where != placement:
                        continue
                    ts = float(ts)
                    if (since is not None and ts < since) or (until is not None and ts >= until):
                        continue
                    if arms != last_arms:  # most lines repeat the arm set of the line before
                        ids, versions, feats = zip(*arms, strict=True) if arms else ((), (), ())
                        list_id = arm_sets.get((ids, versions))
                        if list_id is None:
                            list_id = self._new_arm_set((ids, versions), feats)
                        last_arms, last_id, arm_count = arms, list_id, len(ids)
                    list_id = last_id
                    k = len(actions)
                    if len(values) != k or arm_count != k or not k or len(extra) > 1:
                        raise ValueError("sizes")  # the full decoder names what is wrong
                    no_offer = float(extra[0]) if extra else 0.0
                    context = own = None
                    if with_features:
                        context = nb["features"]
                        used = (nb.get("extra") or {}).get("context")  # the decision's context, if not the request's alone
                        own = logged_arm_rows(used) if used else None
                    # Typed arrays take only numbers (integers for "a" and the label's index):
                    # anything else raises here, and the full decoder reads the line.
                    a_extend(actions)
                    p_extend(values)
                    chosen_append(chosen)
                    cost_append(cost)
                    prob_append(prob)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):  # orjson's error is a ValueError
                    cols.truncate(count, slots)
                    if not line.strip():
                        continue
                    self.last_key = last
                    try:
                        taken = self._read_slowly(number, line, obj, cols)
                    except InvalidInput:
                        if count:  # an earlier line of the chunk may be refused first
                            self._log(cols)
                        raise
                    count += taken
                    slots = len(cols.actions)
                    last = self.last_key
                else:
                    line_append(number)
                    id_append(event_id)
                    ts_append(ts)
                    set_append(list_id)
                    k_append(k)
                    if extra:
                        cols.extra.append(no_offer)
                        cols.extra_at.append(count)
                    if with_features:
                        cols.contexts.append(context)
                        cols.own.append(own or None)
                    count += 1
                    slots += k
                    if ordered:
                        key = (ts, event_id)
                        if last is not None and key < last:
                            self._log(cols)  # a line refused for what it holds is refused for that first
                            raise self._out_of_order(number, event_id)
                        last = key
                if count >= size:
                    log = self._log(cols)
                    # The chunk's lines are freed before it is handed on, while the collector
                    # is still paused: kept, they would be scanned when it runs again.
                    cols, count, slots = _Columns(), 0, 0
                    a_extend, p_extend, chosen_append, cost_append, prob_append, line_append, id_append, ts_append, set_append, k_append = (
                        cols.appenders()
                    )
                    yield log
        if count:
            yield self._log(cols)

    def _error(self, number: int, why: str) -> InvalidInput:
        return InvalidInput("--log", f"{self.shown}, line {number}: {why}")

    def _out_of_order(self, number: int, event_id: Any) -> LogOutOfOrder:
        return LogOutOfOrder("--log", f"{self.shown}, line {number}: event {_clip(str(event_id))} is older than the one before it")

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
        own: tuple[tuple[Feature, ...], ...] | None = None,
    ) -> None:
        """What the loop of ``chunks`` appends, for a line the slow path read."""
        if self.time_order:
            key = (ts, event_id)
            if self.last_key is not None and key < self.last_key:
                raise self._out_of_order(number, event_id)
            self.last_key = key
        if extra:
            cols.extra.append(float(extra[0]))
            cols.extra_at.append(len(cols.sizes))
        cols.lines.append(number)
        cols.event_ids.append(event_id)
        cols.times.append(ts)
        cols.costs.append(cost)
        cols.probs.append(prob)
        cols.chosen.append(chosen)
        cols.list_ids.append(list_id)
        cols.sizes.append(len(actions))
        cols.actions.extend(actions)
        cols.values.extend(values)
        if features is not None:
            cols.contexts.append([list(f) for f in features])
            cols.own.append(own or None)

    def _read_slowly(self, number: int, line: bytes, obj: Any, cols: _Columns) -> bool:
        """The full decoder: another tool's lines, and the exact error for a bad one. True if
        the line was taken (it may be another placement's or outside the period). ``obj`` is
        the line as orjson parsed it, or None if orjson could not (the standard library then
        tries: it reads what orjson refuses, such as a number too large for a float)."""
        try:
            dec, arm_rows = decode(obj) if isinstance(obj, dict) else from_dsjson(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise self._error(number, "not UTF-8 text") from None
        except InvalidInput as e:
            raise self._error(number, _clip(str(e), 3 * _SHOWN)) from None  # it may quote a value of the line
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
        own = dec.context.arm_features if self.with_features and dec.context is not None and any(dec.context.arm_features) else None
        self._append(cols, number, *_fields(dec), list_id, *_actions(dec), features, own)
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
        n = len(cols.sizes)
        lines, event_ids = cols.lines, cols.event_ids
        sizes = np.frombuffer(cols.sizes, np.int64)
        starts = np.zeros(n, np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        total = int(sizes.sum())
        actions = np.frombuffer(cols.actions, np.int64) - 1
        values = np.frombuffer(cols.values, np.float64)
        chosen = np.frombuffer(cols.chosen, np.int64)
        rewards = -np.frombuffer(cols.costs, np.float64)
        probabilities = np.frombuffer(cols.probs, np.float64)
        timestamps = np.frombuffer(cols.times, np.float64)
        pos = self._check(lines, event_ids, cols, sizes, starts, actions, values, chosen, rewards, probabilities)
        if n:
            self.first = min(self.first, float(timestamps.min()))
            self.last = max(self.last, float(timestamps.max()))
        pmf = np.empty(total, np.float64)
        pmf[pos] = values
        pmf_sizes = sizes
        if cols.extra:  # pacing's "no offer" goes last in its event's PMF
            at = np.array(cols.extra_at, dtype=np.int64)
            pmf = np.insert(pmf, starts[at] + sizes[at], cols.extra)
            pmf_sizes = sizes.copy()
            pmf_sizes[at] += 1
        return ReplayLog.from_columns(
            event_ids,
            timestamps,
            rewards,
            probabilities,
            chosen,
            np.frombuffer(cols.list_ids, np.int64),
            self.lists,
            pmf,
            pmf_sizes,
            arm_features=self.arm_features,
            contexts=cols.contexts if self.with_features else None,
            event_arm_features=cols.own if self.with_features and any(cols.own) else None,
        )

    def _check(
        self,
        lines: Sequence[int],
        event_ids: list[str],
        cols: _Columns,
        sizes: IntArray,
        starts: IntArray,
        actions: IntArray,
        values: FloatArray,
        chosen: IntArray,
        rewards: FloatArray,
        probabilities: FloatArray,
    ) -> IntArray:
        """The rules of ``pmf_problem`` and of the full decoder over a whole chunk: the first
        line that breaks one is refused, with that rule's message. Returns each value's slot
        (its action's position in the event)."""
        n, total = len(sizes), len(values)
        if not n:
            return np.zeros(0, np.int64)
        owner = np.repeat(np.arange(n), sizes)
        # "a" must list each of the line's actions once, the chosen one first.
        inside = (actions >= 0) & (actions < sizes[owner])
        pos = starts[owner] + np.where(inside, actions, 0)
        hits = np.bincount(pos[inside], minlength=total)
        repeated = np.zeros(n, bool)
        repeated[owner[inside & (hits[pos] > 1)]] = True
        bad_a = ~np.logical_and.reduceat(inside, starts) | repeated
        extra = np.zeros(n, np.float64)
        extra[cols.extra_at] = cols.extra
        in_range = (values >= 0.0) & (values <= 1.0)  # NaN is in no range
        sums = np.add.reduceat(values, starts) + extra
        first = values[starts]
        rules = (
            (bad_a, "a", "a and p must list each action once"),
            (actions[starts] != chosen, "a", "the chosen action must come first"),
            (
                ~(np.isfinite(rewards) & (probabilities > 0.0) & (probabilities <= 1.0)),
                "_label_cost",
                "need a finite cost and a probability in (0, 1]",
            ),
            (
                ~np.logical_and.reduceat(in_range, starts) | ~((extra >= 0.0) & (extra <= 1.0)),
                "p",
                "every probability must be a number in [0, 1]",
            ),
            (~(np.abs(sums - 1.0) <= PMF_TOLERANCE), "p", ""),
            (~(np.abs(first - probabilities) <= PMF_TOLERANCE * np.maximum(first, probabilities)), "p", ""),
        )
        at = min((int(np.argmax(bad)) for bad, _, _ in rules if bad.any()), default=-1)
        if at < 0:
            return pos
        rule = next(r for r, (bad, _, _) in enumerate(rules) if bad[at])
        _, name, why = rules[rule]
        if rule == 4:
            why = f"the probabilities sum to {float(sums[at]):.9g}, not 1 (within {PMF_TOLERANCE:g})"
        elif rule == 5:
            why = f"the chosen action's probability {float(first[at])!r} is not _label_probability {float(probabilities[at])!r}"
        raise self._error(lines[at], f"{name}: {_clip(event_ids[at])}: {why}")


def _clip(text: str, limit: int = _SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _fields(dec: LoggedDecision) -> tuple[str, float, float, float, int]:
    assert dec.chosen is not None and dec.reward is not None  # from_dsjson gives closed decisions only
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

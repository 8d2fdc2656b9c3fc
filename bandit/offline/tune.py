"""A staged search over a placement's learning settings, scored on its decision log.

Personalizer's Auto-Optimize replayed the last weeks of log over a search of learning settings
and applied a better one only when its lower confidence bound beat the current one's. This is
that search for nextbest's VW models (issue #33): each candidate setting is a VW cb_adf model
that learns the log in time order, every event scored before it is learned (progressive
validation), and its greedy choices are valued by the replay's estimators (SNIPS, DR) with
95 % intervals. Exploration stays out of the search: it is the placement's own (epsilon,
SquareCB, ...) and is the same whatever the model; what is searched is how the model learns.

Three stages, each on the best setting so far:

1. ``--cb_type`` (mtr, dr, ips) × learning rate ``-l``;
2. interactions: none, the shared × arm cross (``-q UA``, the placement's ``interactions``), and
   the self-crosses and cubic crosses of the namespaces the log has;
3. regularisation (``--l1``, ``--l2``) and ``--power_t``.

Candidates learn the log as the server learns it: unweighted (the chosen arm's label at
probability 1, ``nextbest.bandit.model.learn_label``), so that the winner, started as a shadow,
learns as it was scored. The module is pure (no server, no database): the log comes as a
``Chunks`` callable, which must pickle when candidates run in a process pool.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import pylibvw

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.estimators import Estimate
from nextbest.bandit.offline.policies import Scorer, workspace
from nextbest.bandit.offline.replay import replay
from nextbest.bandit.offline.replay_log import ArmKey, FloatArray, ReplayLog, missing_arm_features_warning
from nextbest.bandit.vw_options import options, split_vw_args

Chunks = Callable[[], Iterator[ReplayLog]]

CB_TYPES: Final = ("mtr", "dr", "ips")
LEARNING_RATES: Final = (0.05, 0.2, 0.5, 1.0, 2.0)  # VW's default is 0.5
# Stage 3: each alone on the best setting (VW's defaults: no l1/l2, power_t 0.5).
REGULARISATION: Final = (("l2", 1e-6), ("l2", 1e-5), ("l1", 1e-7), ("l1", 1e-6), ("power_t", 0.25), ("power_t", 0.0))
STAGES: Final = ("cb_type x learning rate", "interactions", "regularisation and power_t")
SCORES: Final = ("snips", "dr")
MIN_SEARCH_EVENTS: Final = 1_000  # fewer: every candidate's interval is too wide to rank them
DEFAULT_MIN_EVENTS: Final = 50_000  # before --apply may change anything


# --------------------------------------------------------------------------- settings


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Setting:
    """A model's learning options, the searched ones apart; ``extra`` keeps the rest of the
    placement's ``vw_args`` as written. ``quadratic`` holds every pair, the placement's
    ``interactions`` (``-q UA``) among them."""

    cb_type: str | None = None
    learning_rate: float | None = None
    quadratic: tuple[str, ...] = ("UA",)
    cubic: tuple[str, ...] = ()
    l1: float | None = None
    l2: float | None = None
    power_t: float | None = None
    extra: tuple[str, ...] = ()

    def args(self, *, with_ua: bool = True) -> list[str]:
        out: list[str] = []
        if self.cb_type is not None:
            out += ["--cb_type", self.cb_type]
        if self.learning_rate is not None:
            out += ["-l", _num(self.learning_rate)]
        for q in self.quadratic:
            if with_ua or q != "UA":
                out += ["-q", q]
        for c in self.cubic:
            out += ["--cubic", c]
        for name in ("l1", "l2", "power_t"):
            v = getattr(self, name)
            if v is not None:
                out += [f"--{name}", _num(v)]
        return out + list(self.extra)

    def text(self) -> str:
        return " ".join(self.args()) or "(VW defaults, no interactions)"

    @property
    def interactions(self) -> bool:
        """The placement's ``interactions`` flag: ``-q UA`` is among the pairs."""
        return "UA" in self.quadratic

    @property
    def vw_args(self) -> str:
        """The placement's (or a shadow's) ``vw_args``: every option but ``-q UA``, which
        ``interactions`` adds."""
        return " ".join(self.args(with_ua=False))

    @classmethod
    def of_placement(cls, vw_args: str, interactions: bool) -> Setting:
        """A placement's setting: its ``vw_args`` read option by option (the searched ones
        apart, the others kept), ``-q UA`` added when ``interactions`` is on."""
        try:
            tokens = split_vw_args(vw_args)
        except ValueError as e:
            raise InvalidInput("vw_args", str(e)) from None
        quadratic, cubic, extra = ["UA"] if interactions else [], [], []
        found: dict[str, Any] = {}
        for opt, value, written in options(tokens):
            if opt == "--cb_type":
                found["cb_type"] = value
            elif opt in ("-l", "--learning_rate"):
                found["learning_rate"] = float(value)
            elif opt in ("--l1", "--l2", "--power_t"):
                found[opt[2:]] = float(value)
            elif opt in ("-q", "--quadratic") or (opt == "--interactions" and len(value) == 2):
                if value not in quadratic:
                    quadratic.append(value)
            elif opt == "--cubic" or (opt == "--interactions" and len(value) == 3):
                cubic.append(value)
            else:
                extra += written
        return cls(
            cb_type=found.get("cb_type"),
            learning_rate=found.get("learning_rate"),
            quadratic=tuple(quadratic),
            cubic=tuple(cubic),
            l1=found.get("l1"),
            l2=found.get("l2"),
            power_t=found.get("power_t"),
            extra=tuple(extra),
        )


@dataclass(frozen=True)
class Candidate:
    name: str
    setting: Setting
    stage: int  # 0: the current setting


def vw_line(setting: Setting, bits: int) -> list[str]:
    """The VW command line a candidate replays with: the placement's model (cb_adf, greedy)."""
    return ["--cb_adf", "-b", str(bits), *setting.args()]


def stage_candidates(stage: int, best: Setting, namespaces: tuple[str, str] = ("U", "A")) -> list[Setting]:
    """The settings stage ``stage`` (1..3) tries around ``best``."""
    if stage == 1:
        return [replace(best, cb_type=t, learning_rate=lr) for t in CB_TYPES for lr in LEARNING_RATES]
    if stage == 2:
        return [replace(best, quadratic=q, cubic=c) for q, c in interaction_sets(*namespaces)]
    if stage == 3:
        return [_regularised(best, name, value) for name, value in REGULARISATION]
    raise ValueError(f"no stage {stage}")


def _regularised(s: Setting, name: str, value: float) -> Setting:
    if name == "l1":
        return replace(s, l1=value)
    if name == "l2":
        return replace(s, l2=value)
    return replace(s, power_t=value)


def interaction_sets(shared: str, arms: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Quadratic and cubic crosses built from the log's namespaces (``shared``: the letters of
    the context's, ``arms``: the arms'): none; shared × arm; with the context's self-crosses,
    the arms', both; with a cubic shared × shared × arm and shared × arm × arm."""
    base = tuple(s + a for s in shared for a in arms)
    uu = tuple(s1 + s2 for i, s1 in enumerate(shared) for s2 in shared[i:])
    aa = tuple(a1 + a2 for i, a1 in enumerate(arms) for a2 in arms[i:])
    suu = tuple(s1 + s2 + a for i, s1 in enumerate(shared) for s2 in shared[i:] for a in arms)
    saa = tuple(s + a1 + a2 for s in shared for i, a1 in enumerate(arms) for a2 in arms[i:])
    out: list[tuple[tuple[str, ...], tuple[str, ...]]] = [((), ()), (base, ())]
    out += [(base + uu, ()), (base + aa, ()), (base + uu + aa, ()), (base, suu), (base, saa)]
    seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    return [x for x in out if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]


_NAMESPACE = re.compile(r"\|([A-Za-z0-9_])")


def log_namespaces(log: ReplayLog, sample: int = 200) -> tuple[str, str]:
    """The namespace letters of the first ``sample`` events: the context's and the arms'."""
    shared: set[str] = set()
    arms: set[str] = set()
    for text in log.vw_examples()[:sample]:
        first, _, rest = text.partition("\n")
        shared.update(_NAMESPACE.findall(first))
        arms.update(_NAMESPACE.findall(rest))
    return "".join(sorted(shared)) or "U", "".join(sorted(arms)) or "A"


# --------------------------------------------------------------------------- scoring


class _TuneRun:
    """A candidate's run: VW learns each logged event as the server would (unweighted), after
    scoring it; the scores give the greedy distribution and the progressive squared error of
    the served arm's predicted reward (the loss the model's regression minimises)."""

    def __init__(self, args: list[str]) -> None:
        self.ws = workspace(args, "tune")
        self.missing: set[ArmKey] = set()
        self.loss = 0.0
        self.learned = 0

    def distribution(self, chunk: ReplayLog) -> FloatArray:
        texts = chunk.vw_examples()
        self.missing.update(chunk.missing_arm_features())
        ws = self.ws
        parse, learn, predict, finish = (
            pylibvw.vw._parse,
            pylibvw.vw.learn_multi,
            pylibvw.vw.predict_multi,
            pylibvw.vw._finish_example_multi_ex,
        )
        target = np.empty(len(chunk.arm_index), np.float64)
        offsets, chosen = chunk.offsets.tolist(), chunk.chosen.tolist()
        rewards, probs = chunk.rewards.tolist(), chunk.logged_prob.tolist()
        loss = 0.0
        for i, text in enumerate(texts):
            lo, hi, c = offsets[i], offsets[i + 1], chosen[i]
            if c >= 0:  # the label at probability 1, as the server learns (nextbest.bandit.model.learn_label)
                r = -rewards[i]
                text = text.replace(f"\n0:{r!r}:{probs[i]!r} ", f"\n0:{r!r}:1.0 ", 1)
            ex = parse(ws, text)
            try:
                (learn if c >= 0 else predict)(ws, ex)
                out = ex[0].get_action_scores()
            finally:
                finish(ws, ex)
            if len(out) != hi - lo:
                raise InvalidInput("policy", f"VW returned {len(out)} values for {hi - lo} arms")
            if c >= 0:
                loss += (out[c] + rewards[i]) ** 2  # scores are costs: -reward
                self.learned += 1
            low = min(out)
            best = [float(x == low) for x in out]
            share = sum(best)
            target[lo:hi] = [b / share for b in best]
        self.loss += loss
        return target

    def finish(self) -> tuple[str, ...]:
        self.ws.finish()
        return missing_arm_features_warning(self.missing)


@dataclass
class _TunePolicy:
    name: str
    args: list[str]
    needs_features: bool = True
    run: _TuneRun | None = None

    def scorer(self) -> Scorer:
        self.run = _TuneRun(self.args)
        return self.run


@dataclass(frozen=True)
class Scored:
    """A candidate's figures: the estimates by estimator, its progressive loss, the events."""

    candidate: Candidate
    estimates: dict[str, Estimate]
    loss: float  # mean progressive squared error of the served arm's predicted reward
    events: int
    warnings: tuple[str, ...] = ()

    def low(self, score: str) -> float:
        e = self.estimates.get(score)
        return -math.inf if e is None or math.isnan(e.ci_low) else e.ci_low

    def key(self, score: str) -> tuple[float, float, float]:
        """Higher is better: the lower 95 % bound, then the value, then the smaller loss."""
        e = self.estimates.get(score)
        value = -math.inf if e is None or math.isnan(e.value) else e.value
        return (self.low(score), value, -self.loss if math.isfinite(self.loss) else -math.inf)


@dataclass(frozen=True)
class Options:
    """How candidates are scored (picklable: sent to the pool's workers)."""

    bits: int = 18
    estimators: tuple[str, ...] = ("ips", "snips", "dr")
    clip: float | None = None
    reward_model_args: str | None = None  # None: the replay's default
    reward_model_loss: str = "auto"  # DR's reward model: auto, squared or logistic (reward_model.REWARD_MODEL_LOSSES)
    folds: int = 2


def score_batch(
    chunks: Chunks, candidates: Sequence[Candidate], options: Options, events: Callable[[str, int], None] | None = None
) -> list[Scored]:
    """Replay ``candidates`` together over the log (one pass, one DR reward model);
    ``events(stage, n)`` hears the replay's progress."""
    policies = [_TunePolicy(c.name, vw_line(c.setting, options.bits)) for c in candidates]
    kw: dict[str, Any] = {"clip": options.clip, "folds": options.folds, "reward_model_loss": options.reward_model_loss, "progress": events}
    if options.reward_model_args is not None:
        kw["reward_model_args"] = options.reward_model_args
    done = replay(chunks, policies, list(options.estimators), **kw)
    by_name: dict[str, dict[str, Estimate]] = {}
    for r in done.results:
        by_name.setdefault(r.policy, {})[r.estimate.estimator] = r.estimate
    out = []
    for c, p in zip(candidates, policies, strict=True):
        est = by_name.get(c.name, {})
        run = p.run
        loss = run.loss / run.learned if run is not None and run.learned else math.nan
        warnings = tuple(dict.fromkeys(w for e in est.values() for w in e.warnings))
        out.append(Scored(c, est, loss, done.n, warnings))
    return out


# --------------------------------------------------------------------------- the search


@dataclass
class TuneResult:
    """Every candidate scored, the current setting's figures and the best one's."""

    scored: list[Scored]
    current: Scored
    best: Scored
    score: str
    seconds: float
    stages: int
    events: int

    def ranked(self) -> list[Scored]:
        return sorted(self.scored, key=lambda s: s.key(self.score), reverse=True)


# A progress line, and whether it ends a stage (a terminal rewrites the others in place).
Progress = Callable[[str, bool], None]


def _show(progress: Progress | None, head: str, total: int, started: float, done: int, what: str = "", final: bool = False) -> None:
    if progress is not None:
        progress(f"{head}{done}/{total} candidates{what}, {time.monotonic() - started:.0f} s", final)


def _events(show: Callable[..., None], what: str, n: int) -> None:
    show(0, f"; {what} {n:,} events")


def _batches(cands: Sequence[Candidate], n: int) -> list[list[Candidate]]:
    groups: list[list[Candidate]] = [[] for _ in range(min(n, len(cands)))]
    for i, c in enumerate(cands):
        groups[i % len(groups)].append(c)
    return groups


def search(
    chunks: Chunks,
    current: Setting,
    *,
    namespaces: tuple[str, str] = ("U", "A"),
    stages: int = 3,
    jobs: int = 1,
    score: str = "snips",
    options: Options | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> TuneResult:
    """The staged search. Stage ``k`` tries its settings around the best of the stages before
    (the current setting is scored with stage 1). ``jobs`` > 1 runs each stage's candidates in
    that many processes (``chunks`` must pickle), each a batch replayed in one pass."""
    options = options or Options()
    if score not in SCORES:
        raise InvalidInput("score", f"expected one of {', '.join(SCORES)}")
    if score not in options.estimators:
        raise InvalidInput("score", f"{score} is not among the estimators")
    if not 1 <= stages <= len(STAGES):
        raise InvalidInput("stages", f"expected 1 to {len(STAGES)}")
    started = time.monotonic()
    own = None
    if executor is None and jobs > 1:
        # spawn: a fork would copy the parent's gRPC and VW state into every worker
        executor = own = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    seen: dict[str, Scored] = {}
    cur = Candidate("current", current, 0)
    best: Scored | None = None
    try:
        for stage in range(1, stages + 1):
            base = current if best is None else best.candidate.setting
            todo: list[Candidate] = [cur] if stage == 1 else []
            names = {" ".join(cur.setting.args())} if stage == 1 else set()
            for s in stage_candidates(stage, base, namespaces):
                key = " ".join(s.args())
                if key in seen or key in names:
                    continue
                names.add(key)
                todo.append(Candidate(f"s{stage}.{len(todo) + (0 if stage == 1 else 1)}", s, stage))
            show = functools.partial(_show, progress, f"stage {stage}/{stages} ({STAGES[stage - 1]}): ", len(todo), started)
            show(0)
            results: list[Scored] = []
            if executor is None:  # one batch: one pass over the log, one reward model
                results = score_batch(chunks, todo, options, functools.partial(_events, show))
            else:
                futures = [executor.submit(score_batch, chunks, b, options) for b in _batches(todo, jobs)]
                for f in as_completed(futures):
                    results += f.result()
                    if len(results) < len(todo):
                        show(len(results))
            order = {c.name: i for i, c in enumerate(todo)}
            results.sort(key=lambda r: order[r.candidate.name])  # as listed, whichever process finished first: ties go to the earlier
            for r in results:
                seen[" ".join(r.candidate.setting.args())] = r
            top = max(results, key=lambda r: r.key(score), default=None)
            if top is not None:
                show(len(results), f"; best {top.candidate.name} {score} low {top.low(score):.4f}", True)
            if top is not None and (best is None or top.key(score) > best.key(score)):
                best = top
    finally:
        if own is not None:
            own.shutdown(cancel_futures=True)
    current_scored = seen[" ".join(cur.setting.args())]
    assert best is not None
    events = current_scored.events
    return TuneResult(list(seen.values()), current_scored, best, score, time.monotonic() - started, stages, events)


# --------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Verdict:
    """Whether the winner may replace the current setting, and why (or why not)."""

    apply: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def verdict(result: TuneResult, min_events: int) -> Verdict:
    """Personalizer's rule: the winner only when its lower 95 % bound beats the current
    setting's, on at least ``min_events`` events."""
    best, cur, score = result.best, result.current, result.score
    details = {
        "score": score,
        "events": result.events,
        "min_events": min_events,
        "winner_low": best.low(score),
        "current_low": cur.low(score),
    }
    if result.events < min_events:
        return Verdict(False, f"the log has {result.events:,} events; applying needs at least {min_events:,} (--min-events)", details)
    if best.candidate.name == cur.candidate.name:
        return Verdict(False, "the current setting is the best one found: nothing to apply", details)
    if not best.low(score) > cur.low(score):
        return Verdict(
            False,
            f"the winner's lower 95 % bound ({score} {best.low(score):.4f}) does not beat the current setting's ({cur.low(score):.4f})",
            details,
        )
    return Verdict(
        True, f"the winner's lower 95 % bound ({score} {best.low(score):.4f}) beats the current setting's ({cur.low(score):.4f})", details
    )


def history_record(placement: str, result: TuneResult, decision: Verdict, at: float, applied: str | None) -> dict[str, Any]:
    """One line of the tuning history: what was current, what won, the figures, the outcome."""

    def fig(s: Scored) -> dict[str, Any]:
        e = s.estimates.get(result.score)
        return {
            "vw_args": s.candidate.setting.vw_args,
            "interactions": s.candidate.setting.interactions,
            "value": None if e is None or math.isnan(e.value) else e.value,
            "ci_low": None if e is None or math.isnan(e.ci_low) else e.ci_low,
            "ci_high": None if e is None or math.isnan(e.ci_high) else e.ci_high,
            "loss": None if math.isnan(s.loss) else s.loss,
        }

    return {
        "at": at,
        "placement": placement,
        "events": result.events,
        "score": result.score,
        "candidates": len(result.scored),
        "seconds": round(result.seconds, 1),
        "current": fig(result.current),
        "winner": fig(result.best),
        "applied": applied,
        "reason": decision.reason,
    }

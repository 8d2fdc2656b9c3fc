"""Offline replay: what would a candidate policy have earned on the logged traffic?

The log is read in chunks in time order (``nextbest.bandit.offline.replay_log``); every candidate
(``policies``) scores each chunk and every estimator keeps running sums (``estimators``), so
memory holds a chunk and the models, whatever the length of the log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.estimators import ESTIMATORS, Accumulator, Estimate, estimator_names
from nextbest.bandit.offline.policies import Policy, Scorer
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.bandit.offline.reward_model import DEFAULT_REWARD_MODEL_ARGS, RewardModel, loss_name


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
    reward_model_loss: str | None = None  # the loss DR's reward model used (auto resolved); None without DR


def evaluate(
    log: ReplayLog,
    policies: Sequence[Policy],
    estimators: Sequence[str] = ESTIMATORS,
    *,
    clip: float | None = None,
    reward_model_args: str = DEFAULT_REWARD_MODEL_ARGS,
    folds: int = 2,
    reward_model_loss: str = "auto",
) -> list[PolicyEstimate]:
    """Every estimator of every policy on a log held in memory (see ``replay``)."""
    return replay(
        lambda: iter((log,)),
        policies,
        estimators,
        clip=clip,
        reward_model_args=reward_model_args,
        folds=folds,
        reward_model_loss=reward_model_loss,
    ).results


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
    reward_model_loss: str = "auto",
    progress: Callable[[str, int], None] | None = None,
) -> Replay:
    """Every estimator of every policy over a log read in chunks, in bounded memory.

    ``chunks()`` gives the log's chunks in time order, afresh at each call: DR's reward model
    learns the whole log in a first pass, then one pass scores every candidate and feeds the
    estimators' running sums, so memory holds a chunk, the models and a few sums per estimate,
    whatever the length of the log. ``progress(stage, events)`` hears after each chunk.

    ``reward_model_loss`` is the loss of DR's reward model (``nextbest.bandit.offline.reward_model``):
    ``logistic`` for rewards of 0 or 1, ``squared`` (predictions clipped to the rewards' range)
    for others, or ``auto``, which chooses from the log: at the first reward other than 0 and 1
    it learns the log again, with squared loss.
    """
    names = estimator_names(estimators)  # before the reward model is made
    loss = loss_name(reward_model_loss)
    model = RewardModel(reward_model_args, folds, loss) if "dr" in names else None
    candidates: list[_Candidate] = []
    running = candidates  # the runs still to finish (the same list until the end)
    try:
        # Every policy starts before anything is read: a bad one fails before the (slow) reward model.
        for p in policies:
            candidates.append(_Candidate(p, p.scorer(), Accumulator(names, clip=clip)))
        if model is not None:
            _learn(model, chunks, progress)
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
    return Replay(out, n, first, last, model.loss if model is not None else None)


def _learn(model: RewardModel, chunks: Chunks, progress: Callable[[str, int], None] | None) -> None:
    """The reward model's pass over the log; a second one, from the start, if auto switched its loss."""
    while True:
        start = 0
        with _reading(chunks) as stream:
            for chunk in stream:
                model.learn(chunk, start)
                if model.restart:
                    break
                start += chunk.n
                if progress is not None:
                    progress("reward model", start)
        if not model.restart:
            return
        model.restart = False


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

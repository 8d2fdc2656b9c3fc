"""Candidate policies of a replay: each gives, for every event in time order, a distribution over
that event's own arm set. VW policies learn as they go (progressive validation), so no event is
scored by a model that has already learned it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pylibvw
from vowpalwabbit import Workspace

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.replay_log import ArmKey, FloatArray, ReplayLog, missing_arm_features_warning
from nextbest.bandit.vw_options import REPLAY_OPTIONS, split_vw_args


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


def vw_args(text: str, field_name: str) -> list[str]:
    """The allow list of ``nextbest.bandit.vw_options`` with the reductions a replay policy chooses:
    replay feeds VW the logged examples itself, and no option may name a file."""
    try:
        return split_vw_args(text, REPLAY_OPTIONS)
    except ValueError as e:
        raise InvalidInput(field_name, f"VW arguments rejected: {e}") from None


def workspace(args: list[str], field_name: str) -> Workspace:
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
        self.name, self.ws, self.learn = name, workspace(args, "policy"), learn
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
        return VwPolicy(f"vw:{rest}", vw_args(rest, "policy"), learn=True)
    if sep and kind == "model" and rest:
        return VwPolicy(f"model:{rest}", ["-i", rest], learn=False)
    raise InvalidInput("policy", f'{spec!r}: expected logged, uniform, constant:ARM_ID, vw:"ARGS" or model:PATH')

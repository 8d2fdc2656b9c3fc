"""The decision pipeline of one placement: eligible arms → scores → exploration → draw.

Later stages (budgets, pacing, fatigue) slot in between scoring and exploration; the logged
probability is always the final probability of the drawn arm among the eligible ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bandit import exploration
from bandit.features import Feature, arm_line
from bandit.model import CbModel
from bandit.spec import ArmSpec, ExplorationSpec, PlacementSpec


@dataclass(frozen=True, slots=True)
class Choice:
    """What the pipeline decided: the drawn arm, its probability and the whole PMF."""

    arm_index: int | None
    probability: float
    pmf: tuple[float, ...]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ArmView:
    """An arm as the decider sees it: its id, version and cached VW text."""

    id: str
    version: int
    line: str

    @classmethod
    def of(cls, arm: ArmSpec, version: int) -> ArmView:
        return cls(arm.id, version, arm_line(arm.id, arm.vw_features()))


def explore(values: np.ndarray, spec: ExplorationSpec, learned: int) -> np.ndarray:
    """The placement's exploration algorithm applied to expected rewards."""
    if spec.algorithm == "epsilon":
        return exploration.epsilon_greedy(values, spec.epsilon)
    if spec.algorithm == "softmax":
        return exploration.softmax(values, spec.lam)
    gamma = exploration.squarecb_gamma(spec.gamma_scale, spec.gamma_exponent, learned)
    return exploration.squarecb(values, gamma)


def decide(
    model: CbModel,
    spec: PlacementSpec,
    arms: Sequence[ArmView],
    shared: str,
    uniform: Callable[[], float],
) -> Choice:
    """Score the eligible arms with the model, explore, and draw one."""
    if not arms:
        return Choice(None, 0.0, (), reason="no active arm")
    values = model.expected_rewards(shared, [a.line for a in arms])
    pmf = explore(values, spec.exploration, model.learned)
    i = exploration.draw(pmf, uniform())
    return Choice(i, float(pmf[i]), tuple(float(p) for p in pmf))


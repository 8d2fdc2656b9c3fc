"""The reward scale of exploration (issue #33): a declared ``reward_range`` sets it from the first
decision; without one, a declared ``max_abs_reward`` is its prior, fading into the estimate from
recent rewards; the range's refusals name the field."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from nextbest.bandit.decider import ArmView, Candidate, decide
from nextbest.bandit.model import CbModel
from nextbest.bandit.reward_scale import WINDOW, RewardScale, exploration_scale
from nextbest.bandit.spec import PlacementSpec
from nextbest.config.files import ConfigFileError, parse_apply_text


def test_a_declared_range_is_the_scale_from_the_first_decision() -> None:
    assert exploration_scale(2.0, 0, (0.0, 15.0)) == 15.0
    assert exploration_scale(2.0, 10_000, (0.0, 15.0)) == 15.0  # whatever the rewards said
    assert exploration_scale(1.0, 0, (-5.0, 5.0)) == 10.0
    assert exploration_scale(1.0, 0, (0.0, 0.5)) == 0.5  # small rewards' gaps are scaled up alike


def test_without_a_range_a_declared_max_abs_reward_is_the_prior_fading_into_the_data() -> None:
    early = RewardScale([0.0, 2.0, 0.0, 1.5]).value  # the first few rewards: margins of 2 where they reach 15
    assert early == pytest.approx(2.0)
    assert exploration_scale(early, 0, None, 15.0) == 15.0  # the prior alone at the start
    assert exploration_scale(early, WINDOW // 2, None, 15.0) == pytest.approx(0.5 * 15.0 + 0.5 * early)
    assert exploration_scale(early, WINDOW, None, 15.0) == early  # the data alone after a window
    assert exploration_scale(12.0, 3 * WINDOW, None, 15.0) == 12.0
    assert exploration_scale(early, 0, None) == early  # the default max_abs_reward is a guard, not a prior: as before
    assert exploration_scale(1.0, 0, None, 0.5) == 1.0  # never below the estimate's floor of 1


def _spec(**extra: object) -> PlacementSpec:
    return PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a"}, {"id": "b"}], "exploration": {"algorithm": "squarecb"}, **extra})


def test_decide_divides_squarecb_gaps_by_the_range() -> None:
    """A trained model whose values differ by about 3 (margins): with the scale of the first
    rewards (2) SquareCB all but stops exploring; with the range [0, 15] it keeps exploring."""
    spec = _spec()
    cands = [Candidate(ArmView.of(a, 1)) for a in spec.arms]
    lines = [c.arm.line for c in cands]
    model = CbModel(spec.model_spec(""))
    for _ in range(300):
        model.learn("shared |U x", lines, 0, 4.0)
        model.learn("shared |U x", lines, 1, 1.0)
    plain = decide(model, _spec(), cands, "shared |U x", lambda: 0.5, reward_scale=2.0)
    ranged = decide(model, _spec(reward_range=[0, 15]), cands, "shared |U x", lambda: 0.5, reward_scale=2.0)
    assert plain.explanation is not None and ranged.explanation is not None
    assert plain.explanation.reward_scale == 2.0 and ranged.explanation.reward_scale == 15.0
    assert min(ranged.pmf) > min(plain.pmf)
    assert np.argmax(ranged.pmf) == np.argmax(plain.pmf) == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[15, 0]", "reward_range: the low end must be below the high end, got [15, 0]"),
        ("[3, 3]", "reward_range: the low end must be below the high end, got [3, 3]"),
        ("[0, 2000]", "reward_range: [0, 2000] reaches beyond max_abs_reward (1000)"),
        ("[0, .inf]", "reward_range[1]: Input should be a finite number"),
        ("[0, .nan]", "reward_range[1]: Input should be a finite number"),
        ("[1]", "reward_range[1]: Field required"),
        ("[0, 1, 2]", "reward_range: Tuple should have at most 2 items"),
        ("[0, high]", "reward_range[1]: Input should be a valid number"),
    ],
)
def test_a_bad_range_is_refused_naming_the_field(value: str, message: str) -> None:
    text = f"placements:\n  - id: p\n    max_abs_reward: 1000\n    reward_range: {value}\n    arms:\n      - id: a\n"
    with pytest.raises(ConfigFileError) as e:
        parse_apply_text(text, "offers.yaml")
    assert "placements[0]" in str(e.value) and message in str(e.value), str(e.value)


def test_a_good_range_applies_and_round_trips() -> None:
    text = "placements:\n  - id: p\n    reward_range: [0, 15]\n    arms:\n      - id: a\n"
    (spec,) = parse_apply_text(text, "offers.yaml").placements
    assert spec.reward_range == (0.0, 15.0)
    assert PlacementSpec.model_validate(spec.model_dump(mode="json")).reward_range == (0.0, 15.0)
    assert PlacementSpec.model_validate({"id": "p"}).reward_range is None
    with pytest.raises(ValidationError):
        PlacementSpec.model_validate({"id": "p", "reward_range": [-2e6, 0]})

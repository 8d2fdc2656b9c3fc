"""Range-scaled SquareCB on the telecom scenario (issue #33): the placements declare the range of
their margins, [0, 15], and every decision of an in-process simulation explores with that scale
instead of the estimate from the first rewards, and loses little against today's (over five seeds
of 4,000 events it earned 0.589 +- 0.011 of the oracle against 0.603 +- 0.025: no gain shown at
that length; docs/configuration.md, "Reward scale")."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from nextbest.bandit import decider
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.cli.main import main
from nextbest.engine import configure

EVENTS = 1500


def _run(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, reward_range: tuple[float, float] | None) -> tuple[float, set[float]]:
    """The run's expected share of the oracle, and the scales its decisions explored with."""
    scales: set[float] = set()
    explore = decider.explore

    def recording(values: Any, spec: Any, learned: int, reward_scale: float = 1.0) -> Any:
        scales.add(reward_scale)
        return explore(values, spec, learned, reward_scale)

    monkeypatch.setattr(decider, "explore", recording)
    if reward_range is not None:
        # The simulator applies its scenario's placements: add the range where the engine applies them.
        apply = configure.Configurator.apply

        async def ranged(self: Any, specs: Sequence[PlacementSpec], campaigns: Sequence[CampaignSpec] = (), dry_run: bool = False) -> Any:
            return await apply(self, [s.model_copy(update={"reward_range": reward_range}) for s in specs], campaigns, dry_run)

        monkeypatch.setattr(configure.Configurator, "apply", ranged)
    out = tmp_path / f"{name}.json"
    args = ["simulate", "--local", "--events", str(EVENTS), "--seed", "2", "--window", "500", "--progress-every", "100000"]
    assert main([*args, "--json", str(out)]) == 0
    monkeypatch.undo()
    r = json.loads(out.read_text())["overall"]
    return r["policy_expected"]["reward"] / r["oracle"]["reward"], scales


@pytest.mark.slow  # two simulations, about 70 s: a soak run (scripts/test -m slow)
def test_range_scaled_squarecb_explores_with_the_range_and_earns_about_as_much(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    today, today_scales = _run(tmp_path, "today", monkeypatch, None)
    ranged, ranged_scales = _run(tmp_path, "range", monkeypatch, (0.0, 15.0))
    assert ranged_scales == {15.0}
    assert min(today_scales) < 2.0  # today: the first rewards set the scale (it grows towards the largest margin later)
    # A bound on the loss, not a gain: seed 2 (reproducible) gave 0.461 against 0.449, and the
    # five-seed mean at 4,000 events is 0.014 below today's (about one standard deviation).
    assert ranged >= today - 0.05, (ranged, today)

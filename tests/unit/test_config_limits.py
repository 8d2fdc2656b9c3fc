"""Apply-file limits: at most 1,000 active arms per placement (retired ones do not count, so a
stored placement that gathered them still loads), and times a Timestamp can carry."""

from __future__ import annotations

import pytest

from nextbest.bandit.spec import MAX_ARMS, PlacementSpec
from nextbest.config.files import ConfigFileError, parse_apply_text


def _file(arms: int, extra: str = "") -> str:
    return "placements:\n  - id: p\n    arms:\n" + "".join(f"      - id: a{i}\n{extra if i == 0 else ''}" for i in range(arms))


def test_an_apply_file_with_more_than_1000_active_arms_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigFileError) as e:
        parse_apply_text(_file(MAX_ARMS + 1), "offers.yaml")
    assert str(e.value) == "offers.yaml:4: placements[0].arms: at most 1,000 active arms per placement, got 1,001"
    assert len(parse_apply_text(_file(MAX_ARMS), "offers.yaml").placements[0].arms) == MAX_ARMS


def test_retired_arms_do_not_count() -> None:
    arms = [{"id": f"a{i}", "active": i < MAX_ARMS} for i in range(MAX_ARMS + 500)]
    assert len(PlacementSpec.model_validate({"id": "p", "arms": arms}).arms) == MAX_ARMS + 500


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("        budget: {total: 5, end: 9999-12-31T23:00:00-05:00}\n", "placements[0].arms[0].budget.end"),
        ("        start: 0001-01-01T00:30:00+01:00\n", "placements[0].arms[0].start"),
    ],
)
def test_a_time_beyond_what_a_timestamp_can_carry_is_refused_naming_the_field(extra: str, field: str) -> None:
    with pytest.raises(ConfigFileError) as e:
        parse_apply_text(_file(2, extra), "offers.yaml")
    assert f"{field}: must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z" in str(e.value), str(e.value)

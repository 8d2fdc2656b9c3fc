"""Apply files: valid ones become specs; invalid ones are rejected naming file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextbest.bandit.spec import parse_duration
from nextbest.config.files import ConfigFileError, load_apply_file, parse_apply_text

GOOD = """placements:
  - id: app_home_banner
    exploration: {algorithm: softmax, lambda: 5}
    reward_window: 10m
    arms:
      - id: data_5gb_7d
        features: {category: data, price: 4.99, validity_days: 7, roaming: true}
"""


def test_a_valid_file() -> None:
    [p] = parse_apply_text(GOOD).placements
    assert p.id == "app_home_banner"
    assert (p.exploration.algorithm, p.exploration.lam) == ("softmax", 5.0)
    assert p.reward_window == 600.0
    assert p.arms[0].features == {"category": "data", "price": 4.99, "validity_days": 7.0, "roaming": True}
    assert p.interactions and p.bits == 18


@pytest.mark.parametrize(
    "text, where",
    [
        (GOOD.replace("    reward_window: 10m", "    reward_windw: 10m"), "f.yaml:4: placements[0].reward_windw: Extra inputs"),
        (GOOD.replace("lambda: 5", "lambda: -5"), "f.yaml:3: placements[0].exploration.lambda:"),
        (GOOD.replace("reward_window: 10m", "reward_window: soon"), "f.yaml:4: placements[0].reward_window: must be a duration"),
        (GOOD + "      - id: data_5gb_7d\n", "f.yaml:8: placements[0].arms[1].id: duplicate arm id"),
        (GOOD + GOOD.replace("placements:\n", ""), "f.yaml:8: placements[1].id: duplicate id"),
        (GOOD.replace("price: 4.99", "price: [1]"), "f.yaml:7: placements[0].arms[0].features.price"),
        (GOOD.replace("id: app_home_banner", "id: 'bad id'"), "f.yaml:2: placements[0].id:"),
        (GOOD + "campaign: []\n", "f.yaml:8: campaign: unknown key"),
        ("placements: [\n", "f.yaml:2: not valid YAML"),
        ("placements: []\n", "f.yaml:1: placements: must be a non-empty list"),
        (GOOD.replace("    exploration:", "    exploration: {}\n    exploration:"), "f.yaml:4: placements[0].exploration: duplicate key"),
        (GOOD.replace("      - id: data_5gb_7d", "      - id: x\n        active: maybe"), "f.yaml:7: placements[0].arms[0].active"),
    ],
)
def test_invalid_files_name_line_and_field(text: str, where: str) -> None:
    with pytest.raises(ConfigFileError) as e:
        parse_apply_text(text, "f.yaml")
    assert str(e.value).startswith(where), str(e.value)


@pytest.mark.parametrize("text, seconds", [(30, 30.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("7d", 604800.0), ("250ms", 0.25)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", -1, "10 weeks", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_non_utf8_file_names_file_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "apply.yaml"
    path.write_bytes(b"placements:\n  - id: caf\xe9\n")
    with pytest.raises(ConfigFileError) as e:
        load_apply_file(path)
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at offset 23)"
    assert e.value.line == 2

"""Configuration by script: export is the inverse of apply, apply is idempotent and atomic,
invalid files are rejected with their line, and the published JSON Schema matches the specs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nextbest.cli.experiments import add_commands
from nextbest.cli.main import main as cli_main
from nextbest.config.export import duration_text, export_yaml
from nextbest.config.files import parse_apply_text
from nextbest.config.schema import PUBLISHED, build_schema, published_text
from tests.harness import ROOT, ServerThread, make_settings

RICH = """campaigns:
  - id: xmas_data
    description: Christmas data push
    budget: {total: 50000, daily: 2000, start: 2026-12-01T00:00:00Z, end: 2027-01-01T00:00:00Z}

placements:
  - id: app_home_banner
    description: Home screen banner
    exploration: {algorithm: softmax, lambda: 5}
    reward_window: 15m
    default_reward: -0.5
    interactions: false
    bits: 20
    vw_args: "--cb_type mtr"
    fallback_arm: info_tips
    cooldown: 1h
    contact_policies:
      - {max_impressions: 3, per: customer_arm, window: 7d}
      - {max_impressions: 5, per: customer, window: 1d}
      - {suppress_after_ignored: 2, for: 14d}
    fatigue: {strength: 0.2, half_life: 36h, shape: linear}
    arms:
      - id: data_5gb_7d
        features: {category: data, price: 4.99, validity_days: 7, roaming: true, zero: 0, window: 600}
        cost_per_impression: 0.01
        cost_per_reward: 1.0
        budget: {total: 1000, daily: 100}
        campaign: xmas_data
        business_value: 0.5
        start: 2026-01-01T10:00:00Z
      - id: info_tips
        features: {category: info}
      - id: to_retire
        features: {category: voice}
  - id: ussd_main_menu
    exploration: {algorithm: epsilon, epsilon: 0.1}
    arms:
      - id: data_1gb_1d
"""
EXPERIMENT = """placements:
  - id: app_home_banner
    experiment:
      holdout: {share: 0.1, policy: uniform}
      variants:
        - {id: A, share: 0.45, exploration: {algorithm: squarecb}}
        - {id: B, share: 0.45, exploration: {algorithm: epsilon, epsilon: 0.2}}
    arms:
      - id: data_5gb_7d
        features: {category: data}
      - id: to_retire
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path_factory.mktemp('exp')}/nb.db"))
    yield s
    s.stop()


def _apply(s: ServerThread, text: str, dry_run: bool = False) -> list[Any]:
    cfg = parse_apply_text(text)
    with s.client() as nb:
        return nb.apply(cfg.placements, dry_run=dry_run, campaigns=cfg.campaigns)


def _export(s: ServerThread) -> str:
    with s.client() as nb:
        return export_yaml(nb)


@pytest.mark.parametrize("text", [RICH, EXPERIMENT], ids=["rich", "experiment"])
def test_export_then_apply_is_a_no_op(srv: ServerThread, text: str) -> None:
    _apply(srv, text)
    _apply(srv, text.replace("      - id: to_retire\n", "").replace("        features: {category: voice}\n", ""))
    exported = _export(srv)
    assert "active: false" in exported and "to_retire" in exported  # the retired arm is kept, retired
    assert _apply(srv, exported, dry_run=True) == []
    assert _apply(srv, exported) == []
    assert _export(srv) == exported
    doc = yaml.safe_load(exported)
    first = doc["placements"][0]
    assert next(iter(first)) == "id" and list(first)[-1] == "arms"


def test_export_reads_like_a_hand_written_file(srv: ServerThread) -> None:
    _apply(srv, RICH)
    out = _export(srv)
    placement = out.split("  - id: app_home_banner\n", 1)[1]
    for line in (
        "reward_window: 15m",
        "cooldown: 1h",
        "{max_impressions: 3, window: 7d}",
        "{suppress_after_ignored: 2, for: 14d}",
        "half_life: 36h",
        "exploration: {algorithm: softmax, lambda: 5}",
        "roaming: true",
        "validity_days: 7",
        "window: 600}",
        "budget: {total: 1000, daily: 100}",
    ):
        assert line in placement, line
    for default in ("default_reward: 0\n", "active: true", "per: customer_arm", "business_value: 0\n", "bits: 18"):
        assert default not in out, default
    ussd = yaml.safe_load(out)["placements"][1]
    assert ussd == {"id": "ussd_main_menu", "exploration": {"algorithm": "epsilon", "epsilon": 0.1}, "arms": [{"id": "data_1gb_1d"}]}


def test_export_keeps_budget_and_arm_times(srv: ServerThread) -> None:
    _apply(srv, RICH)
    out = _export(srv)
    assert "      start: 2026-12-01T00:00:00Z\n      end: 2027-01-01T00:00:00Z\n" in out  # plain YAML times
    assert "        start: 2026-01-01T10:00:00Z\n" in out


def test_dry_run_changes_nothing_and_applying_twice_equals_once(tmp_path: Path) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    try:
        planned = _apply(s, RICH, dry_run=True)
        assert planned and all(c.action == "CREATE" for c in planned)
        with s.client() as nb:
            assert nb.placements() == []
        applied = _apply(s, RICH)
        assert [(c.placement, c.arm_id, c.action, c.campaign) for c in applied] == [
            (c.placement, c.arm_id, c.action, c.campaign) for c in planned
        ]
        once = _export(s)
        assert _apply(s, RICH) == []
        assert _export(s) == once
    finally:
        s.stop()


def _line_of(text: str, marker: str, nth: int = 1) -> int:
    return [i for i, line in enumerate(text.splitlines(), 1) if marker in line][nth - 1]


INVALID = [  # name, text, (marker of the offending line, which occurrence), field
    ("unknown key", RICH.replace("    cooldown: 1h", "    cooldwn: 1h"), ("cooldwn", 1), "placements[0].cooldwn: Extra inputs"),
    ("wrong type", RICH.replace("    bits: 20", "    bits: many"), ("bits: many", 1), "placements[0].bits:"),
    (
        "duplicate arm",
        RICH.replace("      - id: info_tips", "      - id: data_5gb_7d"),
        ("id: data_5gb_7d", 2),
        "placements[0].arms[1].id: duplicate arm id",
    ),
    (
        "negative budget",
        RICH.replace("budget: {total: 1000,", "budget: {total: -5,"),
        ("total: -5", 1),
        "placements[0].arms[0].budget.total:",
    ),
]


@pytest.mark.parametrize("name, text, where, field", INVALID, ids=[x[0] for x in INVALID])
def test_invalid_files_are_rejected_with_their_line_and_change_nothing(
    srv: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str,
    where: tuple[str, int],
    field: str,
) -> None:
    line = _line_of(text, *where)
    _apply(srv, RICH)
    before = _export(srv)
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("epsilon: 0.1", "epsilon: 0.3"))  # a valid change that must not land either
    assert cli_main(["apply", str(path), "--target", srv.target]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{line}: {field}"), err
    assert _export(srv) == before


def test_duration_text() -> None:
    assert [duration_text(x) for x in (600, 3600, 86400 * 14, 90, 0.25, 1.5, 7200.5)] == ["10m", "1h", "14d", "90s", "250ms", 1.5, 7200.5]


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nextbest")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args))


def test_export_command_writes_a_file_that_applies_as_a_no_op(srv: ServerThread, tmp_path: Path) -> None:
    _apply(srv, RICH)
    out = tmp_path / "live.yaml"
    assert _cli(["export", "--target", srv.target, "--out", str(out)]) == 0
    assert out.read_text() == _export(srv)
    assert _apply(srv, out.read_text()) == []


# -- the JSON Schema -----------------------------------------------------------------------


def test_published_schema_has_not_drifted(tmp_path: Path) -> None:
    fresh = tmp_path / "apply.schema.json"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen-schema"), str(fresh)], cwd=ROOT, env=env, check=True, capture_output=True)
    assert PUBLISHED.read_text() == fresh.read_text(), "regenerate with scripts/gen-schema"
    assert json.loads(published_text()) == build_schema()


def test_schema_command_prints_the_published_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"placements", "campaigns"}
    assert schema["$defs"]["ExplorationSpec"]["properties"]["lambda"]["exclusiveMinimum"] == 0


def _as_json(text: str) -> Any:
    """What an editor's YAML checker sees: times are texts."""
    return json.loads(json.dumps(yaml.safe_load(text), default=lambda o: o.isoformat()))


def test_schema_accepts_good_files_and_rejects_bad_ones(srv: ServerThread) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(PUBLISHED.read_text()))
    jsonschema.Draft202012Validator.check_schema(validator.schema)
    good = [(ROOT / "scripts" / "demo.yaml").read_text(), RICH, EXPERIMENT]
    _apply(srv, RICH)
    good.append(_export(srv))
    for text in good:
        assert list(validator.iter_errors(_as_json(text))) == []
    bad = {
        "unknown key": RICH.replace("    cooldown: 1h", "    cooldwn: 1h"),
        "unknown top-level key": RICH + "campaign: []\n",
        "wrong type": RICH.replace("    bits: 20", "    bits: many"),
        "negative budget": RICH.replace("budget: {total: 1000,", "budget: {total: -5,"),
        "bad duration": RICH.replace("cooldown: 1h", "cooldown: soon"),
        "empty budget": RICH.replace("budget: {total: 1000, daily: 100}", "budget: {}"),
        "contact rule of two kinds": RICH.replace(
            "{suppress_after_ignored: 2, for: 14d}", "{suppress_after_ignored: 2, for: 14d, max_impressions: 1, window: 1d}"
        ),
        "bad id": RICH.replace("id: info_tips", "id: 'info tips'"),
    }
    for name, text in bad.items():
        assert list(validator.iter_errors(_as_json(text))), name


def test_export_is_the_same_after_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/nb.db"
    s = ServerThread(make_settings(url))
    try:
        _apply(s, RICH)
        before = _export(s)
    finally:
        s.stop()
    s = ServerThread(make_settings(url))
    try:
        assert _export(s) == before
        assert _apply(s, before) == []
    finally:
        s.stop()

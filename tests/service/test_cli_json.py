"""The CLI's ``--json``: one style (canonical proto3 JSON), and a closed pipe ends it quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.json_style import camel, camel_keys
from nextbest.cli.main import main as cli
from tests.harness import ROOT, ServerThread, make_settings


@pytest.fixture
def served(tmp_path: Any) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    try:
        with s.client() as c:
            c.apply([PlacementSpec.model_validate({"id": "p", "learn_at": "reward", "arms": [{"id": "data_1gb"}, {"id": "voice_100"}]})])
        yield s
    finally:
        s.stop()


def _one_line(out: str) -> Any:
    """A --json output: one document on one line."""
    assert len(out.splitlines()) == 1, out
    return json.loads(out)


def _keys(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc).union(*(_keys(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(_keys(v) for v in doc))
    return set()


def test_choose_explain_and_stats_print_canonical_proto3_json(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["choose", "p", "-f", "customer.plan=prepaid", "--customer", "c42", "--target", served.target]) == 0
    choice = _one_line(capsys.readouterr().out)
    assert choice["armId"] in ("data_1gb", "voice_100") and choice["eventId"]
    assert choice["modelVersion"] == "0"  # int64: a string
    assert choice["reason"] == "" and choice["variant"] == ""  # defaults printed: every key is there
    assert cli(["reward", choice["eventId"], "1", "--target", served.target]) == 0
    assert capsys.readouterr().out.strip() == "learned"

    assert cli(["explain", choice["eventId"], "--json", "--target", served.target]) == 0
    why = _one_line(capsys.readouterr().out)
    assert (why["eventId"], why["armId"], why["modelVersion"]) == (choice["eventId"], choice["armId"], "0")
    assert {a["armId"] for a in why["arms"]} == {"data_1gb", "voice_100"}
    assert sum(a["probability"] for a in why["arms"]) == pytest.approx(1.0)

    assert cli(["stats", "p", "--json", "--target", served.target]) == 0
    stats = _one_line(capsys.readouterr().out)
    assert stats["placement"] == "p" and stats["decisions"] == "1"  # int64: a string
    served_arm = next(a for a in stats["arms"] if a["armId"] == choice["armId"])
    assert (served_arm["impressions"], served_arm["rewards"], served_arm["rewardSum"]) == ("1", "1", 1.0)

    for doc in (choice, why, stats):
        assert not [k for k in _keys(doc) if "_" in k]  # lowerCamelCase throughout


def test_non_message_json_keys_are_lower_camel_case() -> None:
    assert camel("reward_sum_awaiting_close") == "rewardSumAwaitingClose" and camel("mean") == "mean"
    doc = {"variant_buckets": [{"ci_low": None, "arm": "data_1gb"}], "first": "2026-12-01"}
    assert camel_keys(doc) == {"variantBuckets": [{"ciLow": None, "arm": "data_1gb"}], "first": "2026-12-01"}


def _into_closed_pipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command with its standard output a pipe whose reader has gone (as ``| head -1`` once
    head has its line): every write fails, whenever the command makes it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "nextbest.cli.main", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


def test_a_closed_pipe_ends_the_command_quietly(served: ServerThread) -> None:
    env = {**os.environ, "NEXTBEST_TARGET": served.target}  # and no --target: the variable is used
    for args in (["stats", "p", "--json"], ["choose", "p"], ["stats", "p"]):
        r = _into_closed_pipe(args, env)
        assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
        assert (r.returncode, r.stderr) == (141, ""), args  # 128 + SIGPIPE, as the shell reports `cat` ended so

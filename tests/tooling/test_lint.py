"""ruff (configured in pyproject.toml) finds nothing, and the code is formatted as ruff formats it."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_is_clean() -> None:
    r = _ruff("check", "server", "bandit", "tests")
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]


def test_the_code_is_ruff_formatted() -> None:
    r = _ruff("format", "--check", "server", "bandit", "tests")
    assert r.returncode == 0, "run `.venv/bin/ruff format server bandit tests`:\n" + (r.stdout + r.stderr)[-3000:]

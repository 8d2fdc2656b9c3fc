"""bandit/ and server/ stay mypy clean (strict)."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT


def test_mypy_is_clean_on_bandit_and_server() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "bandit", "server"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]

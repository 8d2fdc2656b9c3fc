"""The installed package nextbest (server/ and bandit/ through the strict editable install) stays
mypy clean (strict), checked as users' type checkers see it."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT


def test_mypy_is_clean_on_the_nextbest_package() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "-p", "nextbest"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    checked = int(r.stdout.rsplit(" in ", 1)[1].split()[0])
    assert checked >= 100, r.stdout  # every module of the package, not an empty selection

"""Generated code matches the .proto files, and the .proto files pass buf lint."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_in_sync(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path / "pb")], cwd=ROOT, env=env, check=True, capture_output=True)
    committed = ROOT / "server" / "v1"  # installed as nextbest.v1
    fresh = tmp_path / "pb" / "nextbest" / "v1"

    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    assert files(committed) == files(fresh)
    drift = [f for f in sorted(files(fresh)) if not filecmp.cmp(committed / f, fresh / f, shallow=False)]
    assert drift == [], f"regenerate with scripts/gen-proto: {drift}"


def _buf() -> str | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_passes() -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("buf is not installed (scripts/test installs it from the npm registry when npm is present)")
    r = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

"""Every `nextbest` command shown in README.md and docs/*.md is one the CLI accepts as written.

Each `$ nextbest ...` (or `$ .venv/bin/nextbest ...`) line of a code block, its backslash
continuations joined and anything after a pipe or a redirection left out, is parsed by the CLI's
own parser: a renamed flag, a dropped subcommand or a wrong value type in the docs fails here.
The `choose` and `stats` commands and `apply scripts/demo.yaml --dry-run` are also run against a
live server with the demo placements; every other command is listed in PARSED_ONLY with the reason
it is only parsed (an event id of the run shown, a file the docs make, minutes of simulation).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nextbest.cli.main import build_parser
from tests.harness import ROOT, running_server

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_PROMPT = re.compile(r"^\$ (?:\.venv/bin/)?nextbest (.*)$")
_STOP = {"|", ">", ">>", "<", "2>", "&&", ";"}


def commands(page: Path) -> list[tuple[int, str]]:
    """(line, command) for each nextbest command at a prompt inside a code block of the page."""
    out: list[tuple[int, str]] = []
    lines = page.read_text().splitlines()
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced and (m := _PROMPT.match(line.strip())):
            first, text = i + 1, m.group(1)
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            out.append((first, text))
        i += 1
    return out


def argv_of(text: str) -> list[str]:
    words = shlex.split(text, comments=True)
    for k, w in enumerate(words):
        if w in _STOP or w.startswith(">"):
            return words[:k]
    return words


ALL = [(page, line, text) for page in PAGES for line, text in commands(page)]


def test_the_docs_show_commands_to_check() -> None:
    assert len(ALL) >= 25, len(ALL)  # the extraction still finds the docs' commands
    assert {argv_of(t)[0] for _, _, t in ALL} >= {"apply", "choose", "reward", "explain", "stats", "replay", "profiles", "conversions"}


@pytest.mark.parametrize(("page", "line", "text"), ALL, ids=[f"{p.name}:{n}" for p, n, _ in ALL])
def test_each_documented_command_parses(page: Path, line: int, text: str) -> None:
    parser = build_parser()
    try:
        parser.parse_args(argv_of(text))
    except SystemExit as e:  # argparse's way of refusing: the docs show a command the CLI rejects
        pytest.fail(f"{page.relative_to(ROOT)}:{line}: `nextbest {text}` does not parse (exit {e.code})")


# Commands run against a live server with the demo placements (`scripts/serve`'s), as a reader
# would after `scripts/serve`. The others are parsed only, each for the reason given.
RUN = ("choose", "stats")
PARSED_ONLY = {
    "apply": "changes the server's configuration; `apply --dry-run` is run",
    "explain": "names the event id of the run the docs show",
    "reward": "names the event id of the run the docs show",
    "export": "writes to a file through a redirection",
    "export-log": "reads ./nextbest.db of a served session",
    "replay": "reads the log file exported before",
    "report": "reads ./nextbest.db of a served session",
    "stats-log": "reads ./nextbest.db of a served session",
    "profiles": "loads or reads the file the docs create with a heredoc",
    "conversions": "loads the file the docs create with a heredoc",
    "simulate": "runs for minutes (tests/offline/test_simulate*.py run it small)",
}


def test_every_documented_command_is_run_or_listed_with_a_reason() -> None:
    for page, line, text in ALL:
        head = argv_of(text)[0]
        assert head in RUN or head in PARSED_ONLY, f"{page.name}:{line}: `{head}` is neither run nor listed"


def test_the_documented_choose_and_stats_commands_run_against_the_demo_placements(tmp_path: Path) -> None:
    runs = [argv_of(t) for _, _, t in ALL if argv_of(t)[0] in RUN]
    runs += [argv_of(t) for _, _, t in ALL if argv_of(t)[:1] == ["apply"] and "--dry-run" in t and "scripts/demo.yaml" in t]
    assert len(runs) >= 5, runs
    with running_server(f"sqlite:///{tmp_path}/nb.db") as s:
        env = {**os.environ, "NEXTBEST_TARGET": s.target}

        def nextbest(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "nextbest.cli.main", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
            )

        applied = nextbest("apply", "scripts/demo.yaml")
        assert applied.returncode == 0, applied.stderr
        for argv in runs:
            r = nextbest(*argv)
            assert r.returncode == 0, f"nextbest {' '.join(argv)}: {r.stderr[-1500:]}"
            assert "Traceback" not in r.stderr

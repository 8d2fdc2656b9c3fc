"""Every `nextbest` command shown in README.md and docs/*.md is one the CLI accepts as written.

Each `$ nextbest ...` (or `$ .venv/bin/nextbest ...`) line of a code block, its backslash
continuations joined and anything after a pipe or a redirection left out, is parsed by the CLI's
own parser: a renamed flag, a dropped subcommand or a wrong value type in the docs fails here.
Each is also run, as written, by the reader's session of tests/tooling/test_docs_session.py (or
listed there with the reason it cannot run in the suite); the last test here checks that none
escapes it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nextbest.cli.main import build_parser
from tests.harness import ROOT

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


def test_every_documented_command_is_run_by_the_session_or_listed_there() -> None:
    from tests.tooling import test_docs_session as session

    run, repeated = session.session_steps()
    covered = {(s.page, s.line) for s in run + repeated}
    for page, line, text in ALL:
        listed = any(text.startswith(k.split("nextbest ", 1)[-1]) for k in session.LISTED if "nextbest " in k)
        assert (page.name, line) in covered or listed, f"{page.name}:{line}: `nextbest {text}` is neither run nor listed"

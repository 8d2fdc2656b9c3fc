"""The docs fit on a screen and hold together: README.md is short, every relative link and anchor of
README.md and docs/*.md resolves, every docs page is on README's map and opens with who it is for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), images too
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside a fenced code block (fences blanked)."""
    out, fence = [], ""
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ("```", "~~~"):
            if not fence:
                fence = marker
            elif marker == fence:
                fence = ""
            out.append("")
            continue
        out.append("" if fence else line)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _outside_code(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    links = []
    for line in _outside_code(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "code", line)  # a link inside a code span is text, [`x`](y) a link
        links += [m.group(1) for m in LINK.finditer(line)]
    return links


def _relative(links: list[str]) -> list[str]:
    return [link for link in links if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link)]


def test_the_readme_fits_on_a_screen() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move text to docs/ (at most {MAX_README_LINES})"


def test_there_are_docs_pages() -> None:
    assert {p.name for p in DOCS} >= {
        "api.md",
        "architecture.md",
        "configuration.md",
        "development.md",
        "experiments.md",
        "operations.md",
        "performance.md",
        "reliability.md",
        "replay.md",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for link in _relative(_links(page)):
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.exists():
            broken.append(f"{link}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
            continue
        if anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_on_the_readme_map() -> None:
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _relative(_links(README))}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_each_docs_page_opens_with_who_it_is_for(page: Path) -> None:
    lines = [line for line in _outside_code(page.read_text(encoding="utf-8")) if line.strip()]
    assert lines and lines[0].startswith("# "), f"{page.name}: starts with no title"
    first = next(line for line in lines if not HEADING.match(line))
    assert first.startswith("For "), f"{page.name}: the first line after the title says who it is for: {first!r}"


def test_the_slug_follows_githubs_rules() -> None:
    assert _slug("Logs beyond one machine: Parquet and SQL") == "logs-beyond-one-machine-parquet-and-sql"
    assert _slug("Why this offer: Explain") == "why-this-offer-explain"
    assert _slug("HTTP/JSON") == "httpjson"
    assert _slug("Multi-slot placements, deferred activation") == "multi-slot-placements-deferred-activation"
    assert _slug("The `nextbest` command") == "the-nextbest-command"

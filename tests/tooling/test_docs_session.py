"""A reader's session: every command of README.md and docs/*.md runs as written.

The commands of the pages' code blocks (``$ ...`` lines of console blocks with their
continuations, heredocs and pipes, the lines of a bash block, Python and SQL blocks) run in the
order a reader meets them (README first, then the pages in the README's map), in a fresh
directory, against a live server with the demo placements (what ``scripts/serve`` serves, with
``--http-port``): through bash, with the venv's bin first on PATH (as after ``source
.venv/bin/activate``) and ``.venv`` linked in the directory (``.venv/bin/nextbest``).

Only what the docs say must be substituted is: the server's address (``127.0.0.1:50051``, and
``localhost:8080`` for the HTTP port), the event ids a command printed (the docs show another
run's), the arms ``experiment.yaml`` leaves to the reader ("the other arms of scripts/demo.yaml"),
and the SQL's ``$files`` and ``$arm``. ``SESSION`` says what each command must print; a command
that cannot run here is in ``LISTED`` with the reason, so a command added to the docs fails this
test until it is either.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT, running_server

PAGES = [
    ROOT / "README.md",
    *(ROOT / "docs" / f"{name}.md" for name in ("api", "configuration", "experiments", "replay", "operations")),
    *(ROOT / "docs" / f"{name}.md" for name in ("reliability", "performance", "architecture", "development")),
]
_SHELL = ("console", "bash", "sh", "shell")
_HEREDOC = re.compile(r"<<-?\s*'?\"?([A-Za-z_]+)'?\"?")
_EVENT_ID = re.compile(r'"eventId": "([^"]+)"')


@dataclass
class Step:
    page: str
    line: int
    kind: str  # sh, python or sql
    text: str
    shown: str  # the output the docs show under a shell command


def _blocks(page: Path) -> list[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of each fenced code block."""
    out: list[tuple[int, str, list[str]]] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            lang, start, body = fence[3:].strip(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start, lang, body))
        i += 1
    return out


def steps(page: Path) -> list[Step]:
    """The page's commands and snippets, in order."""
    out: list[Step] = []
    for start, lang, body in _blocks(page):
        if lang in ("python", "sql"):
            out.append(Step(page.name, start, lang, "\n".join(body), ""))
        elif lang == "bash" and not any(b.startswith("$ ") for b in body):  # commands without prompts
            out += [Step(page.name, start + k, "sh", b.split("  #")[0].strip(), "") for k, b in enumerate(body) if b.strip()]
        elif lang in _SHELL:
            k = 0
            while k < len(body):
                if not body[k].startswith("$ "):
                    k += 1
                    continue
                first, text = k, body[k][2:]
                while text.rstrip().endswith("\\") and k + 1 < len(body):
                    k += 1
                    text = text.rstrip()[:-1].rstrip() + " " + body[k].strip()
                heredoc = _HEREDOC.search(text)
                if heredoc:  # the document follows, to its delimiter
                    while k + 1 < len(body):
                        k += 1
                        text += "\n" + body[k]
                        if body[k].strip() == heredoc.group(1):
                            break
                shown: list[str] = []
                while k + 1 < len(body) and not body[k + 1].startswith("$ "):
                    k += 1
                    shown.append(body[k])
                out.append(Step(page.name, start + first, "sh", text, "\n".join(shown)))
                k += 1
    return out


ALL = [s for page in PAGES for s in steps(page)]


def session_steps() -> tuple[list[Step], list[Step]]:
    """The steps to run, and those a page repeats from an earlier one (docs/api.md repeats the
    README's curl and Python): those run once, as for a reader who followed the README; a second
    choose of event demo-1 would rightly fail ALREADY_EXISTS."""
    run: list[Step] = []
    repeated: list[Step] = []
    first_page: dict[str, str] = {}
    for step in ALL:
        if any(step.text.startswith(k) for k in LISTED):
            continue
        if first_page.setdefault(step.text, step.page) != step.page:
            repeated.append(step)
        else:
            run.append(step)
    return run, repeated


# Commands that do not run here, by the start of their text, and why.
LISTED = {
    "scripts/serve": "the session's server is what it serves (`nextbest serve --init-config scripts/demo.yaml`, in process, "
    "on free ports and a fresh ./nextbest.db); scripts/serve itself would install into and serve from the checkout",
    "scripts/test": "runs the whole suite, this test among it",
    ".venv/bin/nextbest simulate --compare-contexts": "a fresh --local server per mode and seed, whatever --events: one seed of "
    "200 events took 50 s on this shared 2-core machine; tests/offline/test_simulate_contexts.py runs it small",
    ".venv/bin/nextbest simulate --rewards conversions": "simulated days of billing on a --local server: 200 events took 30 s "
    "here; tests/offline/test_simulate_billing.py runs it small",
    ".venv/bin/nextbest simulate --compare-rewards": "two such --local runs per seed (events, then conversions); "
    "tests/offline/test_simulate_billing.py runs a billing run and the comparison's table small",
}

# Each command run, in order: the start of its text as the docs write it, and what its output
# (stdout, then stderr) must contain (regular expressions, multiline).
SESSION: list[tuple[str, list[str]]] = [
    # README: the tour
    ("nextbest apply scripts/demo.yaml --dry-run", [r"^no changes: the live configuration already matches$"]),
    ("sed 's/epsilon: 0.1/epsilon: 0.2/'", []),
    ("nextbest apply my.yaml --dry-run", [r"^would update placement ussd_main_menu\n    exploration.epsilon: 0.1 -> 0.2\n1 change"]),
    ("nextbest apply my.yaml", [r"^update placement ussd_main_menu\n    exploration.epsilon: 0.1 -> 0.2\n1 change\(s\) applied$"]),
    ("nextbest choose app_home_banner -f customer.segment=youth -f customer.arpu", [r'^\{"eventId": "[^"]+", "armId": "']),
    ("nextbest reward ", [r"^learned$"]),
    ("nextbest reward ", [r"^duplicate$"]),
    ("nextbest choose app_home_banner -f customer.segment=youth -f device.tier=4g", [r'"armId": "(?!voice_300min")']),
    ("nextbest explain ", [r"^served: \w+ with probability", r"^  voice_300min +- +not eligible: excluded by caller$"]),
    ("nextbest stats app_home_banner", [r"^placement app_home_banner: 2 decisions", r"^voice_300min +\d+"]),
    # README: Python, then curl against the HTTP port
    ("import nextbest", [r"^duplicate None$", r"^learned None$", r"^StatusCode.NOT_FOUND event 'no-such-event' is unknown$"]),
    ("curl -s -X POST localhost:8080/v1/placements/ussd_main_menu:choose", [r'^\{"eventId": "demo-1", "armId": "']),
    ("curl -s -X POST localhost:8080/v1/events/demo-1:reward", [r"^\{\"status\": \"REWARD_STATUS_LEARNED\"\}$"]),
    (
        "curl -s localhost:8080/v1/events/nope:explain",
        [r"""^\{"code": 5, "message": "no decision with event_id 'nope'", "details": \[\]\}$"""],
    ),
    # docs/configuration.md: profiles from the warehouse
    ("cat > customers.csv", []),
    (
        "nextbest profiles load customers.csv --db",
        [r"^2 rows read from customers.csv in 1 batch: 2 stored, 0 stale \(older than the stored profile\); "],
    ),
    ("nextbest profiles get c43", []),  # compared whole with the docs' line below
    ("nextbest profiles load customers.csv --target", [r"^2 rows read from customers.csv in 1 batch: "]),
    # docs/experiments.md
    (
        "nextbest apply experiment.yaml --dry-run",
        [r"^would update placement app_home_banner$", r"^    experiment.holdout.share: None -> 0.1$"],
    ),
    ("nextbest apply experiment.yaml", [r"^update placement app_home_banner$"]),
    ("nextbest export > live.yaml", []),
    ("nextbest stats-log --db sqlite:///nextbest.db --placement app_home_banner --bucket day", [r"^variant +arm +impressions +measured"]),
    ("nextbest report --db sqlite:///nextbest.db --placement app_home_banner --out report.html", []),
    ("nextbest stats app_home_banner --since 2026-11-07", [r"^placement app_home_banner: \d+ decisions"]),
    ("nextbest choose app_home_banner -f customer.segment=youth --customer c42 --exclude", [r'"armId": "data_5gb_7d", "probability": 1.0']),
    ("cat > billing.csv", []),
    (
        "nextbest conversions load billing.csv",
        [r"^2 rows read from billing.csv in 1 batch: 1 attributed \(1 credit\), 1 unattributed, 0 duplicate; "],
    ),
    (
        "nextbest conversions load billing.csv",
        [r"^2 rows read from billing.csv in 1 batch: 0 attributed \(0 credits\), 0 unattributed, 2 duplicate; "],
    ),
    ("nextbest explain ", [r"\Aconversions credited \(1\):\n  conversion +share +value +occurred at\n  inv-2001 +1.0000 +4.9900 +20"]),
    # docs/replay.md
    ("nextbest replay --db sqlite:///nextbest.db --placement app_home_banner", [r"\bsnips\b", r"\bdr\b", r"constant:data_5gb_7d"]),
    ("nextbest export-log --db sqlite:///nextbest.db --placement app_home_banner --format dsjson --out log.json", []),
    ("python -m vowpalwabbit --dsjson --cb_adf -q UA -d log.json", [r"average loss = "]),
    (".venv/bin/nextbest simulate --target 127.0.0.1:50051 --plot curve.png", [r"policy = what the server's choices earned"]),
    ("nextbest replay --log log.json --policy logged uniform", [r"\bsnips\b", r"constant:data_5gb_7d"]),
    ("nextbest replay --log log.json --max-line-bytes 8388608", [r"vw:--cb_explore_adf --epsilon 0.1 -q UA"]),
    ("nextbest export-log --db sqlite:///nextbest.db --placement app_home_banner --format parquet --out log.parquet", []),
    ("WITH w AS (", []),  # duckdb: one row of four numbers
    ("SELECT event_id, f.name", []),  # duckdb: the profile features of decisions (none here: no placement reads profiles)
]

SIMULATE_EVENTS = "100"  # the --target simulate's --events (the docs' default: 20,000)


def _experiment_yaml(block: str) -> str:
    """experiment.yaml as the docs show it, with "the other arms of scripts/demo.yaml" filled in."""
    demo = (ROOT / "scripts" / "demo.yaml").read_text().split("  - id: ussd_main_menu")[0]
    arms = demo.split("    arms:\n", 1)[1].splitlines(keepends=True)
    others = "".join(arms[2:])  # after data_5gb_7d and its features, the docs' one arm
    marker = "      # ... the other arms of scripts/demo.yaml\n"
    assert marker in block + "\n"
    return (block + "\n").replace(marker, others)


def _sql(text: str, files: str, arm: str) -> list[tuple[object, ...]]:
    import duckdb

    con = duckdb.connect()
    try:
        return con.execute(text.replace("$files", f"'{files}'").replace("$arm", f"'{arm}'")).fetchall()
    finally:
        con.close()


def test_the_docs_commands_are_all_run_or_listed() -> None:
    assert sorted(PAGES) == sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])  # a new page joins the session
    run, repeated = session_steps()
    assert len(ALL) >= 45, len(ALL)  # the extraction still finds the pages' commands
    got = [f"{s.page}:{s.line}: {s.text[:100]}" for s in run]
    for k, (prefix, _) in enumerate(SESSION):
        assert k < len(run), f"SESSION expects more commands than the docs show: {[p for p, _ in SESSION[k:]]}"
        assert run[k].text.startswith(prefix), f"command {k}: the docs show {got[k]!r}, SESSION expects {prefix!r}"
    assert len(run) == len(SESSION), f"commands neither in SESSION nor LISTED: {got[len(SESSION) :]}"
    assert {s.page for s in repeated} == {"api.md"} and len(repeated) == 4, repeated
    for key in LISTED:
        assert any(s.text.startswith(key) for s in ALL), f"LISTED names a command the docs no longer show: {key}"


def test_a_readers_session_runs_every_command_as_written(tmp_path: Path) -> None:
    run, _ = session_steps()
    session = [(step, patterns) for step, (_, patterns) in zip(run, SESSION, strict=True)]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "demo.yaml").write_text((ROOT / "scripts" / "demo.yaml").read_text())
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    bin_dir = str(Path(sys.executable).parent)
    experiments = ROOT / "docs" / "experiments.md"
    yaml_block = next(body for _, lang, body in _blocks(experiments) if lang == "yaml")
    (tmp_path / "experiment.yaml").write_text(_experiment_yaml("\n".join(yaml_block)))
    db = f"sqlite:///{tmp_path}/nextbest.db"
    with running_server(db, http_port=0, init_config=str(tmp_path / "scripts" / "demo.yaml")) as server:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NEXTBEST_TARGET": server.target}
        env.pop("VIRTUAL_ENV", None)
        subs = {"127.0.0.1:50051": server.target, "localhost:8080": f"127.0.0.1:{server.running.http_port}"}
        took: list[tuple[float, str]] = []
        for step, patterns in session:
            text = step.text
            for old, new in subs.items():
                text = text.replace(old, new)
            where = f"{step.page}:{step.line}: {step.text.splitlines()[0][:100]}"
            if step.text.startswith("cat > billing.csv"):
                # Its occurred_at is $(date) to the second; typed by hand it comes seconds after the
                # choose it converts, and an impression after its conversion gets no credit.
                time.sleep(1.1)
            started = time.monotonic()
            if step.kind == "sql":
                rows = _sql(text, str(tmp_path / "log.parquet"), "data_5gb_7d")
                out = "\n".join(map(str, rows))
                if text.startswith("WITH w AS"):
                    assert len(rows) == 1 and len(rows[0]) == 4 and all(isinstance(v, float) for v in rows[0]), (where, rows)
            else:
                if step.kind == "python":
                    (tmp_path / "snippet.py").write_text(text)
                    argv = ["python", "snippet.py"]
                else:
                    if text.startswith(".venv/bin/nextbest simulate --target"):
                        text += f" --events {SIMULATE_EVENTS}"  # fewer visits than the default 20,000
                    argv = ["bash", "-c", "set -eo pipefail\n" + text]
                r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
                out = r.stdout + r.stderr
                assert r.returncode == 0, f"{where}: exit {r.returncode}\n{out[-3000:]}"
                assert "Traceback" not in out and "Warning" not in r.stderr, f"{where}:\n{out[-3000:]}"
                if step.kind == "sh":
                    for shown_id, got_id in zip(_EVENT_ID.findall(step.shown), _EVENT_ID.findall(r.stdout), strict=False):
                        subs[shown_id] = got_id  # the docs' run printed another id
            took.append((time.monotonic() - started, where))
            for pattern in patterns:
                assert re.search(pattern, out, re.MULTILINE), f"{where}: no {pattern!r} in\n{out[-3000:]}"
            if step.text.startswith("nextbest profiles get c43"):
                assert json.loads(out) == json.loads(step.shown), (where, out)
        assert (tmp_path / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
        assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
        applied = subprocess.run(["nextbest", "apply", "live.yaml", "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert applied.stdout.startswith("no changes"), applied.stdout + applied.stderr  # "`nextbest apply live.yaml` changes nothing"
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"{len(took)} steps, {sum(t for t, _ in took):.1f} s; the commands' CPU {cpu.ru_utime + cpu.ru_stime:.1f} s; slowest:")
        print("\n".join(f"{t:6.2f} s  {w}" for t, w in sorted(took, reverse=True)[:10]))

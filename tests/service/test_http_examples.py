"""The HTTP/JSON examples of the docs run as written: docs/examples/choose.mjs (Node's fetch) and
docs/examples/choose.sh (curl) against a real server with an HTTP port and the demo placements,
with auth on and off; a refusal prints its google.rpc.Status and exits non-zero."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nextbest.v1 import decision_pb2
from tests.harness import CHANNEL_TOKEN, LIMITED_TOKEN, ROOT, TOKENS, ServerThread, make_settings, token_client

EXAMPLES = ROOT / "docs" / "examples"
DEMO = ROOT / "scripts" / "demo.yaml"
PLACEMENT = "app_home_banner"  # the placement both examples name
ARMS = {a["id"] for p in yaml.safe_load(DEMO.read_text())["placements"] if p["id"] == PLACEMENT for a in p["arms"]}


def _tool(name: str) -> str:
    """The program's path; on CI (CI set) its absence fails the test, elsewhere it skips it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI has no {name}: the CI image must provide it (the docs' examples are run by the suite)")
        pytest.skip(f"{name} is not installed: the docs' {name} example cannot run here")
    return path


@pytest.fixture(params=[False, True], ids=["no-auth", "auth"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ServerThread, str | None]]:
    """A server with an HTTP port and scripts/demo.yaml applied; with auth, a channel token."""
    auth: bool = request.param
    kw = {"auth_tokens": TOKENS} if auth else {}
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db", http_port=0, init_config=str(DEMO), **kw))
    yield s, CHANNEL_TOKEN if auth else None
    s.stop()


def _run(cmd: list[str], s: ServerThread, token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NEXTBEST_TOKEN"}
    env["NEXTBEST_HTTP"] = f"http://127.0.0.1:{s.running.http_port}"
    if token is not None:
        env["NEXTBEST_TOKEN"] = token
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def _explained_arm(s: ServerThread, token: str | None, event_id: str) -> str:
    """The arm the server logged for the event, read over gRPC."""
    s.call(s.engine.writer.flush())
    with token_client(s.target, token) as c:
        arm: str = c.decision.Explain(decision_pb2.ExplainRequest(event_id=event_id)).arm_id
        return arm


def test_the_node_example_chooses_then_rewards(served: tuple[ServerThread, str | None]) -> None:
    s, token = served
    r = _run([_tool("node"), str(EXAMPLES / "choose.mjs")], s, token)
    assert r.returncode == 0, r.stdout + r.stderr
    chosen = re.fullmatch(r"chosen: (\S+) \(probability ([0-9.e-]+), event (\S+)\)\nreward: (\S+)\n", r.stdout)
    assert chosen is not None, r.stdout
    arm, probability, event_id, status = chosen.groups()
    assert arm in ARMS and 0.0 < float(probability) <= 1.0
    assert status == "REWARD_STATUS_LEARNED"
    assert _explained_arm(s, token, event_id) == arm


def test_the_curl_example_chooses_then_rewards(served: tuple[ServerThread, str | None]) -> None:
    s, token = served
    _tool("curl")
    r = _run([_tool("bash"), str(EXAMPLES / "choose.sh")], s, token)
    assert r.returncode == 0, r.stdout + r.stderr
    choose_line, reward_line = r.stdout.strip().splitlines()
    chosen, rewarded = json.loads(choose_line), json.loads(reward_line)
    assert chosen["armId"] in ARMS and chosen["eventId"].startswith("curl-")
    assert rewarded == {"status": "REWARD_STATUS_LEARNED"}
    assert _explained_arm(s, token, chosen["eventId"]) == chosen["armId"]


@pytest.fixture
def authed(tmp_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db", http_port=0, init_config=str(DEMO), auth_tokens=TOKENS))
    yield s
    s.stop()


@pytest.mark.parametrize(
    ("token", "code", "http_status"),
    [("wrong-token-0000", 16, 401), (LIMITED_TOKEN, 7, 403)],  # unknown token; a token for ussd_main_menu only
    ids=["unauthenticated", "permission-denied"],
)
def test_a_refusal_prints_its_status_and_exits_non_zero(authed: ServerThread, token: str, code: int, http_status: int) -> None:
    node = _run([_tool("node"), str(EXAMPLES / "choose.mjs")], authed, token)
    assert node.returncode == 1 and node.stdout == ""
    assert re.fullmatch(rf"error: HTTP {http_status}, code {code}: .+\n", node.stderr), node.stderr
    _tool("curl")
    sh = _run([_tool("bash"), str(EXAMPLES / "choose.sh")], authed, token)
    assert sh.returncode == 22, sh.stdout + sh.stderr  # curl's exit code for an HTTP status of 400 or more
    status = json.loads(sh.stdout)
    assert status["code"] == code and status["message"]
    assert "reward" not in sh.stdout  # stopped after the refused Choose


def test_a_server_that_does_not_answer_is_said_so() -> None:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        node = subprocess.run(
            [_tool("node"), str(EXAMPLES / "choose.mjs")],
            cwd=ROOT,
            env={**os.environ, "NEXTBEST_HTTP": f"http://127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert node.returncode == 1
    assert node.stderr == f"error: http://127.0.0.1:{port} did not answer: ECONNREFUSED\n", node.stderr

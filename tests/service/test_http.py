"""The HTTP/JSON door (serve --http-port): the same contract as gRPC, through real servers on port
0 and urllib, with auth and TLS on and off."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from nextbest.v1 import admin_pb2, decision_pb2
from tests import envs
from tests.harness import ADMIN_TOKEN, CHANNEL_TOKEN, LIMITED_TOKEN, ROOT, TOKENS, FakeClock, ServerThread, make_settings, token_client


def call(
    s: ServerThread,
    verb: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, parsed JSON answer) of one request to the server's HTTP port."""
    port = s.running.http_port
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    scheme = "https" if tls is not None else "http"
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", data=data, method=verb, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=tls) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def parsed(cls: type[Message], doc: dict[str, Any]) -> Any:
    return json_format.ParseDict(doc, cls())


CHOOSE = {"customerId": "c1", "features": [{"namespace": "customer", "name": "segment", "text": "youth"}]}


def _server(db: str, **kw: Any) -> ServerThread:
    s = ServerThread(make_settings(db, http_port=0, seed="http-test", **kw), FakeClock())
    with token_client(s.target, ADMIN_TOKEN if kw.get("auth_tokens") else None) as c:
        c.apply([envs.placement(), envs.placement("ussd_main_menu")])
    return s


@pytest.fixture
def twins(tmp_path: Path) -> Any:
    """Two servers alike (seed, clock, configuration): one is called over gRPC, one over HTTP."""
    a, b = _server(f"sqlite:///{tmp_path}/a.db"), _server(f"sqlite:///{tmp_path}/b.db")
    yield a, b
    a.stop()
    b.stop()


def test_choose_reward_explain_and_stats_over_http_equal_grpc(twins: tuple[ServerThread, ServerThread]) -> None:
    over_grpc, over_http = twins
    with over_grpc.client() as c:
        choose_request = json_format.ParseDict({**CHOOSE, "placement": "app_home_banner", "eventId": "ev-1"}, decision_pb2.ChooseRequest())
        chosen = c.decision.Choose(choose_request)
        rewarded = c.decision.Reward(decision_pb2.RewardRequest(event_id="ev-1", reward=2.5))
        over_grpc.call(over_grpc.engine.writer.flush())
        explained = c.decision.Explain(decision_pb2.ExplainRequest(event_id="ev-1"))
        stats = c.admin.GetStats(admin_pb2.GetStatsRequest(placement="app_home_banner"))

    status, doc = call(over_http, "POST", "/v1/placements/app_home_banner:choose", {**CHOOSE, "eventId": "ev-1"})
    assert status == 200 and doc["eventId"] == "ev-1"
    assert parsed(decision_pb2.ChooseResponse, doc) == chosen
    status, doc = call(over_http, "POST", "/v1/events/ev-1:reward", {"reward": 2.5})
    assert (status, doc) == (200, {"status": "REWARD_STATUS_LEARNED"})
    assert parsed(decision_pb2.RewardResponse, doc) == rewarded
    over_http.call(over_http.engine.writer.flush())
    status, doc = call(over_http, "GET", "/v1/events/ev-1:explain")
    assert status == 200
    assert parsed(decision_pb2.ExplainResponse, doc) == explained
    status, doc = call(over_http, "GET", "/v1/placements/app_home_banner/stats")
    assert status == 200
    assert parsed(admin_pb2.GetStatsResponse, doc) == stats
    with over_http.client() as c:  # one server, both doors: the same answers
        assert c.decision.Explain(decision_pb2.ExplainRequest(event_id="ev-1")) == explained


def test_other_routes_batch_activate_admin_and_query_parameters(tmp_path: Path) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db")
    try:
        status, doc = call(s, "POST", "/v1/placements/app_home_banner:choose", {"eventId": "d-1", "deferActivation": True})
        assert status == 200
        assert call(s, "POST", "/v1/events/d-1:activate", {}) == (200, {"status": "ACTIVATE_STATUS_ACTIVATED"})
        status, doc = call(s, "POST", "/v1/events:batchReward", {"rewards": [{"eventId": "d-1", "reward": 1}, {"eventId": "nope"}]})
        assert status == 200 and doc["results"][0]["status"] == "REWARD_STATUS_LEARNED" and doc["results"][1]["code"] == 5
        status, doc = call(s, "GET", "/v1/placements")
        assert status == 200 and [p["id"] for p in doc["placements"]] == ["app_home_banner", "ussd_main_menu"]
        status, doc = call(s, "GET", f"/v1/placements/app_home_banner/arms/{envs.ARMS[0]}")
        assert status == 200 and doc["arm"]["id"] == envs.ARMS[0]
        status, doc = call(s, "GET", "/v1/placements/app_home_banner/stats?endTime=2027-01-15T00:00:00Z")
        assert status == 200
        status, doc = call(s, "GET", "/v1/events/d-1:explain?slot=abc")
        assert status == 400 and doc["message"].startswith("query parameter 'slot': ")
        status, doc = call(s, "GET", "/v1/events/d-1:explain?slot=0&slot=1")  # not the last silently
        assert (status, doc["code"]) == (400, 3) and doc["message"].startswith("query parameter 'slot': given more than once")
        status, doc = call(s, "GET", "/v1/placements/app_home_banner/stats?endTime=2027-01-15T00:00:00Z&end_time=2027-01-16T00:00:00Z")
        assert status == 400 and "more than once (also as 'endTime')" in doc["message"]
        status, doc = call(s, "GET", "/v1/events/d-1:explain?bogus=1")
        assert status == 400 and "bogus" in doc["message"]
    finally:
        s.stop()


def test_errors_are_google_rpc_status_json_with_envoys_http_status(tmp_path: Path) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db", max_message_bytes=4096)
    try:
        bad_field = call(s, "POST", "/v1/placements/app_home_banner:choose", {"features": [{"name": "x", "number": "lots"}]})
        assert bad_field[0] == 400 and bad_field[1]["code"] == 3 and bad_field[1]["details"] == []
        assert "number" in bad_field[1]["message"]
        unknown = call(s, "POST", "/v1/placements/app_home_banner:choose", {"customerId": "c", "bogusField": 1})
        assert unknown[0] == 400 and "bogusField" in unknown[1]["message"]
        not_json = call(s, "POST", "/v1/placements/app_home_banner:choose", b"{not json")
        assert not_json[0] == 400 and not_json[1]["message"].startswith("body: not valid JSON")
        not_object = call(s, "POST", "/v1/placements/app_home_banner:choose", [1, 2])
        assert not_object[0] == 400 and not_object[1]["code"] == 3
        # The servicer's own validation, through the error catalog, names the field as over gRPC.
        domain = call(s, "POST", "/v1/placements/app_home_banner:choose", {"features": [{"name": "x"}]})
        assert domain[0] == 400 and "features[0].value" in domain[1]["message"]
        assert call(s, "POST", "/v1/events/nope:reward", {"reward": 1})[0] == 404
        status, doc = call(s, "GET", "/v1/events/nope:explain")
        assert status == 404 and doc["code"] == 5
        assert call(s, "POST", "/v1/placements/nope:choose", {})[0] == 404
        call(s, "POST", "/v1/placements/app_home_banner:choose", {"eventId": "dup"})
        assert call(s, "POST", "/v1/placements/app_home_banner:choose", {"eventId": "dup"})[0] == 409
        assert call(s, "GET", "/v1/no/such/route") == (404, {"code": 5, "message": "no route for GET /v1/no/such/route", "details": []})
        assert call(s, "GET", "/v1/events:batchReward")[0] == 405
        too_big = call(s, "POST", "/v1/events:batchReward", {"rewards": [{"eventId": "e" * 100, "reward": 1}] * 100})
        assert too_big[0] == 413 and too_big[1]["code"] == 8
        long_field = call(s, "POST", "/v1/placements/app_home_banner:choose", {"x" * 3000: 1})
        assert long_field[0] == 400 and len(long_field[1]["message"]) <= 1000
    finally:
        s.stop()


def rpcs(s: ServerThread, method: str, code: str) -> float:
    """The server's RPC count of a method and status code (its Prometheus histogram)."""
    labels = {"method": f"nextbest.v1.{method}", "code": code}
    return s.engine.metrics.registry.get_sample_value("nextbest_rpc_duration_seconds_count", labels) or 0.0


@pytest.mark.parametrize("auth", [False, True])
def test_http_calls_are_counted_with_the_grpc_ones(tmp_path: Path, auth: bool) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db", **({"auth_tokens": TOKENS} if auth else {}))
    try:
        token = CHANNEL_TOKEN if auth else None
        before = rpcs(s, "DecisionService/Choose", "OK")
        assert call(s, "POST", "/v1/placements/app_home_banner:choose", {}, token)[0] == 200
        with token_client(s.target, token) as c:
            c.choose("app_home_banner")
        assert rpcs(s, "DecisionService/Choose", "OK") == before + 2
        assert call(s, "GET", "/v1/events/nope:explain", token=token)[0] == 404
        assert rpcs(s, "DecisionService/Explain", "NOT_FOUND") == 1
    finally:
        s.stop()


def test_a_grpc_timeout_header_is_the_deadline(tmp_path: Path) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db")
    try:
        path = "/v1/placements/app_home_banner:choose"
        headers = {"grpc-timeout": "0n"}  # already passed: dropped by the overload guard, as over gRPC
        assert call(s, "POST", path, {}, headers=headers) == (
            504,
            {"code": 4, "message": "the deadline passed before the call was served", "details": []},
        )
        assert call(s, "POST", path, {}, headers={"grpc-timeout": "5S"})[0] == 200
        status, doc = call(s, "POST", path, {}, headers={"grpc-timeout": "soon"})
        assert status == 400 and doc["message"].startswith("grpc-timeout")
    finally:
        s.stop()


def test_the_served_openapi_document_is_docs_openapi_json_with_its_comments(tmp_path: Path) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.running.http_port}/v1/openapi.json", timeout=10) as r:
            served = r.read().decode()
        assert served == (ROOT / "docs" / "openapi.json").read_text()
        assert json.loads(served)["paths"]["/v1/events/{event_id}:reward"]["post"]["description"]
    finally:
        s.stop()


def test_path_variables_are_percent_decoded(tmp_path: Path) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db")
    try:
        status, doc = call(s, "POST", "/v1/placements/app_home_banner:choose", {"eventId": "order/7:a b"})
        assert (status, doc["eventId"]) == (200, "order/7:a b")
        assert call(s, "POST", "/v1/events/order%2F7:a%20b:reward", {"reward": 1}) == (200, {"status": "REWARD_STATUS_LEARNED"})
    finally:
        s.stop()


def test_auth_is_the_grpc_ports(tmp_path: Path) -> None:
    s = _server(f"sqlite:///{tmp_path}/nb.db", auth_tokens=TOKENS)
    try:
        path = "/v1/placements/app_home_banner:choose"
        for token in (None, "wrong-token"):
            status, doc = call(s, "POST", path, {}, token)
            assert (status, doc["code"]) == (401, 16)
        # As on the gRPC port, auth refuses before the request is parsed.
        assert call(s, "POST", path, b"{not json")[0] == 401
        assert call(s, "POST", path, b"{not json", LIMITED_TOKEN)[0] == 400  # its placement is not known yet
        assert call(s, "POST", "/v1/placements:choose", {}, ADMIN_TOKEN)[0] == 404  # no such route, whoever asks
        assert call(s, "POST", path, {"bogus": 1}, ADMIN_TOKEN)[0] == 403
        status, doc = call(s, "POST", path, {}, LIMITED_TOKEN)
        assert (status, doc["code"]) == (403, 7) and "app_home_banner" in doc["message"]
        assert call(s, "POST", "/v1/placements/ussd_main_menu:choose", {"eventId": "u-1"}, LIMITED_TOKEN)[0] == 200
        assert call(s, "POST", path, {"eventId": "a-1"}, CHANNEL_TOKEN)[0] == 200
        assert call(s, "GET", "/v1/placements/app_home_banner/stats", token=CHANNEL_TOKEN)[0] == 403
        status, doc = call(s, "GET", "/v1/placements/app_home_banner/stats", token=ADMIN_TOKEN)
        assert status == 200
        with token_client(s.target, ADMIN_TOKEN) as admin:
            assert parsed(admin_pb2.GetStatsResponse, doc) == admin.admin.GetStats(admin_pb2.GetStatsRequest(placement="app_home_banner"))
        # The limited token's Reward of another placement's event is NOT_FOUND, as over gRPC.
        assert call(s, "POST", "/v1/events/a-1:reward", {"reward": 1}, LIMITED_TOKEN)[0] == 404
    finally:
        s.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key"]
        + ["-out", "server.pem", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        cwd=d,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return d


def test_tls_serves_https_with_the_same_certificate(tmp_path: Path, cert: Path) -> None:
    settings = make_settings(
        f"sqlite:///{tmp_path}/nb.db",
        http_port=0,
        tls_cert_file=str(cert / "server.pem"),
        tls_key_file=str(cert / "server.key"),
        auth_tokens=TOKENS,
    )
    server = ServerThread(settings)
    try:
        creds = grpc.ssl_channel_credentials((cert / "server.pem").read_bytes())
        with token_client(f"localhost:{server.port}", ADMIN_TOKEN, creds) as admin:
            admin.apply([envs.placement()])
        trust = ssl.create_default_context(cafile=str(cert / "server.pem"))
        status, doc = call(server, "POST", "/v1/placements/app_home_banner:choose", {"eventId": "t-1"}, CHANNEL_TOKEN, trust)
        assert status == 200 and doc["eventId"] == "t-1" and doc["armId"] in envs.ARMS
        assert call(server, "POST", "/v1/placements/app_home_banner:choose", {}, None, trust)[0] == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # nobody in clear
            call(server, "GET", "/v1/placements", token=ADMIN_TOKEN)
        with token_client(f"localhost:{server.port}", CHANNEL_TOKEN, creds) as chan:
            assert chan.decision.Explain(decision_pb2.ExplainRequest(event_id="t-1")).arm_id == doc["armId"]
    finally:
        server.stop()


def test_off_by_default(db_url: str) -> None:
    s = ServerThread(make_settings(db_url))
    try:
        assert s.running.http_port is None and s.running.http is None
    finally:
        s.stop()

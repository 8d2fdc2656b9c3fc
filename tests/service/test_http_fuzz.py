"""schemathesis against a live HTTP door: requests generated from the served /v1/openapi.json,
valid and invalid ones, get no 5xx, and every answer conforms to the document (status and body).

The operations are run one by one from the loaded schema (``APIOperation.as_strategy``) rather
than through ``schema.parametrize()``: the schema lives on a server the test starts, and
schemathesis' lazy ``from_fixture`` schemas fail under pytest 9 (``Function._nodeid``). Random
path variables name nothing (404), so a third pass fixes them to a placement, arm and event
that exist, for the success answers to be generated and checked too."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from nextbest.v1 import decision_pb2
from tests import envs
from tests.harness import TOKENS, FakeClock, ServerThread, make_settings

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
KNOWN = {"placement": "app_home_banner", "arm_id": envs.ARMS[0], "event_id": "ev-fuzz"}
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = tmp_path_factory.mktemp("fuzz") / "nb.db"
    s = ServerThread(make_settings(f"sqlite:///{db}", http_port=0, seed="http-fuzz"), FakeClock())
    with s.client() as c:
        c.apply([envs.placement(), envs.placement("ussd_main_menu")])
        c.decision.Choose(decision_pb2.ChooseRequest(placement="app_home_banner", event_id="ev-fuzz", customer_id="c1"))
    yield s
    s.stop()


@pytest.mark.parametrize(
    ("mode", "known"), [(POSITIVE, False), (NEGATIVE, False), (POSITIVE, True)], ids=["valid", "invalid", "valid-on-known-ids"]
)
def test_the_http_door_keeps_to_its_openapi_document(server: ServerThread, mode: schemathesis.GenerationMode, known: bool) -> None:
    base = f"http://127.0.0.1:{server.running.http_port}"
    loaded = schemathesis.openapi.from_url(f"{base}/v1/openapi.json")
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == 20
    assert "POST /v1/placements/{placement}:choose" in {op.label for op in operations}
    ran = 0
    for operation in operations:
        raw = operation.definition.raw
        params = raw.get("parameters", [])
        wrongable = "requestBody" in raw or any(p["in"] == "query" for p in params)
        if mode == NEGATIVE and not wrongable:
            continue  # nothing to send wrong: no body, no query, and a path variable takes any text
        fixed = {p["name"]: KNOWN[p["name"]] for p in params if p["in"] == "path" and p["name"] in KNOWN} if known else {}
        if known and not fixed:
            continue

        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
        @settings(max_examples=10, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            case.call_and_validate(base_url=base, checks=CHECKS, timeout=10)

        call()
        ran += 1
    assert ran == {(POSITIVE, False): 20, (NEGATIVE, False): 14, (POSITIVE, True): 11}[(mode, known)]


def test_the_document_is_served_without_a_token_where_calls_need_one(tmp_path: Path, server: ServerThread) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/auth.db", http_port=0, auth_tokens=TOKENS), FakeClock())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.running.http_port}/v1/openapi.json", timeout=10) as r:
            served = json.loads(r.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{server.running.http_port}/v1/openapi.json", timeout=10) as r:
            assert served == json.loads(r.read())
        assert served["security"] == [{}, {"bearer": []}]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{s.running.http_port}/v1/placements", timeout=10)
        assert refused.value.code == 401
    finally:
        s.stop()

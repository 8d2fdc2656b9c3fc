"""schemathesis against a live HTTP door: requests generated from the served /v1/openapi.json,
valid and invalid ones, get no 5xx, and every answer conforms to the document (status and body).

The operations are run one by one from the loaded schema (``APIOperation.as_strategy``) rather
than through ``schema.parametrize()``: the schema lives on a server the test starts, and
schemathesis' lazy ``from_fixture`` schemas fail under pytest 9 (``Function._nodeid``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests import envs
from tests.harness import FakeClock, ServerThread, make_settings

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = tmp_path_factory.mktemp("fuzz") / "nb.db"
    s = ServerThread(make_settings(f"sqlite:///{db}", http_port=0, seed="http-fuzz"), FakeClock())
    with s.client() as c:
        c.apply([envs.placement(), envs.placement("ussd_main_menu")])
    yield s
    s.stop()


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], ids=str)
def test_the_http_door_keeps_to_its_openapi_document(server: ServerThread, mode: schemathesis.GenerationMode) -> None:
    base = f"http://127.0.0.1:{server.running.http_port}"
    loaded = schemathesis.openapi.from_url(f"{base}/v1/openapi.json")
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == 20
    assert "POST /v1/placements/{placement}:choose" in {op.label for op in operations}
    for operation in operations:
        raw = operation.definition.raw
        wrongable = "requestBody" in raw or any(p["in"] == "query" for p in raw.get("parameters", []))
        if mode == schemathesis.GenerationMode.NEGATIVE and not wrongable:
            continue  # nothing to send wrong: no body, no query, and a path variable takes any text

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            case.call_and_validate(base_url=base, checks=CHECKS, timeout=10)

        call()

"""Requests built from HTTP routes (nextbest.rpc.http_routes.build_request): errors name the query
parameter or the body at fault, and a field that takes one value refuses a query key given twice."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

from nextbest.app import SERVICES
from nextbest.bandit.errors import InvalidInput
from nextbest.rpc.http_routes import Route, build_request, match, routes_of
from nextbest.v1 import decision_pb2, profile_pb2

ROUTES = routes_of([descriptor_pool.Default().FindServiceByName(name) for name in SERVICES])


def _route(verb: str, path: str) -> tuple[Route, dict[str, str]]:
    route, variables, _ = match(ROUTES, verb, path)
    assert route is not None, path
    return route, variables


def test_query_parameters_fill_the_request() -> None:
    route, variables = _route("GET", "/v1/events/ev-1:explain")
    assert build_request(route, variables, None, [("slot", "2")]) == decision_pb2.ExplainRequest(event_id="ev-1", slot=2)
    route, variables = _route("DELETE", "/v1/profiles/c1")
    request = build_request(route, variables, None, [("eraseDecisions", "true")])
    assert request == profile_pb2.DeleteProfileRequest(customer_id="c1", erase_decisions=True)


@pytest.mark.parametrize(
    ("path", "query", "named"),
    [
        ("/v1/events/ev-1:explain", [("slot", "abc")], "query parameter 'slot'"),
        ("/v1/placements/p/stats", [("startTime", "2027-01-01T00:00:00Z"), ("endTime", "soon")], "query parameter 'endTime'"),
        ("/v1/placements/p/stats", [("start_time", "yesterday")], "query parameter 'start_time'"),
    ],
)
def test_a_bad_query_value_is_named_as_the_query_parameter(path: str, query: list[tuple[str, str]], named: str) -> None:
    route, variables = _route("GET", path)
    with pytest.raises(InvalidInput) as e:
        build_request(route, variables, None, query)
    assert e.value.field == named
    assert str(e.value).startswith(named + ": ")
    assert "body" not in str(e.value)


@pytest.mark.parametrize(
    ("path", "query", "named", "said"),
    [
        ("/v1/events/ev-1:explain", [("slot", "1"), ("slot", "2")], "query parameter 'slot'", "given more than once; slot takes one value"),
        ("/v1/events/ev-1:explain", [("slot", "1"), ("slot", "1")], "query parameter 'slot'", "given more than once"),
        (
            "/v1/placements/p/stats",
            [("end_time", "2027-01-01T00:00:00Z"), ("endTime", "2027-02-01T00:00:00Z")],
            "query parameter 'endTime'",
            "given more than once (also as 'end_time'); end_time takes one value",
        ),
    ],
)
def test_a_single_value_field_given_twice_is_refused(path: str, query: list[tuple[str, str]], named: str, said: str) -> None:
    route, variables = _route("GET", path)
    with pytest.raises(InvalidInput) as e:
        build_request(route, variables, None, query)
    assert e.value.field == named
    assert said in e.value.message


def test_a_bad_body_is_still_named_as_the_body() -> None:
    route, variables = _route("POST", "/v1/placements/p:choose")
    with pytest.raises(InvalidInput) as e:
        build_request(route, variables, {"features": [{"name": "x", "number": "lots"}]}, [])
    assert e.value.field == "body"

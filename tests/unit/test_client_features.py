"""The client's pieces without a server: strict feature conversion, the error classes by status
code, the backoff schedule and the attempts a timeout allows."""

from __future__ import annotations

import pickle
from decimal import Decimal
from typing import Any

import grpc
import pytest

import nextbest
from nextbest.client import NextbestClient, RetryPolicy, to_features
from nextbest.client_errors import (
    ERRORS,
    InvalidArgumentError,
    NotFoundError,
    ServiceError,
    UnavailableError,
    error_for,
)
from nextbest.client_shared import Attempts
from nextbest.v1 import common_pb2


def _plain(feats: list[common_pb2.Feature]) -> list[tuple[str, str, object]]:
    return [(f.namespace, f.name, getattr(f, f.WhichOneof("value") or "text")) for f in feats]


def test_numbers_texts_and_booleans_convert_and_none_is_left_out() -> None:
    got = to_features({"customer": {"plan": None, "arpu": 12, "segment": "youth", "roaming": True}, "hour": 9.5, "gone": None})
    assert _plain(got) == [("customer", "arpu", 12.0), ("customer", "segment", "youth"), ("customer", "roaming", "true"), ("", "hour", 9.5)]
    assert [f.WhichOneof("value") for f in got] == ["number", "text", "text", "number"]
    assert _plain(to_features({"flag": False})) == [("", "flag", "false")]  # a bool is the text, as rules spell flags
    assert to_features(None) == [] and to_features({}) == []


@pytest.mark.parametrize(
    "features, message",
    [
        ({"customer": {"tags": ["a", "b"]}}, "feature customer.tags: a list is not"),
        ({"tags": ("a",)}, "feature tags: a tuple is not"),
        ({"customer": {"address": {"city": "x"}}}, "feature customer.address: namespaces do not nest"),
        ({"when": object()}, "feature when: a object is not"),
        ({"blob": b"xy"}, "feature blob: a bytes is not"),
        ({"price": Decimal("1.5")}, "feature price: a Decimal is not"),
        ({1: "x"}, "feature 1: names are texts"),
        ({"customer": {2: "x"}}, "feature 'customer.2': names are texts"),
    ],
)
def test_anything_else_is_a_type_error_naming_the_key(features: dict[Any, Any], message: str) -> None:
    with pytest.raises(TypeError) as e:
        to_features(features)
    assert str(e.value).startswith(message), str(e.value)


def test_feature_messages_pass_and_other_items_do_not() -> None:
    f = common_pb2.Feature(name="segment", text="youth")
    assert to_features([f]) == [f]
    with pytest.raises(TypeError) as e:
        to_features([f, ("segment", "youth")])  # type: ignore[list-item]
    assert str(e.value).startswith("features[1]: a tuple")


def test_choose_refuses_a_bad_feature_before_sending() -> None:
    with NextbestClient("127.0.0.1:1") as nb, pytest.raises(TypeError) as e:
        nb.choose("p", {"customer": {"plan": ["prepaid"]}})
    assert "customer.plan" in str(e.value)


@pytest.mark.parametrize(
    "code, cls, domain",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError, nextbest.InvalidInput),
        (grpc.StatusCode.NOT_FOUND, NotFoundError, nextbest.NotFound),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError, nextbest.Unavailable),
        (grpc.StatusCode.CANCELLED, ServiceError, nextbest.NextbestError),
    ],
)
def test_a_status_becomes_its_class_which_is_also_the_domain_class(code: grpc.StatusCode, cls: type, domain: type) -> None:
    e = error_for(code, "x: y", "Reward")
    assert type(e) is cls and isinstance(e, domain) and isinstance(e, grpc.RpcError) and isinstance(e, nextbest.ServiceError)
    assert (e.code(), e.details(), e.method, str(e)) == (code, "x: y", "Reward", f"{code.name}: x: y")
    assert error_for(code.value[0], "x: y").code() == code  # a batch item's number


def test_invalid_argument_carries_the_field_it_names() -> None:
    e = error_for(grpc.StatusCode.INVALID_ARGUMENT, "rewards[1].reward: must be finite, got nan")
    assert isinstance(e, InvalidArgumentError) and e.field == "rewards[1].reward" and e.message.startswith("rewards[1]")
    assert error_for(grpc.StatusCode.INVALID_ARGUMENT, "no field here").field == ""
    assert error_for(grpc.StatusCode.NOT_FOUND, "event: x").field == ""  # only INVALID_ARGUMENT names fields


def test_every_class_has_its_own_code_and_errors_pickle() -> None:
    assert all(cls.status is code for code, cls in ERRORS.items()) and len(set(ERRORS.values())) == len(ERRORS)
    e = pickle.loads(pickle.dumps(error_for(grpc.StatusCode.INVALID_ARGUMENT, "slot: too big", "Reward")))
    assert isinstance(e, InvalidArgumentError) and (e.field, e.method) == ("slot", "Reward")


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    top = RetryPolicy(initial=0.1, maximum=1.0, multiplier=2.0, jitter=lambda: 1.0)
    assert [top.pause(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert RetryPolicy(jitter=lambda: 0.0).pause(3) == 0.0  # full jitter: anywhere from nothing
    assert RetryPolicy(initial=0.1, jitter=lambda: 0.5).pause(1) == 0.1


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_attempts_retry_only_retryable_codes_within_the_timeout_and_count() -> None:
    clock = _Clock()
    policy = RetryPolicy(attempts=3, initial=0.1, jitter=lambda: 1.0)
    a = Attempts(policy, 10.0, clock)
    assert a.timeout() == 10.0 and a.after(_Failed(grpc.StatusCode.UNAVAILABLE)) == 0.1
    clock.t += 0.1
    assert a.timeout() == pytest.approx(9.9) and a.after(_Failed(grpc.StatusCode.RESOURCE_EXHAUSTED)) == 0.2
    a.timeout()
    assert a.after(_Failed(grpc.StatusCode.UNAVAILABLE)) is None  # three attempts made
    b = Attempts(policy, 10.0, clock)
    b.timeout()
    assert b.after(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED)) is None and b.after(_Failed(grpc.StatusCode.INTERNAL)) is None
    c = Attempts(policy, 0.05, clock)
    c.timeout()
    assert c.after(_Failed(grpc.StatusCode.UNAVAILABLE)) is None  # the pause would outlast the timeout
    assert Attempts(policy, None, clock).timeout() is None

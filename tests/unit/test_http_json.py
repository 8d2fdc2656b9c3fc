"""parse_into (the HTTP door's JSON fast path) against json_format.ParseDict: the same message for
every request the door takes, built at random and written with MessageToDict under either
naming; and for hostile objects (wrong types, bools for numbers, unknown keys, nulls, junk
anywhere) the same exception, type and text."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextbest.bench.procs import choose_pool
from nextbest.rpc import http_json
from nextbest.rpc.http_json import parse_into
from nextbest.v1 import decision_pb2, profile_pb2

REQUESTS: list[type[Message]] = [
    decision_pb2.ChooseRequest,
    decision_pb2.RewardRequest,
    decision_pb2.RewardBatchRequest,
    decision_pb2.ReportConversionsRequest,
    profile_pb2.PutProfilesRequest,
    decision_pb2.ActivateRequest,
    decision_pb2.ExplainRequest,
    profile_pb2.GetProfileRequest,
    profile_pb2.DeleteProfileRequest,
]
F = FieldDescriptor
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_STRING:
        return st.text(max_size=12)
    if field.type == F.TYPE_DOUBLE:
        return st.one_of(st.floats(allow_nan=False, allow_infinity=False), DOUBLES)
    if field.type == F.TYPE_INT32:
        return st.integers(-(2**31), 2**31 - 1)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise AssertionError(f"no strategy for {field.full_name}")


def _fill(draw: st.DrawFn, message: Message, depth: int) -> None:
    d: Descriptor = message.DESCRIPTOR
    chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in d.oneofs}
    for field in d.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen[oneof.name] is not field:
            continue
        if field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp":
            if draw(st.booleans()):
                ts = getattr(message, field.name)
                ts.seconds = draw(st.integers(-62135596800, 253402300799))
                ts.nanos = draw(st.integers(0, 999_999_999))
            continue
        if field.is_repeated:
            n = draw(st.integers(0, 3 if depth < 3 else 0))
            for _ in range(n):
                if field.message_type is not None:
                    _fill(draw, getattr(message, field.name).add(), depth + 1)
                else:
                    getattr(message, field.name).append(draw(_scalar(field)))
        elif field.message_type is not None:
            if depth < 3 and draw(st.booleans()):
                _fill(draw, getattr(message, field.name), depth + 1)
        elif oneof is not None or draw(st.booleans()):
            setattr(message, field.name, draw(_scalar(field)))


@st.composite
def requests(draw: st.DrawFn) -> Message:
    cls = draw(st.sampled_from(REQUESTS))
    message = cls()
    _fill(draw, message, 0)
    return message


def outcome(fn: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except Exception as e:  # the exception itself is the result compared
        return ("raised", type(e), str(e))


def same(d: Any, cls: type[Message]) -> None:
    assert outcome(lambda: parse_into(d, cls)) == outcome(lambda: json_format.ParseDict(d, cls()))


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.booleans())
def test_random_requests_parse_as_parse_dict_does(message: Message, proto_names: bool) -> None:
    d = json_format.MessageToDict(message, preserving_proto_field_name=proto_names)
    got = parse_into(d, type(message))
    assert got == json_format.ParseDict(d, type(message)())
    # Against the original through JSON: a NaN of any bit pattern prints as "NaN" (the message's
    # own comparison is bytewise, so a generated NaN need not equal the parsed, canonical one).
    assert json_format.MessageToDict(got, preserving_proto_field_name=proto_names) == d


def test_the_bench_choose_requests_take_the_fast_path() -> None:
    for message in choose_pool("bench20", 64):
        for proto_names in (False, True):
            d = json_format.MessageToDict(message, preserving_proto_field_name=proto_names)
            kwargs = http_json._object(d, decision_pb2.ChooseRequest.DESCRIPTOR, 1)
            assert decision_pb2.ChooseRequest(**kwargs) == message == parse_into(d, decision_pb2.ChooseRequest)


def test_oneof_members_with_defaults_and_empty_messages_match() -> None:
    cls = decision_pb2.ChooseRequest
    for d in (
        {"features": [{"number": 0}, {"text": ""}, {}], "slotFeatures": [{}, {"features": []}]},
        {"features": [{"number": -0.0, "name": "x"}], "defer_activation": False, "exclude_arms": ["", "é", "😀"]},
        {"placement": "p", "features": [{"number": 2**60}]},
    ):
        assert http_json._object(d, cls.DESCRIPTOR, 1)
        same(d, cls)


HOSTILE = [
    {"placement": 1},
    {"placement": None},
    {"placement": "\ud800"},
    {"deferActivation": 1},
    {"deferActivation": "true"},
    {"features": [{"number": True}]},
    {"features": [{"number": "1.5"}]},
    {"features": [{"number": "NaN"}]},
    {"features": [{"number": float("nan")}]},
    {"features": [{"number": float("inf")}]},
    {"features": [{"number": 10**400}]},
    {"features": [{"number": 1, "text": "a"}]},
    {"features": [{"number": None, "text": "a"}]},
    {"features": [None]},
    {"features": [[]]},
    {"features": {"name": "x"}},
    {"features": "x"},
    {"customerId": "a", "customer_id": "b"},
    {"slotFeatures": [{"features": [{"name": 3}]}]},
    {"bogus": 1},
    {"features": [{"bogus": 1}]},
    {"[ext]": 1},
    [],
    "x",
]
HOSTILE_REWARDS = [
    {"slot": True},
    {"slot": 1.0},
    {"slot": 1.5},
    {"slot": "3"},
    {"slot": 2**31},
    {"slot": -(2**31) - 1},
    {"reward": False},
    {"rewards": [{"slot": "x"}]},
]


@pytest.mark.parametrize("d", HOSTILE)
def test_hostile_choose_objects_raise_what_parse_dict_raises(d: Any) -> None:
    same(d, decision_pb2.ChooseRequest)


@pytest.mark.parametrize("d", HOSTILE_REWARDS)
def test_hostile_reward_objects_raise_what_parse_dict_raises(d: Any) -> None:
    same(d, decision_pb2.RewardRequest)
    same({"rewards": [d]}, decision_pb2.RewardBatchRequest)


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | DOUBLES | st.text(max_size=4) | st.sampled_from(["NaN", "Infinity", "1", "true"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON tree, for a value to be replaced there."""
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((node, key))
            _slots(value, out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((node, i))
            _slots(value, out)
    return out


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.booleans(), st.data())
def test_hostile_objects_raise_what_parse_dict_raises(message: Message, proto_names: bool, data: st.DataObject) -> None:
    d = json_format.MessageToDict(message, preserving_proto_field_name=proto_names)
    slots = _slots(d, [])
    dicts = [d] + [c for c, _ in slots if isinstance(c, dict)]
    for _ in range(data.draw(st.integers(1, 3))):
        if slots and data.draw(st.booleans()):
            container, key = data.draw(st.sampled_from(slots))
            container[key] = data.draw(JUNK)
        else:
            target = data.draw(st.sampled_from(dicts))
            key = data.draw(
                st.sampled_from(["name", "number", "text", "features", "slot", "eventId", "event_id", "x"]) | st.text(max_size=6)
            )
            target[key] = data.draw(JUNK)
    same(d, type(message))

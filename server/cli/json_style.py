"""The one JSON style of the CLI's ``--json`` outputs: canonical proto3 JSON for a response
message (lowerCamelCase names, int64 as strings, enums by name, timestamps in RFC 3339), as
grpcurl, grpc-gateway and Envoy's gRPC-JSON transcoder print it, with the fields at their default
value printed too, so that every key is there; lowerCamelCase keys for what is not a message.
One line per document, for line-oriented tools (``| jq .`` indents it)."""

from __future__ import annotations

from typing import Any


def message_json(msg: Any) -> str:
    """A protobuf message as canonical proto3 JSON, on one line."""
    from google.protobuf.json_format import MessageToJson

    return str(MessageToJson(msg, always_print_fields_with_no_presence=True, indent=None))


def camel(name: str) -> str:
    """``reward_sum_awaiting_close`` -> ``rewardSumAwaitingClose``, as proto3 JSON names fields."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def camel_keys(value: Any) -> Any:
    """A JSON-ready value (dicts, lists, scalars) with every dict key in lowerCamelCase."""
    if isinstance(value, dict):
        return {camel(str(k)): camel_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [camel_keys(v) for v in value]
    return value

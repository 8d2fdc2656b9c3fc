"""A fast path for proto3 JSON objects turned into request messages, with
``json_format.ParseDict``'s result and errors.

``ParseDict`` walks the message in Python, field by field and value by value (~290 µs for the
bench's ChooseRequest of 30 features). ``parse_into`` checks the common shapes itself — JSON
names mapped to field names by a table built once per message type, each value's type checked
strictly — and builds the message with one call of the upb constructor, which takes nested
dicts for message fields and lists of dicts for repeated ones. Whatever it does not accept
exactly (64-bit integers, which proto JSON gives as strings; bytes; maps; well-known types;
"NaN" and "Infinity"; nulls; unknown or repeated keys; two members of a oneof; a value of
another type; anything the constructor refuses) is handed to ``ParseDict`` whole, so edge
semantics and error messages stay ``ParseDict``'s."""

from __future__ import annotations

import re
from typing import Any, NamedTuple, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

_STRING, _DOUBLE, _FLOAT, _BOOL, _INT32, _UINT32, _ENUM, _MESSAGE = range(8)
_KINDS = {
    FieldDescriptor.TYPE_STRING: _STRING,
    FieldDescriptor.TYPE_DOUBLE: _DOUBLE,
    FieldDescriptor.TYPE_FLOAT: _FLOAT,
    FieldDescriptor.TYPE_BOOL: _BOOL,
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_ENUM: _ENUM,
    FieldDescriptor.TYPE_MESSAGE: _MESSAGE,
}  # no int64 kinds (strings in JSON), bytes (base64) or groups: those go to ParseDict
_FLOAT_MAX = 3.4028234663852886e38  # ParseDict's bound for float fields (type_checkers._FLOAT_MAX)
_MAX_DEPTH = 64  # well under ParseDict's max_recursion_depth (100)
# ParseDict refuses strings with unpaired surrogates (json.loads makes them from \ud800).
_UNPAIRED_SURROGATE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")


class _Fallback(Exception):
    """The value is not one the fast path takes: ParseDict decides."""


class _Field(NamedTuple):
    name: str
    kind: int
    repeated: bool
    oneof: str | None
    message: Descriptor | None
    enum_names: dict[str, int] | None
    enum_numbers: frozenset[int] | None


_Table = dict[str, _Field]
_TABLES: dict[Any, _Table | None] = {}  # by Descriptor (the stubs type DESCRIPTOR as two classes)


def _supported(field: FieldDescriptor) -> bool:
    if field.type not in _KINDS:
        return False
    sub = field.message_type
    if sub is not None and (sub.GetOptions().map_entry or sub.full_name.startswith("google.protobuf.")):
        return False  # maps and well-known types have their own JSON forms
    return True


def _build(descriptor: Descriptor) -> _Table | None:
    """JSON name and field name -> field, for the fields the fast path takes (None: no fast path
    for this message type at all)."""
    if descriptor.full_name.startswith("google.protobuf.") or descriptor.GetOptions().map_entry:
        return None
    table: _Table = {}
    for field in descriptor.fields:
        if not _supported(field):
            continue
        enum = field.enum_type if field.type == FieldDescriptor.TYPE_ENUM else None
        entry = _Field(
            field.name,
            _KINDS[field.type],
            field.is_repeated,
            field.containing_oneof.name if field.containing_oneof is not None else None,
            field.message_type,
            {v.name: v.number for v in enum.values} if enum is not None else None,
            frozenset(v.number for v in enum.values) if enum is not None else None,
        )
        table[field.name] = entry
    for field in descriptor.fields:  # ParseDict looks the JSON name up first
        if field.name in table:
            table[field.json_name] = table[field.name]
    # ParseDict counts oneof names among the keys seen; a key equal to one would change its answer.
    if any(oneof.name in table for oneof in descriptor.oneofs):
        return None
    return table


def _scalar(field: _Field, value: Any) -> Any:
    kind, t = field.kind, type(value)
    if kind == _STRING:
        if t is str and (value.isascii() or _UNPAIRED_SURROGATE.search(value) is None):
            return value
    elif kind == _DOUBLE:
        if t is float:
            if value - value == 0.0:  # finite: NaN and infinities are ParseDict's errors
                return value
        elif t is int:
            return float(value)  # as ParseDict; OverflowError for huge ints goes to it too
    elif kind == _BOOL:
        if t is bool:
            return value
    elif kind == _INT32:
        if t is int and -(2**31) <= value < 2**31:
            return value
    elif kind == _UINT32:
        if t is int and 0 <= value < 2**32:
            return value
    elif kind == _ENUM:
        if t is int:
            assert field.enum_numbers is not None
            if value in field.enum_numbers:
                return value
        elif t is str:
            assert field.enum_names is not None
            number = field.enum_names.get(value)
            if number is not None:
                return number
    elif kind == _FLOAT:
        real = float(value) if t is int else value if t is float else None
        if real is not None and -_FLOAT_MAX <= real <= _FLOAT_MAX:
            return real
    raise _Fallback


def _object(data: Any, descriptor: Any, depth: int) -> dict[str, Any]:
    """Constructor keyword arguments for the JSON object data of a message of descriptor."""
    if type(data) is not dict or depth > _MAX_DEPTH:
        raise _Fallback
    try:
        table = _TABLES[descriptor]
    except KeyError:
        table = _TABLES[descriptor] = _build(descriptor)
    if table is None:
        raise _Fallback
    out: dict[str, Any] = {}
    oneofs: list[str] | None = None
    for key, value in data.items():
        field = table.get(key)
        if field is None:
            raise _Fallback  # an unknown key, or one ParseDict handles itself
        name, kind, repeated, oneof, message = field[:5]
        if name in out:
            raise _Fallback  # the field under both its names
        if oneof is not None:
            if oneofs is None:
                oneofs = [oneof]
            elif oneof in oneofs:
                raise _Fallback
            else:
                oneofs.append(oneof)
        t = type(value)
        if repeated:
            if t is not list:
                raise _Fallback
            if message is not None:
                out[name] = [_object(item, message, depth + 1) for item in value]
            else:
                out[name] = [_scalar(field, item) for item in value]
        elif kind == _STRING and t is str and (value.isascii() or _UNPAIRED_SURROGATE.search(value) is None):
            out[name] = value  # the common cases inline: strings, finite doubles
        elif kind == _DOUBLE and t is float and value - value == 0.0:
            out[name] = value
        elif message is not None:
            out[name] = _object(value, message, depth + 1)
        else:
            out[name] = _scalar(field, value)
    return out


def parse_into(data: Any, message_class: type[M]) -> M:
    """The message of message_class the proto3 JSON object data (as json.loads gives it) stands
    for: equal to ``json_format.ParseDict(data, message_class())``, and raising what it raises."""
    try:
        return message_class(**_object(data, message_class.DESCRIPTOR, 1))
    except Exception:  # _Fallback, OverflowError, or the constructor's ValueError/TypeError
        pass
    return json_format.ParseDict(data, message_class())

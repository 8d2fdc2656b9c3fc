"""HTTP routes read from the ``google.api.http`` options of the service descriptors, and requests
turned into request messages the way Envoy's gRPC-JSON transcoder and grpc-gateway do it: path
variables and the body (``body: "*"`` or one field) for the other verbs, path variables and
query parameters for GET and DELETE. JSON is canonical proto3 JSON (``json_format.ParseDict``);
unknown fields are refused. Only the template forms the protos use are supported: literal
segments, ``{field.path}`` and ``{field.path=*}`` single-segment variables, ``{x=**}`` for the
rest of the path, and a ``:verb`` suffix; anything else stops the start."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from nextbest.bandit.errors import InvalidInput
from nextbest.rpc.http_json import parse_into

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Route:
    """One HTTP binding of one RPC."""

    verb: str  # GET, POST, PUT, PATCH, DELETE
    template: str
    pattern: re.Pattern[str]
    variables: tuple[str, ...]  # field paths, in the order of the pattern's groups
    body: str  # "", "*" or a top-level field name
    method: MethodDescriptor

    @property
    def full_method(self) -> str:
        """The gRPC method name, as interceptors see it: /package.Service/Method."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


def _compile(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    if not template.startswith("/"):
        raise ValueError(f"http rule {template!r}: must start with /")
    path, verb = template, ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and "}" not in last.split(":")[-1]:
        path, verb = template.rsplit(":", 1)
    regex, names, pos = "", [], 0
    for m in _VARIABLE.finditer(path):
        literal = path[pos : m.start()]
        if "{" in literal or "}" in literal or "*" in literal:
            raise ValueError(f"http rule {template!r}: unsupported template")
        regex += re.escape(literal)
        sub = m.group(2)
        if sub in (None, "*"):
            regex += "([^/]+)"
        elif sub == "**":
            regex += "(.+)"
        else:
            raise ValueError(f"http rule {template!r}: unsupported variable pattern {sub!r}")
        names.append(m.group(1))
        pos = m.end()
    tail = path[pos:]
    if "{" in tail or "}" in tail or "*" in tail:
        raise ValueError(f"http rule {template!r}: unsupported template")
    regex += re.escape(tail) + (re.escape(":" + verb) if verb else "")
    return re.compile(regex + r"\Z"), tuple(names)


def _bindings(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def routes_of(services: Iterable[ServiceDescriptor]) -> list[Route]:
    """Every HTTP binding of every method of the services; methods without one are skipped."""
    out: list[Route] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            for rule in _bindings(options.Extensions[annotations_pb2.http]):
                kind = rule.WhichOneof("pattern")
                if kind is None or kind == "custom":
                    raise ValueError(f"{method.full_name}: http rule without a standard verb")
                template = getattr(rule, kind)
                pattern, variables = _compile(template)
                for name in variables:
                    _field_path(method.input_type, name)  # fails at start on a wrong field name
                if rule.body not in ("", "*"):
                    _field_path(method.input_type, rule.body)
                out.append(Route(kind.upper(), template, pattern, variables, rule.body, method))
    return out


def _field_path(descriptor: Any, dotted: str) -> list[FieldDescriptor]:
    fields: list[FieldDescriptor] = []
    for part in dotted.split("."):
        if descriptor is None:
            raise ValueError(f"{dotted}: {fields[-1].name} is not a message")
        field = descriptor.fields_by_name.get(part) or descriptor.fields_by_camelcase_name.get(part)
        if field is None:
            raise ValueError(f"{dotted}: no field {part!r} in {descriptor.full_name}")
        fields.append(field)
        descriptor = field.message_type
    return fields


def match(routes: Iterable[Route], verb: str, raw_path: str) -> tuple[Route | None, dict[str, str], bool]:
    """The route for a request, its path variables (percent-decoded), and whether another verb
    would have matched the path (405 rather than 404)."""
    other = False
    for route in routes:
        m = route.pattern.match(raw_path)
        if m is None:
            continue
        if route.verb != verb:
            other = True
            continue
        return route, {name: unquote(value) for name, value in zip(route.variables, m.groups(), strict=True)}, False
    return None, {}, other


def _take(doc: dict[str, Any], field: FieldDescriptor) -> Any:
    """doc's value of field under either of its names, removed (None when absent)."""
    by_json, by_name = doc.pop(field.json_name, None), doc.pop(field.name, None)
    return by_json if by_json is not None else by_name


def _put(doc: dict[str, Any], fields: list[FieldDescriptor], value: Any, where: str) -> None:
    """Set doc[path] = value, under JSON names: a path variable wins over the body's value."""
    for field in fields[:-1]:
        inner = _take(doc, field)
        inner = {} if inner is None else inner
        if not isinstance(inner, dict):
            raise InvalidInput(where, f"{field.name} must be an object")
        doc[field.json_name] = inner
        doc = inner
    _take(doc, fields[-1])
    doc[fields[-1].json_name] = value


def _scalar(field: FieldDescriptor, text: str, where: str) -> Any:
    """A query-parameter value as ParseDict takes it (booleans are not accepted as text)."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if text in ("true", "false"):
            return text == "true"
        raise InvalidInput(where, "must be true or false")
    return text


def _query_doc(route: Route, query: Iterable[tuple[str, str]]) -> tuple[dict[str, Any], list[tuple[str, list[FieldDescriptor], Any]]]:
    """The request document of a GET's or DELETE's query parameters, and each parameter's
    (where, field path, value), ``where`` naming it as ``query parameter 'key'``. A field that
    takes one value given twice (under either of its names) is refused, as grpc-gateway refuses
    it ("too many values"), rather than the last silently winning."""
    doc: dict[str, Any] = {}
    single: dict[tuple[str, ...], str] = {}
    repeated: dict[tuple[str, ...], tuple[str, list[FieldDescriptor], list[Any]]] = {}
    params: list[tuple[str, list[FieldDescriptor], Any]] = []
    for key, text in query:
        where = f"query parameter {key[:64]!r}"
        try:
            fields = _field_path(route.method.input_type, key)
        except ValueError:
            raise InvalidInput(where, "not a field of the request") from None
        value = _scalar(fields[-1], text, where)
        names = tuple(f.name for f in fields)
        if fields[-1].is_repeated:
            repeated.setdefault(names, (key, fields, []))[2].append(value)
            continue
        if names in single:
            also = "" if single[names] == key else f" (also as {single[names][:64]!r})"
            raise InvalidInput(where, f"given more than once{also}; {'.'.join(names)} takes one value")
        single[names] = key
        _put(doc, fields, value, where)
        params.append((where, fields, value))
    for key, fields, values in repeated.values():
        where = f"query parameter {key[:64]!r}"
        _put(doc, fields, values, where)
        params.append((where, fields, values))
    return doc, params


def _culprit(route: Route, cls: type[Message], params: list[tuple[str, list[FieldDescriptor], Any]]) -> str:
    """The query parameter or path variable whose value the request's message refuses ("" if none alone)."""
    for where, fields, value in params:
        alone: dict[str, Any] = {}
        _put(alone, fields, value, where)
        try:
            json_format.ParseDict(alone, cls())
        except json_format.ParseError:
            return where
    return ""


def build_request(route: Route, variables: Mapping[str, str], body: Any | None, query: Iterable[tuple[str, str]]) -> Message:
    """The request message of a call: ``body`` is the parsed JSON (None without a body). Errors
    name what was wrong: the body, a query parameter (``query parameter 'slot'``) or a path variable."""
    cls = message_factory.GetMessageClass(route.method.input_type)
    doc: dict[str, Any]
    params: list[tuple[str, list[FieldDescriptor], Any]] = []
    if route.body == "*":
        if not isinstance(body, dict):
            raise InvalidInput("body", "must be a JSON object")
        doc = body
    elif route.body:
        field = _field_path(route.method.input_type, route.body)[0]
        doc = {field.json_name: body} if body is not None else {}
    else:
        doc, params = _query_doc(route, query)
    for name, value in variables.items():
        fields = _field_path(route.method.input_type, name)
        _put(doc, fields, value, name)
        params.append((f"path variable {name!r}", fields, value))
    try:
        message: Message = parse_into(doc, cls)  # ParseDict's result and errors, faster
    except json_format.ParseError as e:
        where = _culprit(route, cls, params) or ("body" if route.body else "request")
        raise InvalidInput(where, str(e)) from None
    return message

"""The OpenAPI 3.0 document of the HTTP/JSON door, generated from the same ``google.api.http``
routes the door serves (nextbest.rpc.http_routes), never from the .proto text.

Schemas follow the canonical proto3 JSON mapping: lowerCamelCase property names, 64-bit integers
as strings, enums by name, repeated fields as arrays, maps as objects, bytes as base64 and the
well-known types in their JSON forms. Every failure is a ``google.rpc.Status``.

Comments come from a descriptor set with source info, built with grpc_tools' protoc from proto/
(a test tool): ``python -m nextbest.rpc.openapi`` (scripts/gen-openapi) writes docs/openapi.json
that way, and the comments alone beside this module (openapi_comments.json, package data). The
server, which has no protoc and whose compiled descriptors carry no comments, serves
``served()``: the document of its compiled descriptors with the packaged comments, equal to
docs/openapi.json (tests/tooling/test_openapi_drift.py).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, ServiceDescriptor

from nextbest.rpc.http_routes import Route, routes_of

Schema = dict[str, Any]
Comments = dict[str, str]  # full name of a message, field, enum, value, service or method -> comment

_REF = "#/components/schemas/"
_INT32: Schema = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32: Schema = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64: Schema = {"type": "string", "format": "int64", "pattern": r"^-?[0-9]{1,19}$"}
_UINT64: Schema = {"type": "string", "format": "uint64", "pattern": r"^[0-9]{1,20}$"}
_NUMBER: Schema = {"type": "number", "format": "double"}
_SCALARS: dict[int, Schema] = {
    FieldDescriptor.TYPE_DOUBLE: _NUMBER,
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WRAPPERS: dict[str, Schema] = {
    "google.protobuf.DoubleValue": _NUMBER,
    "google.protobuf.FloatValue": _NUMBER,
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": {}},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": True},
}
_WELL_KNOWN.update({name: {**schema, "nullable": True} for name, schema in _WRAPPERS.items()})
STATUS: Schema = {
    "type": "object",
    "description": "A google.rpc.Status: the gRPC code (google.rpc.Code), a message and details.",
    "properties": {
        "code": _INT32,
        "message": {"type": "string"},
        "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
    },
}


class _Schemas:
    """The components/schemas of messages and enums reached from the routes."""

    def __init__(self, comments: Comments) -> None:
        self.comments = comments
        self.components: dict[str, Schema] = {}

    def _described(self, schema: Schema, full_name: str) -> Schema:
        text = self.comments.get(full_name)
        return {**schema, "description": text} if text else schema

    def ref(self, descriptor: Descriptor | EnumDescriptor) -> Schema:
        name = descriptor.full_name
        if name not in self.components:
            self.components[name] = {}  # reserved first: messages may refer to themselves
            if isinstance(descriptor, EnumDescriptor):
                body: Schema = {"type": "string", "enum": [v.name for v in descriptor.values]}
            else:
                body = self.message(descriptor, ())
            self.components[name] = self._described(body, name)
        return {"$ref": _REF + name}

    def message(self, descriptor: Descriptor, leave_out: Iterable[str]) -> Schema:
        skip = set(leave_out)
        props = {f.json_name: self.field(f) for f in descriptor.fields if f.name not in skip}
        return {"type": "object", "properties": props, "additionalProperties": False}

    def value(self, field: FieldDescriptor) -> Schema:
        if field.enum_type is not None:
            return self.ref(field.enum_type)
        if field.message_type is not None:
            known = _WELL_KNOWN.get(field.message_type.full_name)
            return dict(known) if known is not None else self.ref(field.message_type)
        return dict(_SCALARS[field.type])

    def field(self, field: FieldDescriptor) -> Schema:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type
            schema: Schema = {"type": "object", "additionalProperties": self.value(entry.fields_by_name["value"])}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value(field)}
        else:
            schema = self.value(field)
        text = self.comments.get(field.full_name)
        if not text:
            return schema
        if "$ref" in schema:  # 3.0 ignores a $ref's siblings
            return {"allOf": [schema], "description": text}
        return {**schema, "description": text}


_SHAPE = re.compile(r"\{([^}]*)\}")


def _path_name(template: str) -> str:
    """The OpenAPI path of a template: {field.path=*} as {field_path} (OpenAPI allows dots, but
    tools that fill paths with str.format, such as schemathesis, take them for attributes)."""
    out, depth, skipping = "", 0, False
    for ch in template:
        if ch == "{":
            depth, skipping = depth + 1, False
        elif ch == "}":
            depth, skipping = depth - 1, False
        elif ch == "=" and depth:
            skipping = True
            continue
        if not skipping:
            out += "_" if ch == "." and depth else ch
    return out


def _field_at(descriptor: Descriptor, dotted: str) -> FieldDescriptor:
    first, _, rest = dotted.partition(".")
    field = descriptor.fields_by_name[first]
    return _field_at(field.message_type, rest) if rest and field.message_type is not None else field


def _query(schemas: _Schemas, descriptor: Descriptor, prefix: str, taken: set[str], depth: int = 0) -> list[Schema]:
    """The query parameters of a GET or DELETE: the request's fields outside the path, nested
    messages as dotted names (grpc-gateway's style); repeated messages and maps cannot be sent."""
    params: list[Schema] = []
    for field in descriptor.fields:
        name = prefix + field.json_name
        if prefix + field.name in taken or name in taken:
            continue
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        nested = field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN
        if is_map or (field.is_repeated and field.message_type is not None):
            continue
        if field.message_type is not None and nested:
            if depth < 3:
                params += _query(schemas, field.message_type, name + ".", taken, depth + 1)
            continue
        param: Schema = {"name": name, "in": "query", "required": False, "schema": schemas.field(field)}
        if field.is_repeated:
            param.update(style="form", explode=True)
        params.append(param)
    return params


def _operation(schemas: _Schemas, route: Route, operation_id: str, names: Sequence[str]) -> Schema:
    method = route.method
    request = method.input_type
    op: Schema = {"operationId": operation_id, "tags": [method.containing_service.name]}
    text = schemas.comments.get(method.full_name)
    if text:
        op["summary"] = " ".join(text.split("\n\n", 1)[0].split()).split(". ", 1)[0].rstrip(".")
        op["description"] = text
    params: list[Schema] = []
    for var, name in zip(route.variables, names, strict=True):
        field = _field_at(request, var)
        schema = schemas.value(field)
        if schema.get("type") == "string" and "format" not in schema and "pattern" not in schema:
            schema["minLength"] = 1
        param: Schema = {"name": name, "in": "path", "required": True, "schema": schema}
        text = schemas.comments.get(field.full_name, "")
        if "." in var:
            text = f"The request's {var}. {text}".strip()
        if text:
            param["description"] = text
        params.append(param)
    if not route.body:
        params += _query(schemas, request, "", set(route.variables))
    if params:
        op["parameters"] = params
    if route.body == "*":
        top = {v for v in route.variables if "." not in v}
        body = schemas.message(request, top)
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    elif route.body:
        field = request.fields_by_name[route.body]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schemas.field(field)}}}
    op["responses"] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": schemas.ref(method.output_type)}}},
        "default": {
            "description": "An error, as a google.rpc.Status",
            "content": {"application/json": {"schema": {"$ref": _REF + "google.rpc.Status"}}},
        },
    }
    return op


def document(services: Sequence[ServiceDescriptor], comments: Comments | None = None, version: str = "v1") -> Schema:
    """The OpenAPI document of the services' HTTP routes."""
    services = sorted(services, key=lambda s: s.full_name)  # the same document whatever the order given
    schemas = _Schemas(comments or {})
    paths: dict[str, Schema] = {}
    seen: dict[str, int] = {}
    routes = routes_of(services)
    # Paths alike but for their variables' names are one path in OpenAPI: each takes the names
    # of its shape's first route with the fewest nested fields ({placement} over {placement_id}).
    owner: dict[str, str] = {}
    for route in sorted(routes, key=lambda r: sum("." in v for v in r.variables)):
        owner.setdefault(_SHAPE.sub("{}", _path_name(route.template)), _path_name(route.template))
    for route in routes:
        path = owner[_SHAPE.sub("{}", _path_name(route.template))]
        names = _SHAPE.findall(path)
        base = f"{route.method.containing_service.name}_{route.method.name}"
        seen[base] = seen.get(base, 0) + 1
        operation_id = base if seen[base] == 1 else f"{base}{seen[base]}"
        paths.setdefault(path, {})[route.verb.lower()] = _operation(schemas, route, operation_id, names)
    components = {name: schemas.components[name] for name in sorted(schemas.components)}
    components["google.rpc.Status"] = STATUS
    tags = [
        {"name": s.name, **({"description": schemas.comments[s.full_name]} if schemas.comments.get(s.full_name) else {})} for s in services
    ]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "nextbest",
            "version": version,
            "description": "The nextbest API over HTTP/JSON (canonical proto3 JSON), generated from the "
            "google.api.http annotations of proto/nextbest/v1. Send a Bearer token in Authorization when "
            "the server has tokens; a grpc-timeout header sets the call's deadline.",
        },
        "tags": tags,
        "paths": paths,
        "security": [{}, {"bearer": []}],  # a token when the server has tokens (auth_tokens), none otherwise
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of the server's auth_tokens; its role decides the RPCs allowed.",
                }
            },
        },
    }


COMMENTS_FILE = "openapi_comments.json"  # in nextbest.rpc, written by scripts/gen-openapi


def packaged_comments() -> Comments:
    """The proto comments shipped with the package (full name -> comment)."""
    comments: Comments = json.loads(importlib.resources.files("nextbest.rpc").joinpath(COMMENTS_FILE).read_text(encoding="utf-8"))
    return comments


def served(services: Sequence[ServiceDescriptor]) -> Schema:
    """The document the HTTP door serves: its compiled descriptors with the packaged comments."""
    return document(services, packaged_comments())


def _messages(
    names: dict[tuple[int, ...], str], protos: Iterable[descriptor_pb2.DescriptorProto], path: tuple[int, ...], scope: str
) -> None:
    """names[source-info path] = full name, for the messages, their fields and nested types."""
    for i, m in enumerate(protos):
        here, name = (*path, i), f"{scope}.{m.name}"
        names[here] = name
        for j, f in enumerate(m.field):
            names[(*here, 2, j)] = f"{name}.{f.name}"
        _messages(names, m.nested_type, (*here, 3), name)
        _enums(names, m.enum_type, (*here, 4), name)


def _enums(
    names: dict[tuple[int, ...], str], protos: Iterable[descriptor_pb2.EnumDescriptorProto], path: tuple[int, ...], scope: str
) -> None:
    for i, e in enumerate(protos):
        names[(*path, i)] = f"{scope}.{e.name}"
        for j, v in enumerate(e.value):
            names[(*path, i, 2, j)] = f"{scope}.{v.name}"  # enum values live in the enum's scope


def _comments(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Comments:
    """Leading comments by full name, from the source info of the files."""
    out: Comments = {}
    for fd in files:
        names: dict[tuple[int, ...], str] = {}
        _messages(names, fd.message_type, (4,), fd.package)
        _enums(names, fd.enum_type, (5,), fd.package)
        for i, s in enumerate(fd.service):
            names[(6, i)] = f"{fd.package}.{s.name}"
            for j, m in enumerate(s.method):
                names[(6, i, 2, j)] = f"{fd.package}.{s.name}.{m.name}"
        for loc in fd.source_code_info.location:
            name = names.get(tuple(loc.path))
            text = "\n".join(line.removeprefix(" ") for line in loc.leading_comments.strip("\n").split("\n")).strip()
            if name and text:
                out[name] = text
    return out


def descriptor_set(proto_dir: Path) -> descriptor_pb2.FileDescriptorSet:
    """proto_dir's nextbest/v1 files and their imports, with source info (needs grpc_tools)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    files = sorted(p.relative_to(proto_dir).as_posix() for p in (proto_dir / "nextbest" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        argv = [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def from_protos(proto_dir: Path) -> tuple[Schema, Comments]:
    """The document of the services in proto_dir/nextbest/v1, and their comments."""
    fds = descriptor_set(proto_dir)
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    ours = [fd for fd in fds.file if fd.name.startswith("nextbest/v1/")]
    services = [pool.FindServiceByName(f"{fd.package}.{s.name}") for fd in ours for s in fd.service]
    comments = _comments(ours)
    return document(services, comments), comments


def render(doc: Schema) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def render_comments(comments: Comments) -> str:
    return json.dumps(comments, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextbest.rpc.openapi", description="Write the OpenAPI document of the HTTP/JSON door.")
    parser.add_argument("--proto", type=Path, default=Path("proto"), help="the proto root (default: proto)")
    parser.add_argument("--out", type=Path, default=Path("docs/openapi.json"), help="where to write it (- for stdout)")
    parser.add_argument(
        "--comments-out",
        type=Path,
        default=None,
        help=f"where to write the comments the server serves it with (server/rpc/{COMMENTS_FILE})",
    )
    args = parser.parse_args(argv)
    doc, comments = from_protos(args.proto)
    outputs = [(args.out, render(doc))]
    if args.comments_out is not None:
        outputs.append((args.comments_out, render_comments(comments)))
    for out, text in outputs:
        if str(out) == "-":
            sys.stdout.write(text)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

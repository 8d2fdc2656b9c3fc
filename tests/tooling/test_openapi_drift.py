"""docs/openapi.json is what the protos give (scripts/gen-openapi), an edited proto changes it, the
server serves the same document (its comments shipped as package data), and the document is well formed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from google.protobuf import descriptor_pool

from nextbest.app import SERVICES
from nextbest.rpc.openapi import COMMENTS_FILE, from_protos, render, served

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "openapi.json"
COMMENTS = ROOT / "server" / "rpc" / COMMENTS_FILE


def test_regenerating_gives_the_committed_document_and_comments(tmp_path: Path) -> None:
    out, comments = tmp_path / "openapi.json", tmp_path / COMMENTS_FILE
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen-openapi"), str(out), str(comments)], cwd=ROOT, env=env, check=True, capture_output=True)
    assert out.read_text() == COMMITTED.read_text(), "regenerate with scripts/gen-openapi"
    assert comments.read_text() == COMMENTS.read_text(), "regenerate with scripts/gen-openapi"


def _edited(tmp_path: Path, file: str, anchor: str, addition: str) -> Path:
    protos = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", protos)
    path = protos / "nextbest" / "v1" / file
    text = path.read_text()
    assert text.count(anchor) == 1
    path.write_text(text.replace(anchor, anchor + addition))
    return protos


EDITS = {
    "field": ("decision.proto", "message ChooseRequest {\n", "  // A probe of the drift test.\n  string drift_probe = 999;\n"),
    "rpc": (
        "profile.proto",
        "service ProfileService {\n",
        "  rpc DriftProbe(GetProfileRequest) returns (GetProfileResponse) {\n"
        '    option (google.api.http) = {get: "/v1/driftProbe/{customer_id}"};\n  }\n',
    ),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_proto_changes_the_document(tmp_path: Path, edit: str) -> None:
    committed = json.loads(COMMITTED.read_text())
    assert render(from_protos(ROOT / "proto")[0]) == COMMITTED.read_text()
    changed, _ = from_protos(_edited(tmp_path, *EDITS[edit]))
    assert changed != committed
    if edit == "field":
        body = changed["paths"]["/v1/placements/{placement}:choose"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["driftProbe"] == {"type": "string", "description": "A probe of the drift test."}
    else:
        op = changed["paths"]["/v1/driftProbe/{customer_id}"]["get"]
        assert op["operationId"] == "ProfileService_DriftProbe"
        assert [p["name"] for p in op["parameters"] if p["in"] == "path"] == ["customer_id"]
        assert set(changed["paths"]) - set(committed["paths"]) == {"/v1/driftProbe/{customer_id}"}


def test_the_server_serves_the_committed_document() -> None:
    pool = descriptor_pool.Default()
    doc = served([pool.FindServiceByName(name) for name in SERVICES])
    assert render(doc) == COMMITTED.read_text()
    assert doc["paths"]["/v1/placements/{placement}:choose"]["post"]["summary"]  # the comments are there


# Enough of OpenAPI 3.0's structure to catch a malformed document (openapi-spec-validator is not
# a dependency): the top level, path items, operations, parameters and responses.
_SCHEMA_OR_REF = {"type": "object"}
_PARAMETER = {
    "type": "object",
    "required": ["name", "in", "schema"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "in": {"enum": ["path", "query", "header", "cookie"]},
        "required": {"type": "boolean"},
        "schema": _SCHEMA_OR_REF,
    },
}
_CONTENT = {"type": "object", "required": ["application/json"], "additionalProperties": {"type": "object", "required": ["schema"]}}
_OPERATION = {
    "type": "object",
    "required": ["operationId", "responses"],
    "properties": {
        "operationId": {"type": "string"},
        "parameters": {"type": "array", "items": _PARAMETER},
        "requestBody": {"type": "object", "required": ["content"], "properties": {"content": _CONTENT}},
        "responses": {
            "type": "object",
            "required": ["200", "default"],
            "additionalProperties": {"type": "object", "required": ["description"], "properties": {"content": _CONTENT}},
        },
    },
}
OPENAPI_30 = {
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {
        "openapi": {"type": "string", "pattern": r"^3\.0\.\d+$"},
        "info": {"type": "object", "required": ["title", "version"]},
        "paths": {
            "type": "object",
            "propertyNames": {"pattern": "^/"},
            "additionalProperties": {
                "type": "object",
                "propertyNames": {"enum": ["get", "put", "post", "delete", "patch"]},
                "additionalProperties": _OPERATION,
            },
        },
        "components": {
            "type": "object",
            "properties": {"schemas": {"type": "object", "propertyNames": {"pattern": r"^[a-zA-Z0-9.\-_]+$"}}},
        },
    },
}


def _refs(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return {doc["$ref"]} if "$ref" in doc else set().union(*(_refs(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(_refs(v) for v in doc))
    return set()


def test_the_document_is_well_formed_openapi_30() -> None:
    doc = json.loads(COMMITTED.read_text())
    jsonschema.validate(doc, OPENAPI_30)
    schemas = doc["components"]["schemas"]
    assert {ref.removeprefix("#/components/schemas/") for ref in _refs(doc)} <= set(schemas)
    for schema in schemas.values():
        jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI 3.0's schemas are a JSON Schema draft 4 dialect
    for path, item in doc["paths"].items():
        for op in item.values():  # every path variable is a required path parameter, and only those
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
            assert sorted(names) == sorted(seg[1:-1] for seg in path.replace(":", "/").split("/") if seg.startswith("{")), path
            assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
    assert doc["paths"]["/v1/placements/{placement}:choose"]["post"]["responses"]["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }

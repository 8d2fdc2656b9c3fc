"""The JSON Schema of apply files, generated from the pydantic specs so that editors (e.g. the
YAML language server, with ``# yaml-language-server: $schema=...``) check a file while it is
written. The published copy is ``apply.schema.json`` beside this file; ``scripts/gen-schema``
regenerates it and a test fails when it drifts from the specs.

Pydantic describes what the models *output*; a few inputs are wider and are patched in here:
durations also accept texts such as ``10m``, and checks made in model validators (a budget
needs total or daily; a contact rule is of one kind) are stated as ``anyOf``/``oneOf``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nextbest.bandit.spec import CampaignSpec, PlacementSpec, parse_duration

SCHEMA_FILE = "apply.schema.json"
PUBLISHED = Path(__file__).with_name(SCHEMA_FILE)
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"
DURATION = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0},
        {"type": "string", "pattern": DURATION_PATTERN},
    ],
    "description": "seconds, or a text such as 250ms, 90s, 10m, 2h, 7d",
}
# Durations validated by a field validator rather than by the Duration type.
_EXTRA_DURATIONS = {("PlacementSpec", "reward_window")}
_CHECKS: dict[str, dict[str, Any]] = {
    "BudgetSpec": {"anyOf": [{"required": ["total"]}, {"required": ["daily"]}]},
    "ContactRule": {"oneOf": [{"required": ["max_impressions", "window"]}, {"required": ["suppress_after_ignored", "for"]}]},
}


def _models(roots: Sequence[type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every model reachable from the roots, by class name (the schema's $defs names)."""
    out: dict[str, type[BaseModel]] = {}
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m.__name__ in out:
            continue
        out[m.__name__] = m
        for f in m.model_fields.values():
            todo += [a for a in _classes(f.annotation) if issubclass(a, BaseModel)]
    return out


def _classes(annotation: Any) -> list[type]:
    if isinstance(annotation, type):
        return [annotation]
    return [c for arg in getattr(annotation, "__args__", ()) for c in _classes(arg)]


def duration_fields(models: dict[str, type[BaseModel]] | None = None) -> set[tuple[str, str]]:
    """(model, property name) of every field typed as a Duration (export writes them as 10m)."""
    models = models if models is not None else _models([PlacementSpec, CampaignSpec])
    out = set(_EXTRA_DURATIONS)
    for name, m in models.items():
        for fname, f in m.model_fields.items():
            in_meta = any(getattr(x, "func", None) is parse_duration for x in f.metadata)
            if in_meta or "parse_duration" in repr(f.annotation):
                out.add((name, f.alias or fname))
    return out


def _as_duration(prop: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in prop.items() if k in ("default", "title")}
    if prop.get("type") == "array":  # a list of durations (context.history)
        return {**keep, "type": "array", "items": dict(DURATION)}
    if "anyOf" in prop:  # Duration | None
        branches = [b for b in prop["anyOf"] if b.get("type") not in ("number", "string")]
        return {**keep, "anyOf": [*DURATION["anyOf"], *branches], "description": DURATION["description"]}
    return {**keep, **DURATION}


def build_schema() -> dict[str, Any]:
    """The apply file's schema: {campaigns: [...], placements: [...]}, nothing else."""
    _, defs = models_json_schema(
        [(PlacementSpec, "validation"), (CampaignSpec, "validation")], by_alias=True, ref_template="#/$defs/{model}"
    )
    models = _models([PlacementSpec, CampaignSpec])
    for model, prop in sorted(duration_fields(models)):
        props = defs["$defs"].get(model, {}).get("properties", {})
        if prop in props:
            props[prop] = _as_duration(props[prop])
    for model, extra in _CHECKS.items():
        if model in defs["$defs"]:
            defs["$defs"][model].update(extra)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "nextbest apply file",
        "description": "Placements, arms and campaigns for `nextbest apply`. Generated from bandit/spec.py by "
        "scripts/gen-schema; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "campaigns": {
                "description": "Budgets shared by arms, across placements.",
                "type": "array",
                "items": {"$ref": "#/$defs/CampaignSpec"},
            },
            "placements": {
                "description": "Placements with their arms; a placement left out is left alone.",
                "type": "array",
                "items": {"$ref": "#/$defs/PlacementSpec"},
            },
        },
        "anyOf": [{"required": ["placements"]}, {"required": ["campaigns"]}],
        "$defs": defs["$defs"],
    }


def schema_text() -> str:
    """The schema as published: stable key order, two-space indent, final newline."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def published_text() -> str:
    """The published schema file (from the installed package), or a fresh one if it is missing."""
    try:
        return resources.files(__name__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return schema_text()


def main(argv: Sequence[str] | None = None) -> int:
    """Write the schema to the given path (default: the published file)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0]) if args else PUBLISHED
    out.write_text(schema_text(), encoding="utf-8")
    return 0

"""``nextbest export``: the live configuration as an apply file.

The output applies cleanly to the server it came from (a no-op), so a configuration that was
changed by hand or by script can be brought back under version control. It reads like a
hand-written file: defaults are left out, durations are written as ``10m``/``7d``, small
mappings stay on one line, ``id`` comes first and ``arms`` last.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any, Protocol

import yaml
from pydantic import BaseModel

from nextbest.bandit.spec import CampaignSpec, ExplorationSpec, PlacementSpec
from nextbest.rpc import convert
from nextbest.v1 import admin_pb2

HEADER = "# nextbest apply file, exported from the live configuration (retired arms are active: false)\n"
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_LAST = ("contact_policies", "fatigue", "experiment", "shadows", "arms")  # after the scalar settings


class _Client(Protocol):
    """What export needs of NextbestClient (a protocol so tests can pass a fake)."""

    def placements(self) -> list[PlacementSpec]: ...

    @property
    def admin(self) -> Any: ...


class _Timestamp(str):
    """An ISO time written as a plain YAML timestamp (not a quoted text)."""


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key (``arms:\n  - id: x``), as the docs' files do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


class _Block(dict[str, Any]):
    """A mapping written in block style: PyYAML quotes a timestamp (it has colons) in a flow
    mapping, and a quoted one needs a tag; in block style it stays plain."""


_Dumper.add_representer(_Timestamp, lambda d, v: d.represent_scalar("tag:yaml.org,2002:timestamp", str(v)))
_Dumper.add_representer(_Block, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=False))


@cache
def _durations() -> frozenset[tuple[str, str]]:
    from nextbest.config.schema import duration_fields

    return frozenset(duration_fields())


def duration_text(seconds: float) -> str | float | int:
    """600 -> "10m", 1209600 -> "14d"; a value no unit divides stays a number of seconds."""
    for unit, size in _UNITS:
        if seconds >= size and float(seconds) % size == 0:
            return f"{int(seconds // size)}{unit}"
    if 0 < seconds < 1 and round(seconds * 1000, 6) % 1 == 0:
        return f"{round(seconds * 1000)}ms"
    return _number(seconds)


def _number(x: float) -> float | int:
    """7.0 -> 7: integral floats read as a person would write them (the models parse both)."""
    return int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 2**53 else x


def _scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """Features and rule conditions. The protobuf carries a boolean as the text "true"/"false":
    it is written as a boolean again (it travels back as the same text: the round trip is exact)."""
    return {k: (v == "true") if v in ("true", "false") else _value(v, False) for k, v in values.items()}


def _value(v: Any, duration: bool) -> Any:
    if isinstance(v, BaseModel):
        return model_dict(v)
    if isinstance(v, list | tuple):
        return [_value(x, duration) for x in v]
    if isinstance(v, Mapping):
        return _scalars(v)
    if isinstance(v, datetime):
        return _Timestamp(v.isoformat().replace("+00:00", "Z"))
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return duration_text(float(v)) if duration else _number(v)
    return v


def model_dict(m: BaseModel) -> dict[str, Any]:
    """A spec as a file would write it: fields that differ from their defaults, by alias
    (``lambda``, ``for``), in a readable order (id first, lists of sub-specs last)."""
    kind = type(m)
    set_keys = m.model_dump(by_alias=True, exclude_defaults=True).keys()
    out: dict[str, Any] = {}
    for name, f in kind.model_fields.items():
        key = f.alias or name
        if key in set_keys or name == "id":
            out[key] = _value(getattr(m, name), (kind.__name__, key) in _durations())
    if isinstance(m, ExplorationSpec):  # {algorithm: squarecb} rather than {}
        out = {"algorithm": m.algorithm, **out}
    head: dict[str, Any] = {k: out[k] for k in ("id", "description") if k in out}
    middle = {k: v for k, v in out.items() if k not in head and k not in _LAST}
    ordered = {**head, **middle, **{k: out[k] for k in _LAST if k in out}}
    return _Block(ordered) if any(isinstance(v, _Timestamp) for v in ordered.values()) else ordered


def to_yaml(placements: list[PlacementSpec], campaigns: list[CampaignSpec]) -> str:
    """An apply file's text for these specs (campaigns first: arms refer to them)."""
    doc: dict[str, Any] = {}
    if campaigns:
        doc["campaigns"] = [model_dict(c) for c in sorted(campaigns, key=lambda c: c.id)]
    doc["placements"] = [model_dict(p) for p in sorted(placements, key=lambda p: p.id)]
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)
    lines: list[str] = []
    for line in body.splitlines():
        if line.startswith("  - ") and not lines[-1].endswith(":"):
            lines.append("")  # a blank line between placements (and campaigns)
        elif line == "placements:" and lines:
            lines.append("")
        lines.append(line)
    return HEADER + "\n".join(lines) + "\n"


def export_yaml(client: _Client) -> str:
    """The live placements (retired arms included, as ``active: false``) and campaigns."""
    placements = client.placements()
    resp = client.admin.ListCampaigns(admin_pb2.ListCampaignsRequest(), timeout=getattr(client, "timeout", 10.0))
    campaigns = [convert.campaign_spec(c, f"campaigns[{i}]") for i, c in enumerate(resp.campaigns)]
    return to_yaml(placements, campaigns)

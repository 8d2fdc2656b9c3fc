"""Apply files: YAML that declares placements and arms. Errors name the file, line and field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.spec import CampaignSpec, PlacementSpec, error_location
from nextbest.telemetry.gc_pauses import gc_paused

TOP_LEVEL_KEYS = {"placements", "campaigns"}


@dataclass(frozen=True, slots=True)
class ApplyFile:
    """What an apply file declares."""

    placements: list[PlacementSpec] = field(default_factory=list)
    campaigns: list[CampaignSpec] = field(default_factory=list)


Path_ = tuple[str | int, ...]


class ConfigFileError(InvalidInput):
    """An invalid apply file; ``line`` is 1-based (0 when unknown)."""

    def __init__(self, file: str, line: int, field: str, message: str) -> None:
        where = f"{file}:{line}" if line else file
        super().__init__(field, message)
        self.args = (f"{where}: {field}: {message}" if field else f"{where}: {message}",)
        self.file, self.line = file, line


def _field(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_MAX_NODES = 200_000  # values in one file, aliases expanded


def _load(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML keeping the line of every value."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:  # a control character: a ReaderError, which has no mark
        raise ConfigFileError(file, 0, "", f"not valid YAML: {e}") from None
    lines: dict[Path_, int] = {}
    budget = [_MAX_NODES]
    try:
        with gc_paused():  # its RecursionError refuses a deep file: no finalizers may run down there
            node = loader.get_single_node()

        def walk(n: yaml.Node, path: Path_) -> Any:
            budget[0] -= 1
            if budget[0] < 0:  # aliases of aliases expand exponentially ("billion laughs")
                raise ConfigFileError(file, n.start_mark.line + 1, _field(path), f"more than {_MAX_NODES} values")
            lines[path] = n.start_mark.line + 1
            if isinstance(n, yaml.MappingNode):
                out: dict[str, Any] = {}
                for k, v in n.value:
                    key = loader.construct_object(k)
                    if not isinstance(key, str):
                        raise ConfigFileError(file, k.start_mark.line + 1, _field(path), f"key {key!r} must be a text")
                    if key in out:
                        raise ConfigFileError(file, k.start_mark.line + 1, _field((*path, key)), "duplicate key")
                    out[key] = walk(v, (*path, key))
                return out
            if isinstance(n, yaml.SequenceNode):
                return [walk(v, (*path, i)) for i, v in enumerate(n.value)]
            return loader.construct_object(n)

        with gc_paused():  # an alias that contains itself recurses here
            data = walk(node, ()) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigFileError(file, mark.line + 1 if mark else 0, "", f"not valid YAML: {e.problem}") from None
    except RecursionError:  # nested too deeply, or an alias that contains itself
        raise ConfigFileError(file, 0, "", "nested too deeply (or an alias refers to itself)") from None
    finally:
        loader.dispose()
    return data, lines


def _line(lines: dict[Path_, int], path: Path_) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 0)


def _section(
    data: dict[str, Any], lines: dict[Path_, int], file: str, name: str, model: type[PlacementSpec] | type[CampaignSpec]
) -> list[Any]:
    raw = data.get(name, [])
    if not isinstance(raw, list):
        raise ConfigFileError(file, _line(lines, (name,)), name, "must be a list")
    out: list[Any] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        try:
            spec = model.model_validate(item)
        except ValidationError as e:
            err = e.errors()[0]
            where, msg = error_location(tuple(err["loc"]), str(err["msg"]))
            loc: Path_ = (name, i, *where)
            raise ConfigFileError(file, _line(lines, loc), _field(loc), msg) from None
        if spec.id in seen:
            raise ConfigFileError(file, _line(lines, (name, i, "id")), f"{name}[{i}].id", f"duplicate id {spec.id!r}")
        seen.add(spec.id)
        out.append(spec)
    return out


def parse_apply_text(text: str, file: str = "<config>") -> ApplyFile:
    """Validate an apply file's text, or raise ConfigFileError naming file, line and field."""
    data, lines = _load(text, file)
    if not isinstance(data, dict):
        raise ConfigFileError(file, 1, "", "expected a mapping with a 'placements' list")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigFileError(file, _line(lines, (key,)), key, f"unknown key (expected one of {sorted(TOP_LEVEL_KEYS)})")
    out = ApplyFile(_section(data, lines, file, "placements", PlacementSpec), _section(data, lines, file, "campaigns", CampaignSpec))
    if not out.placements and not out.campaigns:
        raise ConfigFileError(file, _line(lines, ("placements",)), "placements", "must be a non-empty list")
    known = {c.id for c in out.campaigns}
    for i, p in enumerate(out.placements):
        for j, a in enumerate(p.arms):
            if a.campaign is not None and a.campaign not in known:
                at: Path_ = ("placements", i, "arms", j, "campaign")
                raise ConfigFileError(file, _line(lines, at), _field(at), f"unknown campaign {a.campaign!r} (declare it under campaigns)")
    return out


def load_apply_file(path: Path) -> ApplyFile:
    """Read and validate an apply file: UTF-8 whatever the locale, or a ConfigFileError naming
    the line and offset of the first byte that is not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigFileError(str(path), 0, "", f"cannot read: {e.strerror}") from None
    return parse_apply_text(decode_utf8(data, str(path)), str(path))


def decode_utf8(data: bytes, file: str) -> str:
    """The text of an apply file, or a ConfigFileError (not a UnicodeDecodeError traceback)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigFileError(file, line, "", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None

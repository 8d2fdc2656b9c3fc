"""Apply files: YAML that declares placements and arms. Errors name the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bandit.errors import InvalidInput
from bandit.spec import PlacementSpec, error_location

TOP_LEVEL_KEYS = {"placements"}

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


def _load(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML keeping the line of every value."""
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}
    try:
        node = loader.get_single_node()

        def walk(n: yaml.Node, path: Path_) -> Any:
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

        data = walk(node, ()) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigFileError(file, mark.line + 1 if mark else 0, "", f"not valid YAML: {e.problem}") from None
    finally:
        loader.dispose()
    return data, lines


def _line(lines: dict[Path_, int], path: Path_) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 0)


def parse_apply_text(text: str, file: str = "<config>") -> list[PlacementSpec]:
    """Validate an apply file's text into placement specs, or raise ConfigFileError."""
    data, lines = _load(text, file)
    if not isinstance(data, dict):
        raise ConfigFileError(file, 1, "", "expected a mapping with a 'placements' list")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigFileError(file, _line(lines, (key,)), key, f"unknown key (expected one of {sorted(TOP_LEVEL_KEYS)})")
    placements = data.get("placements")
    if not isinstance(placements, list) or not placements:
        raise ConfigFileError(file, _line(lines, ("placements",)), "placements", "must be a non-empty list")
    specs: list[PlacementSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(placements):
        try:
            spec = PlacementSpec.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            sub, msg = error_location(tuple(err["loc"]), str(err["msg"]))
            loc: Path_ = ("placements", i, *sub)
            raise ConfigFileError(file, _line(lines, loc), _field(loc), msg) from None
        if spec.id in seen:
            raise ConfigFileError(file, _line(lines, ("placements", i, "id")), f"placements[{i}].id", f"duplicate placement id {spec.id!r}")
        seen[spec.id] = i
        specs.append(spec)
    return specs


def load_apply_file(path: Path) -> list[PlacementSpec]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigFileError(str(path), 0, "", f"cannot read: {e.strerror}") from None
    return parse_apply_text(text, str(path))

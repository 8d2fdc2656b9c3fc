"""Features and their Vowpal Wabbit text form.

Context (shared) features all go to VW namespace ``U`` and arm features to namespace ``A``,
so that the default ``-q UA`` crosses every context feature with every arm feature: a user
who knows nothing of VW gets context-dependent choices. The request namespace is kept as a
prefix of the feature name (``customer.segment=gold``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from bandit.errors import InvalidInput

SHARED_NAMESPACE = "U"
ARM_NAMESPACE = "A"

# Characters that VW's text format gives a meaning to.
_VW_SPECIAL = str.maketrans({c: "_" for c in " \t\r\n|:"})

FeatureValue = float | str


class Feature(NamedTuple):
    """One named feature; a number is a weight, a text a category (``name=text``).

    A named tuple, not a dataclass: a Choose builds one per context feature, and a frozen
    dataclass cost twice as much to build (measured)."""

    namespace: str
    name: str
    value: FeatureValue

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name


def check_features(features: Iterable[Feature], field: str = "features") -> None:
    """Reject what VW would silently mangle: empty names and non-finite numbers."""
    for i, f in enumerate(features):
        if not f.name:
            raise InvalidInput(f"{field}[{i}].name", "must not be empty")
        if isinstance(f.value, float) and not math.isfinite(f.value):
            raise InvalidInput(f"{field}[{i}].number", f"must be finite, got {f.value}")


_NAMES: dict[tuple[str, str], str] = {}  # (namespace, name) -> VW-safe name, built once each
_CATEGORIES: dict[tuple[str, str, str], str] = {}  # (namespace, name, text) -> VW token
_CACHE_LIMIT = 100_000  # names and categories are few; a hostile stream of new ones is not cached


def _name(f: Feature) -> str:
    name = _NAMES.get((f.namespace, f.name))
    if name is None:
        name = f.key.translate(_VW_SPECIAL)
        if len(_NAMES) < _CACHE_LIMIT:
            _NAMES[(f.namespace, f.name)] = name
    return name


def _token(f: Feature) -> str:
    v = f.value
    if isinstance(v, str):
        key = (f.namespace, f.name, v)
        token = _CATEGORIES.get(key)
        if token is None:
            token = f"{_name(f)}={v.translate(_VW_SPECIAL)}"
            if len(_CATEGORIES) < _CACHE_LIMIT:
                _CATEGORIES[key] = token
        return token
    return f"{_name(f)}:{v!r}"


def shared_line(features: Iterable[Feature]) -> str:
    """The ``shared`` line of a cb_adf example (``_token`` inlined: this runs for every
    feature of every Choose and every learned example)."""
    names, categories = _NAMES, _CATEGORIES
    parts = []
    for f in features:
        v = f.value
        if isinstance(v, str):
            token = categories.get((f.namespace, f.name, v))
            parts.append(token if token is not None else _token(f))
        else:
            name = names.get((f.namespace, f.name))
            parts.append(f"{name}:{v!r}" if name is not None else _token(f))
    return f"shared |{SHARED_NAMESPACE} " + " ".join(parts)


def arm_line(arm_id: str, features: Iterable[Feature]) -> str:
    """An action line of a cb_adf example, without label; the arm id is itself a feature."""
    tokens = [f"arm={arm_id.translate(_VW_SPECIAL)}"]
    tokens.extend(_token(f) for f in features)
    return f"|{ARM_NAMESPACE} " + " ".join(tokens)


def features_from_mapping(values: Mapping[str, object], field: str = "features") -> tuple[Feature, ...]:
    """Arm features as written in a config file: ``{category: data, price: 4.99}``."""
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, int | float):
            value = float(value)
            if not math.isfinite(value):
                raise InvalidInput(f"{field}.{name}", "must be finite")
        elif not isinstance(value, str):
            raise InvalidInput(f"{field}.{name}", "must be a number or a text")
        out.append(Feature("", str(name), value))
    return tuple(out)

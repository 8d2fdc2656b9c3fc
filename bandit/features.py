"""Features and their Vowpal Wabbit text form.

Context (shared) features all go to VW namespace ``U`` and arm features to namespace ``A``,
so that the default ``-q UA`` crosses every context feature with every arm feature: a user
who knows nothing of VW gets context-dependent choices. The request namespace is kept as a
prefix of the feature name (``customer.segment=gold``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from nextbest.bandit.errors import InvalidInput

SHARED_NAMESPACE = "U"
ARM_NAMESPACE = "A"

# Characters that VW's text format gives a meaning to.
_VW_SPECIAL = str.maketrans({c: "_" for c in " \t\r\n|:"})

FeatureValue = float | str


Feature: TypeAlias = tuple[str, str, FeatureValue]
"""One named feature, ``(namespace, name, value)``: a number is a weight, a text a category
(``name=text``).

A plain tuple, not a named tuple or a dataclass: a Choose builds one per context feature and
keeps them until its log write. The garbage collector stops tracking a plain tuple of texts and
numbers, never a named tuple; with named tuples, a Choose's 30 features were 9,000 of the
13,000 objects each young collection scanned under load (measured), and they cost more to build."""


def feature(namespace: str, name: str, value: FeatureValue) -> Feature:
    return (namespace, name, value)


def feature_key(f: Feature) -> str:
    """``namespace.name``, or the name alone in the default namespace."""
    namespace, name, _ = f
    return f"{namespace}.{name}" if namespace else name


def check_features(features: Iterable[Feature], field: str = "features") -> None:
    """Reject what VW would silently mangle: empty names and non-finite numbers."""
    for i, (_, name, value) in enumerate(features):
        if not name:
            raise InvalidInput(f"{field}[{i}].name", "must not be empty")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{field}[{i}].number", f"must be finite, got {value}")


_NAMES: dict[tuple[str, str], str] = {}  # (namespace, name) -> VW-safe name, built once each
_CATEGORIES: dict[Feature, str] = {}  # (namespace, name, text) -> VW token
_CACHE_LIMIT = 100_000  # names and categories are few; a hostile stream of new ones is not cached


def _name(namespace: str, name: str) -> str:
    safe = _NAMES.get((namespace, name))
    if safe is None:
        safe = (f"{namespace}.{name}" if namespace else name).translate(_VW_SPECIAL)
        if len(_NAMES) < _CACHE_LIMIT:
            _NAMES[(namespace, name)] = safe
    return safe


def _token(f: Feature) -> str:
    namespace, name, v = f
    if isinstance(v, str):
        token = _CATEGORIES.get(f)
        if token is None:
            token = f"{_name(namespace, name)}={v.translate(_VW_SPECIAL)}"
            if len(_CATEGORIES) < _CACHE_LIMIT:
                _CATEGORIES[f] = token
        return token
    return f"{_name(namespace, name)}:{v!r}"


def shared_line(features: Iterable[Feature]) -> str:
    """The ``shared`` line of a cb_adf example."""
    return f"shared |{SHARED_NAMESPACE} " + shared_tokens(features)


def shared_tokens(features: Iterable[Feature]) -> str:
    """The tokens of a ``shared`` line, space-separated (``_token`` inlined: this runs for every
    feature of every Choose and every learned example); a stored profile's are made once per
    read (server/engine/profiles.py) and appended to the request's."""
    names, categories = _NAMES, _CATEGORIES
    parts = []
    for f in features:
        namespace, name, v = f
        if isinstance(v, str):
            token = categories.get(f)  # a text feature is its own key
            parts.append(token if token is not None else _token(f))
        else:
            safe = names.get((namespace, name))
            parts.append(f"{safe}:{v!r}" if safe is not None else _token(f))
    return " ".join(parts)


def shared_line_of_rows(rows: Iterable[Sequence[Any]]) -> str:
    """``shared_line`` of features as the log stores them (``[namespace, name, value]`` lists,
    a number or a text), without making Feature tuples first: a replay reads millions."""
    names, categories = _NAMES, _CATEGORIES
    parts = []
    for namespace, name, v in rows:
        if isinstance(v, str):
            f = (namespace, name, v)
            token = categories.get(f)
            parts.append(token if token is not None else _token(f))
        else:
            safe = names.get((namespace, name))
            parts.append(f"{safe}:{float(v)!r}" if safe is not None else _token((namespace, name, float(v))))
    return f"shared |{SHARED_NAMESPACE} " + " ".join(parts)


def with_arm_features(line: str, features: Iterable[Feature]) -> str:
    """An arm's action line with features of this request only (interaction history) appended
    to its namespace: the same text as ``arm_line`` of all the features at once. Its tokens
    by ``shared_tokens``, which inlines ``_token``: a Choose with history makes these for every
    arm the customer saw."""
    extra = shared_tokens(features)
    return f"{line} {extra}" if extra else line


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
        out.append(feature("", str(name), value))
    return tuple(out)

"""Features and their Vowpal Wabbit text form.

Context (shared) features all go to VW namespace ``U`` and arm features to namespace ``A``,
so that the default ``-q UA`` crosses every context feature with every arm feature: a user
who knows nothing of VW gets context-dependent choices. The request namespace is kept as a
prefix of the feature name (``customer.segment=gold``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bandit.errors import InvalidInput

SHARED_NAMESPACE = "U"
ARM_NAMESPACE = "A"

# Characters that VW's text format gives a meaning to.
_VW_SPECIAL = str.maketrans({c: "_" for c in " \t\r\n|:"})

FeatureValue = float | str


@dataclass(frozen=True, slots=True)
class Feature:
    """One named feature; a number is a weight, a text a category (``name=text``)."""

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


def _token(f: Feature) -> str:
    name = _NAMES.get((f.namespace, f.name))
    if name is None:
        name = f.key.translate(_VW_SPECIAL)
        if len(_NAMES) < 100_000:  # feature names are few; a hostile stream of new ones is not cached
            _NAMES[(f.namespace, f.name)] = name
    if isinstance(f.value, str):
        return f"{name}={f.value.translate(_VW_SPECIAL)}"
    return f"{name}:{f.value!r}"


def shared_line(features: Iterable[Feature]) -> str:
    """The ``shared`` line of a cb_adf example."""
    return f"shared |{SHARED_NAMESPACE} " + " ".join(_token(f) for f in features)


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

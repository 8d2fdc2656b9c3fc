"""What a Choose request must satisfy before any work: ids, feature names and values within
the server's limits, and text every store can keep (no NUL, no lone surrogate: PostgreSQL
refuses them, and one such decision used to fail every group commit after it). InvalidInput
names the field at fault."""

from __future__ import annotations

from collections.abc import Sequence

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature, check_features
from nextbest.bandit.text import check_text, storable
from nextbest.settings import Settings

_MAX_KNOWN_NAMES = 100_000


class ChooseChecks:
    """The checks, with a fast path for feature names already seen valid."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._known: set[tuple[str, str]] = set()  # feature names that passed validation

    def validate(self, placement: str, customer_id: str, event_id: str, features: Sequence[Feature], field: str = "features") -> None:
        s = self._settings
        limit = s.max_id_length
        if (
            placement
            and len(placement) <= limit
            and len(customer_id) <= limit
            and len(event_id) <= limit
            and len(features) <= s.max_features
            and storable(placement)
            and storable(customer_id)
            and storable(event_id)
        ):
            # The common case in one cheap pass (a fifth of a 20-arm Choose otherwise, measured);
            # anything unusual takes the careful path below, which names the field at fault.
            known, max_abs, max_text = self._known, s.max_abs_number, s.max_text_length
            for namespace, name, v in features:
                if (namespace, name) not in known:
                    break
                if type(v) is float:
                    if not abs(v) <= max_abs:  # NaN fails too
                        break
                elif type(v) is not str or len(v) > max_text or not storable(v):
                    break
            else:
                return
        self._check(placement, customer_id, event_id, features, field)

    def _check(self, placement: str, customer_id: str, event_id: str, features: Sequence[Feature], field: str) -> None:
        s = self._settings
        if not placement:
            raise InvalidInput("placement", "must not be empty")
        check_text(placement, "placement", s.max_id_length)
        check_text(customer_id, "customer_id", s.max_id_length)
        check_text(event_id, "event_id", s.max_id_length)
        self.validate_features(features, field)
        if len(self._known) < _MAX_KNOWN_NAMES:  # a hostile stream of new names is not remembered
            self._known.update((namespace, name) for namespace, name, _ in features)

    def validate_features(self, features: Sequence[Feature], field: str = "features") -> None:
        """The checks of a Choose's features, for any features a decision may use (a stored
        profile's too): at most max_features, names and texts within their lengths and
        storable, numbers finite and within max_abs_number. InvalidInput names the field."""
        s = self._settings
        if len(features) > s.max_features:
            raise InvalidInput(field, f"more than {s.max_features} features")
        check_features(features, field)
        for i, (namespace, name, value) in enumerate(features):
            check_text(namespace, f"{field}[{i}].namespace", s.max_name_length)
            check_text(name, f"{field}[{i}].name", s.max_name_length)
            if isinstance(value, float) and abs(value) > s.max_abs_number:
                raise InvalidInput(f"{field}[{i}].number", f"magnitude above {s.max_abs_number:g}; scale the feature")
            if isinstance(value, str):
                check_text(value, f"{field}[{i}].text", s.max_text_length)

"""Times as users write them on command lines and in notebooks (no SQLAlchemy: the client-only
install's ``nextbest stats --since`` reads them too)."""

from __future__ import annotations

from datetime import UTC, datetime

from nextbest.bandit.errors import InvalidInput


def parse_time(text: str | None, field: str = "--since") -> float | None:
    """Epoch seconds from a number or an ISO 8601 date or time (UTC unless it says otherwise)."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(field, f"{text!r}: expected epoch seconds or an ISO date such as 2024-05-01T12:00") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()

"""What became of a reported conversion (ReportConversions, issue #31): light, for rpc/convert.py
and the client, which must not load the engine (VW, SQLAlchemy)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nextbest.bandit.attribution import Credit
from nextbest.bandit.errors import NextbestError


class ConversionStatus(enum.Enum):
    ATTRIBUTED = "attributed"  # stored, credited to the decisions listed
    UNATTRIBUTED = "unattributed"  # stored and counted; no activated impression in the window
    DUPLICATE = "duplicate"  # this conversion id was reported before: its credits as stored then


@dataclass(frozen=True, slots=True)
class ConversionResult:
    """A conversion's status and credits, or the error it failed with (a reward of a recorded
    conversion that could not be stored: send the conversion again, it completes as DUPLICATE)."""

    status: ConversionStatus | None
    credits: tuple[Credit, ...] = ()
    error: NextbestError | None = None

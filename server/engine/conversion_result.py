"""What became of a reported conversion (ReportConversions, issue #31), and how old one may be:
light, for rpc/convert.py, the client and the CLI, which must not load the engine (VW, SQLAlchemy)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nextbest.bandit.attribution import Credit
from nextbest.bandit.errors import NextbestError
from nextbest.bandit.spec import MAX_ATTRIBUTION_WINDOW

# A conversion older than this is refused: it could be credited to no decision whose window is
# still open (the longest attribution window before it, the longest reward window after).
MAX_AGE = 2 * MAX_ATTRIBUTION_WINDOW


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

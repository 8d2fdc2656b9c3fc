"""Which placements the current caller may act on, checked where the action reads its data.

A placement-limited channel token may reward and activate only its own placements' events. The
placement of an event is known only once the event is found (in memory, or in the database
when another server decided it), so the check belongs to the code that finds the event and acts
on it, on that same read: a check made on an earlier, separate read let a reward through when
the event became visible between the two reads (seen across replicas, 2 of 400 tries).

The edge (server/rpc/auth.py) sets the scope for the duration of one call; a context variable
carries it into the engine without every signature naming it. Unset means unrestricted
(admin tokens, no authentication, in-process callers).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass

from nextbest.bandit.errors import PermissionDenied
from nextbest.bandit.text import quote

log = logging.getLogger("nextbest.auth")


@dataclass(frozen=True, slots=True)
class Scope:
    """A caller limited to some placements; ``name`` names its token in logs and messages."""

    name: str
    placements: frozenset[str]


current: ContextVar[Scope | None] = ContextVar("nextbest_scope", default=None)


def allows(placement: str) -> bool:
    """Whether the current caller may act on ``placement``; a denial is logged. Where the
    placement was found from an event id, the caller hears the same as for an unknown event
    (NOT_FOUND): a limited token learns nothing of other placements' events."""
    scope = current.get()
    if scope is None or placement in scope.placements:
        return True
    log.info(
        "denied placement %s to token %s",
        placement,
        scope.name,
        extra={"event": "auth_denied", "principal": scope.name, "placement": placement},
    )
    return False


def require(placement: str) -> None:
    """PermissionDenied unless the current caller may act on ``placement``."""
    scope = current.get()
    if scope is None or placement in scope.placements:
        return
    log.info(
        "denied placement %s to token %s",
        placement,
        scope.name,
        extra={"event": "auth_denied", "principal": scope.name, "placement": placement},
    )
    raise PermissionDenied(f"token {quote(scope.name)} may not use placement {quote(placement)}")

"""Domain errors: the server maps each class to one gRPC status code (server/rpc/errors.py).

Hierarchy::

    NextbestError
    ├── InvalidInput      bad request or configuration; names the offending field
    ├── NotFound          unknown placement, arm or event
    ├── AlreadyExists     an id that is taken
    ├── PermissionDenied  the caller's token may not act on this placement
    └── Unavailable       a dependency (the database) cannot do its part now; retry later
"""

from __future__ import annotations


class NextbestError(Exception):
    """Base of every error nextbest raises on purpose."""


class InvalidInput(NextbestError):
    """A request or configuration field is invalid; nothing was changed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class NotFound(NextbestError):
    """The named placement, arm or event does not exist."""


class AlreadyExists(NextbestError):
    """An object with this id exists already."""


class PermissionDenied(NextbestError):
    """The caller may not act on the placement this request concerns; nothing was changed."""


class Unavailable(NextbestError):
    """Storage cannot serve the request now; the caller may retry."""

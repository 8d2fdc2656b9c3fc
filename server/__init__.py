"""nextbest: a contextual-bandit next-best-offer decision service over gRPC, on Vowpal Wabbit.

The public face for channel services and experimenters::

    from nextbest import NextbestClient

    with NextbestClient("127.0.0.1:50051") as nb:
        d = nb.choose("app_home_banner", {"customer": {"plan": "prepaid"}}, customer_id="c42")
        nb.reward(d.event_id, 1.0)

Names load on first use (PEP 562), so ``import nextbest.bandit.decider`` loads no gRPC and
``from nextbest import NextbestClient`` loads neither SQLAlchemy, Alembic nor VW
(tests/tooling/test_architecture.py checks both).

Errors: the server answers each domain error with one status code (docs/api.md, the error catalog); the same
classes are here for code that uses the domain directly (``nextbest.bandit``)::

    NextbestError
    ├── InvalidInput      INVALID_ARGUMENT, names the field
    ├── NotFound          NOT_FOUND
    ├── AlreadyExists     ALREADY_EXISTS
    ├── PermissionDenied  PERMISSION_DENIED
    └── Unavailable       UNAVAILABLE

The clients raise ServiceError subclasses, one per status code (nextbest.client_errors), each
also the domain class above of its code: ``except nextbest.NotFound`` catches a NOT_FOUND answer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nextbest.bandit.errors import AlreadyExists, InvalidInput, NextbestError, NotFound, PermissionDenied, Unavailable
    from nextbest.client import AsyncNextbestClient, ChooseResult, NextbestClient, ServiceError

__all__ = [
    "AlreadyExists",
    "AsyncNextbestClient",
    "ChooseResult",
    "InvalidInput",
    "NextbestClient",
    "NextbestError",
    "NotFound",
    "PermissionDenied",
    "ServiceError",
    "Unavailable",
]

_WHERE = {
    "NextbestClient": "nextbest.client",
    "ChooseResult": "nextbest.client",
    "AsyncNextbestClient": "nextbest.client",
    "ServiceError": "nextbest.client",
    "NextbestError": "nextbest.bandit.errors",
    "InvalidInput": "nextbest.bandit.errors",
    "NotFound": "nextbest.bandit.errors",
    "AlreadyExists": "nextbest.bandit.errors",
    "PermissionDenied": "nextbest.bandit.errors",
    "Unavailable": "nextbest.bandit.errors",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'nextbest' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

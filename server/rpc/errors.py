"""The error catalog: each domain error class maps to one gRPC status code.

| domain error (nextbest.bandit.errors) | gRPC status       |
|------------------------------|-------------------|
| InvalidInput                 | INVALID_ARGUMENT  |
| NotFound                     | NOT_FOUND         |
| AlreadyExists                | ALREADY_EXISTS    |
| PermissionDenied             | PERMISSION_DENIED |
| Unavailable                  | UNAVAILABLE       |
| anything else                | INTERNAL (logged, message not sent) |
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from nextbest.bandit.errors import AlreadyExists, InvalidInput, NextbestError, NotFound, PermissionDenied, Unavailable
from nextbest.storage.refusal import RecordRefused

log = logging.getLogger("nextbest.rpc")

CATALOG: dict[type[NextbestError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    RecordRefused: grpc.StatusCode.INTERNAL,  # not UNAVAILABLE: sending it again fails again
}


# gRPC sends the message in a trailer: one above ~16 KB reaches the caller as RESOURCE_EXHAUSTED
# ("metadata size exceeds hard limit"), which reads as "retry with backoff". Messages quote a
# bounded prefix of the input (nextbest.bandit.text.quote); this bound holds whatever a message says.
MAX_MESSAGE = 1000


def message_of(error: BaseException) -> str:
    """The error's message, at most MAX_MESSAGE characters."""
    text = str(error)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 15] + "... (truncated)"


def status_for(error: NextbestError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CATALOG:
            return CATALOG[cls]
    return grpc.StatusCode.INTERNAL


R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]


def rpc(handler: Handler[R]) -> Handler[R]:
    """Turn domain errors into their status; log anything else and answer INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await handler(self, request, context)
        except NextbestError as e:
            await context.abort(status_for(e), message_of(e))
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (ref %s)", handler.__name__, ref)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")
        raise AssertionError("unreachable")  # abort always raises

    return wrapper

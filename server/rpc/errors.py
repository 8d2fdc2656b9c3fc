"""The error catalog: each domain error class maps to one gRPC status code.

| domain error (bandit.errors) | gRPC status       |
|------------------------------|-------------------|
| InvalidInput                 | INVALID_ARGUMENT  |
| NotFound                     | NOT_FOUND         |
| AlreadyExists                | ALREADY_EXISTS    |
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

from bandit.errors import AlreadyExists, InvalidInput, NextbestError, NotFound, Unavailable

log = logging.getLogger("nextbest.rpc")

CATALOG: dict[type[NextbestError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


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
            await context.abort(status_for(e), str(e))
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (ref %s)", handler.__name__, ref)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")
        raise AssertionError("unreachable")  # abort always raises

    return wrapper

"""The client's exceptions: every failed call raises one, by its gRPC status code.

Each class is also the matching domain error of ``nextbest`` (``nextbest.bandit.errors``), so
``except nextbest.NotFound`` catches an unknown event whether the domain raised it in-process or
the server answered NOT_FOUND; and each is a ``grpc.RpcError`` with ``code()`` and ``details()``,
so code written against the raw stubs keeps working::

    NextbestError                       (nextbest.bandit.errors)
    └── ServiceError                    also grpc.RpcError; any other code (CANCELLED, UNKNOWN, ...)
        ├── InvalidArgumentError        INVALID_ARGUMENT, also InvalidInput (``.field``)
        ├── NotFoundError               NOT_FOUND, also NotFound
        ├── AlreadyExistsError          ALREADY_EXISTS, also AlreadyExists
        ├── PermissionDeniedError       PERMISSION_DENIED, also PermissionDenied
        ├── UnauthenticatedError        UNAUTHENTICATED (no or an unknown token)
        ├── UnavailableError            UNAVAILABLE, also Unavailable: retry with backoff
        ├── ResourceExhaustedError      RESOURCE_EXHAUSTED: overloaded, retry with backoff
        ├── DeadlineExceededError       DEADLINE_EXCEEDED: the call's timeout passed
        └── InternalError               INTERNAL: logged by the server under the ref it quotes

The server sends the status code and a message (server/rpc/errors.py), no rich status: an
INVALID_ARGUMENT message starts with the field it names (``rewards[1].reward: must be finite``),
which ``.field`` carries.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import grpc

from nextbest.bandit.errors import AlreadyExists, InvalidInput, NextbestError, NotFound, PermissionDenied, Unavailable

# Worth another attempt, with backoff: the server did not do the work (or, for UNAVAILABLE on a
# connection that broke mid-call, may have: only idempotent calls are retried, see client_shared).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_.\[\]]*): ", re.ASCII)


class ServiceError(NextbestError, grpc.RpcError):  # type: ignore[misc]
    """A call failed with a gRPC status: ``code()`` (grpc.StatusCode), ``details()`` (the server's
    message), ``method`` (e.g. "Choose"), ``field`` (the request field an INVALID_ARGUMENT names,
    else ""), ``trailing_metadata()`` (as received)."""

    status: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self, code: grpc.StatusCode, details: str, method: str = "", field: str = "", trailing: Sequence[tuple[str, Any]] = ()
    ) -> None:
        Exception.__init__(self, f"{code.name}: {details}")  # not super(): InvalidInput's takes (field, message)
        self._code = code
        self._details = details
        self._trailing = tuple(trailing)
        self.method = method
        self.field = field
        self.message = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again later may succeed (UNAVAILABLE, RESOURCE_EXHAUSTED)."""
        return self._code in RETRYABLE

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (error_for, (self._code, self._details, self.method, self._trailing))


class InvalidArgumentError(ServiceError, InvalidInput):
    """The request is invalid (``field`` names what); nothing was changed. Do not retry as is."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServiceError, NotFound):
    """The placement, arm, event or profile named does not exist (or is not this token's)."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError, AlreadyExists):
    """The id is taken (a Choose with an event_id used before)."""

    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ServiceError, PermissionDenied):
    """The token's role or placements do not allow this call."""

    status = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ServiceError):
    """No token, or one the server does not know."""

    status = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(ServiceError, Unavailable):
    """The server (or its database) cannot serve now, or could not be reached; retry later."""

    status = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(ServiceError):
    """The server is overloaded and refused the call before doing anything; retry with backoff."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ServiceError):
    """The call's timeout passed; the server may or may not have done the work."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(ServiceError):
    """A server fault (logged there under the ref the message quotes); sending it again fails again."""

    status = grpc.StatusCode.INTERNAL


ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        InternalError,
    )
    if cls.status is not None
}

_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def error_for(code: grpc.StatusCode | int, details: str, method: str = "", trailing: Sequence[tuple[str, Any]] = ()) -> ServiceError:
    """The exception for a status (a grpc.StatusCode or its number, as a batch result carries it)."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    field = ""
    if code is grpc.StatusCode.INVALID_ARGUMENT and (m := _FIELD.match(details)):
        field = m.group(1)
    return ERRORS.get(code, ServiceError)(code, details, method, field, trailing)


def error_from(error: grpc.RpcError, method: str = "") -> ServiceError:
    """The exception for what a stub raised (a grpc.Call, sync or asyncio)."""
    if isinstance(error, ServiceError):
        return error
    code = _call(error, "code") or grpc.StatusCode.UNKNOWN
    return error_for(code, _call(error, "details") or "", method, _call(error, "trailing_metadata") or ())


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    code = _call(error, "code")
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _call(error: grpc.RpcError, name: str) -> Any:
    fn = getattr(error, name, None)
    return fn() if callable(fn) else None

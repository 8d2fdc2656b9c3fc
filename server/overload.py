"""Overload protection: a bound on calls in flight, and no work for callers who have given up.

A saturated server that queues every call lets latency grow until every caller times out and
all the work done is wasted. Instead, past ``max_inflight`` concurrent calls of one method a
new call of that method is refused at once with RESOURCE_EXHAUSTED (no engine work), and a
call whose deadline has already passed when it reaches its handler is dropped with
DEADLINE_EXCEEDED before it decides, reserves budget or writes anything.

The bound is per method so that Rewards piling up behind a database that went away cannot
starve Choose, which keeps serving from memory. Health and reflection are never limited, so a
busy server still answers its load balancer. A request that does not even parse is answered
INVALID_ARGUMENT (gRPC would say UNKNOWN with a parser message), since it is bad input.

Everything runs on the server's one event loop, so the counter needs no lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from server.wrapping import HandlerWrapper

if TYPE_CHECKING:
    from server.metrics import Metrics

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Behavior: TypeAlias = Callable[[Any, Ctx], Awaitable[Any]]
LIMITED_PREFIXES = ("/nextbest.v1.",)


class _Malformed:
    """Stands for a request that did not parse, so that the guard can answer INVALID_ARGUMENT."""

    placement = event_id = ""


MALFORMED = _Malformed()


def _lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - any parse failure is bad input
            return MALFORMED

    return lenient


def deadline_passed(context: Ctx, margin: float = 0.0) -> bool:
    """Whether the caller's deadline has passed (or will within margin seconds)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= margin


async def check_deadline(context: Ctx, margin: float = 0.0) -> None:
    """Abort with DEADLINE_EXCEEDED if the caller has given up: call before doing work."""
    if deadline_passed(context, margin):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the work started")


class OverloadInterceptor(HandlerWrapper):
    """RESOURCE_EXHAUSTED past max_inflight calls of a method; DEADLINE_EXCEEDED for expired calls."""

    def __init__(self, max_inflight: int, metrics: Metrics | None = None, margin: float = 0.0) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.max_inflight = max_inflight
        self.by_method: dict[str, int] = {}
        self.refused = 0
        self.expired = 0
        self._metrics = metrics
        self._margin = margin

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """The handler, guarded; also used to wrap handlers once when they are registered."""
        if handler is None or handler.unary_unary is None or not method.startswith(LIMITED_PREFIXES):
            return handler
        return handler._replace(
            unary_unary=self._guarded(handler.unary_unary, method),
            request_deserializer=_lenient(handler.request_deserializer),
        )

    def _shed(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.shed.labels(reason).inc()

    @property
    def inflight(self) -> int:
        return sum(self.by_method.values())

    def _count(self, method: str, delta: int) -> None:
        self.by_method[method] = self.by_method.get(method, 0) + delta
        if self._metrics is not None:
            self._metrics.inflight.inc(delta)

    def _guarded(self, behavior: Behavior, method: str) -> Behavior:
        async def guarded(request: Any, context: Ctx) -> Any:
            if request is MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message for this method")
            if deadline_passed(context, self._margin):
                self.expired += 1
                self._shed("deadline")
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call was served")
            if self.by_method.get(method, 0) >= self.max_inflight:
                self.refused += 1
                self._shed("overload")
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: {self.max_inflight} calls of this method in flight; retry with backoff",
                )
            self._count(method, 1)
            try:
                return await behavior(request, context)
            finally:
                self._count(method, -1)

        return guarded

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

Shedding before the queue forms. A Choose never awaits (it is served from memory), so it is
never counted concurrently by the bound above: past saturation the calls queue *inside gRPC*,
in the core's list of calls that have arrived but that the Python server has not yet taken
(grpc.aio's server loop asks gRPC for one call at a time, and each ask takes a turn of the
event loop). That queue is invisible from
Python: the loop shows no lag (each turn is one call's work) and only one or two RPC tasks
exist at a time. grpc.aio's ``maximum_concurrent_rpcs`` does not help: it counts the RPC tasks
it has started (health checks included) and, past the cap, it does not answer
RESOURCE_EXHAUSTED (the sync server does) but stops taking calls, so they wait in that same
queue. It stays as a memory ceiling (``max_concurrent_rpcs``, set far above ``max_inflight``
times the methods, so that it binds only if something else went wrong). gRPC core's own bound
on that queue (``grpc.server.max_pending_requests``) answers CANCELLED, which a client cannot
tell from its own cancellation, so it is not used.

So the queue is measured: while the loop is busy, the server sends itself a tiny Choose every
``PROBE_INTERVAL`` over loopback and times its answer. The probe waits in the same queue as
every other Choose, so its round trip *is* the current queue wait (while a probe is still
out, the time it has been waiting so far is the estimate, so a growing queue is seen at once).
Past ``shed_queue_ms`` of estimated wait, each new nextbest.v1 call is refused at once with
RESOURCE_EXHAUSTED with probability (wait - target) / target (at most SHED_MAX, 50 %):
a refusal costs gRPC's per-call work but none of ours, so callers who back off leave the queue
and the others wait less (see the last paragraph for how much); callers still queued when the
refusals start wait like the rest (their place in gRPC's queue was taken before any code of ours ran). When the
load drops, the next probe comes back fast and shedding stops: nothing latches. Probes are
answered without touching the engine, and before the RPC metrics count them (a few a
second, only while the loop is busy). The probe is recognised by its payload
(16 random bytes drawn at start) and, when tokens are configured, by a metadata entry holding
the same secret: ``ProbeGate`` answers it ahead of authentication, so the probe neither needs a
token nor fills the log with refused calls, and a caller who does not know the secret gains
nothing (a probe's answer is empty). With TLS the probe is off (the in-flight bound, the
deadline check and the hard cap remain).

A refusal is not free: it costs gRPC's per-call work, about 60 % of a served Choose on the
reference machine, so shedding shortens the wait of callers who back off (``nextbest bench
--phases overload``: accepted median about half, p99 about three quarters of the same flood
unshed, for some 40 % of the accepted throughput); it cannot bound the latency of a server
offered several times its capacity, where admission must be limited in front of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from nextbest.rpc.wrapping import HandlerWrapper

if TYPE_CHECKING:
    from nextbest.telemetry.metrics import Metrics

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Behavior: TypeAlias = Callable[[Any, Ctx], Awaitable[Any]]
LIMITED_PREFIXES = ("/nextbest.v1.",)
CHOOSE = "/nextbest.v1.DecisionService/Choose"
PROBE_INTERVAL = 0.025  # seconds between queue probes while the loop is busy
PROBE_BUSY = 0.3  # share of the loop thread's time on CPU above which the queue is probed
# At most half the calls are shed: a refusal costs about 60 % of a served Choose (gRPC's per-call
# work), so refusing more spends more of the loop on refusals than on answers (measured: at 95 %
# the accepted throughput fell to a fifth of the unshed one, at 50 % to four fifths)
SHED_MAX = 0.5
log = logging.getLogger("nextbest.overload")


class _Malformed:
    """Stands for a request that did not parse, so that the guard can answer INVALID_ARGUMENT."""

    placement = event_id = ""


MALFORMED = _Malformed()
PROBE = object()  # the parsed form of this server's own queue probe


PROBE_KEY = "x-nextbest-queue-probe"  # metadata of the probe: the payload's secret, in hex


def _probe_payload() -> bytes:
    """A ChooseRequest no client sends: an unknown field 15 holding 16 random bytes."""
    return b"\x7a\x10" + os.urandom(16)


async def _probe_answer(request: Any, context: Ctx) -> bytes:
    return b""


class ProbeGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers this server's own queue probe ahead of the other interceptors (authentication):
    a Choose carrying the probe's secret in its metadata gets an empty answer, and no work."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._answer = grpc.unary_unary_rpc_method_handler(_probe_answer)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method == CHOOSE:
            for key, value in handler_call_details.invocation_metadata or ():
                if key == PROBE_KEY and isinstance(value, str) and hmac.compare_digest(value, self._secret):
                    return self._answer
        return await continuation(handler_call_details)


def _lenient(parse: Callable[[bytes], Any] | None, probe: bytes | None = None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def lenient(data: bytes) -> Any:
        if data == probe:
            return PROBE
        try:
            return parse(data)
        except Exception:
            return MALFORMED

    return lenient


def _probe_serializer(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serializer(response: Any) -> bytes:
        return b"" if response is PROBE else serialize(response)

    return serializer


class QueueShedder:
    """Estimates the wait of a Choose in gRPC's queue and turns it into a shed probability.

    ``observe(wait)`` is fed by the probe (or by a test with its own numbers); ``shed_p`` is
    what the guard reads per call: 0 up to ``target`` seconds of wait, rising linearly (1 at
    twice the target), capped at SHED_MAX. The wait is the smaller of the last two estimates: a
    queue of calls keeps the loop turning, so the probe's estimates grow one after the other,
    whereas a loop that was blocked (a model loading, a long collection) gives one late answer
    and no estimate before it, and is not mistaken for a queue. No other state: a short wait ends
    shedding at once.
    """

    def __init__(self, target: float) -> None:
        self.target = target
        self.wait = 0.0
        self.shed_p = 0.0
        self._last = 0.0

    def observe(self, estimate: float) -> None:
        wait, self._last = min(self._last, estimate), estimate
        self.wait = wait
        if self.target <= 0 or wait <= self.target:
            self.shed_p = 0.0
        else:
            self.shed_p = min(SHED_MAX, (wait - self.target) / self.target)


class QueueProbe:
    """Sends this server a probe Choose every PROBE_INTERVAL while the loop is busy, and feeds
    its round trip (so far, while it is out) to a QueueShedder. Runs on the server's loop."""

    def __init__(
        self, target: str, payload: bytes, shedder: QueueShedder, interval: float = PROBE_INTERVAL, busy: float = PROBE_BUSY
    ) -> None:
        self.target, self.payload, self.shedder = target, payload, shedder
        self.metadata = ((PROBE_KEY, payload.hex()),)  # lets the probe past authentication (ProbeGate)
        self.interval, self.busy = interval, busy
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="overload-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(self.target, options=[("grpc.so_reuseport", 0)]) as channel:
            call = channel.unary_unary(CHOOSE)
            wall, cpu = loop.time(), time.thread_time()
            while True:
                await asyncio.sleep(self.interval)
                now, used = loop.time(), time.thread_time()
                busy = (used - cpu) / max(now - wall, 1e-6)
                if busy < self.busy and self.shedder.wait < self.shedder.target / 2:
                    self.shedder.observe(0.0)  # an idle loop has taken every call gRPC holds
                else:
                    await self._probe(loop, call)
                    now, used = loop.time(), time.thread_time()
                wall, cpu = now, used

    async def _probe(self, loop: asyncio.AbstractEventLoop, call: Any) -> None:
        self.sent += 1
        t0 = loop.time()
        fut = asyncio.ensure_future(call(self.payload, timeout=30.0, metadata=self.metadata))
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=self.interval)
                waited = loop.time() - t0
                if done:
                    fut.result()
                    self.shedder.observe(waited)
                    return
                self.shedder.observe(max(self.shedder.wait, waited))  # still queued: at least this long
        except grpc.aio.AioRpcError as e:
            # answered, just not by the guard or the gate: it still queued like a Choose
            self.shedder.observe(loop.time() - t0 if e.code() != grpc.StatusCode.UNAVAILABLE else 0.0)
        except asyncio.CancelledError:
            fut.cancel()
            raise


def deadline_passed(context: Ctx, margin: float = 0.0) -> bool:
    """Whether the caller's deadline has passed (or will within margin seconds)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= margin


class OverloadInterceptor(HandlerWrapper):
    """RESOURCE_EXHAUSTED past max_inflight calls of a method; DEADLINE_EXCEEDED for expired calls."""

    def __init__(self, max_inflight: int, metrics: Metrics | None = None, margin: float = 0.0, shed_queue: float = 0.0) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.max_inflight = max_inflight
        self.by_method: dict[str, int] = {}
        self.refused = 0
        self.expired = 0
        self.busy_shed = 0
        self._metrics = metrics
        self._margin = margin
        self.shedder = QueueShedder(shed_queue)
        self.probe_payload = _probe_payload()
        self.probe: QueueProbe | None = None
        self._random = random.random

    def probe_gate(self) -> ProbeGate:
        """The interceptor to place ahead of authentication, so that the probe needs no token."""
        return ProbeGate(self.probe_payload.hex())

    async def start_probe(self, target: str) -> None:
        """Measure gRPC's Choose queue through target (this server); no-op when shedding is off."""
        if self.shedder.target > 0 and self.probe is None:
            self.probe = QueueProbe(target, self.probe_payload, self.shedder)
            self.probe.start()

    async def stop_probe(self) -> None:
        if self.probe is not None:
            await self.probe.stop()
            self.probe = None
        self.shedder.observe(0.0)

    def bypass(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """Outermost layer of Choose (around the timing): the probe is answered before it is
        counted in the RPC metrics. ``wrap`` must be inside, for its deserializer."""
        if handler is None or handler.unary_unary is None or method != CHOOSE:
            return handler
        inner = handler.unary_unary

        async def probe_first(request: Any, context: Ctx) -> Any:
            return PROBE if request is PROBE else await inner(request, context)

        return handler._replace(unary_unary=probe_first)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """The handler, guarded; also used to wrap handlers once when they are registered."""
        if handler is None or handler.unary_unary is None or not method.startswith(LIMITED_PREFIXES):
            return handler
        if method == CHOOSE and self.shedder.target > 0:  # the queue probe is a Choose
            return handler._replace(
                unary_unary=self._guarded(handler.unary_unary, method),
                request_deserializer=_lenient(handler.request_deserializer, self.probe_payload),
                response_serializer=_probe_serializer(handler.response_serializer),
            )
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
            if request is PROBE:
                return PROBE  # this server's queue probe: it has waited its turn, that was the point
            shed_p = self.shedder.shed_p
            if shed_p and self._random() < shed_p:
                self.busy_shed += 1
                self._shed("queue")
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: calls wait {1000 * self.shedder.wait:.0f} ms in its queue; retry with backoff",
                )
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

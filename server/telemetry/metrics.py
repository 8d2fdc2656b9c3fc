"""Prometheus metrics: RPC latency by method and code, decisions and rewards per placement and
arm, and the engine's state (queues, learner lag, model versions, budgets) on an HTTP port.

Counters are bumped by the engine as things happen. State gauges are read at scrape time *on
the event loop* (the engine's single owner), so a scrape never sees a half-updated engine; if
the loop does not answer within a second, the previous reading is served. The learner's
backlog and the rewards awaiting their window's close (acknowledged, not yet learned) come
from the database, whichever server wrote them, queried in the scrape's own thread, never on
the loop: a restart shows them as they are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nextbest.rpc.wrapping import HandlerWrapper
from nextbest.telemetry.gc_pauses import PauseObserver

if TYPE_CHECKING:
    from nextbest.storage.base import Awaiting

log = logging.getLogger("nextbest.rpc")
Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class EngineReading:
    """The engine's state at one instant, as plain values."""

    ready: bool = False
    queue_depth: int = 0
    learn_seq: int = 0
    learner_lag: dict[str, int] = field(default_factory=dict)  # from the database
    model_cursor: dict[str, int] = field(default_factory=dict)
    model_version: dict[tuple[str, str], int] = field(default_factory=dict)
    budget_remaining: dict[tuple[str, str], float] = field(default_factory=dict)
    budget_limit: dict[tuple[str, str], float] = field(default_factory=dict)
    # (placement, arm) -> (rewards, their sum, reward spend) of windows still open: from the database
    awaiting: dict[tuple[str, str], tuple[int, float, float]] = field(default_factory=dict)
    unknown_arm_versions: int = 0  # learned rows skipped: an arm version the database does not have


class Metrics:
    """One registry per server; the engine reports through decision/reward/closed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_seconds = Histogram(
            "nextbest_rpc_duration_seconds",
            "RPC latency by method and status code (its _count counts RPCs)",
            ["method", "code"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "nextbest_decisions", "Decisions served, by placement and arm ('' = none)", ["placement", "arm"], registry=r
        )
        self.rewards = Counter(
            "nextbest_rewards",
            "Reward windows closed durably, by placement, arm and outcome (reward|default); rewards acknowledged"
            " and not yet closed are nextbest_rewards_awaiting_close",
            ["placement", "arm", "outcome"],
            registry=r,
        )
        self.reward_calls = Counter("nextbest_reward_calls", "Reward answers by status (learned|duplicate|late)", ["status"], registry=r)
        self.inflight = Gauge("nextbest_inflight_rpcs", "Calls being served now (nextbest services)", registry=r)
        self.shed = Counter("nextbest_shed_rpcs", "Calls refused early, by reason (overload|deadline|queue)", ["reason"], registry=r)
        self.profile_read_failures = Counter(
            "nextbest_profile_read_failures", "Profile reads for Choose that failed (decided on cached or no profiles)", registry=r
        )
        self.refused_records = Counter(
            "nextbest_refused_records",
            "Records the database refused to store, dropped, by kind (decision|close|activation|reward)",
            ["kind"],
            registry=r,
        )
        self.gc_pauses = PauseObserver(
            Histogram(
                "nextbest_gc_pause_seconds",
                "Garbage-collector pauses by generation: each stops the event loop",
                ["generation"],
                buckets=_BUCKETS,
                registry=r,
            )
        )
        self._collector = _EngineCollector()
        r.register(self._collector)
        self._http: Any = None
        self._children: dict[tuple[Any, ...], Any] = {}

    # -- engine hooks (called on the event loop) --------------------------------------------

    def decision(self, placement: str, arm: str | None) -> None:
        self.child(self.decisions, placement, arm or "").inc()

    def reward(self, status: str) -> None:
        self.child(self.reward_calls, status).inc()

    def refused(self, kind: str) -> None:
        """The database refused a record (the writer's on_refused): it was not stored."""
        self.child(self.refused_records, kind).inc()

    def closed(self, placement: str, arm: str, rewarded: bool) -> None:
        """A window closed durably: with a reward, or with the placement's default."""
        self.child(self.rewards, placement, arm, "reward" if rewarded else "default").inc()

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus-client's lookup took 10-15 µs a
        call on the Choose path (measured). Label sets are bounded by placements and arms."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- state gauges -------------------------------------------------------------------------

    def track(
        self,
        read: Callable[[], EngineReading],
        backlog: Callable[[dict[str, int]], tuple[int, dict[str, int]]],
        loop: asyncio.AbstractEventLoop,
        awaiting: Callable[[str], list[Awaiting]] | None = None,
    ) -> None:
        """At every scrape: ``read`` the engine's state on its ``loop`` (its single owner), then
        its learn ``backlog`` and each placement's rewards ``awaiting`` their window's close
        from the database, off the loop."""
        self._collector.read, self._collector.backlog, self._collector.loop = read, backlog, loop
        self._collector.awaiting = awaiting

    # -- HTTP exporter ----------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a thread; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)


class _EngineCollector:
    """Gauges of engine state, read on the event loop when Prometheus scrapes."""

    def __init__(self) -> None:
        self.read: Callable[[], EngineReading] | None = None
        self.backlog: Callable[[dict[str, int]], tuple[int, dict[str, int]]] | None = None
        self.awaiting: Callable[[str], list[Awaiting]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last = EngineReading()

    def describe(self) -> list[Any]:
        return []

    def _reading(self) -> EngineReading:
        read, backlog, loop = self.read, self.backlog, self.loop
        if read is None or backlog is None or loop is None:
            return self._last
        fut: concurrent.futures.Future[EngineReading] = concurrent.futures.Future()

        def work() -> None:
            try:
                fut.set_result(read())
            except Exception as e:
                fut.set_exception(e)

        try:
            loop.call_soon_threadsafe(work)
            reading = fut.result(timeout=1.0)
        except Exception:
            return self._last
        try:
            reading.learn_seq, reading.learner_lag = backlog(reading.model_cursor)
        except Exception:
            reading.learn_seq, reading.learner_lag = self._last.learn_seq, self._last.learner_lag
        try:
            reading.awaiting = self._awaiting(list(reading.model_cursor))
        except Exception:
            reading.awaiting = self._last.awaiting
        self._last = reading
        return reading

    def _awaiting(self, placements: list[str]) -> dict[tuple[str, str], tuple[int, float, float]]:
        """Per (placement, arm): acknowledged rewards of open windows, their sum and reward spend."""
        out: dict[tuple[str, str], tuple[int, float, float]] = {}
        if self.awaiting is None:
            return out
        for pid in placements:
            for w in self.awaiting(pid):
                n, total, spend = out.get((pid, w.arm_id), (0, 0.0, 0.0))
                out[(pid, w.arm_id)] = (n + w.count, total + w.reward_sum, spend + w.spend)
        return out

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r = self._reading()
        yield GaugeMetricFamily("nextbest_ready", "1 once every model is loaded and calls are served", value=float(r.ready))
        yield GaugeMetricFamily("nextbest_writer_queue_depth", "Decisions and reward closes waiting to be written", value=r.queue_depth)
        yield GaugeMetricFamily("nextbest_learn_seq", "Highest learn_seq given to a closed reward window", value=r.learn_seq)
        lag = GaugeMetricFamily("nextbest_learner_lag", "Reward windows closed durably but not yet learned", labels=["placement"])
        for pid, v in sorted(r.learner_lag.items()):
            lag.add_metric([pid], v)
        yield lag
        cur = GaugeMetricFamily("nextbest_model_cursor", "Highest learn_seq learned by a model of the placement", labels=["placement"])
        for pid, v in sorted(r.model_cursor.items()):
            cur.add_metric([pid], v)
        yield cur
        ver = GaugeMetricFamily("nextbest_model_version", "Examples learned by each model", labels=["placement", "model"])
        for (pid, model), v in sorted(r.model_version.items()):
            ver.add_metric([pid, model], v)
        yield ver
        rem = GaugeMetricFamily("nextbest_budget_remaining", "Budget left (limit - spent - reserved)", labels=["budget", "period"])
        lim = GaugeMetricFamily("nextbest_budget_limit", "Budget limit", labels=["budget", "period"])
        for (key, period), left in sorted(r.budget_remaining.items()):
            rem.add_metric([key, period], left)
            lim.add_metric([key, period], r.budget_limit[(key, period)])
        yield rem
        yield lim
        rewards = GaugeMetricFamily(
            "nextbest_rewards_awaiting_close",
            "Decisions of open windows holding an acknowledged reward, learned at the close (from the database)",
            labels=["placement", "arm"],
        )
        total = GaugeMetricFamily(
            "nextbest_reward_sum_awaiting_close",
            "Sum of those rewards (an aggregating window's running aggregate)",
            labels=["placement", "arm"],
        )
        spend = GaugeMetricFamily(
            "nextbest_reward_spend_awaiting_close",
            "Reward costs of the positive ones, reserved in the budgets until the close",
            labels=["placement", "arm"],
        )
        for (pid, arm), (n, s, cost) in sorted(r.awaiting.items()):
            rewards.add_metric([pid, arm], n)
            total.add_metric([pid, arm], s)
            spend.add_metric([pid, arm], cost)
        yield rewards
        yield total
        yield spend
        yield CounterMetricFamily(
            "nextbest_unknown_arm_versions",
            "Closed decisions not learned: they name an arm version the database does not have",
            value=r.unknown_arm_versions,
        )


Behavior: TypeAlias = Callable[[Any, Ctx], Awaitable[Any]]


def _code_name(code: object) -> str | None:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # the aio context may hold the raw core code
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return str(c.name)
    return None


class MetricsInterceptor(HandlerWrapper):
    """Times every unary call by method and final status code; put it first (outermost)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """The handler, timed; also used to wrap handlers once when they are registered."""
        if handler is None or handler.unary_unary is None:
            return handler
        return handler._replace(unary_unary=self._timed(handler.unary_unary, method.lstrip("/")))

    def _timed(self, behavior: Behavior, method: str) -> Behavior:
        histogram = self._metrics.rpc_seconds

        async def timed(request: Any, context: Ctx) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                response = await behavior(request, context)
                code = _code_name(context.code()) or "OK"
                return response
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            except BaseException:
                code = _code_name(context.code()) or "UNKNOWN"
                raise
            finally:
                seconds = time.perf_counter() - start
                self._metrics.child(histogram, method, code).observe(seconds)
                if log.isEnabledFor(logging.DEBUG):  # an access log, when asked for
                    log.debug(
                        "%s %s %.4fs", method, code, seconds, extra={"event": "rpc", "method": method, "code": code, "seconds": seconds}
                    )

        return timed

"""Composition root: settings → store → engine → servicers → gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nextbest.config.files import load_apply_file
from nextbest.engine.engine import Engine
from nextbest.engine.profile_handler import ProfileHandler
from nextbest.rpc import tls
from nextbest.rpc.admin import AdminServicer
from nextbest.rpc.auth import AuthInterceptor, load_tokens
from nextbest.rpc.decision import DecisionServicer
from nextbest.rpc.http import HttpDoor, https_context
from nextbest.rpc.overload import OverloadInterceptor
from nextbest.rpc.profiles import ProfileServicer
from nextbest.rpc.reflection import enable_reflection
from nextbest.rpc.wrapping import RegisterWrapped
from nextbest.settings import Settings
from nextbest.storage.sql import open_store
from nextbest.telemetry import gc_pauses as collector
from nextbest.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc, profile_pb2, profile_pb2_grpc

log = logging.getLogger("nextbest")

SERVICES = (
    decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
)


@dataclass
class Running:
    """A started server: its bound port and the parts a test or the CLI may need."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health.aio.HealthServicer
    metrics_port: int | None = None
    overload: OverloadInterceptor | None = None
    http: HttpDoor | None = None
    http_port: int | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, drain within grace, then flush the log and snapshot models."""
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.overload is not None:
            await self.overload.stop_probe()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.engine.stop()
        self.engine.metrics.stop_http()
        self.engine.metrics.gc_pauses.remove()


async def create_server(settings: Settings, clock: Callable[[], float] = time.time) -> Running:
    """Start a server; health says NOT_SERVING until every model is loaded. Tests pass a clock."""
    tls.check_settings(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    tokens = load_tokens(settings.auth_tokens_file, settings.auth_tokens)  # bad files stop here, before the store
    creds = (
        tls.server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        if settings.tls_cert_file
        else None
    )
    store = open_store(settings.db)
    engine = Engine(store, settings, clock)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]
    overload = OverloadInterceptor(settings.max_inflight, engine.metrics, shed_queue=settings.shed_queue_ms / 1000)
    # grpc.aio stops taking calls past this many (it does not refuse them): a memory ceiling only
    limits: dict[str, Any] = {"maximum_concurrent_rpcs": settings.max_concurrent_rpcs or None}
    if len(tokens):
        # Outermost first: the server's own queue probe is answered (it carries no token and is
        # not counted), metrics see every other answer, auth refuses before any work (before the
        # request is even parsed), then the limit.
        gate = [overload.probe_gate()] if settings.shed_queue_ms else []
        interceptors = [*gate, engine.metrics.interceptor(), AuthInterceptor(tokens), overload]
        http_layers: dict[str, Any] = {"interceptors": interceptors[len(gate) :]}  # the probe is gRPC's only
        server = grpc.aio.server(options=options, interceptors=interceptors, **limits)
        target: Any = server
    else:
        # Without auth, the limit and the timing are wrapped around each handler once, when it
        # is registered: as interceptors they cost every call 60-100 µs (measured on Choose).
        server = grpc.aio.server(options=options, **limits)
        timing = engine.metrics.interceptor()
        if settings.shed_queue_ms:
            target = RegisterWrapped(server, lambda m, h: overload.bypass(m, timing.wrap(m, overload.wrap(m, h))))
        else:
            target = RegisterWrapped(server, lambda m, h: timing.wrap(m, overload.wrap(m, h)))
        http_layers = {"wrap": lambda m, h: timing.wrap(m, overload.wrap(m, h))}
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, target)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    decision = DecisionServicer(engine.chooser, engine.windows, engine.reward_batch, engine.explainer, engine.metrics, engine.conversions)
    admin = AdminServicer(engine.config, engine.stats)
    profiles = ProfileServicer(ProfileHandler(store, settings, engine.clock, on_written=engine.profiles.written))
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(decision, target)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, target)
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(profiles, target)
    enable_reflection((*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), target)  # v1 and v1alpha
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    await server.start()
    if creds is None:  # the queue probe calls this server over loopback, in plaintext
        await overload.start_probe(f"{_loopback(settings.host)}:{port}")
    await engine.start()
    engine.metrics.track(engine.reading, engine.store.learn_backlog, asyncio.get_running_loop(), engine.store.awaiting_close)
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = engine.metrics.serve_http(settings.metrics_host or settings.host, settings.metrics_port)
    if settings.init_config and not engine.states:
        await _init_config(engine, settings.init_config)
    http, http_port = None, None
    if settings.http_port is not None:  # the same servicers and layers, over HTTP/JSON
        https = https_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) if creds is not None else None
        http = HttpDoor(
            dict(zip(SERVICES, (decision, admin, profiles), strict=True)), max_body=settings.max_message_bytes, tls=https, **http_layers
        )
        http_port = await http.start(settings.host, settings.http_port, settings.reuse_port)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "auth %s (%d tokens), TLS %s, metrics %s, HTTP/JSON %s",
        "on" if len(tokens) else "off",
        len(tokens),
        ("mTLS" if settings.tls_client_ca_file else "on") if creds is not None else "off",
        f"on port {metrics_port}" if metrics_port is not None else "off",
        f"on port {http_port}" if http_port is not None else "off",
    )
    engine.metrics.gc_pauses.install()  # last: a server that failed to start leaves none behind
    return Running(server, port, engine, health_servicer, metrics_port, overload, http, http_port)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully and return (exit code 0)."""
    running = await create_server(settings)
    collector.tune()
    log.info("nextbest serving on %s:%d, database %s", settings.host, running.port, _safe_url(settings.db))
    print(f"nextbest serving on {settings.host}:{running.port}", flush=True)
    if running.http_port is not None:
        log.info("nextbest serving HTTP/JSON on %s:%d", settings.host, running.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining calls for up to %.1fs", settings.grace_period)
    await running.stop(settings.grace_period)
    log.info("stopped")


async def _init_config(engine: Engine, path: str) -> None:
    """Apply the init config to an empty database, once whatever the race: servers starting
    together (``--workers``, replicas) each find the database empty; the first to store it wins,
    the others' apply fails on its rows (all or nothing) and they load the winner's instead."""
    cfg = load_apply_file(Path(path))
    try:
        changes = await engine.config.apply(cfg.placements, campaigns=cfg.campaigns)
    except Exception as e:
        await engine.config.reload(await asyncio.get_running_loop().run_in_executor(engine.reader_pool, engine.store.config_serial))
        if not engine.states:
            raise
        log.info("another server applied its configuration first (%s: %s); loaded that one", type(e).__name__, e)
        return
    log.info("empty database: applied %s (%d changes)", path, len(changes))


def _loopback(host: str) -> str:
    """The address this process reaches its own server at."""
    if host in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url

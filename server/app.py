"""Composition root: settings → store → engine → servicers → gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.configfile import load_apply_file
from server.engine import Engine
from server.pb.nextbest.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc
from server.rpc.admin import AdminServicer
from server.rpc.decision import DecisionServicer
from server.settings import Settings
from server.storage import open_store

log = logging.getLogger("nextbest")

SERVICES = (
    decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass
class Running:
    """A started server: its bound port and the parts a test or the CLI may need."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, drain within grace, then flush the log and snapshot models."""
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.engine.stop()


async def create_server(settings: Settings, clock: Callable[[], float] = time.time) -> Running:
    """Start a server; health says NOT_SERVING until every model is loaded. Tests pass a clock."""
    store = open_store(settings.db)
    engine = Engine(store, settings, clock)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(DecisionServicer(engine), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine), server)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    await server.start()
    await engine.start()
    if settings.init_config and not engine.states:
        cfg = load_apply_file(Path(settings.init_config))
        changes = await engine.apply(cfg.placements, campaigns=cfg.campaigns)
        log.info("empty database: applied %s (%d changes)", settings.init_config, len(changes))
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, engine, health_servicer)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully and return (exit code 0)."""
    running = await create_server(settings)
    log.info("nextbest serving on %s:%d, database %s", settings.host, running.port, _safe_url(settings.db))
    print(f"nextbest serving on {settings.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining calls for up to %.1fs", settings.grace_period)
    await running.stop(settings.grace_period)
    log.info("stopped")


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url

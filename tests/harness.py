"""Real servers for tests: in-process on port 0 (own event loop in a thread), or as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from nextbest.app import Running, create_server
from nextbest.client import NextbestClient
from nextbest.rpc.auth import BearerToken, hash_token
from nextbest.settings import Settings
from nextbest.storage import scratch

if TYPE_CHECKING:
    from nextbest.engine.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


class ServerThread:
    """A real gRPC server on port 0, on its own event loop in a background thread."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: Running = self.call(create_server(settings, clock))
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def engine(self) -> Any:
        return self.running.engine

    def client(self) -> NextbestClient:
        return NextbestClient(self.target)

    def stop(self, grace: float | None = 1.0) -> None:
        try:
            self.call(self.running.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


# Tokens of the auth tests: a channel token, one limited to ussd_main_menu, an admin token.
CHANNEL_TOKEN = "chan-3f9a1c77e0b24d2e"
LIMITED_TOKEN = "ussd-only-8d0e51aa47"
ADMIN_TOKEN = "admin-b61c0f3e9d2a44"
TOKENS = (
    f"app:channel:{hash_token(CHANNEL_TOKEN)}; ops:admin:{hash_token(ADMIN_TOKEN)}; ussd:channel:{hash_token(LIMITED_TOKEN)}:ussd_main_menu"
)


def token_client(target: str, token: str | None = None, creds: grpc.ChannelCredentials | None = None) -> NextbestClient:
    """A client sending ``token`` (and using TLS with ``creds``)."""
    ch = grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    if token is not None:
        ch = grpc.intercept_channel(ch, BearerToken(token))
    return NextbestClient(target, timeout=5, channel=ch)


def make_settings(db: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {"db": db, "port": 0, "flush_interval": 0.005, "sweep_interval": 0.05}
    base.update(kw)
    return Settings(**base)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@contextmanager
def running_server(db: str, clock: Callable[[], float] = time.time, **kw: Any) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(db, **kw), clock)
    try:
        yield s
    finally:
        s.stop()


def postgres_available() -> bool:
    return scratch.postgres_available()


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema in database test; yields a SQLAlchemy URL whose search_path is it."""
    with scratch.postgres_schema("nbtest") as url:
        yield url


class ServerProcess:
    """`nextbest serve` as a real process; reads the bound port from its first line."""

    def __init__(self, db: str, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "nextbest.cli.main", "serve", "--port", "0", "--db", db, *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NEXTBEST_FLUSH_INTERVAL": "0.005", **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "serving on" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.target = line.strip().rsplit(" ", 1)[1]
        wait_serving(self.target)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def started_together(*starts: Callable[[], ServerProcess]) -> list[ServerProcess]:
    """Several ``ServerProcess``es started at once (their imports and starts overlap), each
    serving when this returns. Only for servers whose roles do not depend on which starts first
    (a learner with ``--learner never`` replicas, say); if one fails to start the others are killed."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
    errors = [e for f in futures if (e := f.exception()) is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().kill()
        raise errors[0]
    return [f.result() for f in futures]


def wait_serving(target: str, timeout: float = 30) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{target} not serving after {timeout}s")


def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    """Rows of one query on a database URL, read with an engine of its own (as an operator would)."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return [tuple(r) for r in c.execute(text(query)).all()]
    finally:
        eng.dispose()


def until(pred: Callable[[], object], timeout: float = 30.0, every: float = 0.05) -> None:
    """Wait for ``pred`` to hold (a process test's condition), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


@asynccontextmanager
async def engine_on(db: str, clock: Callable[[], float], **kw: Any) -> AsyncIterator[Engine]:
    """An Engine (no gRPC) started on the running loop; its background tasks (sweep, replica
    poll) wait far longer than a test runs, so the test drives them. Two on one SQLite file
    (``workers=2``) are two servers."""
    from nextbest.engine.engine import Engine
    from nextbest.storage.sql import open_store

    engine = Engine(open_store(db), make_settings(db, **{"sweep_interval": 60, "replica_poll_interval": 60, **kw}), clock)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def run_async(body: Callable[[], Awaitable[None]]) -> None:
    """Run an async test body to its end on a fresh loop."""
    asyncio.run(body())  # type: ignore[arg-type]

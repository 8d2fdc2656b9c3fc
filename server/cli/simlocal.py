"""In-process servers for the simulators: a throwaway SQLite database, a clock that can follow
the simulated days. Used by ``nextbest simulate`` (server/cli/simulate.py, simulate_billing.py)
and ``nextbest bakeoff``."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

LOCAL_SEED = "bakeoff"  # the in-process server's seed: it fixes the random draw of every event
SIM_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: simulated day 0 on an in-process server's clock


class SimClock:
    """An in-process server's clock that follows the simulated days: day d is ``SIM_EPOCH + d``
    days. The simulator sets it before each Choose, so that history windows (7d, 30d), reward
    windows and profile times count in simulated time, not in the minutes a run takes."""

    def __init__(self, now: float = SIM_EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at_day(self, day: float) -> None:
        self.now = SIM_EPOCH + day * 86400.0


@contextmanager
def local_server(
    db_dir: str | None = None, clock: Callable[[], float] = time.time, seed: str = LOCAL_SEED, **settings: Any
) -> Iterator[tuple[str, Any]]:
    """An in-process server on a free port with a throwaway SQLite database; yields its target
    and the running server. ``settings`` override the server's (Settings fields)."""
    import asyncio
    import threading

    from nextbest.app import create_server
    from nextbest.settings import Settings

    with tempfile.TemporaryDirectory(prefix="nextbest-local-", dir=db_dir) as d:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="nextbest-local", daemon=True)
        thread.start()
        base: dict[str, Any] = {"flush_interval": 0.005, "snapshot_every": 100_000, **settings}
        conf = Settings(db=f"sqlite:///{d}/nb.db", port=0, seed=seed, **base)
        running = asyncio.run_coroutine_threadsafe(create_server(conf, clock), loop).result(60)
        try:
            yield f"127.0.0.1:{running.port}", running
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


@contextmanager
def sim_server(seed: int, db_dir: str | None = None) -> Iterator[tuple[str, SimClock, Callable[[str], int]]]:
    """An in-process server on a throwaway SQLite database whose clock follows the simulated
    days (:class:`SimClock`), seeded by the simulation's seed: with the simulator naming the
    events, each event's random draw is fixed. Yields its target, its clock and a placement's
    learned count."""
    clock = SimClock()
    with local_server(db_dir, clock=clock, seed=f"simulate-{seed}", flush_interval=0.0005) as (target, running):
        states = running.engine.states

        def learned(placement: str) -> int:
            ps = states.get(placement)
            if ps is None:
                return 0
            # A model group's model counts every member's rewards: wait for this placement's own.
            return int(ps.own_learned if ps.models[""].group is not None else ps.model.learned)

        yield target, clock, learned


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds takes whole numbers separated by commas, not {text!r}") from None
    if not seeds:
        raise SystemExit("error: --seeds needs at least one seed")
    return seeds

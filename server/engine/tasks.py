"""Background tasks of the engine: each is stopped the same way."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; whether it was set. Unlike
    ``asyncio.wait_for(event.wait(), ...)`` on Python 3.11 this never swallows a cancellation
    that arrives as the event is set (the task then ran on, and cancel_and_wait hung: seen
    stopping an engine whose replication was woken at that moment)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)

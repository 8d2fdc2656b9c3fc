"""The garbage collector's settings for a serving process, its pauses as a metric, and where
it is paused on purpose.

Every collection stops the event loop, so its length lands in tail latency. gRPC leaves five
objects in a reference cycle per call (`_find_method_handler`'s closure, seen with
``gc.DEBUG_SAVEALL``), so the young generation always has garbage to collect, and a young
collection costs in proportion to the objects it holds. Measured at 1,700 Choose/s (20 arms,
SQLite, the benchmark's load): with a young threshold of 50,000 each collection paused the loop
10-30 ms, every 2-3 s, and p99 was 15-19 ms; at 2,000 no collection paused it over 10 ms and p99
was 8-14 ms, at the same saturation throughput.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Young collections small and often; the middle generation collected every 20 of them (what
# survives a young collection is mostly calls still in flight, garbage by then); full
# collections, which scan every open reward window, rarely.
THRESHOLDS = (2_000, 20, 1_000)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for work that makes many containers and no cycles,
    and for work that recurses deep.

    Building a replay chunk keeps every parsed line or fetched row, so the collector would scan
    the growing chunk again and again (15 % of a DSJSON replay, measured); reference counting
    frees all of it. A deeply nested apply file is refused by the RecursionError of its parse,
    and a collection there would run other objects' finalizers with no stack left."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def tune() -> None:
    """Freeze what is loaded at start (never scanned again), then set the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


class PauseObserver:
    """A ``gc.callbacks`` entry observing each collection's pause, by generation."""

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._children = {g: histogram.labels(str(g)) for g in range(3)}
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._start)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

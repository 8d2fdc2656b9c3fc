"""Phases of ``nextbest bench`` that drive real server processes over loopback gRPC.

Each load run is bounded in time and in count; the server's CPU time per request comes from
/proc around the run (warm-up included, as are its requests), which is what a request costs
the server in all: gRPC, Python, VW and the share of the group-committed log write.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextbest.bench.load import CHOOSE, REWARD, REWARD_BATCH, reward_batch_request, reward_request, write_payloads
from nextbest.bench.procs import ServerProc, Workers, choose_pool, placement, start_nextbest
from nextbest.client import NextbestClient

ARM_COUNTS = (5, 20, 100)


@dataclass(frozen=True)
class Limits:
    """How long and how much each phase may run."""

    seconds: float  # measured part of a load run
    warmup: float
    concurrency: int  # closed-loop callers at saturation
    reward_concurrency: int
    reward_ids: int  # at most this many events are prepared for the Reward phase
    prepare_seconds: float  # at most this long to prepare them
    placements: int  # the "1,000 placements" of the memory phase
    memory_limit: int  # bytes: the memory phase stops growing a server past this
    vw_seconds: float
    server_rounds: int
    server_per_round: int
    target_repeats: int  # paced runs at the p99 target's point (judged on the median one)


FULL = Limits(5.0, 1.0, 32, 256, 60_000, 20.0, 1000, 3 << 30, 2.0, 15, 300, 5)
SMOKE = Limits(0.3, 0.1, 8, 32, 400, 2.0, 10, 1 << 30, 0.1, 2, 20, 3)


@dataclass
class Events:
    """Event ids the Choose runs used (client-chosen), to be rewarded later."""

    ids: list[str] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        if result["errors"] or result["dropped"] or result.get("warmup_failed"):
            return  # we do not know which failed: keep only runs where every request was served
        for part in result["parts"]:
            self.ids.extend(f"{part['prefix']}{i:012d}" for i in range(part["sent"]))


class LoadRunner:
    """Run specs against one server, reading its CPU time around each run."""

    def __init__(self, workers: Workers, server: ServerProc, tmp: Path, limits: Limits) -> None:
        self.workers, self.server, self.tmp, self.limits = workers, server, tmp, limits
        self._files: dict[str, str] = {}
        self._runs = 0

    def payloads(self, key: str, payloads: Sequence[bytes]) -> str:
        if key not in self._files:
            # named by key: runners share the directory, and one key's payloads are the same in all
            path = str(self.tmp / f"payloads-{key.replace(':', '-').replace('/', '-')}.bin")
            write_payloads(path, payloads)
            self._files[key] = path
        return self._files[key]

    def choose_file(self, pid: str) -> str:
        return self.payloads(f"choose:{pid}", [r.SerializeToString() for r in choose_pool(pid)])

    def run(self, spec: dict[str, Any], workers: int | None = None) -> dict[str, Any]:
        self._runs += 1
        full = {
            "target": self.server.target,
            "warmup": self.limits.warmup,
            "seconds": self.limits.seconds,
            "concurrency": self.limits.concurrency,
            "max_requests": 10**9,
            **spec,
        }
        cpu0, threads0 = self.server.cpu(), self.server.threads()
        result = self.workers.run(full, workers)
        cpu1, threads1 = self.server.cpu(), self.server.threads()
        n = max(result["sent"], result["ok"] + result["not_acked"] + result["errors"], 1)
        result["server_cpu_us"] = 1e6 * (cpu1 - cpu0) / n
        # by thread: the event loop ("main") holds the GIL for Python work; gRPC's C threads do not
        result["server_threads_us"] = {k: 1e6 * (v - threads0.get(k, 0.0)) / n for k, v in threads1.items() if v - threads0.get(k, 0.0) > 0}
        return result

    def saturate(self, pid: str, events: Events | None = None, tag: str = "") -> dict[str, Any]:
        """Closed loop at fixed concurrency: the most Choose calls per second the server gives."""
        r = self.run({"method": CHOOSE, "payloads": self.choose_file(pid), "mode": "closed", "event_prefix": f"{tag}r{self._runs}-"})
        if events is not None:
            events.add(r)
        return r

    def paced(self, pid: str, rate: float, events: Events | None = None, tag: str = "") -> dict[str, Any]:
        """Open loop at a fixed rate: latency percentiles at that load."""
        r = self.run(
            {
                "method": CHOOSE,
                "payloads": self.choose_file(pid),
                "mode": "open",
                "rate": rate,
                "warmup": min(self.limits.warmup, 0.5),
                "event_prefix": f"{tag}r{self._runs}-",
            }
        )
        if events is not None:
            events.add(r)
        return r

    def overload(self, pid: str, rate: float) -> dict[str, Any]:
        """Open loop far past saturation (calls are not retried): what is shed, what is served."""
        return self.run(
            {
                "method": CHOOSE,
                "payloads": self.choose_file(pid),
                "mode": "open",
                "rate": rate,
                "warmup": min(self.limits.warmup, 0.5),
                "event_prefix": f"ov{self._runs}-",
                "timeout": 5.0,
                "max_inflight": 4000,
            }
        )

    def backoff_flood(self, pid: str, callers: int = 600, backoff: float = 0.2) -> dict[str, Any]:
        """Closed loop of many callers who back off ``backoff`` s (doubled per refusal in a row) on
        RESOURCE_EXHAUSTED: what shedding gives clients that do as they are told."""
        return self.run(
            {
                "method": CHOOSE,
                "payloads": self.choose_file(pid),
                "mode": "closed",
                "concurrency": callers,
                "backoff": backoff,
                "timeout": 20.0,
                "warmup": 1.0,
                "event_prefix": f"ob{self._runs}-",
            }
        )

    def rewards(self, ids: Sequence[str], seconds: float, batch: int = 1) -> dict[str, Any]:
        """Closed loop of Reward calls (or RewardBatch calls of ``batch`` rewards), each reward
        on a distinct open decision; counts LEARNED acks."""
        path = str(self.tmp / f"rewards-{self._runs}.bin")
        if batch > 1:
            calls = [reward_batch_request([(e, 1.0) for e in ids[i : i + batch]]) for i in range(0, len(ids) - batch + 1, batch)]
            method, concurrency = REWARD_BATCH, max(2, 4 * self.limits.reward_concurrency // batch)
        else:
            calls, method, concurrency = [reward_request(e, 1.0) for e in ids], REWARD, self.limits.reward_concurrency
        write_payloads(path, calls)
        r = self.run(
            {
                "method": method,
                "payloads": path,
                "mode": "closed",
                "exhaust": True,
                "warmup": 0.0,
                "batch": batch,
                "seconds": seconds,
                "concurrency": concurrency,
                "max_requests": len(calls),
            },
            workers=1,
        )
        r["batch"] = batch
        r["ids_available"] = len(ids)
        r["ran_out_of_ids"] = r["sent"] >= len(calls)
        r["ids_used"] = min(r["sent"] * batch, len(ids))
        return r

    def echo_reward(self) -> dict[str, Any]:
        path = self.payloads("reward-echo", [reward_request(f"e{i:015d}", 1.0) for i in range(256)])
        return self.run({"method": REWARD, "payloads": path, "mode": "closed", "concurrency": self.limits.reward_concurrency}, workers=1)


def apply_bench_placements(target: str, arm_counts: Sequence[int] = ARM_COUNTS) -> None:
    with NextbestClient(target, timeout=120) as nb:
        nb.apply([placement(f"bench{a}", a) for a in arm_counts])


def wait_placements(target: str, pids: Sequence[str], timeout: float = 30) -> None:
    """Until a replica serves the placements applied through another server."""
    deadline = time.monotonic() + timeout
    with NextbestClient(target, timeout=10) as nb:
        while not set(pids) <= {p.id for p in nb.placements()}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} did not pick up {list(pids)} within {timeout:g}s")
            time.sleep(0.1)


def prepare_events(runner: LoadRunner, events: Events, want: int, tag: str) -> None:
    """More open decisions for the Reward phase, from the cheapest placement, bounded in time."""
    deadline = time.monotonic() + runner.limits.prepare_seconds
    while len(events.ids) < want and (left := deadline - time.monotonic()) > 0.1:
        before = len(events.ids)
        events.add(
            runner.run(
                {
                    "method": CHOOSE,
                    "payloads": runner.choose_file(f"bench{ARM_COUNTS[0]}"),
                    "mode": "closed",
                    "warmup": 0.0,
                    "seconds": left,
                    "max_requests": want - before,
                    "event_prefix": f"{tag}p{before}-",
                }
            )
        )
        if len(events.ids) == before:
            break


# -- memory ---------------------------------------------------------------------------------------


def memory(placements: int, bits: int, vw_args: str, limit: int, db_dir: Path, target: int = 1000) -> dict[str, Any]:
    """Resident memory of one server process with 1, then up to ``placements`` placements of 20
    arms. Every placement serves one Choose and learns one Reward first, because VW allocates
    its weight table lazily: the pages become resident at the first learn (with -q UA one
    example touches nearly all of them), and a server in use has learned on every placement."""
    db = f"sqlite:///{db_dir}/memory-{bits}-{abs(hash(vw_args)) % 10**6}.db"
    server = start_nextbest(db)
    feats = list(choose_pool("memory", 16)[0].features)
    out: dict[str, Any] = {"bits": bits, "vw_args": vw_args, "rss_empty": server.rss()}
    t0 = time.perf_counter()
    try:
        with NextbestClient(server.target, timeout=300) as nb:

            def grow(first: int, count: int) -> None:
                specs = [placement(f"m{i:05d}", 20, bits).model_copy(update={"vw_args": vw_args}) for i in range(first, first + count)]
                nb.apply(specs)
                for s in specs:
                    nb.reward(nb.choose(s.id, feats).event_id, 1.0)

            grow(0, 1)
            _wait_learned(nb, ["m00000"])
            out["rss_1"] = server.rss()
            n, batch = 1, 50
            while n < placements and server.rss() < limit:
                k = min(batch, placements - n)
                grow(n, k)
                n += k
            _wait_learned(nb, [f"m{n - 1:05d}"])
            out["rss_n"] = server.rss()
    finally:
        server.stop()
    out["placements"] = n
    out["seconds"] = time.perf_counter() - t0
    per = (out["rss_n"] - out["rss_1"]) / max(n - 1, 1)
    out["per_placement"] = per
    out["target_placements"] = target
    out["rss_at_target"] = out["rss_n"] + per * (target - n)
    out["extrapolated"] = n != target
    return out


def _wait_learned(nb: NextbestClient, pids: Sequence[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(nb.stats(p).model_version >= 1 for p in pids):
            return
        time.sleep(0.05)


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="nextbest-bench-")

"""In-process parts of ``nextbest bench``: raw VW (the ceiling of a Choose), the server's own
time per Choose besides VW, Reward without gRPC, and optional profiles of both hot paths.

These run in the benchmark's own process, with no server or load running, so that what they
time is the code and not the neighbours.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pylibvw

from nextbest.bandit.decider import ArmView
from nextbest.bandit.features import shared_line
from nextbest.bandit.model import CbModel
from nextbest.bench.procs import ROOT, choose_pool, placement
from nextbest.rpc import convert


def _timed_loop(fn: Callable[[int], object], seconds: float, max_n: int) -> tuple[int, float]:
    """Call fn(0), fn(1), ... until the time or the count runs out; (calls, CPU seconds of this
    thread). CPU time, not wall time: other work on the machine then does not count."""
    t0, c0 = time.perf_counter(), time.thread_time()
    end = t0 + seconds
    n = 0
    while n < max_n:
        fn(n)
        n += 1
        if n % 16 == 0 and time.perf_counter() >= end:
            break
    return n, time.thread_time() - c0


def vw_raw(arms: int, seconds: float, max_n: int) -> dict[str, float]:
    """Predicts and learns per CPU second of one placement's model on the server's example text:
    through CbModel (as the server calls it) and straight through the C++ binding (pylibvw),
    which skips pyvw's per-line Python Example wrappers."""
    spec = placement("raw", arms)
    lines = [ArmView.of(a, 0).line for a in spec.arms]
    shared = [shared_line(convert.features(r.features)) for r in choose_pool("raw")]
    model = CbModel(spec)
    ws = model._ws  # the bench measures the binding underneath on purpose
    learn_text = []
    for i, s in enumerate(shared):
        ls = [s, *lines]
        ls[1 + i % arms] = f"0:-1.0:0.5 {lines[i % arms]}"
        learn_text.append("\n".join(ls))

    def predict(i: int) -> None:
        model.expected_rewards(shared[i % len(shared)], lines)

    def learn(i: int) -> None:
        model.learn(shared[i % len(shared)], lines, i % arms, float(i % 2))

    def predict_binding(i: int) -> None:
        ex = pylibvw.vw._parse(ws, "\n".join((shared[i % len(shared)], *lines)))
        try:
            pylibvw.vw.predict_multi(ws, ex)
            ex[0].get_action_scores()
        finally:
            pylibvw.vw._finish_example_multi_ex(ws, ex)

    def learn_binding(i: int) -> None:
        ex = pylibvw.vw._parse(ws, learn_text[i % len(learn_text)])
        try:
            pylibvw.vw.learn_multi(ws, ex)
        finally:
            pylibvw.vw._finish_example_multi_ex(ws, ex)

    out: dict[str, float] = {"arms": arms}
    _timed_loop(learn, min(seconds, 0.2), 200)  # a model that has learned something
    for name, fn in (("predict", predict), ("learn", learn), ("binding_predict", predict_binding), ("binding_learn", learn_binding)):
        n, dt = _timed_loop(fn, seconds, max_n)
        out[f"{name}_per_s"] = n / dt
        out[f"{name}_us"] = 1e6 * dt / n
    model.close()
    return out


class NoContext:
    """Stands in for a grpc ServicerContext: the bench sends only valid requests."""

    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


async def with_server(fn: Callable[[Any], Awaitable[dict[str, Any]]], db: str | None = None) -> dict[str, Any]:
    """An in-process server (default settings) on ``db``, or a temp SQLite file, torn down afterwards."""
    import logging

    from nextbest.app import create_server
    from nextbest.settings import Settings

    logging.getLogger("nextbest").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-") as d:
        settings = Settings(db=db or f"sqlite:///{d}/nb.db", host="127.0.0.1", port=0, log_level="WARNING")
        running = await create_server(settings)
        try:
            return await fn(running.engine)
        finally:
            await running.stop(0)


def rule(j: int) -> dict[str, Any]:
    """Arm j's rule: three conditions, different for each arm, that hold for the benchmark's
    requests, so that every arm stays eligible and the rest of the work is the same."""
    return {
        "all": [
            {"feature": "customer.n0", "gte": -float(j)},
            {"feature": "device.c1", "in": ["youth", "family", "business", "senior", "student", "premium", f"s{j}"]},
            {"exists": ("channel.c2", "time.n3")[j % 2]},
        ]
    }


def rules_cost(arms: int, rounds: int, per_round: int) -> dict[str, Any]:
    """Per Choose through the servicer (no gRPC): a placement whose every arm carries a
    3-condition eligibility rule against the same placement without rules, both in every round
    (in alternating order) in one engine; the fastest round of each, and the median of the
    rounds' ratios."""
    from nextbest.bandit.spec import PlacementSpec
    from nextbest.rpc.decision import DecisionServicer

    async def run(engine: Any) -> dict[str, Any]:
        plain = placement("plain", arms)
        doc = plain.model_dump(by_alias=True, exclude_none=True)
        doc["id"] = "ruled"
        for j, a in enumerate(doc["arms"]):
            a["eligible"] = rule(j)
        await engine.config.apply([plain, PlacementSpec.model_validate(doc)])
        servicer = DecisionServicer(engine.chooser, engine.windows, engine.reward_batch, engine.explainer, engine.metrics)
        ctx: Any = NoContext()
        pools = {pid: choose_pool(pid) for pid in ("plain", "ruled")}
        times: dict[str, list[float]] = {"plain": [], "ruled": []}
        k = 0
        for rnd in range(rounds + 1):  # round 0 warms up
            for pid in ("plain", "ruled") if rnd % 2 else ("ruled", "plain"):
                reqs = pools[pid]
                t0 = time.process_time()
                for _ in range(per_round):
                    d = await servicer.Choose(reqs[k % len(reqs)], ctx)
                    assert d.arm_id, d.reason  # the rule holds: the same work as without it
                    k += 1
                await asyncio.wait_for(engine.writer.flush(), 60)
                if rnd:
                    times[pid].append((time.process_time() - t0) / per_round)
        plain_us, ruled_us = 1e6 * min(times["plain"]), 1e6 * min(times["ruled"])
        # Each round runs both, back to back: the median of the rounds' own ratios cancels the
        # machine's drift, which moved a plain-against-plain ratio of fastest rounds by +-12 %.
        paired = statistics.median(p / r for p, r in zip(times["plain"], times["ruled"], strict=True))
        return {"arms": arms, "plain_us": plain_us, "ruled_us": ruled_us, "speed_ratio": paired, "rounds": len(times["plain"])}

    return asyncio.run(with_server(run))


def server_time(arms: int, rounds: int, per_round: int, profile_top: int = 0) -> dict[str, Any]:
    """Per Choose: the servicer's CPU time (decode features, engine, response, and the decision's
    share of the group-committed log write, which runs in the writer thread) and VW's own
    predict on the same inputs. Process CPU time, in alternating rounds; the fastest round of
    each (and the medians): other work on the machine then hardly shows."""
    from nextbest.rpc.decision import DecisionServicer

    async def run(engine: Any) -> dict[str, Any]:
        pid = f"bench{arms}"
        await engine.config.apply([placement(pid, arms)])
        servicer = DecisionServicer(engine.chooser, engine.windows, engine.reward_batch, engine.explainer, engine.metrics)
        reqs = choose_pool(pid)
        ctx: Any = NoContext()
        ps = engine.states[pid]
        lines = [a.line for a in ps.arms]
        shared = [shared_line(convert.features(r.features)) for r in reqs]
        handler, vw, walls = [], [], []
        writes = _WriteMeter(engine.store, False)
        k = 0
        for rnd in range(rounds + 1):  # round 0 warms up
            t0, w0 = time.process_time(), time.perf_counter()
            for _ in range(per_round):
                await servicer.Choose(reqs[k % len(reqs)], ctx)
                k += 1
            await asyncio.wait_for(engine.writer.flush(), 60)
            t1, w1 = time.process_time(), time.perf_counter()
            for i in range(per_round):
                ps.model.expected_rewards(shared[i % len(shared)], lines)
            t2 = time.process_time()
            if rnd:
                handler.append((t1 - t0) / per_round)
                vw.append((t2 - t1) / per_round)
                walls.append((w1 - w0) / per_round)
        writes.restore()
        # The fastest round of each: on a shared machine, noise only ever adds time, so the
        # minimum is the best estimate of what the code costs (medians are kept beside it).
        h, v = min(handler), min(vw)
        hm, vm = statistics.median(handler), statistics.median(vw)
        out: dict[str, Any] = {
            "arms": arms,
            "choose_us": 1e6 * h,
            "vw_predict_us": 1e6 * v,
            "besides_vw_us": 1e6 * (h - v),
            "median_choose_us": 1e6 * hm,
            "median_vw_predict_us": 1e6 * vm,
            "median_besides_vw_us": 1e6 * (hm - vm),
            "choose_wall_us": 1e6 * statistics.median(walls),
            "calls": rounds * per_round,
            **writes.summary(),
        }
        if profile_top:  # a separate pass: the profiler's overhead must not reach the figures
            prof, pwrites = cProfile.Profile(time.thread_time), _WriteMeter(engine.store, True)
            prof.enable()
            for _ in range(rounds * per_round):
                await servicer.Choose(reqs[k % len(reqs)], ctx)
                k += 1
            await asyncio.wait_for(engine.writer.flush(), 60)
            prof.disable()
            pwrites.restore()
            assert pwrites.prof is not None
            out["profile"] = _top(prof, profile_top)
            out["profile_writer"] = _top(pwrites.prof, profile_top)
        return out

    return asyncio.run(with_server(run))


def reward_inproc(events: int, concurrency: int, profile_top: int = 0) -> dict[str, Any]:
    """Durable rewards per second through the servicer, without gRPC: the engine and store's
    ceiling as the server drives them. With profile_top, profiles the loop and the writer thread apart."""

    async def run(engine: Any) -> dict[str, Any]:
        from nextbest.rpc.decision import DecisionServicer
        from nextbest.v1 import decision_pb2

        pid = "bench20"
        await engine.config.apply([placement(pid, 20)])
        servicer = DecisionServicer(engine.chooser, engine.windows, engine.reward_batch, engine.explainer, engine.metrics)
        ctx: Any = NoContext()
        reqs = choose_pool(pid)
        ids = []
        for i in range(events * (2 if profile_top else 1)):
            ids.append((await servicer.Choose(reqs[i % len(reqs)], ctx)).event_id)
        await asyncio.wait_for(engine.writer.flush(), 60)

        async def rewards(batch: list[str], profile: bool) -> dict[str, Any]:
            writes = _WriteMeter(engine.store, profile)
            loop_prof = cProfile.Profile(time.thread_time) if profile else None
            sem = asyncio.Semaphore(concurrency)
            acked = 0

            async def one(eid: str) -> None:
                nonlocal acked
                async with sem:
                    r = await servicer.Reward(decision_pb2.RewardRequest(event_id=eid, reward=1.0), ctx)
                    if r.status == decision_pb2.REWARD_STATUS_LEARNED:
                        acked += 1

            if loop_prof is not None:
                loop_prof.enable()
            t0, c0 = time.perf_counter(), time.process_time()
            await asyncio.wait_for(asyncio.gather(*(one(e) for e in batch)), 300)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if loop_prof is not None:
                loop_prof.disable()
            writes.restore()
            out: dict[str, Any] = {
                "events": len(batch),
                "acked": acked,
                "seconds": dt,
                "acks_per_s": acked / dt,
                "cpu_us_per_ack": 1e6 * cpu / max(acked, 1),
                **writes.summary(),
            }
            if loop_prof is not None and writes.prof is not None:
                out = {"profile_loop": _top(loop_prof, profile_top), "profile_writer": _top(writes.prof, profile_top)}
            return out

        result = await rewards(ids[:events], False)
        if profile_top:  # a separate pass: the profiler's overhead must not reach the figures
            result.update(await rewards(ids[events:], True))
        return result

    return asyncio.run(with_server(run))


class _WriteMeter:
    """Wraps the store's group-commit write (it runs in the writer thread) to measure its wall
    and CPU time apart: the difference is mostly waiting for the GIL held by the event loop."""

    def __init__(self, store: Any, profile: bool) -> None:
        self.store, self.original = store, store.write
        self.prof = cProfile.Profile(time.thread_time) if profile else None
        self.calls = self.rows = 0
        self.wall = self.cpu = 0.0

        def write(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            if self.prof is not None:
                self.prof.enable()
            try:
                return self.original(*args, **kwargs)
            finally:
                if self.prof is not None:
                    self.prof.disable()
                self.calls += 1
                self.rows += sum(len(a) for a in args if isinstance(a, list | tuple))
                self.wall += time.perf_counter() - w0
                self.cpu += time.thread_time() - c0

        store.write = write

    def restore(self) -> None:
        self.store.write = self.original

    def summary(self) -> dict[str, float]:
        rows = max(self.rows, 1)
        return {
            "write_batches": self.calls,
            "write_rows": self.rows,
            "write_wall_us_per_row": 1e6 * self.wall / rows,
            "write_cpu_us_per_row": 1e6 * self.cpu / rows,
        }


def _top(prof: cProfile.Profile, n: int) -> str:
    """The top entries by own time. Profiles use each thread's CPU clock: the writer thread
    waits for the GIL a lot, and a wall clock would bill that wait to whatever line it hit."""
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(n)
    return _trim(buf.getvalue())


def _trim(text: str) -> str:
    """pstats output without its preamble, paths shortened to the package."""
    keep: list[str] = []
    started = False
    for line in text.splitlines():
        if line.strip().startswith("ncalls"):
            started = True
        if started and line.strip():
            keep.append(_short(line))
    return "\n".join(keep)


def _short(line: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3.11/"):
        i = line.find(marker)
        if i >= 0:
            j = line.rfind(" ", 0, i) + 1
            line = line[:j] + line[i + len(marker) :]
    return line

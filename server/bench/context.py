"""Choose with the stored profile and interaction history (issue #30) against the same
placement without, in the same run: ``nextbest bench --phases context`` (also run by
``--phases profiles,choose``, the issue's command, and by the full default run).

Servers side by side, each with one placement of 20 arms identical but for ``context``:
``plain`` (none: requests carry only a customer id and the channel, what an IVR or USSD gateway
can send), ``profiled`` (``{profile: true, history: [7d, 30d]}``, the same requests; its database
holds ``customers`` profiles of ten features each, written before it starts), and ``inline``
(no context; the requests carry the customer's ten profile features themselves): profiled /
plain is the issue's target, profiled / inline the cost of the lookup and the history alone,
without the model's cost of ten more features. One server per placement, not one server: a
placement with history turns on contact tracking for every placement of its server, so a plain
placement beside it would pay part of the cost it is the baseline for.

Two workloads: ``many`` (every request names a customer the last runs did not: the cache
misses, each Choose waits for a batched read) and ``repeat`` (a few hot customers: the cache
mostly hits; plain and profiled only). Each round saturates every server, then paces every one
at 80 % of the plain server's saturation in that round (the order reversed on odd rounds), then
the profiled one at 80 % of its own saturation (its latency when it is not past saturation);
figures are the medians of the rounds. The hit rate is estimated from each run's request
sequence, its pace and the cache's TTL (the server does not count hits): within the run, so for
the repeating customers, whom the run before may have left cached, a lower bound.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextbest.bandit.spec import PlacementSpec
from nextbest.bench.load import CHOOSE, write_payloads
from nextbest.bench.phases import Limits, LoadRunner
from nextbest.bench.procs import Workers, placement, start_nextbest
from nextbest.client import NextbestClient
from nextbest.storage.base import Profile
from nextbest.v1 import common_pb2, decision_pb2

ARMS = 20
PROFILE_FEATURES = 10
CONTEXT = {"profile": True, "history": ["7d", "30d"]}
LOAD = 0.8  # of the plain server's saturation, for the p99
KINDS = ("many", "repeat")  # workloads: every request a customer not named lately; a few hot customers
TTL = 5.0  # the server's default profile_cache_ttl (the servers here run with defaults)
TARGETS = {"rate": 0.8, "p99": 1.3}  # profiled / plain: throughput at least, p99 at most
_PLANS = ("prepaid", "postpaid", "hybrid")
_TIERS = ("low", "mid", "high", "flagship")
_REGIONS = tuple(f"r{k:02d}" for k in range(12))
_SEGMENTS = ("youth", "family", "business", "senior", "student", "premium")


@dataclass(frozen=True)
class Size:
    customers: int  # profiles stored
    hot: int  # customers of the repeat workload
    pool: int  # requests in one run's payload file (cycled if a run sends more)
    rounds: int  # SQLite; PostgreSQL runs max(1, rounds // 2) of the many-customers workload only


FULL = Size(100_000, 1_000, 20_000, 5)
SMOKE = Size(2_000, 100, 1_000, 1)


def profiles(n: int, seed: int = 11) -> list[Profile]:
    """``n`` customers' profiles: ten features in the customer namespace, numbers and texts."""
    rnd = random.Random(seed)
    now = time.time()
    out = []
    for i in range(n):
        feats = (
            ("customer", "plan", rnd.choice(_PLANS)),
            ("customer", "arpu", round(rnd.lognormvariate(3, 0.6), 2)),
            ("customer", "tenure_months", float(rnd.randrange(1, 240))),
            ("customer", "data_gb", round(rnd.expovariate(0.2), 2)),
            ("customer", "balance", round(rnd.uniform(0, 50), 2)),
            ("customer", "device_tier", rnd.choice(_TIERS)),
            ("customer", "region", rnd.choice(_REGIONS)),
            ("customer", "segment", rnd.choice(_SEGMENTS)),
            ("customer", "churn_score", round(rnd.random(), 3)),
            ("customer", "data_propensity", round(rnd.random(), 3)),
        )
        out.append(Profile(customer_id(i), feats, now - 3600.0))
    return out


def customer_id(i: int) -> str:
    return f"cust{i:07d}"


def load_profiles(url: str, n: int, batch: int = 20_000) -> float:
    """Write ``n`` profiles into the database at ``url`` (before its server starts); seconds taken."""
    from nextbest.storage.sql import open_store

    t0 = time.perf_counter()
    store = open_store(url)
    try:
        every = profiles(n)
        for i in range(0, n, batch):
            store.put_profiles(every[i : i + batch], time.time())
    finally:
        store.close()
    return time.perf_counter() - t0


def specs() -> dict[str, PlacementSpec]:
    base = placement("plain20", ARMS)
    return {
        "plain": base,
        "inline": base.model_copy(update={"id": "inline20"}),
        "profiled": base.model_validate({**base.model_dump(), "id": "profiled20", "context": CONTEXT}),
    }


def requests(pid: str, customers: Sequence[str], profile_of: dict[str, Profile] | None = None) -> list[bytes]:
    """ChooseRequests that carry only the customer id and the channel, or (``profile_of``) also
    the customer's profile features, as a channel that knows them would send them."""
    channel = common_pb2.Feature(namespace="channel", name="name", text="ivr")

    def feats(c: str) -> list[common_pb2.Feature]:
        if profile_of is None:
            return [channel]
        return [channel, *(_pb(f) for f in profile_of[c].features)]

    return [decision_pb2.ChooseRequest(placement=pid, customer_id=c, features=feats(c)).SerializeToString() for c in customers]


def _pb(f: tuple[str, str, Any]) -> common_pb2.Feature:
    ns, name, v = f
    if isinstance(v, str):
        return common_pb2.Feature(namespace=ns, name=name, text=v)
    return common_pb2.Feature(namespace=ns, name=name, number=float(v))


class Workload:
    """The customers of each run: ``many`` walks a shuffled list of every customer, one slice
    per run (consecutive runs name different customers); ``repeat`` draws from ``hot`` of them."""

    def __init__(self, kind: str, size: Size, seed: int = 5) -> None:
        self.kind, self.size = kind, size
        self._rnd = random.Random(seed)
        self._all = [customer_id(i) for i in range(size.customers)]
        self._rnd.shuffle(self._all)
        self._hot = self._all[: size.hot]
        self._next = 0

    def pool(self) -> list[str]:
        if self.kind == "repeat":
            return self._rnd.choices(self._hot, k=self.size.pool)
        n = len(self._all)
        start = self._next
        self._next = (start + self.size.pool) % n
        return [self._all[(start + i) % n] for i in range(self.size.pool)]


def hit_rate(pool: Sequence[str], r: dict[str, Any], warmup: float, ttl: float = TTL) -> float:
    """Share of the measured requests of run ``r`` whose customer was read less than ``ttl``
    before (a cache hit), replaying the run's sequence at its average pace (warm-up included)."""
    sent = int(r["sent"])
    measured = int(r["ok"] + r["errors"])
    if sent <= 0 or measured <= 0:
        return float("nan")
    step = (warmup + r["seconds"]) / sent
    read_at: dict[str, float] = {}
    hits = 0
    for i in range(sent):
        c, t = pool[i % len(pool)], i * step
        last = read_at.get(c)
        if last is not None and t - last < ttl:
            if i >= sent - measured:
                hits += 1
        else:
            read_at[c] = t
    return hits / measured


def _run_all(
    runners: dict[str, LoadRunner],
    workload: Workload,
    profile_of: dict[str, Profile],
    lim: Limits,
    k: int,
    tag: str,
    plain_rate: float | None = None,
) -> dict[str, Any]:
    """Every server saturated (``plain_rate`` None) or paced at ``plain_rate``, in an order
    reversed on odd rounds ``k``; each on its own slice of the workload."""
    out: dict[str, Any] = {}
    names = list(runners) if k % 2 == 0 else list(reversed(runners))
    for name in names:
        runner = runners[name]
        pool = workload.pool()
        path = str(runner.tmp / f"context-{tag}-{name}.bin")  # each run its own customers
        write_payloads(path, requests(f"{name}20", pool, profile_of if name == "inline" else None))
        spec: dict[str, Any] = {"method": CHOOSE, "payloads": path, "event_prefix": f"{tag}{name[:2]}-"}
        if plain_rate is None:
            spec["mode"] = "closed"
            warmup = lim.warmup
        else:
            warmup = min(lim.warmup, 0.5)
            spec.update(mode="open", rate=plain_rate, warmup=warmup)
        r = runner.run(spec)
        r["order"] = names.index(name)
        if name == "profiled":
            r["hit_rate"] = hit_rate(pool, r, warmup)
        out[name] = r
    return out


def measure(
    workers: Workers, tmp: Path, lim: Limits, size: Size, urls: dict[str, str], kinds: Sequence[str], rounds: int
) -> dict[str, Any]:
    """The servers on the databases of ``urls`` (plain, inline, profiled): every workload
    ``rounds`` times; ``inline`` (the profile's features sent in the request, no history) in the
    many-customers workload only. Profiles are written into the profiled database first."""
    out: dict[str, Any] = {"customers": size.customers, "profile_features": PROFILE_FEATURES, "arms": ARMS, "context": CONTEXT}
    out["load_seconds"] = load_profiles(urls["profiled"], size.customers)
    profile_of = {p.customer_id: p for p in profiles(size.customers)}
    servers: dict[str, Any] = {}
    try:
        with ThreadPoolExecutor(len(urls)) as pool:  # started at once: a start is mostly waiting on the machine
            started = {name: pool.submit(start_nextbest, url) for name, url in urls.items()}
        servers.update({name: f.result() for name, f in started.items() if f.exception() is None})
        failed = [e for f in started.values() if (e := f.exception()) is not None]
        if failed:
            raise failed[0]
        for name, spec in specs().items():
            with NextbestClient(servers[name].target, timeout=120) as nb:
                nb.apply([spec])
        for kind in kinds:
            runners = {n: LoadRunner(workers, s, tmp, lim) for n, s in servers.items() if n != "inline" or kind == "many"}
            wl = Workload(kind, size)
            runs = []
            for k in range(rounds):
                sat = _run_all(runners, wl, profile_of, lim, k, f"{kind[0]}s{k}")
                rate = max(1.0, LOAD * sat["plain"]["rate"])
                paced = _run_all(runners, wl, profile_of, lim, k, f"{kind[0]}p{k}", rate)
                # and at 80 % of its own saturation: its latency when it is not past it
                own_rate = max(1.0, LOAD * sat["profiled"]["rate"])
                own = _run_all({"profiled": runners["profiled"]}, wl, profile_of, lim, k, f"{kind[0]}o{k}", own_rate)["profiled"]
                runs.append({"saturation": sat, "paced": paced, "rate": rate, "own": own, "own_rate": own_rate})
            out[kind] = summarize(runs, kind, size)
    finally:
        with ThreadPoolExecutor(max(len(servers), 1)) as pool:  # each drains and snapshots: at once
            list(pool.map(lambda server: server.stop(), servers.values()))
    return out


def summarize(runs: list[dict[str, Any]], kind: str, size: Size) -> dict[str, Any]:
    """Medians over the rounds, and the ratios profiled / plain (and / inline) of those medians."""

    def med(phase: str, name: str, key: str) -> float:
        return float(statistics.median(r[phase][name][key] for r in runs))

    s: dict[str, Any] = {
        "kind": kind,
        "customers": size.hot if kind == "repeat" else size.customers,
        "rounds": len(runs),
        "runs": runs,
        "paced_rate": float(statistics.median(r["rate"] for r in runs)),
    }
    for name in runs[0]["saturation"]:
        s[name] = {
            "rate": med("saturation", name, "rate"),
            "p50_ms": med("paced", name, "p50_ms"),
            "p99_ms": med("paced", name, "p99_ms"),
            "server_cpu_us": med("saturation", name, "server_cpu_us"),
            "loop_cpu_us": float(statistics.median(r["saturation"][name]["server_threads_us"].get("main", 0.0) for r in runs)),
            "errors": sum(r[p][name]["errors"] + r[p][name]["dropped"] for r in runs for p in ("saturation", "paced")),
        }
    s["profiled"]["own_rate"] = float(statistics.median(r["own_rate"] for r in runs))
    s["profiled"]["own_p99_ms"] = float(statistics.median(r["own"]["p99_ms"] for r in runs))
    s["hit_rate"] = float(statistics.median(r[p]["profiled"]["hit_rate"] for r in runs for p in ("saturation", "paced")))
    for base in ("plain", "inline"):
        if base not in s:
            continue
        sfx = "" if base == "plain" else "_vs_inline"
        s[f"rate_ratio{sfx}"] = s["profiled"]["rate"] / s[base]["rate"] if s[base]["rate"] else float("nan")
        s[f"p99_ratio{sfx}"] = s["profiled"]["p99_ms"] / s[base]["p99_ms"] if s[base]["p99_ms"] else float("nan")
        s[f"paired_rate_ratios{sfx}"] = [r["saturation"]["profiled"]["rate"] / max(r["saturation"][base]["rate"], 1e-9) for r in runs]
        s[f"paired_p99_ratios{sfx}"] = [r["paced"]["profiled"]["p99_ms"] / max(r["paced"][base]["p99_ms"], 1e-9) for r in runs]
    return s


def run(workers: Workers, tmp: Path, lim: Limits, smoke: bool, postgres: bool) -> dict[str, Any]:
    """SQLite (both workloads), then PostgreSQL (many customers) when ``postgres``; smoke: SQLite,
    many customers, one round."""
    from nextbest.bench.procs import postgres_schema

    size = SMOKE if smoke else FULL
    out: dict[str, Any] = {"sqlite": measure(workers, tmp, lim, size, _sqlite_urls(tmp), KINDS[:1] if smoke else KINDS, size.rounds)}
    if postgres and not smoke:
        with postgres_schema("nbctxp") as plain, postgres_schema("nbctxi") as inline, postgres_schema("nbctxc") as profiled:
            urls = {"plain": plain, "inline": inline, "profiled": profiled}
            out["postgres"] = measure(workers, tmp, lim, size, urls, KINDS[:1], max(1, size.rounds // 2 + 1))
    return out


def _sqlite_urls(tmp: Path) -> dict[str, str]:
    return {name: f"sqlite:///{tmp / f'context-{name}.db'}" for name in ("plain", "inline", "profiled")}


class _ThreadMeter:
    """Wraps a store method that runs in a worker thread (the log writer's ``write``, the
    profile cache's ``get_profiles``): its CPU time, and a cProfile of it when asked."""

    def __init__(self, store: Any, method: str, profile: bool) -> None:
        import cProfile

        self.store, self.method, self.original = store, method, getattr(store, method)
        self.prof = cProfile.Profile(time.thread_time) if profile else None
        self.cpu = 0.0

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            if self.prof is not None:
                self.prof.enable()
            try:
                return self.original(*args, **kwargs)
            finally:
                if self.prof is not None:
                    self.prof.disable()
                self.cpu += time.thread_time() - c0

        setattr(store, method, wrapped)

    def restore(self) -> None:
        setattr(self.store, self.method, self.original)


_METERED = ("contacts_open", "contacts_commit", "contacts_insert", "contacts_read")  # shared history's store calls


def inproc(
    customers: int, calls: int, concurrency: int = 32, top: int = 0, db: str = "sqlite", profiled: str = "profiled"
) -> dict[str, Any]:
    """Per Choose through the servicer (no gRPC), ``concurrency`` at a time, on SQLite or
    PostgreSQL (``db``): plain and inline on one engine (no contact tracking, as on their own
    servers in the bench), profile only, history only and profiled on another (history turns
    tracking on for its whole server; on PostgreSQL it is shared, the default there); 3 rounds
    in alternating order after a warm-up. The process's CPU per call, and the parts of it spent
    in the log writer's, the profile reader's and the shared history's store calls (worker
    threads); medians of the rounds. With ``top``, a cProfile of the ``profiled`` placement's
    Choose (or another's): event loop, writer and reader threads, by own time."""
    import asyncio
    import contextlib
    import cProfile

    from nextbest.bench.inproc import NoContext, _top, with_server
    from nextbest.rpc.decision import DecisionServicer
    from nextbest.storage import scratch

    size = Size(customers, 0, calls, 0)
    profile_of = {p.customer_id: p for p in profiles(customers)}
    base = placement("plain20", ARMS)
    every = specs()
    parts = {  # the profiled placement's two halves, each alone
        "profile_only": base.model_validate({**base.model_dump(), "id": "profile_only20", "context": {"profile": True}}),
        "history_only": base.model_validate({**base.model_dump(), "id": "history_only20", "context": {"history": CONTEXT["history"]}}),
    }
    bare_names = ("plain", "inline")

    async def go(bare: Any, engine: Any) -> dict[str, Any]:
        await bare.config.apply([every["plain"], every["inline"]])
        await engine.config.apply([every["profiled"], *parts.values()])
        ctx: Any = NoContext()
        wl = Workload("many", size)

        async def drive(name: str, profile: bool = False) -> dict[str, Any]:
            e = bare if name in bare_names else engine
            servicer = DecisionServicer(e.chooser, e.windows, e.reward_batch, e.explainer, e.metrics)
            pool = wl.pool()
            reqs = [decision_pb2.ChooseRequest.FromString(b) for b in requests(f"{name}20", pool, profile_of if name == "inline" else None)]
            it = iter(reqs)

            async def caller() -> None:
                for r in it:
                    await servicer.Choose(r, ctx)

            writer, reader = _ThreadMeter(e.store, "write", profile), _ThreadMeter(e.store, "get_profiles", profile)
            contacts = [_ThreadMeter(e.store, m, False) for m in _METERED if hasattr(e.store, m)]
            loop_prof = cProfile.Profile(time.thread_time) if profile else None
            t0 = time.process_time()
            if loop_prof is not None:
                loop_prof.enable()
            try:
                await asyncio.gather(*(caller() for _ in range(concurrency)))
                await asyncio.wait_for(e.writer.flush(), 60)
            finally:
                if loop_prof is not None:
                    loop_prof.disable()
                for m in (writer, reader, *contacts):
                    m.restore()
            n = len(reqs)
            r: dict[str, Any] = {
                "cpu_us": 1e6 * (time.process_time() - t0) / n,
                "writer_us": 1e6 * writer.cpu / n,
                "reader_us": 1e6 * reader.cpu / n,
                "contacts_us": 1e6 * sum(m.cpu for m in contacts) / n,
            }
            if profile and loop_prof is not None and writer.prof is not None and reader.prof is not None:
                profs = {"loop": loop_prof, "writer": writer.prof, "reader": reader.prof}
                r["profiles"] = {k: _top(p, top) for k, p in profs.items() if p.getstats()}  # a thread not used: none
            return r

        names = ("plain", "inline", "profile_only", "history_only", "profiled")
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rnd in range(4):  # round 0 warms up
            for name in names if rnd % 2 else tuple(reversed(names)):
                r = await drive(name)
                if rnd:
                    runs[name].append(r)
        keys = ("cpu_us", "writer_us", "reader_us", "contacts_us")
        out: dict[str, Any] = {"db": db, **{n: {k: float(statistics.median(r[k] for r in rs)) for k in keys} for n, rs in runs.items()}}
        if top:
            out["profiles"] = (await drive(profiled, True))["profiles"]
        return out

    with contextlib.ExitStack() as stack:
        if db == "postgres":
            urls = [stack.enter_context(scratch.postgres_schema("nbctxin")) for _ in range(2)]
        else:
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix="nextbest-bench-"))
            urls = [f"sqlite:///{d}/bare.db", f"sqlite:///{d}/nb.db"]
        load_profiles(urls[1], customers)

        async def both() -> dict[str, Any]:
            return await with_server(lambda bare: with_server(lambda engine: go(bare, engine), urls[1]), urls[0])

        return asyncio.run(both())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nextbest.bench.context [--profile N]``: the in-process comparison (no gRPC)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m nextbest.bench.context", description=inproc.__doc__)
    p.add_argument("--customers", type=int, default=FULL.customers)
    p.add_argument("--calls", type=int, default=5000, help="Choose calls per placement and round")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also print the top N entries of a cProfile of the profiled Choose")
    p.add_argument(
        "--of",
        default="profiled",
        choices=("plain", "inline", "profile_only", "history_only", "profiled"),
        help="whose Choose --profile profiles",
    )
    p.add_argument(
        "--db", choices=("sqlite", "postgres"), default="sqlite", help="postgres: a fresh schema of 127.0.0.1:5432 database test"
    )
    args = p.parse_args(argv)
    r = inproc(args.customers, args.calls, top=args.profile, db=args.db, profiled=args.of)
    profiles = r.pop("profiles", {})
    print(json.dumps(r, indent=1))
    for thread, text in profiles.items():
        print(f"== {args.of} Choose, in process: {thread} (tottime) ==\n{text}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

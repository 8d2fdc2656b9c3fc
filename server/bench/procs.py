"""Processes and workload of ``nextbest bench``: servers, load workers, PostgreSQL schemas,
/proc readings, and the synthetic placements and requests every phase shares.

Servers and load run in separate processes so that each is measured as it runs in production
(its own interpreter and GIL), and so that /proc gives each one's CPU time and resident memory.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from nextbest.bandit.spec import PlacementSpec
from nextbest.storage import scratch
from nextbest.storage.scratch import postgres_available as postgres_available  # re-exported for the bench phases
from nextbest.v1 import common_pb2, decision_pb2

ROOT = Path(__file__).resolve().parents[2]
SHARED_FEATURES = 30
ARM_FEATURES = 5
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (gRPC's pollers and DB threads too)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by thread name (main, grpc, db pools)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue  # the thread ended meanwhile
        name = "main" if tid == str(pid) else head.split("(", 1)[1].rstrip("0123456789-_")
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def busy_fraction(seconds: float = 0.5) -> float:
    """Share of all cores busy over a short sample: what else runs on the machine meanwhile."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def peak_rss(pid: int) -> int:
    """The process's own peak resident memory (VmHWM, its address space since its exec), in bytes; 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class ChildRun:
    """How a command run by run_child went."""

    returncode: int
    wall_seconds: float  # process start included
    peak_rss: int  # its VmHWM, sampled every 50 ms until it exits (0 when never read)
    # wait4's maxrss, in bytes: it counts this process's memory at the spawn too (the child
    # shares it until its exec): 500 MiB after writing a 10 M-row file here, twice a loader's own
    maxrss: int
    stdout: bytes
    stderr: str  # its last 300 characters


def run_child(cmd: Sequence[str], out_dir: Path, name: str, timeout: float, env: dict[str, str] | None = None) -> ChildRun:
    """``cmd`` in a process of its own, its output in ``out_dir``/``name``.out and .err, killed
    after ``timeout`` seconds: exit code, wall time and peak memory (VmHWM and wait4's maxrss)."""
    out_path, err_path = out_dir / f"{name}.out", out_dir / f"{name}.err"
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + timeout
        hwm = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, peak_rss(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    return ChildRun(
        returncode=os.waitstatus_to_exitcode(status),
        wall_seconds=wall,
        peak_rss=hwm,
        maxrss=usage.ru_maxrss * 1024,  # KiB on Linux
        stdout=out_path.read_bytes(),
        stderr=err_path.read_text(errors="replace")[-300:],
    )


def print_report(report: dict[str, Any], table: str, json_path: Path | None) -> int:
    """A bench module's ``main`` ending: its table printed, its report also written as JSON to
    ``json_path`` when given (values JSON has no type for as text); 0, the exit code."""
    print(table)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


# -- server processes ------------------------------------------------------------------------------


class ServerProc:
    """A server process that prints "... serving on HOST:PORT" as its first stdout line."""

    def __init__(self, cmd: Sequence[str], name: str, env: dict[str, str] | None = None, start_timeout: float = 60) -> None:
        self.name = name
        self._log: IO[bytes] = tempfile.TemporaryFile(prefix=f"nextbest-bench-{name}-")
        self.proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR", **(env or {})},
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if "serving on" not in line:
            tail = self.stderr_tail()
            self.stop()
            raise RuntimeError(f"{name} did not start: {line!r} {tail}")
        self.target = line.strip().rsplit(" ", 1)[1]
        self.pid = self.proc.pid

    def stderr_tail(self, n: int = 2000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def threads(self) -> dict[str, float]:
        return thread_cpu(self.pid)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (nextbest drains, flushes and snapshots), SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def start_nextbest(db: str, *flags: str, env: dict[str, str] | None = None) -> ServerProc:
    """``nextbest serve`` on a free loopback port, as deployed (default settings, or NEXTBEST_*
    variables in ``env``), logging warnings only."""
    cmd = [
        sys.executable,
        "-m",
        "nextbest.cli.main",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db",
        db,
        "--log-level",
        "WARNING",
        *flags,
    ]
    p = ServerProc(cmd, "nextbest", env=env)
    wait_serving(p.target)
    return p


def start_echo(kind: str = "echo") -> ServerProc:
    """The echo ceiling, or a server doing part of a Choose's work (nextbest.bench.load.SERVERS)."""
    return ServerProc([sys.executable, "-m", "nextbest.bench.load", kind], kind)


def wait_serving(target: str, timeout: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{target} not serving after {timeout}s")


# -- PostgreSQL --------------------------------------------------------------------------------------


def postgres_schema(prefix: str = "nbbench") -> AbstractContextManager[str]:
    """A fresh schema of the machine's PostgreSQL for one benchmark phase."""
    return scratch.postgres_schema(prefix)


# -- load workers ------------------------------------------------------------------------------------


class Workers:
    """Load worker processes (``nextbest.bench.load worker``), given the same run spec at once."""

    def __init__(self, n: int = 1) -> None:
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-m", "nextbest.bench.load", "worker"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self._procs)

    def run(self, spec: dict[str, Any], workers: int | None = None) -> dict[str, Any]:
        """Run the spec on every worker (each its share of rate and concurrency), or on the first
        ``workers``; the merged result, with ``parts`` giving each worker's event prefix and count."""
        procs = self._procs[: workers or len(self._procs)]
        n = len(procs)
        prefixes: list[str | None] = []
        for k, p in enumerate(procs):
            part = dict(spec, return_latencies=n > 1 and (spec.get("mode") == "open" or bool(spec.get("backoff"))))
            if "rate" in spec:
                part["rate"] = spec["rate"] / n
            part["concurrency"] = max(1, int(spec.get("concurrency", 1)) // n)
            if spec.get("event_prefix") is not None:
                part["event_prefix"] = f"{spec['event_prefix']}w{k}-"
            if spec.get("targets"):  # worker k loads server k (mod the number of servers)
                part["target"] = spec["targets"][k % len(spec["targets"])]
            prefixes.append(part.get("event_prefix"))
            assert p.stdin is not None
            p.stdin.write(json.dumps(part) + "\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a load worker died")
            results.append(json.loads(line))
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"load worker failed: {errors[0]}")
        out = dict(results[0]) if n == 1 else _merge(results)
        out.pop("latencies", None)
        out.pop("shed_latencies", None)
        out["parts"] = [{"prefix": pre, "sent": r["sent"]} for pre, r in zip(prefixes, results, strict=True)]
        return out

    def close(self) -> None:
        for p in self._procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    from nextbest.bench.load import percentiles

    out: dict[str, Any] = {k: sum(r[k] for r in results) for k in ("sent", "ok", "not_acked", "errors", "dropped", "warmup_failed")}
    out["seconds"] = max(r["seconds"] for r in results)
    out["rate"] = sum(r["rate"] for r in results)
    out["client_cpu_us"] = sum(r["client_cpu_us"] for r in results) / len(results)
    codes: dict[str, int] = {}
    for r in results:
        for c, k in r["error_codes"].items():
            codes[c] = codes.get(c, 0) + k
    out["error_codes"] = codes
    lat = [x for r in results for x in r.get("latencies", [])]
    out.update(percentiles(lat) if lat else {k: max(r[k] for r in results) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")})
    shed = [x for r in results for x in r.get("shed_latencies", [])]
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    out.update(
        {f"shed_{k}": v for k, v in percentiles(shed).items()}
        if shed
        else {f"shed_{k}": max(r.get(f"shed_{k}", math.nan) for r in results) for k in keys}
    )
    return out


# -- workload ------------------------------------------------------------------------------------------

_CATEGORIES = ("data", "voice", "combo", "tv", "loyalty", "roaming", "device")
_SEGMENTS = ("youth", "family", "business", "senior", "student", "premium")


def placement(pid: str, arms: int, bits: int = 18) -> PlacementSpec:
    """A placement of ``arms`` offers with five features each; every other setting the default
    but ``learn_at: reward``, so that a Reward's cost includes its close and the learner keeps
    up within the run (under window_close a Reward stores the reward and the close comes at the
    deadline: one more row written per rewarded decision)."""
    return PlacementSpec.model_validate(
        {
            "id": pid,
            "bits": bits,
            "learn_at": "reward",
            "arms": [
                {
                    "id": f"arm_{j:03d}",
                    "features": {
                        "category": _CATEGORIES[j % len(_CATEGORIES)],
                        "price": round(1.99 + 0.75 * j, 2),
                        "validity_days": (7, 14, 30)[j % 3],
                        "tier": f"t{j % 4}",
                        "digital": j % 2 == 0,
                    },
                }
                for j in range(arms)
            ],
        }
    )


def choose_request(placement_id: str, rnd: random.Random) -> decision_pb2.ChooseRequest:
    """A request with 30 shared features (12 numbers, 18 categories) in four namespaces."""
    feats: list[common_pb2.Feature] = []
    for k in range(SHARED_FEATURES):
        ns = ("customer", "device", "channel", "time")[k % 4]
        if k % 5 in (0, 3):
            feats.append(common_pb2.Feature(namespace=ns, name=f"n{k}", number=round(rnd.uniform(0, 100), 3)))
        else:
            vocab = _SEGMENTS if k < 6 else tuple(f"v{v}" for v in range(8 + k))
            feats.append(common_pb2.Feature(namespace=ns, name=f"c{k}", text=rnd.choice(vocab)))
    return decision_pb2.ChooseRequest(placement=placement_id, customer_id=f"cust{rnd.randrange(10**7):07d}", features=feats)


def choose_pool(placement_id: str, n: int = 256, seed: int = 7) -> list[decision_pb2.ChooseRequest]:
    rnd = random.Random(seed)
    return [choose_request(placement_id, rnd) for _ in range(n)]

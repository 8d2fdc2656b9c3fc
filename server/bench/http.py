"""``nextbest bench --phases http``: Choose over the HTTP/JSON door against Choose over gRPC, on
one server with both ports, in the same run.

The same placement (20 arms) and the same 256 requests, as protobuf for gRPC and as canonical
proto3 JSON bodies for ``POST /v1/placements/bench20:choose`` (the placement in the path). Each
door is saturated (closed loop, the same concurrency), then paced at 80 % of its own saturation
(open loop) for its p99, in rounds (gRPC then HTTP in each; five in a full run), each figure from
the round with the median HTTP/gRPC ratio: the machine is shared and one round's ratio swung
0.30-0.88 minute to minute. The HTTP load is aiohttp client sessions in the same load worker
processes: keep-alive, one connection per closed-loop caller (twice as many allowed in the paced
run, which a burst may need). Target: HTTP's throughput at least half of gRPC's.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from nextbest.bench import phases as ph
from nextbest.bench.load import CHOOSE
from nextbest.bench.procs import Workers, choose_pool, start_nextbest
from nextbest.bench.report import Report

PLACEMENT = "bench20"
LOAD = 0.8  # share of each door's own saturation its p99 is measured at
TARGET = 0.5  # HTTP throughput / gRPC throughput at least this


def free_port() -> int:
    """A loopback port free now (the server prints only its gRPC port, so the bench picks this one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def json_bodies(pid: str) -> list[bytes]:
    """The gRPC runs' Choose requests as the HTTP route's bodies: canonical proto3 JSON, compact,
    without the placement (the path carries it)."""
    out = []
    for request in choose_pool(pid):
        doc = json_format.MessageToDict(request)
        doc.pop("placement", None)
        out.append(json.dumps(doc, separators=(",", ":")).encode())
    return out


def run(workers: Workers, tmp: Path, lim: ph.Limits) -> dict[str, Any]:
    """Rounds of gRPC then HTTP saturation, then rounds of each paced at 80 % of its own rate from
    the round judged on, on one server; each judged on the round with the median ratio."""
    port = free_port()
    server = start_nextbest(f"sqlite:///{tmp / 'http.db'}", "--http-port", str(port))
    rounds = lim.target_repeats
    try:
        ph.apply_bench_placements(server.target, (20,))
        runner = ph.LoadRunner(workers, server, tmp, lim)
        http = {
            "method": CHOOSE,
            "http_url": f"http://127.0.0.1:{port}/v1/placements/{PLACEMENT}:choose",
            "payloads": runner.payloads(f"choose-json:{PLACEMENT}", json_bodies(PLACEMENT)),
        }
        saturation = [
            (runner.saturate(PLACEMENT, tag=f"hg{k}"), runner.run({**http, "mode": "closed", "event_prefix": f"hhs{k}-"}))
            for k in range(rounds)
        ]
        grpc_sat, http_sat = median_pair(saturation, lambda g, h: _ratio(h["rate"], g["rate"]), kind=False)
        paced = [
            (
                runner.paced(PLACEMENT, max(1.0, LOAD * grpc_sat["rate"]), tag=f"hg{k}"),
                runner.run(
                    {
                        **http,
                        "mode": "open",
                        "rate": max(1.0, LOAD * http_sat["rate"]),
                        "warmup": min(lim.warmup, 0.5),
                        "connections": 2 * lim.concurrency,
                        "event_prefix": f"hhp{k}-",
                    }
                ),
            )
            for k in range(rounds)
        ]
        grpc_paced, http_paced = median_pair(paced, lambda g, h: _ratio(h["p99_ms"], g["p99_ms"]), kind=True)
    finally:
        server.stop()
    return {
        "placement": PLACEMENT,
        "load": LOAD,
        "concurrency": lim.concurrency,
        "grpc": {"saturation": grpc_sat, "paced": grpc_paced},
        "http": {"saturation": http_sat, "paced": http_paced},
        "rate_ratios": [_ratio(h["rate"], g["rate"]) for g, h in saturation],
        "p99_ratios": [_ratio(h["p99_ms"], g["p99_ms"]) for g, h in paced],
        "rounds": {"saturation": saturation, "paced": paced},
    }


Pair = tuple[dict[str, Any], dict[str, Any]]


def median_pair(pairs: list[Pair], ratio: Callable[[dict[str, Any], dict[str, Any]], float], kind: bool) -> Pair:
    """The (gRPC, HTTP) round with the median ratio: of an even number, the middle one less kind
    to HTTP (the lower throughput ratio; with ``kind`` True, where lower is better, the higher)."""
    ranked = sorted(pairs, key=lambda p: ratio(*p))
    return ranked[len(ranked) // 2 if kind else (len(ranked) - 1) // 2]


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def add_to(rep: Report, r: dict[str, Any]) -> None:
    """The phase's figures: each door's saturation and p99, and HTTP's ratios to gRPC."""
    rep.phases["http"] = r
    g, h = r["grpc"], r["http"]
    n = len(r["rate_ratios"])
    sat = f", the round of median ratio of {n}" if n > 1 else ""
    load = f"{r['load']:.0%} of its saturation{sat}"
    rep.add("http.grpc.rate", f"gRPC Choose 20 arms, saturation (server with both doors{sat})", g["saturation"]["rate"], "req/s")
    rep.add(
        "http.http.rate",
        f"HTTP/JSON Choose 20 arms, saturation (aiohttp keep-alive, {r['concurrency']} callers{sat})",
        h["saturation"]["rate"],
        "req/s",
        {"gRPC": g["saturation"]["rate"]},
        f">= {TARGET} x gRPC",
        h["saturation"]["rate"] >= TARGET * g["saturation"]["rate"],
    )
    ratio = _ratio(h["saturation"]["rate"], g["saturation"]["rate"])
    rep.add("http.rate_ratio", "HTTP/JSON Choose throughput / gRPC's", ratio, "x", {}, f">= {TARGET}", ratio >= TARGET)
    rep.add("http.grpc.p99", f"gRPC Choose 20 arms p99 at {load}", g["paced"]["p99_ms"], "ms")
    rep.add("http.http.p99", f"HTTP/JSON Choose 20 arms p99 at {load}", h["paced"]["p99_ms"], "ms", {"gRPC": g["paced"]["p99_ms"]})
    rep.add(
        "http.p99_ratio", "HTTP/JSON Choose p99 / gRPC's (each at its own 80 %)", _ratio(h["paced"]["p99_ms"], g["paced"]["p99_ms"]), "x"
    )
    rep.add(
        "http.http.server_cpu",
        "server CPU per HTTP/JSON Choose (20 arms, saturation)",
        h["saturation"]["server_cpu_us"],
        "us",
        {"gRPC": g["saturation"]["server_cpu_us"]},
    )
    rep.add(
        "http.http.client_cpu",
        "load generator CPU per HTTP/JSON Choose (aiohttp)",
        h["saturation"]["client_cpu_us"],
        "us",
        {"gRPC": g["saturation"]["client_cpu_us"]},
    )
    for kind, pairs in r["rounds"].items():
        for k, pair in enumerate(pairs):
            for door, x in zip(("gRPC", "HTTP/JSON"), pair, strict=True):
                if x["errors"] or x["dropped"] or x["warmup_failed"]:
                    rep.note(f"http phase, {door} {kind} round {k + 1}: {x['errors']} errors {x['error_codes']}, {x['dropped']} not sent")
    if len(r["rate_ratios"]) > 1:
        rep.note(
            "http phase, HTTP/gRPC by round: throughput "
            + " / ".join(f"{x:.2f}" for x in r["rate_ratios"])
            + "; p99 "
            + " / ".join(f"{x:.2f}" for x in r["p99_ratios"])
        )

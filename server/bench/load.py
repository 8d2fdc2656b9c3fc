"""Load generator and bare echo server for ``nextbest bench``, each run as its own process.

The worker and the echo import only grpc and protobuf, so that the load costs the same CPU
against the echo ceiling and against nextbest: ratios then compare servers, not clients. Requests
are pre-serialized bytes sent through identity serializers, which keeps the client as cheap as it
can be on a machine whose cores it shares with the server.

    python -m nextbest.bench.load echo      # prints "echo serving on 127.0.0.1:PORT"
    python -m nextbest.bench.load parse     # a Choose that parses and answers, nothing more
    python -m nextbest.bench.load decode    # ... and decodes the features into VW's context line
    python -m nextbest.bench.load worker    # reads one JSON run spec a line, answers one JSON line

A spec with ``http_url`` drives the HTTP/JSON door instead (Choose only): its payloads are JSON
bodies, posted with an aiohttp session (keep-alive, one connection per caller), imported then.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import resource
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

CHOOSE = "/nextbest.v1.DecisionService/Choose"
REWARD = "/nextbest.v1.DecisionService/Reward"
REWARD_BATCH = "/nextbest.v1.DecisionService/RewardBatch"
LEARNED = b"\x08\x01"  # RewardResponse(status=REWARD_STATUS_LEARNED)
LEARNED_ITEM = b"\x0a\x02\x08\x01"  # one RewardResult(status=LEARNED) inside a RewardBatchResponse
CHANNEL_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)]


# -- payload files: length-prefixed serialized messages ---------------------------------------


def write_payloads(path: str, payloads: Sequence[bytes]) -> None:
    with open(path, "wb") as f:
        for p in payloads:
            f.write(struct.pack("<I", len(p)))
            f.write(p)


def read_payloads(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string_field(number: int, text: str) -> bytes:
    """One length-delimited protobuf field; appended to a message it sets (or overrides) it."""
    raw = text.encode()
    return varint(number << 3 | 2) + varint(len(raw)) + raw


def reward_request(event_id: str, reward: float) -> bytes:
    """RewardRequest(event_id, reward) by hand, so the worker needs no generated code."""
    return string_field(1, event_id) + b"\x11" + struct.pack("<d", reward)


def reward_batch_request(items: Sequence[tuple[str, float]]) -> bytes:
    """RewardBatchRequest: each RewardRequest as a length-delimited field 1."""
    out = b""
    for event_id, reward in items:
        item = reward_request(event_id, reward)
        out += varint(1 << 3 | 2) + varint(len(item)) + item
    return out


# -- the echo server ---------------------------------------------------------------------------


def echo_responses() -> dict[str, bytes]:
    """A typical ChooseResponse and RewardResponse, byte for byte the sizes nextbest answers."""
    from nextbest.v1 import decision_pb2

    choose = decision_pb2.ChooseResponse(event_id="s20-c0-000000123456", arm_id="arm_007", probability=0.8123456789, model_version=123456)
    return {CHOOSE: choose.SerializeToString(), REWARD: LEARNED}


def _echo_handler(responses: dict[str, bytes]) -> Any:
    """Answers each known method with its canned response, without parsing the request."""

    def make(response: bytes) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def handle(request: bytes, context: Any) -> bytes:
            return response

        return handle

    service = CHOOSE.rsplit("/", 2)[1]
    return grpc.method_handlers_generic_handler(
        service, {m.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(make(r)) for m, r in responses.items()}
    )


def _partial_choose_handler(decode: bool) -> Any:
    """A Choose that does only part of nextbest's work: parse the request and build a response
    ("parse"), and also decode the features and write the VW context line ("decode"). Between
    echo and nextbest, they show where a Choose's time goes."""
    from nextbest.bandit.features import shared_line
    from nextbest.rpc import convert
    from nextbest.v1 import decision_pb2

    async def handle(request: Any, context: Any) -> Any:
        if decode:
            shared_line(convert.features(request.features))
        return decision_pb2.ChooseResponse(
            event_id=request.event_id or "s20-c0-000000123456", arm_id="arm_007", probability=0.8123456789, model_version=123456
        )

    method = grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=decision_pb2.ChooseRequest.FromString,
        response_serializer=decision_pb2.ChooseResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(CHOOSE.rsplit("/", 2)[1], {"Choose": method})


SERVERS = ("echo", "parse", "decode")  # what `python -m nextbest.bench.load SERVER` can serve


async def serve_echo(kind: str = "echo") -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([_echo_handler(echo_responses()) if kind == "echo" else _partial_choose_handler(kind == "decode")])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{kind} serving on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


# -- the load worker ---------------------------------------------------------------------------


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds (nearest rank), nan when there are none."""
    if not samples:
        return {k: math.nan for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}
    s = sorted(samples)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] * 1000.0

    return {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": s[-1] * 1000.0}


class _Requests:
    """Request i: a payload from the pool, for Choose with its own event id appended."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.pool = read_payloads(spec["payloads"])
        self.prefix: str | None = spec.get("event_prefix")
        self.json = bool(spec.get("http_url"))
        self.limit = min(int(spec["max_requests"]), len(self.pool)) if spec.get("exhaust") else int(spec["max_requests"])

    def __getitem__(self, i: int) -> bytes:
        p = self.pool[i % len(self.pool)]
        if self.prefix is None:
            return p
        if self.json:  # a JSON object's first member: {"eventId": "...", <the rest>}
            head = f'{{"eventId":"{self.prefix}{i:012d}"'.encode()
            return head + (b"}" if p.strip() == b"{}" else b"," + p.lstrip()[1:])
        return p + string_field(3, f"{self.prefix}{i:012d}")


class Tally:
    """Outcomes of one run; only LEARNED rewards count as acknowledged."""

    def __init__(self, method: str, batch: int = 1) -> None:
        self.reward = method == REWARD
        self.batch = batch if method == REWARD_BATCH else 0  # rewards per call; each LEARNED one counts
        self.ok = self.errors = self.not_acked = self.dropped = 0
        self.codes: dict[str, int] = {}
        self.latencies: list[float] = []
        self.shed_latencies: list[float] = []  # of RESOURCE_EXHAUSTED answers

    def done(self, response: bytes | None, code: grpc.StatusCode | None, latency: float) -> None:
        if response is None:
            self.errors += 1
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.shed_latencies.append(latency)
            name = code.name if code is not None else "UNKNOWN"
            self.codes[name] = self.codes.get(name, 0) + 1
            return
        if self.batch:
            acked = response.count(LEARNED_ITEM)
            self.ok += acked
            self.not_acked += self.batch - acked
        elif self.reward and response != LEARNED:
            self.not_acked += 1
        else:
            self.ok += 1
        self.latencies.append(latency)


Outcome = tuple[bytes | None, grpc.StatusCode | None]  # the answer, or the failure's code
Call = Callable[[bytes, float], Awaitable[Outcome]]  # one call: (payload, timeout) -> Outcome
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def grpc_call(stub: Any) -> Call:
    async def call(payload: bytes, timeout: float) -> Outcome:
        try:
            return await stub(payload, timeout=timeout), None
        except grpc.aio.AioRpcError as e:
            return None, e.code()

    return call


@asynccontextmanager
async def http_call(url: str, connections: int) -> AsyncIterator[Call]:
    """POSTs of JSON bodies to ``url`` on one keep-alive session of up to ``connections``
    connections (a call waits for a free one); a failure's code read from its google.rpc.Status
    body (UNKNOWN when it has none)."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=max(connections, 1), keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
        timeouts: dict[float, aiohttp.ClientTimeout] = {}

        async def call(payload: bytes, timeout: float) -> Outcome:
            limit = timeouts.get(timeout) or timeouts.setdefault(timeout, aiohttp.ClientTimeout(total=timeout))
            try:
                async with session.post(url, data=payload, headers=headers, timeout=limit) as r:
                    body = await r.read()
                    if r.status == 200:
                        return body, None
            except TimeoutError:
                return None, grpc.StatusCode.DEADLINE_EXCEEDED
            except aiohttp.ClientError:
                return None, grpc.StatusCode.UNAVAILABLE
            try:
                code = json.loads(body).get("code")
            except (ValueError, AttributeError):
                code = None
            return None, _CODES.get(code, grpc.StatusCode.UNKNOWN) if isinstance(code, int) else grpc.StatusCode.UNKNOWN

        yield call


async def closed_loop(call: Call, reqs: _Requests, start: int, spec: dict[str, Any], seconds: float, tally: Tally) -> int:
    """``concurrency`` callers back to back until time or requests run out; returns next index."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    nxt = [start]  # the next request index, shared by the callers
    timeout = float(spec.get("timeout", 10.0))
    # seconds a caller waits after RESOURCE_EXHAUSTED, doubled at each refusal in a row (up to 32 x)
    backoff = float(spec.get("backoff", 0.0))

    async def caller() -> None:
        refused = 0
        while nxt[0] < reqs.limit and loop.time() < end:
            i = nxt[0]
            nxt[0] += 1
            t0 = loop.time()
            resp, code = await call(reqs[i], timeout)
            tally.done(resp, code, loop.time() - t0)
            if backoff and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(min(backoff * 2**refused, end - loop.time()) * (0.5 + random.random()))
                refused = min(refused + 1, 5)
            else:
                refused = 0

    await asyncio.gather(*(caller() for _ in range(int(spec["concurrency"]))))
    return nxt[0]


async def open_loop(call: Call, reqs: _Requests, start: int, spec: dict[str, Any], seconds: float, tally: Tally) -> int:
    """Sends at a fixed rate whatever the answers (no coordinated omission): latency counts
    from when a request was due, so client-side queueing shows in it."""
    loop = asyncio.get_running_loop()
    rate = float(spec["rate"])
    max_inflight = int(spec.get("max_inflight", 2000))
    timeout = float(spec.get("timeout", 10.0))
    t0 = loop.time()
    inflight: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        resp, code = await call(reqs[i], timeout)
        tally.done(resp, code, loop.time() - due)

    i = start
    while i < reqs.limit:
        now = loop.time()
        if now - t0 >= seconds:
            break
        due_count = start + int((now - t0) * rate) + 1
        while i < min(due_count, reqs.limit):
            if len(inflight) >= max_inflight:
                tally.dropped += 1
            else:
                task = asyncio.create_task(one(i, t0 + (i - start) / rate))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            i += 1
        await asyncio.sleep(max(0.0, t0 + (i - start) / rate - loop.time()))
    if inflight:
        await asyncio.wait(inflight, timeout=timeout + 1)
    return i


async def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """One run: an unmeasured warm-up, then the measured part, on one channel."""
    reqs = _Requests(spec)
    driver = open_loop if spec["mode"] == "open" else closed_loop
    async with _caller(spec) as call:
        nxt = 0
        warm = Tally(spec["method"], int(spec.get("batch", 1)))
        if spec.get("warmup", 0) > 0:
            # at the run's own pace: a paced run warmed up at saturation would start with the
            # server still working off that burst, which is not the load it measures
            nxt = await driver(call, reqs, 0, spec, float(spec["warmup"]), warm)
        tally = Tally(spec["method"], int(spec.get("batch", 1)))
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        nxt = await driver(call, reqs, nxt, spec, float(spec["seconds"]), tally)
        elapsed, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    done = tally.ok + tally.not_acked
    out: dict[str, Any] = {
        "sent": nxt,
        "ok": tally.ok,
        "not_acked": tally.not_acked,
        "errors": tally.errors,
        "error_codes": tally.codes,
        "dropped": tally.dropped,
        "warmup_failed": warm.errors + warm.dropped,  # "sent" counts the warm-up's requests too
        "seconds": elapsed,
        "rate": tally.ok / elapsed if elapsed > 0 else 0.0,
        "client_cpu_us": 1e6 * (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / max(done, 1),
        **percentiles(tally.latencies),
        **{f"shed_{k}": v for k, v in percentiles(tally.shed_latencies).items()},
    }
    if spec.get("return_latencies"):
        out["latencies"] = tally.latencies
        out["shed_latencies"] = tally.shed_latencies
    return out


@asynccontextmanager
async def _caller(spec: dict[str, Any]) -> AsyncIterator[Call]:
    """The spec's calls: over HTTP/JSON when it gives ``http_url``, else over one gRPC channel."""
    if spec.get("http_url"):
        async with http_call(spec["http_url"], int(spec.get("connections") or spec["concurrency"])) as call:
            yield call
        return
    async with grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as ch:
        yield grpc_call(ch.unary_unary(spec["method"]))


def worker() -> None:
    """Serve run specs from stdin until it closes; one JSON answer line per spec."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = asyncio.run(run_spec(json.loads(line)))
        except Exception as e:  # reported, not fatal: the orchestrator decides
            result = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if argv[:1] and argv[0] in SERVERS:
        asyncio.run(serve_echo(argv[0]))
        return 0
    if argv[:1] == ["worker"]:
        worker()
        return 0
    print("usage: python -m nextbest.bench.load echo|parse|decode|worker", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

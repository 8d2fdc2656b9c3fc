"""The Python client as a library, against real servers on port 0: each status the service
answers raises its exception class (blocking and asyncio clients alike), retries happen only
where they are safe, and the results are typed.

Retries are shown through a front: a small gRPC server before the real one that fails the
first calls with a status, then passes calls through; it keeps every request as received."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

import nextbest
from nextbest.bandit.spec import PlacementSpec
from nextbest.client import (
    AlreadyExistsError,
    AsyncNextbestClient,
    DeadlineExceededError,
    Explanation,
    InternalError,
    InvalidArgumentError,
    NextbestClient,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    RewardStatus,
    ServiceError,
    Stats,
    UnauthenticatedError,
    UnavailableError,
)
from nextbest.v1 import decision_pb2
from tests import envs
from tests.harness import ADMIN_TOKEN, CHANNEL_TOKEN, LIMITED_TOKEN, TOKENS, ServerThread, make_settings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Auth on, a 64 KiB message limit, two placements and a taken event id."""
    db = f"sqlite:///{tmp_path_factory.mktemp('lib')}/nb.db"
    s = ServerThread(make_settings(db, auth_tokens=TOKENS, max_message_bytes=64 * 1024))
    with NextbestClient(s.target, token=ADMIN_TOKEN) as admin, NextbestClient(s.target, token=CHANNEL_TOKEN) as app:
        admin.apply([envs.placement("app_home_banner"), envs.placement("ussd_main_menu")])
        app.choose("app_home_banner", event_id="taken")
    yield s
    s.stop()


BIG = {f"f{i}": "x" * 1000 for i in range(100)}  # past the 64 KiB limit

# code -> (token, method, args, kwargs, class, domain class): one call the service answers so
CASES: dict[str, tuple[str, str, tuple[Any, ...], dict[str, Any], type[ServiceError], type[Exception]]] = {
    "INVALID_ARGUMENT": (CHANNEL_TOKEN, "reward", ("taken", float("nan")), {}, InvalidArgumentError, nextbest.InvalidInput),
    "NOT_FOUND": (CHANNEL_TOKEN, "reward", ("no-such-event", 1.0), {}, NotFoundError, nextbest.NotFound),
    "ALREADY_EXISTS": (CHANNEL_TOKEN, "choose", ("app_home_banner",), {"event_id": "taken"}, AlreadyExistsError, nextbest.AlreadyExists),
    "PERMISSION_DENIED": (LIMITED_TOKEN, "choose", ("app_home_banner",), {}, PermissionDeniedError, nextbest.PermissionDenied),
    "UNAUTHENTICATED": ("", "stats", ("app_home_banner",), {}, UnauthenticatedError, nextbest.NextbestError),
    "RESOURCE_EXHAUSTED": (CHANNEL_TOKEN, "choose", ("app_home_banner", BIG), {}, ResourceExhaustedError, nextbest.NextbestError),
    "DEADLINE_EXCEEDED": (ADMIN_TOKEN, "stats", ("app_home_banner",), {"timeout": 1e-6}, DeadlineExceededError, nextbest.NextbestError),
    "UNAVAILABLE": (ADMIN_TOKEN, "stats", ("app_home_banner",), {"retry": False}, UnavailableError, nextbest.Unavailable),
}
NOWHERE = "127.0.0.1:1"  # nothing listens: UNAVAILABLE


def _target(served: ServerThread, code: str) -> str:
    return NOWHERE if code == "UNAVAILABLE" else served.target


def _check(e: ServiceError, code: str, cls: type[ServiceError], domain: type[Exception]) -> None:
    assert type(e) is cls and isinstance(e, domain) and isinstance(e, nextbest.ServiceError) and isinstance(e, grpc.RpcError)
    assert e.code() == getattr(grpc.StatusCode, code) and e.details() and str(e).startswith(f"{code}: ")


@pytest.mark.parametrize("code", CASES)
def test_each_status_raises_its_class(served: ServerThread, code: str) -> None:
    token, method, args, kwargs, cls, domain = CASES[code]
    with NextbestClient(_target(served, code), token=token) as nb, pytest.raises(cls) as e:
        getattr(nb, method)(*args, **kwargs)
    _check(e.value, code, cls, domain)


@pytest.mark.parametrize("code", CASES)
def test_each_status_raises_its_class_from_the_async_client(served: ServerThread, code: str) -> None:
    token, method, args, kwargs, cls, domain = CASES[code]

    async def call() -> BaseException:
        async with AsyncNextbestClient(_target(served, code), token=token) as nb:
            try:
                await getattr(nb, method)(*args, **kwargs)
            except Exception as e:
                return e
        raise AssertionError("no error")

    got = asyncio.run(call())
    assert isinstance(got, ServiceError)
    _check(got, code, cls, domain)


def test_the_exported_classes_catch_what_the_server_answers(served: ServerThread) -> None:
    with NextbestClient(served.target, token=CHANNEL_TOKEN) as nb:
        try:
            nb.reward("no-such-event", 1.0)
        except nextbest.NotFound as e:  # the user's report: this never fired
            assert isinstance(e, NotFoundError) and e.method == "Reward" and "no-such-event" in e.details()
        with pytest.raises(nextbest.InvalidInput) as bad:
            nb.reward("taken", float("nan"))
        assert isinstance(bad.value, InvalidArgumentError) and bad.value.field == "reward"


def test_results_are_typed_and_keep_the_message(served: ServerThread) -> None:
    with NextbestClient(served.target, token=CHANNEL_TOKEN) as nb, NextbestClient(served.target, token=ADMIN_TOKEN) as admin:
        d = nb.choose("ussd_main_menu", {"customer": {"segment": "youth", "plan": None}})
        assert d.raw is not None and d.raw.event_id == d.event_id
        status = nb.reward(d.event_id, 1.0)
        assert status is RewardStatus.LEARNED and status == "learned"
        x = nb.explain(d.event_id)
        assert isinstance(x, Explanation) and (x.event_id, x.arm_id, x.slot) == (d.event_id, d.arm_id, 0)
        assert isinstance(x.raw, decision_pb2.ExplainResponse) and [a.arm_id for a in x.arms] == [a.arm_id for a in x.raw.arms]
        assert [(f.feature.namespace, f.feature.name) for f in x.features] == [("customer", "segment")]  # plan=None: left out
        s = admin.stats("ussd_main_menu")
        assert isinstance(s, Stats) and s.decisions == 1 and sum(a.rewards for a in s.arms) == 1
        assert s.budgets == s.raw.budgets and s.arms[0].rewards_learned == s.raw.arms[0].rewards_learned  # the rest reads through
        outcomes = nb.reward_batch([(d.event_id, 1.0), ("no-such-event", 1.0)])
        assert [o.status for o in outcomes] == [RewardStatus.DUPLICATE, RewardStatus.FAILED]
        failed = outcomes[1].error
        assert isinstance(failed, NotFoundError) and not failed.retryable and outcomes[1].reward_id and not outcomes[1].ok


# -- retries, through a front that fails first -----------------------------------------------


class Front:
    """A gRPC server before ``target``: the first ``fail`` calls (of any method) fail with
    ``code``, later ones pass through; ``seen`` keeps (method, request bytes) of every call."""

    def __init__(self, target: str) -> None:
        self.fail = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.seen: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(target)
        self._server = grpc.server(ThreadPoolExecutor(4))
        self._server.add_generic_rpc_handlers((self,))
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.seen.append((method.rsplit("/", 1)[1], request))
                failing = self.fail > 0
                self.fail -= failing
            if failing:
                context.abort(self.code, "the front says no")
            answer: bytes = self._upstream.unary_unary(method)(request, timeout=10)
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    def calls(self, method: str) -> list[bytes]:
        return [r for m, r in self.seen if m == method]

    def stop(self) -> None:
        self._server.stop(None)
        self._upstream.close()


@pytest.fixture
def front(server: ServerThread) -> Iterator[Front]:
    with server.client() as c:
        c.apply([envs.placement()])
    f = Front(server.target)
    yield f
    f.stop()


HALF = RetryPolicy(attempts=4, initial=0.1, maximum=1.0, jitter=lambda: 0.5)  # pauses 0.05, 0.1, 0.2


class Sleeps:
    """Injected pauses: recorded, not slept; the fake clock moves by each."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.t += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


def _call(kind: str, front: Front, sleeps: Sleeps, method: str, *args: Any, policy: RetryPolicy = HALF, **kw: Any) -> Any:
    """``method`` of a blocking (``kind`` "sync") or an asyncio client through the front."""
    if kind == "sync":
        with NextbestClient(front.target, token="", retry_policy=policy, sleep=sleeps.sleep, clock=sleeps.clock) as nb:
            return getattr(nb, method)(*args, **kw)

    async def run() -> Any:
        async with AsyncNextbestClient(front.target, token="", retry_policy=policy, sleep=sleeps.asleep, clock=sleeps.clock) as anb:
            return await getattr(anb, method)(*args, **kw)

    return asyncio.run(run())


def _events(front: Front, n: int) -> list[str]:
    with NextbestClient(front.target, token="") as nb:
        ids = [nb.choose("app_home_banner").event_id for _ in range(n)]
    front.seen.clear()
    return ids


KINDS = ["sync", "async"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_reward_is_retried_with_the_same_reward_id(front: Front, kind: str, code: grpc.StatusCode) -> None:
    [event] = _events(front, 1)
    sleeps = Sleeps()
    front.fail, front.code = 2, code
    assert _call(kind, front, sleeps, "reward", event, 1.0) == "learned"
    sent = [decision_pb2.RewardRequest.FromString(r) for r in front.calls("Reward")]
    assert len(sent) == 3 and len({r.reward_id for r in sent}) == 1 and sent[0].reward_id  # one id, the client's
    assert sleeps.pauses == [0.05, 0.1]


@pytest.mark.parametrize("kind", KINDS)
def test_a_choose_is_not_retried_unless_the_caller_opts_in(front: Front, kind: str) -> None:
    sleeps = Sleeps()
    front.fail = 1
    with pytest.raises(UnavailableError):
        _call(kind, front, sleeps, "choose", "app_home_banner")
    assert len(front.calls("Choose")) == 1 and sleeps.pauses == []
    front.fail = 1
    d = _call(kind, front, sleeps, "choose", "app_home_banner", event_id=f"opted-{kind}", retry=True)
    assert d.event_id == f"opted-{kind}" and len(front.calls("Choose")) == 3 and sleeps.pauses == [0.05]


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stop_after_the_attempts_and_within_the_timeout(front: Front, kind: str) -> None:
    [event] = _events(front, 1)
    sleeps = Sleeps()
    front.fail = 100
    with pytest.raises(UnavailableError):
        _call(kind, front, sleeps, "reward", event, 1.0)
    assert len(front.calls("Reward")) == 4 and sleeps.pauses == [0.05, 0.1, 0.2]
    front.seen.clear()
    sleeps.pauses.clear()
    # timeout 0.1: after a pause of 0.05, another of 0.1 would end past it; the call gives up
    with pytest.raises(UnavailableError):
        _call(kind, front, sleeps, "reward", event, 1.0, timeout=0.1)
    assert len(front.calls("Reward")) == 2 and sleeps.pauses == [0.05]


@pytest.mark.parametrize("kind", KINDS)
def test_only_retryable_codes_are_retried(front: Front, kind: str) -> None:
    [event] = _events(front, 1)
    sleeps = Sleeps()
    front.fail, front.code = 1, grpc.StatusCode.INTERNAL
    with pytest.raises(InternalError):
        _call(kind, front, sleeps, "reward", event, 1.0)
    assert len(front.calls("Reward")) == 1 and sleeps.pauses == []
    front.fail, front.code = 1, grpc.StatusCode.UNAVAILABLE
    with pytest.raises(UnavailableError):
        _call(kind, front, sleeps, "reward", event, 1.0, retry=False)  # the caller opts out
    assert len(front.calls("Reward")) == 2 and sleeps.pauses == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_is_retried_whole_with_its_reward_ids(front: Front, kind: str) -> None:
    ids = _events(front, 2)
    sleeps = Sleeps()
    front.fail = 1
    outcomes = _call(kind, front, sleeps, "reward_batch", [(ids[0], 1.0), (ids[1], 0.0, 0, "mine")])
    assert [o.status for o in outcomes] == ["learned", "learned"]
    sent = [decision_pb2.RewardBatchRequest.FromString(r) for r in front.calls("RewardBatch")]
    assert len(sent) == 2 and sent[0] == sent[1] and [r.reward_id for r in sent[0].rewards] == [outcomes[0].reward_id, "mine"]


def test_reads_are_retried_and_both_clients_answer_alike(front: Front) -> None:
    [event] = _events(front, 1)
    got = []
    for kind in KINDS:
        front.fail = 1
        got.append(_call(kind, front, Sleeps(), "explain", event))
    assert got[0] == got[1] and got[0].event_id == event and len(front.calls("Explain")) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_wait_for_ready_waits_for_the_server_until_the_timeout(kind: str) -> None:
    nowhere = Front.__new__(Front)
    nowhere.target = NOWHERE
    with pytest.raises(UnavailableError):
        _call(kind, nowhere, Sleeps(), "stats", "p", timeout=5, retry=False)  # fails at once: nothing listens
    with pytest.raises(DeadlineExceededError):
        _call(kind, nowhere, Sleeps(), "stats", "p", timeout=0.2, wait_for_ready=True)  # waits for a server that never comes


def test_a_per_call_timeout_leaves_the_clients_default(served: ServerThread) -> None:
    with NextbestClient(served.target, timeout=7.0, token=ADMIN_TOKEN) as nb:
        with pytest.raises(DeadlineExceededError):
            nb.stats("app_home_banner", timeout=1e-6)
        assert nb.timeout == 7.0 and nb.stats("app_home_banner").placement == "app_home_banner"


def test_placements_are_specs_that_apply_back(served: ServerThread) -> None:
    """placement() and placements() answer PlacementSpecs (the type apply takes), from both clients."""
    with NextbestClient(served.target, token=ADMIN_TOKEN) as nb:
        one = nb.placement("ussd_main_menu")
        assert isinstance(one, PlacementSpec) and one.id == "ussd_main_menu" and [a.id for a in one.arms] == list(envs.ARMS)
        every = nb.placements()
        assert all(isinstance(p, PlacementSpec) for p in every) and [p.id for p in every] == ["app_home_banner", "ussd_main_menu"]
        assert every[1] == one
        assert nb.apply([one], dry_run=True) == []  # a spec read back applies as a no-op
        with pytest.raises(NotFoundError):
            nb.placement("nope")

    async def from_async() -> tuple[PlacementSpec, list[PlacementSpec]]:
        async with AsyncNextbestClient(served.target, token=ADMIN_TOKEN) as nb:
            return await nb.placement("ussd_main_menu"), await nb.placements()

    assert asyncio.run(from_async()) == (one, every)


def test_the_client_and_its_conversions_load_no_numpy() -> None:
    """The base install (the client) has no numpy: importing the client, reading a placement
    into its spec and the other conversions must not need it."""
    probe = (
        "import sys\nfrom nextbest import NextbestClient\nfrom nextbest import client_shared\n"
        "from nextbest.rpc import convert\nfrom nextbest.v1 import admin_pb2\n"
        "convert.placement_spec(admin_pb2.Placement(id='p', arms=[admin_pb2.Arm(id='a')]))\n"
        "print('numpy' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"

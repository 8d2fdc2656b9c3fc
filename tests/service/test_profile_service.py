"""ProfileService through real gRPC on port 0: put, get, delete and erase customer profiles;
validation as Choose's, all or nothing; the "data" role (issue #30)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import feature
from nextbest.engine.profile_handler import ProfileHandler
from nextbest.rpc.auth import hash_token
from nextbest.storage.base import Erased, Profile, ProfilesPut
from nextbest.v1 import common_pb2, profile_pb2
from tests import envs
from tests.harness import ADMIN_TOKEN, CHANNEL_TOKEN, TOKENS, FakeClock, ServerThread, make_settings, running_server, token_client, until

DATA_TOKEN = "loader-5d1e0a9c2f7b"
WITH_DATA = f"{TOKENS}; warehouse:data:{hash_token(DATA_TOKEN)}"
T0 = 1_800_000_000.0


def _code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return e.value.code()


def _details(e: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return str(e.value.details())


def profile(
    customer_id: str, as_of: float | None = T0, plan: str = "prepaid", arpu: float = 12.5, expires_at: float | None = None
) -> Profile:
    return Profile(customer_id, (feature("customer", "plan", plan), feature("customer", "arpu", arpu)), as_of or 0.0, expires_at)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0 + 3600)


@pytest.fixture
def served(any_db: str, clock: FakeClock) -> Iterator[ServerThread]:
    with running_server(any_db, clock) as s:
        yield s


def test_profiles_round_trip_and_the_last_writer_by_as_of_wins(served: ServerThread, clock: FakeClock) -> None:
    with served.client() as c:
        assert c.put_profiles([profile("c1", T0, "prepaid", 5.0), profile("c2", T0, expires_at=T0 + 7200)]) == ProfilesPut(2, 0)
        assert c.get_profile("c1") == profile("c1", T0, "prepaid", 5.0)
        assert c.get_profile("c2").expires_at == T0 + 7200
        # older: stale, nothing changes; the same as_of: the new one wins
        assert c.put_profiles([profile("c1", T0 - 1, "postpaid")]) == ProfilesPut(0, 1)
        assert c.get_profile("c1").features[0] == ("customer", "plan", "prepaid")
        assert c.put_profiles([profile("c1", T0, "hybrid", 7.0), profile("c1", T0 - 5, "x"), profile("c3", T0)]) == ProfilesPut(2, 1)
        assert c.get_profile("c1").features == (("customer", "plan", "hybrid"), ("customer", "arpu", 7.0))
        # as_of unset: the server's time
        c.put_profiles([profile_pb2.Profile(customer_id="c4", features=[])])
        assert c.get_profile("c4") == Profile("c4", (), clock(), None)
        # expired: NOT_FOUND
        clock.advance(7200)
        with pytest.raises(grpc.RpcError) as e:
            c.get_profile("c2")
        assert _code(e) == grpc.StatusCode.NOT_FOUND and "c2" in _details(e)
        # deleted: gone, counted
        assert c.delete_profile("c1") == Erased(1, 0, 0)
        assert c.delete_profile("c1") == Erased(0, 0, 0)
        with pytest.raises(grpc.RpcError) as e:
            c.get_profile("c1")
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        assert c.get_profile("c3").as_of == T0


def test_a_bad_profile_is_refused_with_its_field_and_nothing_is_written(server: ServerThread) -> None:
    good = [profile(f"g{i}", T0) for i in range(5)]
    nan = Profile("bad", (feature("customer", "plan", "x"), feature("customer", "arpu", float("nan"))), T0)
    cases = {
        "profiles[5].features[1].number": nan,
        "profiles[5].features[0].text": Profile("bad", (feature("customer", "plan", "a\x00b"),), T0),
        "profiles[5].features[0].name": Profile("bad", (feature("customer", "n" * 129, 1.0),), T0),
        "profiles[5].features[1].text": Profile("bad", (feature("c", "a", 1.0), feature("c", "b", "x" * 1025)), T0),
        "profiles[5].features[0].number": Profile("bad", (feature("c", "a", 1e13),), T0),
        "profiles[5].features[2].name": Profile("bad", (feature("c", "a", 1.0), feature("c", "b", 1.0), feature("c", "a", "x")), T0),
        "profiles[5].customer_id": Profile("", (), T0),
        "profiles[5].features": Profile("bad", tuple(feature("c", f"f{i}", 1.0) for i in range(513)), T0),
    }
    with server.client() as c:
        for field, bad in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                c.put_profiles([*good, bad])
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, field
            assert _details(e).startswith(f"{field}:"), _details(e)
            assert len(_details(e)) < 1000
        long_id = profile_pb2.Profile(customer_id="x" * 100_000)
        with pytest.raises(grpc.RpcError) as e:
            c.put_profiles([long_id])
        assert _details(e).startswith("profiles[0].customer_id: longer than 256") and len(_details(e)) < 200
        no_value = profile_pb2.Profile(customer_id="c", features=[common_pb2.Feature(namespace="c", name="v")])
        with pytest.raises(grpc.RpcError) as e:
            c.put_profiles([no_value])
        assert _details(e).startswith("profiles[0].features[0].value:")
        bad_time = profile_pb2.Profile(customer_id="c")
        bad_time.as_of.seconds = 10**12
        with pytest.raises(grpc.RpcError) as e:
            c.put_profiles([bad_time])
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and _details(e).startswith("profiles[0].as_of:")
        for cid in ("g0", "bad", ""):
            with pytest.raises(grpc.RpcError) as e:
                c.get_profile(cid)
            assert _code(e) == (grpc.StatusCode.NOT_FOUND if cid else grpc.StatusCode.INVALID_ARGUMENT)
        assert c.put_profiles(good) == ProfilesPut(5, 0)  # the server is fine


def test_a_batch_above_max_profile_batch_is_refused(db_url: str) -> None:
    with running_server(db_url, max_profile_batch=10) as s, s.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.put_profiles([profile(f"c{i}") for i in range(11)])
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(e).startswith("profiles: 11 profiles, more than max_profile_batch (10)")
        assert c.put_profiles([profile(f"c{i}") for i in range(10)]) == ProfilesPut(10, 0)


def test_only_data_and_admin_tokens_may_call_the_profile_service(db_url: str) -> None:
    s = ServerThread(make_settings(db_url, auth_tokens=WITH_DATA))
    try:
        with (
            token_client(s.target, ADMIN_TOKEN) as admin,
            token_client(s.target, DATA_TOKEN) as data,
            token_client(s.target, CHANNEL_TOKEN) as chan,
            token_client(s.target, None) as anonymous,
        ):
            admin.apply([envs.placement("app_home_banner")])
            assert data.put_profiles([profile("c1")]) == ProfilesPut(1, 0)
            assert data.get_profile("c1").customer_id == "c1"
            assert admin.put_profiles([profile("c2")]) == ProfilesPut(1, 0)
            assert admin.get_profile("c1").customer_id == "c1"
            for who, code in ((chan, grpc.StatusCode.PERMISSION_DENIED), (anonymous, grpc.StatusCode.UNAUTHENTICATED)):
                for name, arg in (("put_profiles", [profile("c3")]), ("get_profile", "c1"), ("delete_profile", "c1")):
                    with pytest.raises(grpc.RpcError) as e:
                        getattr(who, name)(arg)
                    assert _code(e) == code, (name, code)
            # the data role may do nothing else
            for call in (lambda: data.choose("app_home_banner"), lambda: data.placements(), lambda: data.explain("e1")):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
            assert data.delete_profile("c2") == Erased(1, 0, 0)
            assert admin.delete_profile("c1", erase_decisions=True) == Erased(1, 0, 0)
            assert chan.choose("app_home_banner", customer_id="c1").arm_id
    finally:
        s.stop()


def test_erase_decisions_blanks_the_customers_decision_log(served: ServerThread) -> None:
    with served.client() as c:
        c.apply([envs.placement("app_home_banner")])
        c.put_profiles([profile("c1"), profile("c2")])
        mine = [c.choose("app_home_banner", {"customer": {"segment": "youth", "msisdn_hash": "ab12"}}, customer_id="c1") for _ in range(3)]
        theirs = c.choose("app_home_banner", {"customer": {"segment": "family"}}, customer_id="c2")
        assert c.reward(mine[0].event_id, 1.0) == "learned"
        store = served.engine.store
        until(lambda: all(store.find_decision(d.event_id) is not None for d in [*mine, theirs]))
        assert c.delete_profile("c1", erase_decisions=True) == Erased(1, 3, 0)
        for d in mine:
            row = store.find_decision(d.event_id)
            assert row.customer_id == "" and row.features == () and row.context is None
            assert row.arm_id == d.arm_id and row.probability == pytest.approx(d.probability)
        assert store.find_decision(mine[0].event_id).reward == 1.0
        other = store.find_decision(theirs.event_id)
        assert other.customer_id == "c2" and ("customer", "segment", "family") in other.features
        assert c.get_profile("c2").customer_id == "c2"
        with pytest.raises(grpc.RpcError) as e:
            c.get_profile("c1")
        assert _code(e) == grpc.StatusCode.NOT_FOUND
        assert c.stats("app_home_banner").decisions == 4  # the log still adds up
        with pytest.raises(grpc.RpcError) as e:
            c.delete_profile("", erase_decisions=True)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT


def test_writes_tell_the_on_written_callback(db_url: str) -> None:
    told: list[list[str]] = []
    with running_server(db_url) as s:
        handler = ProfileHandler(s.engine.store, s.settings, s.engine.clock, on_written=lambda ids: told.append(sorted(ids)))
        s.call(handler.put([profile("a"), profile("b")]))
        s.call(handler.delete("a", erase_decisions=True))
        with pytest.raises(InvalidInput):
            s.call(handler.put([profile("")]))  # refused before anything: nothing told
    assert told == [["a", "b"], ["a"]]

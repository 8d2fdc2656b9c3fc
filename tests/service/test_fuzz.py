"""Hypothesis fuzzing through real gRPC: arbitrary and hostile requests, raw bytes and config
files. The server never crashes, never answers INTERNAL or UNKNOWN to bad input, and its
invariants hold: budgets are never exceeded and every logged decision carries the exact
probability it was drawn with."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.spec import PlacementSpec
from nextbest.config.files import parse_apply_text
from nextbest.rpc.auth import parse_file
from nextbest.storage import tables as t
from nextbest.v1 import admin_pb2, common_pb2, decision_pb2
from tests.harness import ServerThread, make_settings, postgres_available, postgres_schema

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ARMS = ("paid", "capped", "free")
PLACEMENT = PlacementSpec.model_validate(
    {
        "id": "fz",
        "exploration": {"algorithm": "epsilon", "epsilon": 0.3},
        "contact_policies": [{"max_impressions": 3, "per": "customer_arm", "window": "1d"}],
        "arms": [
            {"id": "paid", "cost_per_impression": 1.0, "cost_per_reward": 0.5, "budget": {"total": 40}},
            {"id": "capped", "cost_per_impression": 0.7, "budget": {"total": 10, "daily": 5}},
            {"id": "free"},
        ],
    }
)
BAD_INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}

# Surrogates cannot travel over gRPC (protobuf refuses to encode them); NUL bytes can, and
# PostgreSQL refuses to store them: they are drawn often, alone and inside other text.
nul_text = st.text(alphabet=st.sampled_from(["\x00", "a", "é", "東"]), min_size=1, max_size=12)
text = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80), nul_text)
long_text = st.one_of(text, st.integers(60, 3000).map(lambda n: "x" * n), st.integers(1, 300).map(lambda n: "\x00" * n))
number = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1e308, -1e308, 5e-324, 1e13, -1e13, 1e300, 1e6, 1e12 + 1]
)
feature = st.one_of(
    st.builds(common_pb2.Feature, namespace=long_text, name=long_text, number=number),
    st.builds(common_pb2.Feature, namespace=long_text, name=long_text, text=long_text),
    st.builds(common_pb2.Feature, namespace=text, name=text),
)
segments = st.sampled_from(["youth", "family", "senior"]).map(lambda s: common_pb2.Feature(name="segment", text=s))
choose_request = st.builds(
    decision_pb2.ChooseRequest,
    placement=st.one_of(st.just("fz"), st.just("fz"), st.just(""), long_text),
    customer_id=st.one_of(st.just(""), st.sampled_from(["c1", "c2", "c3"]), long_text),
    event_id=st.one_of(st.just(""), st.just(""), long_text),
    features=st.lists(st.one_of(segments, feature), max_size=20),
    baseline_arm=st.one_of(st.just(""), st.just(""), st.sampled_from(["paid", "ghost"])),
    defer_activation=st.booleans(),
)


def _code(e: grpc.RpcError) -> grpc.StatusCode:
    return e.code()  # type: ignore[attr-defined, no-any-return]


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/nb.db"
    s = ServerThread(make_settings(db, max_features=16, max_id_length=64, max_name_length=32, max_text_length=64))
    with s.client() as c:
        c.apply([PLACEMENT])
    yield s
    s.stop()


SEEN: list[str] = []


@FUZZ
@given(req=choose_request)
def test_any_choose_is_served_or_refused_as_bad_input(fz: ServerThread, req: decision_pb2.ChooseRequest) -> None:
    with fz.client() as c:
        try:
            r = c.decision.Choose(req, timeout=10)
        except grpc.RpcError as e:
            assert _code(e) in BAD_INPUT_CODES, (_code(e), e.details())  # type: ignore[attr-defined]
            if _code(e) == grpc.StatusCode.INVALID_ARGUMENT:
                assert e.details().split(":")[0].strip()  # type: ignore[attr-defined]  # names a field
            return
    assert req.placement == "fz"
    assert r.arm_id in ARMS or (r.arm_id == "" and r.reason)
    if r.arm_id:
        assert 0 < r.probability <= 1
        SEEN.append(r.event_id)


@FUZZ
@given(
    event_id=st.one_of(st.sampled_from(SEEN or ["x"]), long_text, st.just("")),
    reward=number,
    slot=st.integers(-3, 12),
    reward_id=st.one_of(st.just(""), long_text),
)
def test_any_reward_is_answered_or_refused_as_bad_input(fz: ServerThread, event_id: str, reward: float, slot: int, reward_id: str) -> None:
    if SEEN and event_id == "x":
        event_id = SEEN[hash(reward) % len(SEEN)]
    with fz.client() as c:
        try:
            c.decision.Reward(decision_pb2.RewardRequest(event_id=event_id, reward=reward, slot=slot, reward_id=reward_id), timeout=10)
        except grpc.RpcError as e:
            assert _code(e) in BAD_INPUT_CODES, (_code(e), e.details())  # type: ignore[attr-defined]
            assert len(e.details()) <= 1000  # type: ignore[attr-defined]  # a bounded message
            if (not math.isfinite(reward) or abs(reward) > 1e12) and event_id:
                assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT  # before the event is looked up
        else:
            assert abs(reward) <= 1e6  # the placement's max_abs_reward


METHODS = [
    "/nextbest.v1.DecisionService/Choose",
    "/nextbest.v1.DecisionService/Reward",
    "/nextbest.v1.DecisionService/Activate",
    "/nextbest.v1.AdminService/GetStats",
    "/nextbest.v1.AdminService/GetPlacement",
    "/nextbest.v1.AdminService/CreateArm",
]


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=300))
def test_raw_bytes_never_get_internal_or_unknown(fz: ServerThread, method: str, payload: bytes) -> None:
    with grpc.insecure_channel(fz.target) as ch:
        try:
            ch.unary_unary(method)(payload, timeout=10)
        except grpc.RpcError as e:
            assert _code(e) not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (_code(e), e.details())  # type: ignore[attr-defined]


vw_args = st.sampled_from(
    ["", "--cb_type mtr", "--bogus", "-f /tmp/x", "-d /etc/passwd", "--bits 40", "-q ::", "--l2 nan", "'", "--cb_type dr --power_t 0"]
)
arm_pb = st.builds(
    admin_pb2.Arm,
    id=st.one_of(st.sampled_from(["a", "b", "c"]), long_text),
    features=st.lists(feature, max_size=4),
    cost_per_impression=number,
    cost_per_reward=number,
    business_value=number,
)
placement_pb = st.builds(
    admin_pb2.Placement,
    id=st.sampled_from(["fz2", "fz3", "", "bad id", "x" * 200, "ü"]),  # at most two real placements: models cost memory
    arms=st.lists(arm_pb, max_size=4),
    exploration=st.builds(admin_pb2.Exploration, epsilon=number),
    reward_window_seconds=number,
    default_reward=number,
    vw_args=vw_args,
    bits=st.one_of(st.integers(-5, 12), st.sampled_from([29, 64, 2**31 - 1])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(placements=st.lists(placement_pb, min_size=1, max_size=2), dry_run=st.booleans())
def test_hostile_configurations_are_applied_whole_or_refused_whole(
    fz: ServerThread, placements: list[admin_pb2.Placement], dry_run: bool
) -> None:
    with fz.client() as c:
        before = c.placements()
        try:
            c.admin.ApplyConfig(admin_pb2.ApplyConfigRequest(placements=placements, dry_run=dry_run), timeout=30)
        except grpc.RpcError as e:
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, (_code(e), e.details())  # type: ignore[attr-defined]
            assert c.placements() == before  # nothing changed
            return
        for p in placements:
            if not dry_run and p.arms:
                r = c.choose(p.id)
                assert r.arm_id == "" or 0 < r.probability <= 1


yaml_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), number, text),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
VALID = Path(__file__).resolve().parents[2] / "scripts" / "demo.yaml"


def _mutate(doc: object, path: list[int], value: object) -> object:
    """Replace the node reached by following path (indices into mappings/lists) with value."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    k = keys[path[0] % len(keys)]
    doc[k] = _mutate(doc[k], path[1:], value)  # type: ignore[index]
    return doc


@settings(max_examples=200, deadline=None)
@given(path=st.lists(st.integers(0, 50), max_size=6), value=yaml_value, raw=st.one_of(st.none(), text))
def test_config_files_load_or_name_the_problem(path: list[int], value: object, raw: str | None) -> None:
    doc = yaml.safe_load(VALID.read_text())
    text_ = raw if raw is not None else yaml.safe_dump(_mutate(doc, path, value), allow_unicode=True)
    try:
        cfg = parse_apply_text(text_, "f.yaml")
    except InvalidInput as e:
        assert str(e).startswith("f.yaml")
        return
    assert cfg.placements or cfg.campaigns
    for p in cfg.placements:
        for a in p.arms:
            assert all(not isinstance(v, float) or math.isfinite(v) for v in a.features.values())


@pytest.mark.parametrize(
    "text_",
    [
        "[" * 5000,
        "placements: " + "[" * 5000,
        "placements: &a [*a]",
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)),  # a billion laughs
        "x: !!python/object/apply:os.system [ls]",
        "\x1f",
        "placements: *undefined",
    ],
)
def test_hostile_yaml_is_refused_with_a_message(text_: str) -> None:
    for parse in (lambda: parse_apply_text(text_, "f.yaml"), lambda: parse_file(text_, "f.yaml")):
        with pytest.raises(InvalidInput) as e:
            parse()
        assert str(e.value).startswith("f.yaml")


@settings(max_examples=200, deadline=None)
@given(value=yaml_value)
def test_token_files_load_or_name_the_problem(value: object) -> None:
    try:
        table = parse_file(yaml.safe_dump({"tokens": value} if isinstance(value, list) else value), "tokens.yaml")
    except InvalidInput as e:
        assert str(e).startswith("tokens.yaml")
        return
    for digest, principal in table.items():
        assert len(digest) == 64 and principal.roles <= {"channel", "admin"}


def test_invariants_hold_after_the_fuzzing(fz: ServerThread) -> None:
    """Runs last in this module: budgets within limits, every logged probability exact, and
    ordinary traffic still learned (the writer was not wedged by anything above)."""
    with fz.client() as c:
        d = c.choose("fz", {"segment": "youth"})
        assert d.arm_id in ARMS  # still serving
        assert c.reward(d.event_id, 1.0) == "learned"
        stats = c.stats("fz")
    assert fz.engine.writer.depth == 0
    assert stats.decisions > 0
    for b in stats.budgets:
        assert b.spent + b.reserved <= b.limit + 1e-9, b
    store = fz.engine.store
    d = t.decisions.c
    with store.engine.connect() as conn:
        rows = conn.execute(select(d.pmf, d.chosen, d.probability, d.arm_id).where(d.placement_id == "fz")).all()
    assert len(rows) == stats.decisions
    for pmf, chosen, probability, arm in rows:
        if arm is None:
            continue
        assert math.isclose(sum(pmf), 1.0, rel_tol=1e-9) and all(p >= 0 for p in pmf)
        assert pmf[chosen] == probability and 0 < probability <= 1


@pytest.mark.parametrize(
    "features, field",
    [
        ([common_pb2.Feature(name="n" * 33, number=1.0)], "features[0].name"),
        ([common_pb2.Feature(namespace="s" * 33, name="n", number=1.0)], "features[0].namespace"),
        ([common_pb2.Feature(name="a", number=1.0), common_pb2.Feature(name="n", text="t" * 65)], "features[1].text"),
        ([common_pb2.Feature(name=f"f{i}", number=1.0) for i in range(17)], "features"),
        ([common_pb2.Feature(name="x", number=float("-inf"))], "features[0].number"),
    ],
)
def test_configured_limits_name_the_field_and_change_nothing(fz: ServerThread, features: list[common_pb2.Feature], field: str) -> None:
    with fz.client() as c:
        before = c.stats("fz").decisions
        with pytest.raises(grpc.RpcError) as e:
            c.decision.Choose(decision_pb2.ChooseRequest(placement="fz", features=features), timeout=5)
        assert _code(e.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":")  # type: ignore[attr-defined]
        assert c.stats("fz").decisions == before


def test_a_request_that_does_not_parse_is_invalid_argument(fz: ServerThread) -> None:
    with grpc.insecure_channel(fz.target) as ch:
        for method in METHODS:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(method)(b"\xff\xff\xff", timeout=5)
            assert _code(e.value) == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("request:")  # type: ignore[attr-defined]


def test_numbers_vw_cannot_take_are_refused_and_cannot_poison_the_model(fz: ServerThread) -> None:
    """VW computes in float32: a feature of 1e40 is infinite to it and 1e20 ruins a model it
    learns from. Such numbers are INVALID_ARGUMENT; the largest accepted one is harmless."""
    with fz.client() as c:
        for big in (1e40, -1e20, 1e13):
            with pytest.raises(grpc.RpcError) as e:
                c.decision.Choose(
                    decision_pb2.ChooseRequest(placement="fz", features=[common_pb2.Feature(name="x", number=big)]), timeout=5
                )
            assert _code(e.value) == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("features[0].number:")  # type: ignore[attr-defined]
        for _ in range(3):
            d = c.decision.Choose(
                decision_pb2.ChooseRequest(placement="fz", features=[common_pb2.Feature(name="x", number=1e12)]), timeout=5
            )
            if d.arm_id:
                assert c.reward(d.event_id, 1.0) in ("learned", "duplicate")
        time_limit = 50
        for _ in range(time_limit):  # whatever was learned, ordinary requests are still served
            r = c.choose("fz", {"segment": "youth"})
            assert r.arm_id == "" or 0 < r.probability <= 1
    with pytest.raises(Exception, match="1e12"):
        PlacementSpec.model_validate({"id": "p", "arms": [{"id": "a", "features": {"price": 1e20}}]})


@pytest.mark.postgres
def test_hostile_text_and_magnitudes_on_postgresql_leave_ordinary_traffic_learned() -> None:
    """PostgreSQL refuses NUL bytes: one such Choose used to wedge its writer for good."""
    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test)")
    with postgres_schema() as url:
        s = ServerThread(make_settings(url, max_id_length=64, max_text_length=64))
        try:
            with s.client() as c:
                c.apply([PLACEMENT])
            seen: list[str] = []

            @settings(max_examples=80, deadline=None)
            @given(req=choose_request, reward=number, reward_id=st.one_of(st.just(""), long_text))
            def hostile(req: decision_pb2.ChooseRequest, reward: float, reward_id: str) -> None:
                with s.client() as c:
                    try:
                        r = c.decision.Choose(req, timeout=10)
                    except grpc.RpcError as e:
                        assert _code(e) in BAD_INPUT_CODES, (_code(e), e.details())  # type: ignore[attr-defined]
                        return
                    if r.arm_id:
                        seen.append(r.event_id)
                        try:
                            c.decision.Reward(
                                decision_pb2.RewardRequest(event_id=r.event_id, reward=reward, reward_id=reward_id), timeout=10
                            )
                        except grpc.RpcError as e:
                            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT, (_code(e), e.details())  # type: ignore[attr-defined]

            hostile()
            with pytest.raises(InvalidInput):  # a lone surrogate, in process: refused the same
                s.call(s.engine.chooser.choose("fz", "c\ud800", "", []))
            with s.client() as c:
                for _ in range(5):
                    d = c.choose("fz", {"segment": "youth"}, customer_id="ok")
                    assert d.arm_id in ARMS
                    assert c.reward(d.event_id, 1.0) == "learned"
            assert s.engine.writer.depth == 0 and seen
        finally:
            s.stop()

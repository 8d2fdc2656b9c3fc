"""Explain through real gRPC: every arm of a decision with its reason or the parts of its value,
as recorded at decision time, from which the logged probabilities follow exactly."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import grpc
import numpy as np
import pytest

from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.main import main as cli
from nextbest.v1 import decision_pb2
from tests.harness import ADMIN_TOKEN, CHANNEL_TOKEN, LIMITED_TOKEN, TOKENS, FakeClock, ServerThread, make_settings, token_client

ARMS = ["data_1gb", "voice_100", "postpaid_upgrade", "bundle_5g", "loyalty"]


def placement(algorithm: str, pid: str = "p", **kw: Any) -> PlacementSpec:
    """Business values, a paced daily budget, fatigue, rules: every part of a value is at work."""
    return PlacementSpec.model_validate(
        {
            "id": pid,
            "exploration": {"algorithm": algorithm, "epsilon": 0.2, "lambda": 4.0, "gamma_scale": 5.0},
            "reward_window": 600,
            "learn_at": "reward",  # the rewards move the model (and its reward scale) as the run goes
            "fatigue": {"strength": 0.15, "half_life": "1d"},
            "arms": [
                {"id": "data_1gb", "business_value": 0.3, "cost_per_impression": 1.0, "budget": {"daily": 12}},
                {"id": "voice_100"},
                {"id": "postpaid_upgrade", "eligible": {"feature": "customer.plan", "eq": "postpaid"}},
                {"id": "bundle_5g", "business_value": 0.1, "eligible": {"feature": "device.tier", "in": ["5g"]}},
                {"id": "loyalty", "business_value": -0.05},
            ],
            **kw,
        }
    )


def recompute(r: decision_pb2.ExplainResponse) -> list[float]:
    """The pmf over the eligible arms (and "no offer" when pacing offered it), from the values
    Explain reports alone, by the published formulas (not the server's code)."""
    eligible = [a for a in r.arms if a.eligible]
    for a in eligible:  # value is the sum of its parts, in the decider's order
        assert a.value == ((a.expected_reward + a.business_value) - a.fatigue_penalty) - a.pacing_cost
    v = np.array([a.value for a in eligible])
    if r.no_offer_probability > 0:
        v = np.append(v, 0.0)
    k = len(v)
    if r.policy == "epsilon":
        best = v == v.max()
        p = np.full(k, r.exploration_parameter / k) + best * (1 - r.exploration_parameter) / best.sum()
    elif r.policy == "softmax":
        z = np.exp(r.exploration_parameter * (v / r.reward_scale - (v / r.reward_scale).max()))
        p = z / z.sum()
    else:
        assert r.policy == "squarecb"
        s = v / r.reward_scale
        b = int(np.argmax(s))
        p = 1.0 / (k + r.exploration_parameter * (s[b] - s))
        p[b] = 0.0
        p[b] = 1.0 - p.sum()
    return list(p)


def wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def contexts(n: int, seed: int) -> list[dict[str, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    out: list[dict[str, dict[str, Any]]] = []
    for _ in range(n):
        f: dict[str, dict[str, Any]] = {"customer": {"segment": str(rng.choice(["youth", "family"]))}}
        if rng.random() < 0.8:
            f["customer"]["plan"] = str(rng.choice(["prepaid", "postpaid"]))
        if rng.random() < 0.8:
            f["device"] = {"tier": str(rng.choice(["4g", "5g"]))}
        out.append(f)
    return out


@pytest.mark.parametrize("algorithm", ["epsilon", "softmax", "squarecb"])
def test_explain_gives_back_the_logged_probabilities(tmp_path: Any, algorithm: str) -> None:
    clock = FakeClock()
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"), clock)
    try:
        with s.client() as c:
            c.apply([placement(algorithm)])
            served: list[tuple[str, str, float]] = []
            rewarded = 0
            for i, feats in enumerate(contexts(120, seed=7)):
                clock.advance(30)
                r = c.choose("p", feats, customer_id=f"c{i % 6}", exclude_arms=["loyalty"] if i % 5 == 0 else [])
                served.append((r.event_id, r.arm_id, r.probability))
                if r.arm_id and i % 3 == 0:
                    # Rewards above 1 (every ninth, whatever the arm): a reward scale > 1.
                    c.reward(r.event_id, 3.0 if r.arm_id == "voice_100" or i % 9 == 0 else 0.5)
                    rewarded += 1
                    # Learned before the next Choose, so that the run does not depend on the learner's timing.
                    wait(lambda n=rewarded: s.engine.states["p"].model.learned >= n)  # type: ignore[misc]
            s.call(s.engine.writer.flush())
            first = c.explain(served[0][0])
            kinds: dict[str, int] = {"paced": 0, "fatigued": 0, "excluded": 0, "ruled": 0, "scaled": 0}
            for event_id, arm, probability in served:
                r = c.explain(event_id)
                logged = s.engine.store.find_decision(event_id)
                assert r.placement == "p" and r.arm_id == arm and r.probability == probability
                assert r.policy == algorithm and r.scored and r.model_version == logged.model_version
                assert sorted(a.arm_id for a in r.arms) == sorted(ARMS)  # every arm of the placement
                eligible = [a for a in r.arms if a.eligible]
                assert [a.arm_id for a in eligible] == [a for a, _ in logged.arms]
                assert [a.probability for a in eligible] + ([r.no_offer_probability] if r.no_offer_probability else []) == list(logged.pmf)
                got = recompute(r)
                assert np.allclose(got, logged.pmf, rtol=0, atol=1e-12), (got, logged.pmf)
                for a in r.arms:
                    if not a.eligible:
                        assert a.probability == 0 and a.reason == dict(logged.ineligible)[a.arm_id]
                        kinds["excluded"] += a.reason == "excluded by caller"
                        kinds["ruled"] += a.reason.startswith("rule: ")
                    else:
                        assert math.isfinite(a.expected_reward)
                        want_bv = {"data_1gb": 0.3, "bundle_5g": 0.1, "loyalty": -0.05}.get(a.arm_id, 0.0)
                        assert a.business_value == want_bv
                        kinds["fatigued"] += a.fatigue_penalty > 0
                        kinds["paced"] += a.pacing_cost > 0
                kinds["scaled"] += r.reward_scale > 1
            # Each part was at work somewhere in this run.
            assert all(n > 0 for n in kinds.values()), kinds
            # What was true then, not what today's model says: after more learning, the same answer.
            for _ in range(40):
                clock.advance(30)
                r2 = c.choose("p", {"customer": {"segment": "youth"}}, customer_id="z")
                if r2.arm_id:
                    c.reward(r2.event_id, 1.0)
            s.call(s.engine.writer.flush())
            assert c.explain(served[0][0]) == first
    finally:
        s.stop()


def test_explain_names_slots_holdouts_and_baselines(tmp_path: Any) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    try:
        with s.client() as c:
            c.apply(
                [
                    placement("squarecb", "multi", slots=2),
                    placement("epsilon", "held", experiment={"holdout": {"share": 1.0, "policy": "uniform"}}),
                    placement("epsilon", "apprentice", mode="apprentice"),
                ]
            )
            r = c.choose("multi", {"device": {"tier": "4g"}, "customer": {"plan": "prepaid"}})
            one = c.explain(r.event_id, slot=1)
            assert one.slot == 1 and one.arm_id == r.slots[1][0]
            assert {a.arm_id: a.reason for a in one.arms if not a.eligible}[r.slots[0][0]] == "shown in slot 0 of the same response"
            assert sorted(a.arm_id for a in one.arms) == sorted(ARMS)
            assert recompute(one) == pytest.approx([a.probability for a in one.arms if a.eligible], abs=1e-12)

            h = c.explain(c.choose("held", {"customer": {"plan": "postpaid"}}).event_id)
            assert h.variant == "holdout" and h.policy == "holdout: uniform" and not h.scored
            eligible = [a for a in h.arms if a.eligible]
            assert [a.probability for a in eligible] == pytest.approx([1 / len(eligible)] * len(eligible))
            assert {a.arm_id: a.reason for a in h.arms if not a.eligible} == {"bundle_5g": "rule: device.tier missing"}

            b = c.explain(c.choose("apprentice", {}, baseline_arm="voice_100").event_id)
            assert b.policy == "baseline" and b.arm_id == "voice_100" and b.probability == 1.0
            nothing = c.explain(c.choose("apprentice", {}, baseline_arm="bundle_5g").event_id)
            assert nothing.arm_id == "" and nothing.reason.startswith("baseline arm 'bundle_5g' is not eligible: rule: device.tier missing")
    finally:
        s.stop()


def test_explain_refuses_bad_and_unknown_ids(tmp_path: Any) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db", max_id_length=64))
    try:
        with s.client() as c:
            c.apply([placement("epsilon")])
            for event_id, slot, code, text in [
                ("", 0, grpc.StatusCode.INVALID_ARGUMENT, "event_id: must not be empty"),
                ("x" * 65, 0, grpc.StatusCode.INVALID_ARGUMENT, "event_id: longer than 64"),
                ("a\x00b", 0, grpc.StatusCode.INVALID_ARGUMENT, "event_id: contains a NUL"),
                ("e1", 10, grpc.StatusCode.INVALID_ARGUMENT, "slot: must be between 0 and 9"),
                ("never-decided", 0, grpc.StatusCode.NOT_FOUND, "no decision with event_id 'never-decided'"),
            ]:
                with pytest.raises(grpc.RpcError) as e:
                    c.explain(event_id, slot)
                assert e.value.code() == code and text in (e.value.details() or ""), e.value.details()
    finally:
        s.stop()


def test_explain_is_for_admins_and_the_placements_own_channels(tmp_path: Any) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db", auth_tokens=TOKENS))
    try:
        with token_client(s.target, ADMIN_TOKEN) as admin:
            admin.apply([placement("epsilon", "app_banner"), placement("epsilon", "ussd_main_menu")])
        with token_client(s.target, CHANNEL_TOKEN) as chan, token_client(s.target, LIMITED_TOKEN) as ussd:
            app_event = chan.choose("app_banner", {}).event_id
            ussd_event = ussd.choose("ussd_main_menu", {}).event_id
            assert chan.explain(app_event).placement == "app_banner"  # a channel token, every placement
            assert ussd.explain(ussd_event).placement == "ussd_main_menu"  # limited: its own placement
            with pytest.raises(grpc.RpcError) as e:
                ussd.explain(app_event)
            # Another placement's event is answered as an unknown one: a limited token learns nothing of it.
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "app_banner" not in (e.value.details() or "")
            with token_client(s.target, ADMIN_TOKEN) as admin:  # admin only, no channel role
                assert admin.explain(app_event).event_id == app_event
                with pytest.raises(grpc.RpcError) as e:
                    admin.choose("app_banner", {})
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with token_client(s.target, None) as anonymous, pytest.raises(grpc.RpcError) as e:
                anonymous.explain(app_event)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()


def test_cli_explain_prints_a_table_and_json(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    try:
        with s.client() as c:
            c.apply([placement("squarecb")])
            r = c.choose("p", {"customer": {"plan": "prepaid"}, "device": {"tier": "4g"}}, exclude_arms=["loyalty"])
        assert cli(["explain", r.event_id, "--target", s.target]) == 0
        table = capsys.readouterr().out
        assert f"served: {r.arm_id} with probability {r.probability:.4g}" in table
        assert "policy: squarecb (gamma 5, reward scale 1)" in table
        assert "loyalty" in table and "not eligible: excluded by caller" in table
        assert "postpaid_upgrade" in table and "not eligible: rule: customer.plan" in table
        assert any(line.startswith("* " + r.arm_id) for line in table.splitlines())
        assert cli(["explain", r.event_id, "--json", "--target", s.target]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["armId"] == r.arm_id and doc["policy"] == "squarecb" and len(doc["arms"]) == len(ARMS)  # proto3 JSON
        assert sum(a["probability"] for a in doc["arms"]) == pytest.approx(1.0)
        assert cli(["explain", "nope", "--target", s.target]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        s.stop()

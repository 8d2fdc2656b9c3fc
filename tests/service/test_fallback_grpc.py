"""The fallback arm through real gRPC: never served when the caller excluded it or an eligibility
rule rules it out, still served past a contact policy, and Explain says what it was."""

from __future__ import annotations

from typing import Any

import pytest

from nextbest.bandit.spec import PlacementSpec
from tests.harness import ServerThread, make_settings


@pytest.fixture()
def server(tmp_path: Any) -> Any:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db"))
    yield s
    s.stop()


def test_an_ineligible_fallback_is_never_served_and_explain_says_why(server: ServerThread) -> None:
    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "fallback_arm": "tips",
            "contact_policies": [{"max_impressions": 1, "per": "customer_arm", "window": "1d"}],
            "arms": [
                {"id": "upgrade", "eligible": {"feature": "customer.plan", "eq": "postpaid"}},
                {"id": "tips", "eligible": {"feature": "customer.age", "gte": 18}},
            ],
        }
    )
    adult = {"customer": {"plan": "prepaid", "age": 30.0}}
    with server.client() as c:
        c.apply([spec])
        assert c.choose("p", adult, customer_id="c1", event_id="first").arm_id == "tips"  # eligible: chosen normally
        # tips is now capped for c1: served as the fallback, past the contact policy
        fb = c.choose("p", adult, customer_id="c1", event_id="fb")
        assert (fb.arm_id, fb.probability, fb.reason) == ("tips", 1.0, "fallback: no eligible arm")
        # excluded by the caller, or its rule false or unknown: nothing is served
        cases: list[tuple[str, dict[str, Any], list[str], str]] = [
            ("excluded", adult, ["tips"], "excluded by caller"),
            ("minor", {"customer": {"plan": "prepaid", "age": 15.0}}, [], "rule: customer.age < 18"),
            ("no_age", {"customer": {"plan": "prepaid"}}, [], "rule: customer.age missing"),
        ]
        for event_id, ctx, excluded, why in cases:
            d = c.choose("p", ctx, customer_id="c2", event_id=event_id, exclude_arms=excluded)
            assert (d.arm_id, d.probability) == ("", 0.0), event_id
            assert d.reason == f"no eligible arm; fallback arm tips not eligible: {why}"
            x = c.explain(event_id)
            assert x.arm_id == "" and x.reason == d.reason
            arms = {a.arm_id: a for a in x.arms}
            assert not arms["tips"].eligible and arms["tips"].probability == 0.0
            assert arms["tips"].reason == f"fallback arm tips not eligible: {why}"
        x = c.explain("fb")
        assert x.policy == "fallback" and [a.arm_id for a in x.arms] == ["tips", "upgrade"]
        tips = x.arms[0]
        assert tips.eligible and tips.probability == 1.0
        assert tips.reason.startswith("fallback arm: served because no other arm is eligible (it bypassed: contact policy: ")
        # GetStats counts the fallback's own reasons as logged
        reasons = {r.reason: r.decisions for a in c.stats("p").arms if a.arm_id == "tips" for r in a.ineligible_reasons}
        assert reasons["excluded by caller"] == 1 and reasons["rule: customer.age < 18"] == 1

"""Eligibility rules: three-valued logic over the request's features, reasons, limits, and the
decider keeping ineligible arms out before exploration."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextbest.bandit.decider import EXCLUDED, ArmView, Candidate, context_of, decide, eligibility
from nextbest.bandit.eligibility import EligibilityRule, Value
from nextbest.bandit.features import feature, shared_line
from nextbest.bandit.model import CbModel
from nextbest.bandit.spec import PlacementSpec
from nextbest.config.files import ConfigFileError, parse_apply_text

FEATURES = ("customer.plan", "customer.arpu", "device.tier", "flag")
TEXTS = ("prepaid", "postpaid", "4g", "5g", "true", "false")


def rule(doc: dict[str, Any]) -> EligibilityRule:
    return EligibilityRule.model_validate(doc)


# -- a reference: the truth tables, written out plainly -------------------------------------


def reference(doc: dict[str, Any], ctx: dict[str, Value]) -> bool | None:
    if "exists" in doc:
        return doc["exists"] in ctx
    if "all" in doc:
        parts = [reference(p, ctx) for p in doc["all"]]
        return False if False in parts else (None if None in parts else True)
    if "any" in doc:
        parts = [reference(p, ctx) for p in doc["any"]]
        return True if True in parts else (None if None in parts else False)
    if "not" in doc:
        inner = reference(doc["not"], ctx)
        return None if inner is None else not inner
    name = doc["feature"]
    if name not in ctx:
        return None
    have = ctx[name]
    op, want = next((k, v) for k, v in doc.items() if k != "feature")

    def norm(v: Any) -> Value:
        return ("true" if v else "false") if isinstance(v, bool) else (float(v) if isinstance(v, int | float) else v)

    if op in ("in", "not_in"):
        inside = any(type(have) is type(norm(w)) and have == norm(w) for w in want)
        return inside if op == "in" else not inside
    if op in ("eq", "ne"):
        same = type(have) is type(norm(want)) and have == norm(want)
        return same if op == "eq" else not same
    if not isinstance(have, float):
        return False
    return {"lt": have < want, "lte": have <= want, "gt": have > want, "gte": have >= want}[op]


def _conditions() -> st.SearchStrategy[dict[str, Any]]:
    text = st.sampled_from(TEXTS)
    number = st.sampled_from([0, 1, 2.5, 5, 10, -3])
    scalar = st.one_of(text, number, st.booleans())
    name = st.sampled_from(FEATURES)
    return st.one_of(
        st.builds(lambda n, op, v: {"feature": n, op: v}, name, st.sampled_from(["eq", "ne"]), scalar),
        st.builds(
            lambda n, op, v: {"feature": n, op: v}, name, st.sampled_from(["in", "not_in"]), st.lists(scalar, min_size=1, max_size=4)
        ),
        st.builds(lambda n, op, v: {"feature": n, op: v}, name, st.sampled_from(["lt", "lte", "gt", "gte"]), number),
        st.builds(lambda n: {"exists": n}, name),
    )


RULES = st.recursive(
    _conditions(),
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
    ),
    max_leaves=12,
)
CONTEXTS = st.dictionaries(
    st.sampled_from(FEATURES), st.one_of(st.sampled_from(TEXTS), st.sampled_from([0.0, 1.0, 2.5, 5.0, 7.0, -3.0])), max_size=4
)


def _fits(doc: dict[str, Any], depth: int = 1) -> bool:
    parts = doc.get("all") or doc.get("any") or ([doc["not"]] if "not" in doc else [])
    return not parts or (depth < 8 and all(_fits(p, depth + 1) for p in parts))


@settings(max_examples=400, deadline=None)
@given(RULES, CONTEXTS)
def test_compiled_rules_follow_the_three_valued_truth_tables(doc: dict[str, Any], ctx: dict[str, Value]) -> None:
    if not _fits(doc):
        return
    verdict, reason = rule(doc)(ctx)
    assert verdict == reference(doc, ctx)
    assert (reason == "") == bool(verdict)  # a reason exactly when the arm is not eligible
    if verdict is None:
        assert "missing" in reason  # unknown names the feature it lacks


def test_missing_features_fail_closed_and_name_the_feature() -> None:
    r = rule({"all": [{"feature": "customer.plan", "in": ["postpaid"]}, {"feature": "device.tier", "in": ["4g", "5g"]}]})
    assert r({"customer.plan": "postpaid", "device.tier": "5g"}) == (True, "")
    assert r({"customer.plan": "prepaid", "device.tier": "5g"}) == (False, "rule: customer.plan not in [postpaid]")
    assert r({"device.tier": "5g"}) == (None, "rule: customer.plan missing")
    assert r({"customer.plan": "prepaid"}) == (False, "rule: customer.plan not in [postpaid]")  # false beats unknown in all
    barred = rule({"not": {"feature": "customer.roaming_barred", "eq": True}})
    assert barred({"customer.roaming_barred": "false"}) == (True, "")
    assert barred({"customer.roaming_barred": "true"}) == (False, "rule: not (customer.roaming_barred = true)")
    assert barred({}) == (None, "rule: customer.roaming_barred missing")  # not of unknown is unknown
    either = rule({"any": [{"feature": "a", "eq": 1}, {"feature": "b", "eq": 1}]})
    assert either({"a": 1.0}) == (True, "")  # true beats unknown in any
    assert either({"a": 0.0})[0] is None
    assert rule({"exists": "a"})({}) == (False, "rule: a missing")  # exists is never unknown
    assert rule({"feature": "customer.arpu", "gte": 5})({"customer.arpu": "high"}) == (False, "rule: customer.arpu is not a number")


@pytest.mark.parametrize(
    "eligible, message",
    [
        ("{feature: customer.arpu, lt: cheap}", "eligible: lt compares numbers"),
        ("{feature: customer.arpu, lt: .nan}", "eligible.lt: numbers must be finite"),
        ("{feature: x, between: [1, 2]}", "eligible: unknown operator 'between'"),
        ("{not: " * 9 + "{exists: x}" + "}" * 9, "eligible: rules may nest all/any/not at most 8 deep"),
        ("{any: [" + ", ".join("{exists: x}" for _ in range(70)) + "]}", "at most 64 conditions"),
        ("{feature: x, in: [" + ", ".join(str(i) for i in range(1001)) + "]}", "in must list 1 to 1000 values"),
        ("{feature: x, eq: 1, ne: 2}", "needs exactly one of"),
        ("{feature: x, eq: [1]}", "eligible"),
        ("{all: []}", "all needs at least one rule"),
        ("{feature: x}", "needs exactly one of"),
    ],
)
def test_hostile_rules_are_refused_at_apply_naming_file_line_and_field(eligible: str, message: str) -> None:
    text = f"placements:\n  - id: p\n    arms:\n      - id: a\n        eligible: {eligible}\n"
    with pytest.raises(ConfigFileError) as e:
        parse_apply_text(text, "offers.yaml")
    assert str(e.value).startswith("offers.yaml:5: placements[0].arms[0].eligible"), str(e.value)
    assert message in str(e.value)
    assert len(str(e.value)) < 1000


def test_a_placement_rule_applies_to_every_arm_and_exclusions_come_first() -> None:
    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "eligible": {"feature": "customer.plan", "ne": "corporate"},
            "arms": [{"id": "a"}, {"id": "b", "eligible": {"feature": "device.tier", "eq": "5g"}}, {"id": "c"}],
        }
    )
    assert spec.unconstrained and spec.has_rules  # rules alone keep the fast path: _by_rules
    cands = [Candidate(ArmView.of(a, 1)) for a in spec.arms]
    ctx = context_of([feature("customer", "plan", "prepaid"), feature("device", "tier", "4g")])
    ok, why = eligibility(spec, cands, [], 0.0, context=ctx, excluded=frozenset({"c"}))
    assert ok == [0] and why == {"b": "rule: device.tier != 5g", "c": EXCLUDED}
    ok, why = eligibility(spec, cands, [], 0.0, context=context_of([feature("customer", "plan", "corporate")]))
    assert ok == [] and set(why.values()) == {"rule: customer.plan = corporate"}


def test_the_pmf_is_over_the_eligible_arms_only() -> None:
    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "exploration": {"algorithm": "epsilon", "epsilon": 0.3},
            "arms": [{"id": "a"}, {"id": "b", "eligible": {"exists": "customer.vip"}}, {"id": "c"}, {"id": "d"}],
        }
    )
    model = CbModel(spec)
    try:
        cands = [Candidate(ArmView.of(a, 1)) for a in spec.arms]
        feats = [feature("customer", "plan", "prepaid")]
        rng = np.random.default_rng(1)
        seen: set[str] = set()
        for _ in range(300):
            u = float(rng.random())
            choice = decide(model, spec, cands, shared_line(feats), lambda u=u: u, context=context_of(feats), excluded=frozenset({"d"}))
            assert choice.eligible == (0, 2) and len(choice.pmf) == 2 and abs(sum(choice.pmf) - 1.0) < 1e-12
            assert choice.ineligible == {"b": "rule: customer.vip missing", "d": EXCLUDED}
            assert choice.arm_index is not None
            seen.add(cands[choice.eligible[choice.arm_index]].arm.id)
        assert seen == {"a", "c"}
    finally:
        model.close()


def test_feature_names_are_data_in_the_generated_code() -> None:
    """Rules compile to generated Python; a hostile name stays a dict key, never code."""
    name = "x'); import os; os._exit(3); ('\n\"\\"
    r = rule({"all": [{"feature": name, "eq": "v"}, {"exists": name + "2"}]})
    assert r({name: "v", name + "2": "w"}) == (True, "")
    assert r({name: "w", name + "2": "w"})[0] is False
    assert r({})[1].startswith("rule: x'); import os")


def test_a_rule_change_shows_in_the_plan_as_the_file_writes_it() -> None:
    from nextbest.config.plans import plan
    from nextbest.storage.base import PlacementRecord

    before = PlacementSpec.model_validate({"id": "p", "arms": [{"id": "x"}]})
    after = PlacementSpec.model_validate({"id": "p", "arms": [{"id": "x", "eligible": {"feature": "customer.plan", "in": ["postpaid"]}}]})
    (change,) = plan({"p": PlacementRecord(before, {"x": 1})}, [after], 1).changes
    assert (change.arm_id, change.action) == ("x", "UPDATE")
    assert change.details == ("eligible.feature: None -> 'customer.plan'", "eligible.in: None -> ['postpaid']")

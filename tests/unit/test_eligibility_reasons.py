"""Eligibility reasons are built lazily (bandit/eligibility.py ``Joined``) and only as far as
the logged 300 characters, yet the logged text is exactly what building them eagerly gave:
``("rule: " + reason)[:300]`` with ``any`` joining its parts' reasons by " and "."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings

from nextbest.bandit import eligibility as el
from nextbest.bandit.eligibility import EligibilityRule, Joined, Value, reason_against
from tests.unit.test_eligibility import CONTEXTS, RULES, _fits


def eager(r: EligibilityRule, ctx: dict[str, Value]) -> tuple[bool | None, str]:
    """The rule's verdict and its whole reason text, built eagerly as the decider used to."""
    if r.feature is not None or r.exists is not None:
        kind, name, operand, polarity, failed, missing = el._leaf(r)
        if kind == el._EXISTS:
            return (True, "") if name in ctx else (False, missing)
        if name not in ctx:
            return None, missing
        h = ctx[name]
        if kind == el._MEMBER:
            ok = (h in operand) == polarity
        elif kind == el._EQUAL:
            ok = (h == operand and type(h) is type(operand)) == polarity
        elif not isinstance(h, float):
            return False, f"{name} is not a number"
        else:
            ok = {el._LT: h < operand, el._LTE: h <= operand, el._GT: h > operand, el._GTE: h >= operand}[kind]
        return (True, "") if ok else (False, failed)
    if r.not_ is not None:
        verdict, reason = eager(r.not_, ctx)
        if verdict is None:
            return None, reason
        return (not verdict), ("" if verdict is False else f"not ({el._describe(r.not_)})")
    if r.all is not None:
        unknown = ""
        for part in r.all:
            verdict, reason = eager(part, ctx)
            if verdict is False:
                return False, reason
            if verdict is None and not unknown:
                unknown = reason
        return (None, unknown) if unknown else (True, "")
    reasons, any_unknown = [], False
    for part in r.any or ():
        verdict, reason = eager(part, ctx)
        if verdict:
            return True, ""
        any_unknown = any_unknown or verdict is None
        reasons.append(reason)
    return (None if any_unknown else False), " and ".join(reasons)


def logged(r: EligibilityRule, ctx: dict[str, Value]) -> str:
    verdict, reason = eager(r, ctx)
    return "" if verdict else ("rule: " + reason)[:300]


@settings(max_examples=400, deadline=None)
@given(RULES, CONTEXTS)
def test_lazy_reasons_log_exactly_the_eager_text(doc: dict[str, Any], ctx: dict[str, Value]) -> None:
    if not _fits(doc):
        return
    r = EligibilityRule.model_validate(doc)
    assert reason_against(r, ctx) == logged(r, ctx)
    assert r(ctx)[1] == logged(r, ctx)


def long_condition(i: int) -> dict[str, Any]:
    return {"feature": f"customer.f{i}", "in": [f"value_{i}_{k}_" + "x" * 40 for k in range(8)]}


def test_the_longest_reasons_are_cut_where_the_eager_text_was_and_an_any_that_fails_is_not_joined() -> None:
    ctx: dict[str, Value] = {f"customer.f{i}": "v" for i in range(70)}
    nested: dict[str, Any] = {"any": [long_condition(i) for i in range(8)]}
    for d in range(6):
        nested = {"any": [nested, *(long_condition(10 + 8 * d + i) for i in range(8))]}
    for doc in (
        {"any": [long_condition(i) for i in range(63)]},  # 64 nodes, the limit
        nested,  # 7 levels of any
        {"any": [{"feature": "customer.f0", "eq": "w"}, {"feature": "customer.f1", "eq": "w"}]},  # short: not cut
        {"all": [{"exists": "customer.f0"}, {"any": [{"feature": "customer.f1", "eq": "w"}, {"feature": "customer.none", "eq": 1}]}]},
    ):
        r = EligibilityRule.model_validate(doc)
        text = reason_against(r, ctx)
        assert text == logged(r, ctx) and text.startswith("rule: customer.f") and len(text) <= 300
    verdict, reason = EligibilityRule.model_validate({"any": [long_condition(i) for i in range(63)]}).check(ctx)
    assert verdict is False and isinstance(reason, Joined) and len(reason.parts) == 63  # no text built until logged
    held = EligibilityRule.model_validate({"not": {"any": [long_condition(i) for i in range(62)]}})
    assert reason_against(held, ctx) == ""  # eligible: nothing to log, nothing built


def test_feature_names_stay_data_in_a_generated_any() -> None:
    name = "x'); import os; os._exit(3); ('\n\"\\"
    r = EligibilityRule.model_validate({"any": [{"feature": name, "eq": "v"}, {"exists": name + "2"}]})
    assert r({name: "v"}) == (True, "") and r({name + "2": 1.0}) == (True, "")
    assert r({name: "w"}) == (False, f"rule: {name} != v and {name}2 missing")
    assert r({}) == (None, f"rule: {name} missing and {name}2 missing")

"""The decision log as VW's DSJSON: one JSON object per closed decision, one per line.

``c`` is written so that ``vw --dsjson --cb_adf`` hashes exactly the features our text format
(bandit/features.py) gives the server's models: context in namespace ``U``, arms in ``A``.
A text feature is written as the key ``"name=value"`` with the number 1, not as the JSON
string ``{"name": "value"}``: VW's JSON parser makes the latter the feature ``namevalue``
(``name^value`` with ``--chain_hash``), which the text parser never produces, so a model
trained on the file would not fit the live one. Names and values get the same character
replacement as in the text format.

What ``c`` cannot carry exactly (arm versions, the unmangled features, the customer, the exact
epoch time) travels in a top-level ``_nb`` object, which VW ignores. Lines without it (written
by another tool in the same U/A convention) are decoded from ``c``; there a numeric feature
``"k=v": 1`` and the text feature ``k=v`` cannot be told apart, which VW cannot either.

The context is the one the decision used (issue #30): ``U`` holds every shared feature the model
saw, the stored profile's included, and each action in ``_multi`` its arm's features followed by
that decision's own arm-level features (interaction history, ``history.impressions_7d``...), as
the model saw them. Where they came from is ``_nb.extra.context`` (DecisionContext's JSON):
``profile_keys`` names the shared features the profile gave (the others came with the request),
``profile_as_of`` is that profile's time, ``arm_features`` the history features per arm (in
``_nb.arms`` order); a decision whose features all came with the request has no ``context``.

A line is read only if its probabilities can weigh a replay: ``_label_probability`` in (0, 1],
every ``p`` (and pacing's "no offer" in ``_nb.pmf_extra``) in [0, 1], together summing to 1
within ``PMF_TOLERANCE``, and the chosen action's ``p`` equal to ``_label_probability`` within
the same relative tolerance (``pmf_problem``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from nextbest.bandit.decision_log import DecisionContext, Explanation, LoggedDecision, Outcome
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import ARM_NAMESPACE, SHARED_NAMESPACE, Feature, feature, feature_key, features_from_mapping

FORMAT_VERSION = 1
PMF_TOLERANCE = 1e-6  # how far a line's PMF may sum from 1, and its chosen p from _label_probability (relative)
_FIELDS = frozenset(f.name for f in fields(LoggedDecision))

ArmFeatures = Mapping[str, float | str | bool]
ArmKey = tuple[str, int]

# LoggedDecision fields the standard DSJSON keys or "_nb" carry by name; any other field travels
# in "_nb.extra", so fields added to the log later survive a round trip.
_CORE_FIELDS = frozenset(
    (
        "event_id",
        "placement",
        "customer_id",
        "timestamp",
        "features",
        "arms",
        "pmf",
        "chosen",
        "probability",
        "model_version",
        "deadline",
        "outcome",
        "reward",
        "learn_seq",
    )
)

# The same characters nextbest.bandit.features replaces, for the same reason: VW gives them a meaning.
_VW_SPECIAL = str.maketrans({c: "_" for c in " \t\r\n|:"})


def _pairs(features: Iterable[Feature]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for f in features:
        name, value = feature_key(f).translate(_VW_SPECIAL), f[2]
        if isinstance(value, str):
            out.append((f"{name}={value.translate(_VW_SPECIAL)}", 1))
        else:
            out.append((name, value))
    return out


def _object(pairs: Iterable[tuple[str, float]]) -> str:
    """A JSON object written by hand: repeated names stay repeated features, as in text."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def iso_time(epoch: float) -> str:
    """DSJSON's Timestamp: UTC, microseconds, a trailing Z."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso_time(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput("Timestamp", f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def to_dsjson(d: LoggedDecision, arm_features: Mapping[ArmKey, ArmFeatures]) -> str:
    """One DSJSON line. Only a closed decision (an arm and a learned reward) has a label."""
    if d.chosen is None or d.reward is None:
        raise InvalidInput("decision", f"{d.event_id}: only closed decisions with a reward can be exported")
    chosen = d.chosen
    order = [chosen] + [i for i in range(len(d.arms)) if i != chosen]  # VW: the chosen action first
    multi = _multi(d, arm_features)
    context = f'{{"{SHARED_NAMESPACE}":{_object(_pairs(d.features))},"_multi":[{",".join(multi)}]}}'
    exact = {
        "v": FORMAT_VERSION,
        "placement": d.placement,
        "customer_id": d.customer_id,
        "ts": d.timestamp,
        "deadline": d.deadline,
        "model_version": d.model_version,
        "outcome": int(d.outcome),
        "learn_seq": d.learn_seq,
        "features": [list(f) for f in d.features],
        "arms": [[a, v, dict(arm_features.get((a, v), {}))] for a, v in d.arms],
        "pmf_extra": list(d.pmf[len(d.arms) :]),  # pacing's "no offer", which is not an action in c
        "extra": {f.name: _plain(getattr(d, f.name)) for f in fields(d) if f.name not in _CORE_FIELDS and _kept(d, f.name)},
    }
    head = {
        "_label_cost": -d.reward,
        "_label_probability": d.probability,
        "_label_Action": chosen + 1,
        "_labelIndex": chosen,
        "Timestamp": iso_time(d.timestamp),
        "Version": "1",
        "EventId": d.event_id,
        "a": [i + 1 for i in order],
        "p": [d.pmf[i] for i in order],
    }
    return json.dumps(head)[:-1] + f',"c":{context},"_nb":{json.dumps(exact)}}}'


def to_ccb_dsjson(slots: Sequence[LoggedDecision], arm_features: Mapping[ArmKey, ArmFeatures]) -> str:
    """One CCB DSJSON line (VW's ``--ccb_explore_adf --dsjson``) for the slot decisions of one event.

    The actions are slot 0's eligible arms; each slot's outcome lists its chosen action first,
    then the others it could have drawn, with the slot's own probabilities (given the earlier
    slots) and its own reward. Slot features (``slot.*``) go to the slot, the rest is shared.
    """
    slots = sorted(slots, key=lambda d: d.slot)
    first = slots[0]
    if first.slot != 0 or any(d.chosen is None or d.reward is None for d in slots):
        raise InvalidInput("decision", f"{first.event_id}: only events whose every slot is closed can be exported")
    index = {arm: i for i, (arm, _) in enumerate(first.arms)}
    multi = _multi(first, arm_features)
    shared = [f for f in first.features if f[0] != "slot"]
    slot_objs, outcomes = [], []
    for d in slots:
        assert d.chosen is not None and d.reward is not None
        own = [f for f in d.features if f[0] == "slot"]
        slot_objs.append(f'{{"_id":"{d.slot}","{SHARED_NAMESPACE}":{_object(_pairs(own))}}}')
        order = [d.chosen] + [i for i in range(len(d.arms)) if i != d.chosen]
        outcomes.append(
            {
                "_id": str(d.slot),
                "_label_cost": -d.reward,
                "_a": [index[d.arms[i][0]] for i in order],
                "_p": [d.pmf[i] for i in order],
            }
        )
    context = f'{{"{SHARED_NAMESPACE}":{_object(_pairs(shared))},"_multi":[{",".join(multi)}],"_slots":[{",".join(slot_objs)}]}}'
    head = {"Timestamp": iso_time(first.timestamp), "Version": "1", "EventId": first.event_id}
    return json.dumps(head)[:-1] + f',"c":{context},"_outcomes":{json.dumps(outcomes)}}}'


def _multi(d: LoggedDecision, arm_features: Mapping[ArmKey, ArmFeatures]) -> list[str]:
    """The ``_multi`` actions of a decision's arms: each arm's id and features, then the
    decision's own features of that arm (its context's, e.g. interaction history)."""
    own = d.context.arm_features if d.context is not None and any(d.context.arm_features) else ()
    if own and len(own) != len(d.arms):
        raise InvalidInput("decision", f"{d.event_id}: context has arm features for {len(own)} arms, the decision {len(d.arms)}")
    multi = []
    for i, (arm_id, version) in enumerate(d.arms):
        feats = features_from_mapping(arm_features.get((arm_id, version), {}))
        pairs = [(f"arm={arm_id.translate(_VW_SPECIAL)}", 1), *_pairs(feats)]
        if own:
            pairs += _pairs(own[i])
        multi.append(f'{{"{ARM_NAMESPACE}":{_object(pairs)}}}')
    return multi


def from_dsjson(line: str) -> tuple[LoggedDecision, dict[ArmKey, dict[str, float | str | bool]]]:
    """A decision and the features of its arms (by id and version) from one DSJSON line."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise InvalidInput("dsjson", f"not a nextbest DSJSON line ({e.__class__.__name__}: {e})") from None
    return decode(obj)


def decode(obj: Any) -> tuple[LoggedDecision, dict[ArmKey, dict[str, float | str | bool]]]:
    """``from_dsjson`` of a line already parsed as JSON."""
    try:
        return _decode(obj)
    except InvalidInput:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise InvalidInput("dsjson", f"not a nextbest DSJSON line ({e.__class__.__name__}: {_clip(str(e))})") from None


def pmf_problem(probability: float, values: Sequence[float]) -> tuple[str, str]:
    """What is wrong with a line's probabilities, as (key, why), or ("", "") if nothing:
    ``values`` are its ``p`` in the line's order (the chosen action first) and then pacing's
    "no offer" probability if it has one. The replay's reader checks the same rules over a whole
    chunk at once (nextbest.offline.dsjson_reader)."""
    if not (0.0 < probability <= 1.0):
        return "_label_cost", "need a finite cost and a probability in (0, 1]"
    if not all(0.0 <= v <= 1.0 for v in values):
        return "p", "every probability must be a number in [0, 1]"
    total = math.fsum(values)
    if not abs(total - 1.0) <= PMF_TOLERANCE:
        return "p", f"the probabilities sum to {total:.9g}, not 1 (within {PMF_TOLERANCE:g})"
    if not abs(values[0] - probability) <= PMF_TOLERANCE * max(values[0], probability):
        return "p", f"the chosen action's probability {values[0]!r} is not _label_probability {probability!r}"
    return "", ""


def _clip(text: str, limit: int = 200) -> str:
    """A piece of a line quoted in an error, at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _decode(obj: dict[str, Any]) -> tuple[LoggedDecision, dict[ArmKey, dict[str, float | str | bool]]]:
    event_id = _clip(str(obj["EventId"]))
    chosen = int(obj["_labelIndex"])
    actions = [int(a) - 1 for a in obj["a"]]
    probs = [float(p) for p in obj["p"]]
    if sorted(actions) != list(range(len(actions))) or len(probs) != len(actions):
        raise InvalidInput("a", f"{event_id}: a and p must list each action once")
    if actions[0] != chosen:
        raise InvalidInput("a", f"{event_id}: the chosen action must come first")
    pmf = [0.0] * len(actions)
    for a, p in zip(actions, probs, strict=True):
        pmf[a] = p
    exact = obj.get("_nb")
    if exact is not None and exact.get("v") != FORMAT_VERSION:
        raise InvalidInput("_nb", f"{event_id}: format version {exact.get('v')!r}, this nextbest reads {FORMAT_VERSION}")
    if exact is not None:
        features = tuple(feature(ns, name, v if isinstance(v, str) else float(v)) for ns, name, v in exact["features"])
        arms = tuple((str(a), int(v)) for a, v, _ in exact["arms"])
        arm_features = {(str(a), int(v)): dict(f) for a, v, f in exact["arms"]}
        timestamp = float(exact["ts"])
        rest: dict[str, Any] = {
            "placement": exact["placement"],
            "customer_id": exact["customer_id"],
            "deadline": float(exact["deadline"]),
            "model_version": int(exact["model_version"]),
            "outcome": Outcome(exact["outcome"]),
            "learn_seq": exact["learn_seq"],
            **{k: _from_plain(k, v) for k, v in exact.get("extra", {}).items() if k in _FIELDS},
        }
        no_offer = [float(p) for p in exact.get("pmf_extra", ())]
        if len(no_offer) > 1:
            raise InvalidInput("_nb", f"{event_id}: pmf_extra holds at most one probability (pacing's 'no offer')")
        pmf += no_offer
    else:
        features, arms, arm_features = _decode_context(obj["c"], event_id)
        timestamp = parse_iso_time(obj["Timestamp"])
        rest = {"placement": "", "customer_id": "", "deadline": timestamp, "model_version": 0, "outcome": Outcome.REWARD, "learn_seq": None}
    if len(arms) != len(actions):
        raise InvalidInput("c", f"{event_id}: {len(arms)} arms in c but {len(actions)} in a")
    reward = -float(obj["_label_cost"])
    probability = float(obj["_label_probability"])
    if not math.isfinite(reward):
        raise InvalidInput("_label_cost", f"{event_id}: need a finite cost and a probability in (0, 1]")
    key, why = pmf_problem(probability, probs + pmf[len(actions) :])
    if key:
        raise InvalidInput(key, f"{event_id}: {why}")
    decision = LoggedDecision(
        event_id=event_id,
        timestamp=timestamp,
        features=features,
        arms=arms,
        pmf=tuple(pmf),
        chosen=chosen,
        probability=probability,
        reward=reward,
        **rest,
    )
    return decision, arm_features


def _kept(d: LoggedDecision, name: str) -> bool:
    """Whether ``_nb.extra`` carries a field: a decision without a context (its features all
    came with the request) is written as before contexts were logged."""
    return name != "context" or (d.context is not None and not d.context.empty)


def _plain(value: Any) -> Any:
    """A log field as JSON: the explanation and the context in their stored form, anything else as it is."""
    return value.to_json() if isinstance(value, Explanation | DecisionContext) else value


def _from_plain(name: str, value: Any) -> Any:
    if name == "explanation":
        return Explanation.from_json(value) if isinstance(value, dict) else None
    if name == "context":
        return DecisionContext.from_json(value) if isinstance(value, dict) else None
    return _tuples(value)


def _tuples(value: Any) -> Any:
    """JSON arrays back into the tuples the frozen log uses."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _split(key: str, value: Any) -> tuple[str, float | str]:
    """``name=text`` with 1 is a text feature; a string value is one too (VW hashes it differently)."""
    if isinstance(value, str):
        return key, value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput("c", f"feature {key!r}: expected a number or a text, got {value!r}")
    if value == 1 and "=" in key:
        name, text = key.split("=", 1)
        return name, text
    return key, float(value)


def _decode_context(
    c: dict[str, Any], event_id: str
) -> tuple[tuple[Feature, ...], tuple[ArmKey, ...], dict[ArmKey, dict[str, float | str | bool]]]:
    features = []
    for key, value in c.get(SHARED_NAMESPACE, {}).items():
        name, v = _split(key, value)
        ns, _, short = name.rpartition(".")
        features.append(feature(ns, short, v))
    arms: list[ArmKey] = []
    arm_features: dict[ArmKey, dict[str, float | str | bool]] = {}
    for i, action in enumerate(c["_multi"]):
        mine: dict[str, float | str | bool] = {}
        arm_id = None
        for key, value in action.get(ARM_NAMESPACE, {}).items():
            name, v = _split(key, value)
            if name == "arm" and isinstance(v, str) and arm_id is None:
                arm_id = v
            else:
                mine[name] = v
        if arm_id is None:
            raise InvalidInput("c._multi", f"{event_id}: action {i} has no arm=<id> feature in namespace A")
        arms.append((arm_id, 0))  # the version is not in c
        arm_features[(arm_id, 0)] = mine
    return tuple(features), tuple(arms), arm_features

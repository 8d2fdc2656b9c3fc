"""The decision log as Parquet (``nextbest export-log --format parquet``), for logs beyond one
machine: DuckDB, pandas and Spark read the files as they are.

One row per decision and slot, written in row groups of ``row_group`` rows from a streaming read
of the database, so memory holds one row group whatever the size of the log. Pacing's "no
offer" decisions are rows too (``chosen_arm`` null, reward 0, ``probability`` that of "no
offer"), as the replay from the database counts them. The SQL recipe of docs/replay.md computes IPS and
SNIPS of ``uniform`` and ``constant:ARM`` over these columns and matches ``nextbest replay``
(tests/offline/test_parquet_export.py).

The context is the one the decision used (issue #30): ``features`` holds every shared feature
the model saw, the stored profile's values of decision time included; ``profile_keys`` names
those (``namespace.name``) that came from the profile, as of ``profile_as_of``; ``arm_features``
is, per arm of ``arms``, that decision's own arm-level features (interaction history), which
the model saw after the arm's own. A decision whose features all came with the request has
``profile_as_of`` null and both lists empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature

_FEATURE = pa.struct([("namespace", pa.string()), ("name", pa.string()), ("text", pa.string()), ("number", pa.float64())])

SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),
        pa.field("placement", pa.string(), nullable=False),
        pa.field("variant", pa.string()),  # "" outside experiments, "holdout" for the control group
        pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),  # the same instant, exact (epoch seconds)
        pa.field("customer_id", pa.string()),
        pa.field("features", pa.list_(_FEATURE)),  # the shared context the model saw (request, profile): text or number per feature
        pa.field("arms", pa.list_(pa.string()), nullable=False),  # the eligible arms, in scoring order
        pa.field("arm_versions", pa.list_(pa.int32()), nullable=False),
        pa.field("pmf", pa.list_(pa.float64()), nullable=False),  # over arms, same order
        pa.field("no_offer_probability", pa.float64(), nullable=False),  # pacing's "no offer" (0: not offered)
        pa.field("chosen_arm", pa.string()),  # null: pacing made no offer
        pa.field("chosen_index", pa.int32()),  # into arms; null with chosen_arm
        pa.field("probability", pa.float64(), nullable=False),  # of what was logged: the chosen arm, or "no offer"
        pa.field("reward", pa.float64(), nullable=False),  # learned reward (the default if none came); 0 for "no offer"
        pa.field("outcome", pa.string(), nullable=False),  # REWARD, DEFAULT or NO_ARM ("no offer")
        pa.field("model_version", pa.int64(), nullable=False),
        pa.field("profile_as_of", pa.timestamp("us", tz="UTC")),  # the stored profile used (null: none)
        pa.field("profile_as_of_ts", pa.float64()),  # the same instant, exact (epoch seconds)
        pa.field("profile_keys", pa.list_(pa.string())),  # the features (namespace.name) the profile gave
        pa.field("arm_features", pa.list_(pa.list_(_FEATURE))),  # per arm: this decision's (history), or []
    ]
)

ROW_GROUP = 50_000


def _features(features: Iterable[Feature]) -> list[dict[str, Any]]:
    return [
        {"namespace": ns, "name": name, "text": v if isinstance(v, str) else None, "number": None if isinstance(v, str) else float(v)}
        for ns, name, v in features
    ]


def _row(d: LoggedDecision) -> dict[str, Any]:
    k = len(d.arms)
    ctx = d.context
    as_of = ctx.profile_as_of if ctx is not None else None
    return {
        "event_id": d.event_id,
        "slot": d.slot,
        "placement": d.placement,
        "variant": d.variant,
        "decided_at": int(round(d.timestamp * 1_000_000)),
        "ts": d.timestamp,
        "customer_id": d.customer_id or None,
        "features": _features(d.features),
        "arms": [a for a, _ in d.arms],
        "arm_versions": [v for _, v in d.arms],
        "pmf": list(d.pmf[:k]),
        "no_offer_probability": d.pmf[k] if len(d.pmf) > k else 0.0,
        "chosen_arm": d.arm_id,
        "chosen_index": d.chosen,
        "probability": d.probability,
        "reward": d.reward if d.reward is not None else 0.0,
        "outcome": d.outcome.name,
        "model_version": d.model_version,
        "profile_as_of": None if as_of is None else int(round(as_of * 1_000_000)),
        "profile_as_of_ts": as_of,
        "profile_keys": list(ctx.profile_keys) if ctx is not None else [],
        "arm_features": [_features(fs) for fs in ctx.arm_features] if ctx is not None and any(ctx.arm_features) else [],
    }


def write_parquet(path: str, decisions: Iterable[LoggedDecision], row_group: int = ROW_GROUP) -> int:
    """Write the decisions to one Parquet file, ``row_group`` rows at a time; returns how many."""
    if path == "-":
        raise InvalidInput("--out", "Parquet is a binary file: give a path, not -")
    n = 0
    batch: list[dict[str, Any]] = []
    try:
        with pq.ParquetWriter(path, SCHEMA, compression="zstd") as writer:
            for d in decisions:
                batch.append(_row(d))
                if len(batch) >= row_group:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                    n += len(batch)
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                n += len(batch)
    except OSError as e:
        raise InvalidInput("--out", f"cannot write {path}: {e.strerror or e}") from None
    return n

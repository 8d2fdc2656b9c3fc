"""A synthetic environment: the best arm depends on a customer segment."""

from __future__ import annotations

import numpy as np

from nextbest.bandit.spec import PlacementSpec

SEGMENTS = ["youth", "family", "business", "senior", "student"]
ARMS = ["data_5gb", "voice_300", "combo_10gb", "device_5g", "loyalty_pts"]
# Acceptance probability of each arm (columns) for each segment (rows): each segment has its own best arm.
P = np.array(
    [
        [0.60, 0.10, 0.20, 0.10, 0.05],
        [0.10, 0.15, 0.55, 0.10, 0.10],
        [0.05, 0.50, 0.15, 0.25, 0.05],
        [0.05, 0.20, 0.10, 0.05, 0.55],
        [0.20, 0.05, 0.10, 0.50, 0.10],
    ]
)
CATEGORY = {"data_5gb": "data", "voice_300": "voice", "combo_10gb": "combo", "device_5g": "device", "loyalty_pts": "loyalty"}


def placement(pid: str = "app_home_banner", **kw: object) -> PlacementSpec:
    data: dict[str, object] = {
        "id": pid,
        "arms": [{"id": a, "features": {"category": CATEGORY[a]}} for a in ARMS],
        # These tests report every outcome and look at the model right after: learn at once.
        # learn_at: window_close, the default, has its own tests (tests/service/test_learn_order.py).
        "learn_at": "reward",
    }
    data.update(kw)
    return PlacementSpec.model_validate(data)


def best_mean() -> float:
    return float(P.max(axis=1).mean())


def uniform_mean() -> float:
    return float(P.mean())

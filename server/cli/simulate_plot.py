"""The learning-curve picture of ``nextbest simulate --plot`` (matplotlib, loaded only then)."""

from __future__ import annotations

from typing import Any


def plot(board: Any, scenario: Any, path: str) -> None:
    import matplotlib
    import numpy as np  # the server's dependencies: the CLI starts without them

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = board.per_event()
    n = len(board)
    w = max(50, n // 40)
    kernel = np.ones(w) / w
    x = np.arange(w, n + 1)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    styles = {
        "oracle": ("oracle", "k", "--", 1.0),
        "policy": ("served policy (realized)", "tab:blue", "-", 0.35),
        "policy_expected": ("served policy (expected)", "tab:blue", "-", 1.0),
        "best_fixed": ("best fixed offer", "tab:orange", "-.", 1.0),
        "random": ("uniform random", "tab:gray", ":", 1.0),
    }
    for key, (label, color, ls, alpha) in styles.items():
        if n >= w:
            ax.plot(x, np.convolve(per[key][0], kernel, mode="valid"), label=label, color=color, linestyle=ls, alpha=alpha)
    for p in scenario.promotions:
        a, b = p.start_day * scenario.visits_per_day, (p.start_day + p.days) * scenario.visits_per_day
        if a < n:
            ax.axvspan(a, min(b, n), color="tab:red", alpha=0.1, label=p.name.replace("_", " "))
    ax.set_xlabel("events")
    ax.set_ylabel(f"average reward per event (moving average of {w})")
    ax.set_title(f"nextbest learning curve: scenario {scenario.name}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

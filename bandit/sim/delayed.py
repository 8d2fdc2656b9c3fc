"""Delayed feedback, in process: what learning order and update weighting cost a model.

The "Learning order and weighting" table of docs/configuration.md comes from here (``scripts/learn-order``). A
3-segment x 5-arm environment (each segment's best arm pays 0.7, the others 0.2: the oracle
earns 0.7, a uniform policy 0.3) is served by one ``CbModel`` with nextbest's own exploration;
outcomes reach the model at once or a window of ``delay`` decisions later, all of them or, for
a channel that reports only successes, the successes at once and the failures (default rewards)
at the close, each update weighted by 1/probability (VW's off-policy default) or not (what the
server does now, ``nextbest.bandit.model.learn_label``). Seeded: the same arguments give the
same figures.
"""

from __future__ import annotations

import argparse
import heapq
from collections.abc import Sequence
from typing import Literal

import numpy as np

from nextbest.bandit.decider import explore
from nextbest.bandit.features import arm_line, feature, shared_line
from nextbest.bandit.model import CbModel
from nextbest.bandit.spec import PlacementSpec

Schedule = Literal["at_reward", "at_close", "successes_at_once"]

PAYS = np.full((3, 5), 0.2)
PAYS[0, 0] = PAYS[1, 2] = PAYS[2, 4] = 0.7
_ARMS = [f"a{i}" for i in range(5)]
_LINES = [arm_line(a, ()) for a in _ARMS]
_SHARED = [shared_line((feature("customer", "segment", f"s{s}"),)) for s in range(3)]


class _WeightedModel(CbModel):
    """The model as it learned before: the logged probability in the label, so VW weights the
    update by 1/probability."""

    def learn_weighted(self, shared: str, arms: Sequence[str], chosen: int, reward: float, probability: float) -> None:
        lines = [shared, *arms]
        lines[chosen + 1] = f"0:{-reward!r}:{probability!r} {arms[chosen]}"
        ws = self._ws
        ex = ws.parse("\n".join(lines))
        ws.learn(ex)
        ws.finish_example(ex)
        self.learned += 1


def run(schedule: Schedule, weighted: bool, seed: int, delay: int = 150, rounds: int = 4000, algorithm: str = "squarecb") -> float:
    """Mean reward over rounds 1001 to the end of one seeded run."""
    exploration: dict[str, object] = {"algorithm": algorithm}
    if algorithm == "epsilon":
        exploration["epsilon"] = 0.1
    spec = PlacementSpec.model_validate({"id": "p", "arms": [{"id": a} for a in _ARMS], "exploration": exploration})
    model = _WeightedModel(spec)
    rng = np.random.default_rng(seed)
    pending: list[tuple[int, int, int, int, float, float]] = []  # (due, t, segment, arm, reward, p)

    def learn(s: int, a: int, r: float, p: float) -> None:
        if weighted:
            model.learn_weighted(_SHARED[s], _LINES, a, r, p)
        else:
            model.learn(_SHARED[s], _LINES, a, r)

    earned = np.zeros(rounds)
    try:
        for t in range(rounds):
            while pending and pending[0][0] <= t:
                _, _, s, a, r, p = heapq.heappop(pending)
                learn(s, a, r, p)
            s = int(rng.integers(3))
            pmf = explore(model.expected_rewards(_SHARED[s], _LINES), spec.exploration, model.learned)
            a = int(rng.choice(5, p=pmf / pmf.sum()))
            r = float(rng.random() < PAYS[s, a])
            earned[t] = r
            p = float(pmf[a])
            if schedule == "at_reward" or (schedule == "successes_at_once" and r > 0):
                learn(s, a, r, p)
            else:
                heapq.heappush(pending, (t + delay, t, s, a, r, p))
    finally:
        model.close()
    return float(earned[1000:].mean())


ROWS: tuple[tuple[str, Schedule], ...] = (
    ("every outcome, learned at the reward", "at_reward"),
    ("every outcome, learned at the close", "at_close"),
    ("successes only: successes at once, failures at the close", "successes_at_once"),
    ("successes only, learned at the close (learn_at: window_close)", "at_close"),
)


def table(seeds: Sequence[int], delay: int, rounds: int, algorithm: str) -> list[tuple[str, float, float]]:
    """(row, weighted mean, unweighted mean) over the seeds, for each row of ROWS. Reporting only
    successes and learning at the close is the same learning as reporting everything: the
    failures are the default rewards of the windows that close without one."""
    means: dict[tuple[Schedule, bool], float] = {}
    out = []
    for label, schedule in ROWS:
        for weighted in (True, False):
            if (schedule, weighted) not in means:
                means[(schedule, weighted)] = float(np.mean([run(schedule, weighted, s, delay, rounds, algorithm) for s in seeds]))
        out.append((label, means[(schedule, True)], means[(schedule, False)]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5)")
    ap.add_argument("--delay", type=int, default=150, help="window length in decisions (default 150)")
    ap.add_argument("--rounds", type=int, default=4000, help="decisions per run (default 4000; the mean is over 1001..)")
    ap.add_argument("--algorithm", choices=["squarecb", "epsilon", "softmax"], default="squarecb")
    args = ap.parse_args(argv)
    print(f"{args.algorithm}, window {args.delay} decisions, mean reward over rounds 1001-{args.rounds}, seeds 1-{args.seeds}")
    print(f"{'':64}{'weighted 1/p':>14}{'unweighted':>12}")
    for label, w, u in table(range(1, args.seeds + 1), args.delay, args.rounds, args.algorithm):
        print(f"{label:64}{w:>14.3f}{u:>12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

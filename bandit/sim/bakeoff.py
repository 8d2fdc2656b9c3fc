"""Supervised-to-bandit bake-off: is the service as good a learner as Vowpal Wabbit itself?

A classification dataset becomes a contextual bandit (each class an arm, reward 1 for the
right class). The same seeded stream is fed to the service over gRPC and to a VW
``--cb_explore_adf`` workspace run directly with the same arguments, the same exploration, the
same (unweighted, nextbest.bandit.model.learn_label) update and
the very same example text; the ratio of their average rewards is the service's learning loss
(none, if it is 1 up to exploration noise). The datasets ship with scikit-learn: no network.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from nextbest.bandit.exploration import draw
from nextbest.bandit.features import arm_line, feature, shared_line
from nextbest.bandit.model import learn_label, vw_arguments
from nextbest.bandit.spec import ArmSpec, ExplorationSpec, PlacementSpec

DATASETS = ("digits", "iris", "wine", "breast_cancer")
NAMESPACE = "x"  # request namespace of the context features


@dataclass(frozen=True)
class Dataset:
    name: str
    X: NDArray[np.float64]  # scaled features, rounded so that their text is short and exact
    y: NDArray[np.int64]
    classes: int


def load(name: str) -> Dataset:
    """A scikit-learn bundled dataset, scaled: digits to [0, 1], the others standardized."""
    from sklearn import datasets  # optional dependency: only the bake-off needs it

    loaders = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r} (expected one of {', '.join(DATASETS)})")
    bunch: Any = loaders[name]()
    X = np.asarray(bunch.data, dtype=np.float64)
    if name == "digits":
        X = X / 16.0
    else:
        sd = X.std(axis=0)
        X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    return Dataset(name, np.round(X, 4), y, int(y.max()) + 1)


def stream(ds: Dataset, seed: int, events: int) -> NDArray[np.int64]:
    """Row indices: seeded permutations of the dataset, one after another, cut to length."""
    rng = np.random.default_rng([seed, len(ds.y)])
    reps = -(-events // len(ds.y))
    return np.concatenate([rng.permutation(len(ds.y)) for _ in range(reps)])[:events].astype(np.int64)


def context(ds: Dataset, row: int) -> dict[str, float]:
    """A row's non-zero features, named f0, f1, ... (zeros carry nothing in a linear model)."""
    return {f"f{j}": float(v) for j, v in enumerate(ds.X[row]) if v != 0.0}


def placement(ds: Dataset, pid: str, epsilon: float = 0.05, bits: int = 18) -> PlacementSpec:
    """One arm per class whose only feature is its id; epsilon-greedy like the direct side."""
    return PlacementSpec(
        id=pid,
        description=f"bake-off on {ds.name}",
        arms=[ArmSpec(id=f"c{k}") for k in range(ds.classes)],
        exploration=ExplorationSpec(algorithm="epsilon", epsilon=epsilon),
        bits=bits,
        learn_at="reward",  # every outcome is reported at once, as VW learns it directly
    )


def direct_arguments(spec: PlacementSpec) -> list[str]:
    """The service's VW command line with VW's own exploration in place of ours."""
    args = vw_arguments(spec)
    args[args.index("--cb_adf")] = "--cb_explore_adf"
    return [*args, "--epsilon", repr(spec.exploration.epsilon)]


@dataclass
class Run:
    """Per-event rewards of one learner on one stream; versions = examples learned at each choice."""

    rewards: NDArray[np.float64]
    versions: NDArray[np.int64]

    @property
    def mean(self) -> float:
        return float(self.rewards.mean()) if len(self.rewards) else 0.0

    @property
    def lag(self) -> NDArray[np.int64]:
        """Rewards already sent but not yet learned when each choice was made."""
        return np.arange(len(self.versions)) - self.versions


Uniform = Callable[[int], float]  # the uniform draw that picks the arm of event t


def run_direct(
    ds: Dataset, rows: Sequence[int], spec: PlacementSpec, seed: int, versions: Sequence[int] | None = None, uniform: Uniform | None = None
) -> Run:
    """VW ``--cb_explore_adf`` on the stream. With ``versions`` it learns each example only
    once the service had (same staleness at every choice), to measure what lag costs. With
    ``uniform`` it draws arms with the service's own random numbers: where both models agree
    both pick the same arm, so the comparison is not drowned in exploration noise."""
    from vowpalwabbit import Workspace

    ws = Workspace(arg_list=direct_arguments(spec))
    rng = np.random.default_rng([seed, 7])
    u = uniform or (lambda t: float(rng.random()))
    arms = [arm_line(a.id, a.vw_features()) for a in spec.arms]
    pending: deque[str] = deque()
    learned = 0
    rewards = np.zeros(len(rows))
    seen = np.zeros(len(rows), dtype=np.int64)
    try:
        for t, row in enumerate(rows):
            target = t if versions is None else int(versions[t])
            while pending and learned < target:
                ex = ws.parse(pending.popleft())
                ws.learn(ex)
                ws.finish_example(ex)
                learned += 1
            seen[t] = learned
            shared = shared_line(feature(NAMESPACE, k, v) for k, v in context(ds, row).items())
            ex = ws.parse("\n".join((shared, *arms)))
            pmf = np.asarray(ws.predict(ex), dtype=np.float64)
            ws.finish_example(ex)
            a = draw(pmf, u(t))
            r = 1.0 if a == ds.y[row] else 0.0
            rewards[t] = r
            lines = [shared, *arms]
            lines[a + 1] = f"{learn_label(r)} {arms[a]}"  # the service's own update
            pending.append("\n".join(lines))
    finally:
        ws.finish()
    return Run(rewards, seen)


def event_id(pid: str, t: int) -> str:
    return f"{pid}.e{t}"


class Chosen(Protocol):
    @property
    def event_id(self) -> str: ...
    @property
    def arm_id(self) -> str: ...
    @property
    def model_version(self) -> int: ...


class Service(Protocol):
    """What the bake-off needs of a client (NextbestClient is one)."""

    def choose(self, placement: str, features: Mapping[str, Any], customer_id: str = "", event_id: str = "") -> Chosen: ...

    def reward(self, event_id: str, reward: float) -> str: ...

    def apply(self, placements: Sequence[PlacementSpec]) -> object: ...


def run_service(svc: Service, ds: Dataset, rows: Sequence[int], pid: str, wait_learned: Callable[[int], None] | None = None) -> Run:
    """Choose then Reward, one event at a time; ``wait_learned(n)`` (optional) returns once the
    placement's model has learned n examples, which removes the learning lag altogether."""
    rewards = np.zeros(len(rows))
    versions = np.zeros(len(rows), dtype=np.int64)
    for t, row in enumerate(rows):
        d = svc.choose(pid, {NAMESPACE: context(ds, row)}, event_id=event_id(pid, t))
        r = 1.0 if d.arm_id == f"c{ds.y[row]}" else 0.0
        svc.reward(d.event_id, r)
        rewards[t], versions[t] = r, d.model_version
        if wait_learned is not None:
            wait_learned(t + 1)
    return Run(rewards, versions)


@dataclass(frozen=True)
class SeedResult:
    dataset: str
    seed: int
    service: float  # average reward of the service
    direct: float  # of VW run directly, learning every example before the next choice
    direct_same_lag: float  # of VW run directly with the service's staleness at each choice
    mean_lag: float  # rewards sent but not yet learned, at a choice, on average
    stale_share: float  # share of choices made by a model that had not learned everything sent


def compare(
    svc: Service,
    ds: Dataset,
    seed: int,
    events: int,
    pid: str,
    epsilon: float = 0.05,
    wait_learned: Callable[[int], None] | None = None,
    uniform: Uniform | None = None,
) -> SeedResult:
    """One dataset and seed on both sides: a fresh placement on the service, then VW directly
    (learning every example at once, and again with the staleness the service had)."""
    rows = list(stream(ds, seed, events))
    spec = placement(ds, pid, epsilon)
    svc.apply([spec])
    service = run_service(svc, ds, rows, pid, wait_learned)
    direct = run_direct(ds, rows, spec, seed, uniform=uniform)
    lagged = run_direct(ds, rows, spec, seed, versions=list(service.versions), uniform=uniform)
    lag = service.lag
    return SeedResult(ds.name, seed, service.mean, direct.mean, lagged.mean, float(lag.mean()), float((lag > 0).mean()))


def summarize(results: Sequence[SeedResult]) -> dict[str, dict[str, float]]:
    """Per dataset: mean rewards over seeds and their ratio (service / direct)."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.dataset for r in results):
        rs = [r for r in results if r.dataset == name]
        service = float(np.mean([r.service for r in rs]))
        direct = float(np.mean([r.direct for r in rs]))
        lagged = float(np.mean([r.direct_same_lag for r in rs]))
        out[name] = {
            "seeds": float(len(rs)),
            "service": service,
            "direct": direct,
            "direct_same_lag": lagged,
            "ratio": service / direct if direct > 0 else float("nan"),
            "ratio_same_lag": service / lagged if lagged > 0 else float("nan"),
            "mean_lag": float(np.mean([r.mean_lag for r in rs])),
            "stale_share": float(np.mean([r.stale_share for r in rs])),
        }
    return out

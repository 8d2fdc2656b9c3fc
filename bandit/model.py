"""One Vowpal Wabbit cb_adf model: scores arms, learns logged examples, saves and loads.

A VW workspace is not thread-safe: whoever holds a CbModel is its only user. The server
keeps each model on one event loop, where predicts and learns interleave but never overlap.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Sequence

import numpy as np
import pylibvw
from numpy.typing import NDArray
from vowpalwabbit import Workspace

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import ARM_NAMESPACE, SHARED_NAMESPACE
from nextbest.bandit.spec import PlacementSpec
from nextbest.bandit.vw_options import FILE_OPTIONS

# VW preallocates 256 examples per workspace (about 7.6 MiB whatever the bits); we hand it one
# multi-line example at a time, so 4 suffice: 1,000 placements then fit in far less memory.
_RING = ["--ring_size", "4"]


def vw_arguments(spec: PlacementSpec) -> list[str]:
    """The full VW command line of a placement's model."""
    args = ["--cb_adf", "--quiet", *_RING, "-b", str(spec.bits)]
    if spec.interactions:
        args += ["-q", f"{SHARED_NAMESPACE}{ARM_NAMESPACE}"]
    return args + shlex.split(spec.vw_args)


def learn_label(reward: float) -> str:
    """The cb_adf label of the served arm: cost = -reward, at probability 1.

    Unweighted: the model is a regression of reward on (context, arm) trained on what was
    served, as VW's own SquareCB trains its regression oracle. Weighting each update by
    1/probability (what the logged probability in the label would do) makes one outcome of a
    rarely served arm count for up to a few hundred examples: after 200 examples of a 0.2-arm
    one lucky success at probability 0.02 moved its estimate from 0.13 to 0.91, above the best
    arm. Learned at once the next failures undo that within a few decisions; learned at the
    close of a window the model serves the wrong arm for a whole window first (docs/configuration.md,
    "Learning order and weighting"). Offline estimators still use the logged probability."""
    return f"0:{-reward!r}:1.0"


def check_vw_arguments(spec: PlacementSpec) -> None:
    """Build a throwaway workspace so that VW itself rejects bad arguments up front.

    The workspace is finished at once, and VW writes ``-f``/``--readable_model``/... files when a
    workspace finishes: this runs for every apply, dry runs included. ``vw_args`` is already an
    allow list (``nextbest.bandit.vw_options``), but the file options are refused once more right before
    VW sees the arguments, and the throwaway workspace writes its own model into a temporary
    folder that is removed afterwards: VW refuses a second, disagreeing ``-f``, so even an
    option slipping past both checks cannot make it write elsewhere."""
    args = vw_arguments(spec)
    for tok in args:
        opt = tok.partition("=")[0] if tok.startswith("--") else tok[:2]
        if tok.startswith("-") and opt in FILE_OPTIONS:
            raise InvalidInput("vw_args", f"{opt}: reads or writes files; not allowed in vw_args")
    with tempfile.TemporaryDirectory(prefix="nextbest-vwcheck-") as scratch:
        try:
            ws = Workspace(arg_list=["-f", os.path.join(scratch, "check.vw"), *args])
        except Exception as e:  # VW raises RuntimeError, sometimes others, for bad options
            raise InvalidInput("vw_args", f"Vowpal Wabbit rejected the arguments: {e}") from None
        try:
            if ws.get_prediction_type() != ws.pACTION_SCORES:
                raise InvalidInput("vw_args", "the arguments must keep a cb_adf model that scores arms")
        finally:
            ws.finish()


class CbModel:
    """A placement's contextual-bandit model with the count of examples it learned."""

    def __init__(self, spec: PlacementSpec, model_bytes: bytes | None = None, learned: int = 0) -> None:
        self.learned = learned
        self._finished = False
        if model_bytes is None:
            self._ws = Workspace(arg_list=vw_arguments(spec))
        else:
            self._ws = _load(model_bytes)

    def expected_rewards(self, shared: str, arms: Sequence[str]) -> NDArray[np.float64]:
        """Expected reward of each arm (VW predicts costs; reward = -cost).

        Calls VW's binding directly: pyvw's wrapper builds a Python object per example line,
        which cost about 70 of the 100 µs of a 20-arm predict (measured; same scores)."""
        ws = self._ws
        ex = pylibvw.vw._parse(ws, "\n".join((shared, *arms)))
        try:
            pylibvw.vw.predict_multi(ws, ex)
            scores = ex[0].get_action_scores()
        finally:
            pylibvw.vw._finish_example_multi_ex(ws, ex)
        return 0.0 - np.asarray(scores, dtype=np.float64)  # not -x: a cost of 0 is a reward of 0.0, not -0.0

    def learn(self, shared: str, arms: Sequence[str], chosen: int, reward: float) -> None:
        """Learn one logged decision: context, arm set, the chosen arm and its reward."""
        lines = [shared, *arms]
        lines[chosen + 1] = f"{learn_label(reward)} {arms[chosen]}"
        ws = self._ws
        ex = pylibvw.vw._parse(ws, "\n".join(lines))
        try:
            pylibvw.vw.learn_multi(ws, ex)
        finally:
            pylibvw.vw._finish_example_multi_ex(ws, ex)
        self.learned += 1

    def to_bytes(self) -> bytes:
        with tempfile.TemporaryDirectory(prefix="nextbest-") as d:
            path = os.path.join(d, "model.vw")
            self._ws.save(path)
            with open(path, "rb") as f:
                return f.read()

    def close(self) -> None:
        """Finish the workspace; a second close does nothing (several owners may let go of one)."""
        if not self._finished:
            self._finished = True
            self._ws.finish()


def _load(model_bytes: bytes) -> Workspace:
    with tempfile.TemporaryDirectory(prefix="nextbest-") as d:
        path = os.path.join(d, "model.vw")
        with open(path, "wb") as f:
            f.write(model_bytes)
        return Workspace(arg_list=["--quiet", *_RING, "-i", path])

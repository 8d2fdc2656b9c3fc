"""DR's reward model: a regression of the logged reward on the context and the arm, learned by VW
and cross-fitted over the log's chunks, with a loss that fits the rewards.

* ``logistic``: every reward is 0 or 1 (a click, a purchase). VW's logistic regression (labels
  -1/+1, ``--link logistic``) predicts the probability of a 1, which stays in [0, 1] however
  rare the ones are. Squared loss does not fit such rewards: on the Open Bandit Dataset's clicks
  (mean 0.0038) it predicted about -0.24 for every event, and DR came out negative (issue #33).
* ``squared``: any other reward (a margin, a count). VW's direct method (``--cb_adf --cb_type
  dm``, a least-squares regression), its predictions clipped to the range of the rewards it
  learned: no reward outside that range was ever seen.
* ``auto`` (the default) chooses from the log: logistic when every logged reward is 0 or 1,
  squared otherwise. The log is streamed, so auto starts logistic and, at the first reward other
  than 0 and 1, switches to squared and learns the log again from its start (the caller's loop
  sees ``restart``): a log of margins usually shows one in its first chunk.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import pylibvw
from vowpalwabbit import Workspace

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.policies import vw_args, workspace
from nextbest.bandit.offline.replay_log import FloatArray, ReplayLog

DEFAULT_REWARD_MODEL_ARGS = "-q UA"
REWARD_MODEL_LOSSES: Final = ("auto", "squared", "logistic")
_OWN_OPTIONS: Final = frozenset({"--loss_function", "--link", "--cb_adf", "--cb_type", "--cb_explore_adf"})


def loss_name(loss: str, field: str = "reward_model_loss") -> str:
    """The loss as the code spells it, or the error naming ``field``."""
    key = loss.strip().lower() if isinstance(loss, str) else ""
    if key not in REWARD_MODEL_LOSSES:
        raise InvalidInput(field, f"unknown loss {loss!r}; expected one of {', '.join(REWARD_MODEL_LOSSES)}")
    return key


def binary_rewards(rewards: FloatArray) -> bool:
    """Every reward is 0 or 1 (an empty array is)."""
    return bool(np.all((rewards == 0.0) | (rewards == 1.0)))


class RewardModel:
    """DR's reward model, cross-fitted: event ``i`` (counted from the start of the log) falls in
    fold ``i % folds`` and is scored by the model that learned only the other folds, so DR's
    correction is not fooled by memorised rewards.

    ``learn`` takes the log's chunks in order (a first pass), then ``predict`` scores them (a
    second pass over the same chunks); memory holds the models, not the log. With ``loss="auto"``
    check ``restart`` after each ``learn``: when set, the model has switched from logistic to
    squared loss (a reward other than 0 and 1), holds nothing learned, and wants the first pass
    again from the log's start (then clear it).

    ``args`` are VW's learning options of the model (interactions, learning rate, ...); the loss
    and the reduction are the model's own to choose.
    """

    def __init__(self, args: str = DEFAULT_REWARD_MODEL_ARGS, folds: int = 2, loss: str = "auto") -> None:
        if folds < 2:
            raise InvalidInput("folds", f"must be at least 2, got {folds}")
        self.requested = loss_name(loss)
        self.args = vw_args(args, "reward_model_args")
        own = sorted(_OWN_OPTIONS.intersection(a.split("=", 1)[0] for a in self.args))
        if own:
            raise InvalidInput(
                "reward_model_args",
                f"{', '.join(own)}: the reward model chooses its loss and reduction itself (see reward_model_loss)",
            )
        self.folds = folds
        self.loss = "squared" if self.requested == "squared" else "logistic"  # auto starts logistic
        self.restart = False
        self.low, self.high = math.inf, -math.inf  # the range of the rewards learned
        self.models: list[Workspace] = []
        self._start()

    def _start(self) -> None:
        if self.loss == "logistic":
            base = [*self.args, "--loss_function", "logistic", "--link", "logistic"]
        else:
            base = ["--cb_adf", "--cb_type", "dm", *self.args]
        try:
            for _ in range(self.folds):
                self.models.append(workspace(base, "reward_model_args"))
        except BaseException:
            self.close()
            raise
        if self.loss == "logistic" and self.models[0].get_prediction_type() != self.models[0].pSCALAR:
            kind = self.models[0].get_prediction_type()
            self.close()
            raise InvalidInput("reward_model_args", f"the logistic reward model needs a regression, and these options make {kind}")

    def learn(self, chunk: ReplayLog, start: int) -> None:
        """Learn the chunk's events (the ``start``-th of the log first) in every other fold's model."""
        offered = np.flatnonzero(chunk.offered)
        rewards = chunk.rewards[offered]
        if rewards.shape[0]:
            if self.loss == "logistic" and not binary_rewards(rewards):
                bad = float(rewards[~((rewards == 0.0) | (rewards == 1.0))][0])
                if self.requested == "logistic":
                    raise InvalidInput(
                        "reward_model_loss", f"logistic needs rewards of 0 or 1, and the log has {bad!r}; use squared or auto"
                    )
                self._switch_to_squared()
                return
            self.low = min(self.low, float(rewards.min()))
            self.high = max(self.high, float(rewards.max()))
        texts = chunk.vw_examples()
        folds = self.folds
        if self.loss == "logistic":
            labels = np.where(chunk.rewards > 0.5, "1 ", "-1 ").tolist()
            chosen = chunk.chosen.tolist()
            parse, learn, finish = _Simple.parse, _Simple.learn, _Simple.finish
            for i in offered.tolist():
                context, arms = _lines(texts[i])
                text = labels[i] + context + " " + arms[chosen[i]]
                own = (start + i) % folds
                for k, ws in enumerate(self.models):
                    if k != own:
                        (ex,) = parse(ws, text)
                        learn(ws, ex)
                        finish(ws, ex)
            return
        for i in offered.tolist():
            own = (start + i) % folds
            for k, ws in enumerate(self.models):
                if k != own:
                    ex = ws.parse(texts[i])
                    ws.learn(ex)
                    ws.finish_example(ex)

    def _switch_to_squared(self) -> None:
        self.close()
        self.loss, self.restart = "squared", True
        self.low, self.high = math.inf, -math.inf
        self._start()

    def predict(self, chunk: ReplayLog, start: int) -> FloatArray:
        """The predicted reward of every slot of the chunk, by its own fold's model: a
        probability in [0, 1] (logistic), or within the range of the rewards learned (squared)."""
        texts = chunk.vw_examples()
        offsets = chunk.offsets.tolist()
        rhat = np.zeros(len(chunk.arm_index), np.float64)
        if self.loss == "logistic":
            parse, predict, finish = _Simple.parse, _Simple.predict, _Simple.finish
            for i, text in enumerate(texts):
                ws = self.models[(start + i) % self.folds]
                context, arms = _lines(text)  # without the label
                for j, arm in enumerate(arms, offsets[i]):
                    (ex,) = parse(ws, context + " " + arm)
                    predict(ws, ex)
                    rhat[j] = ex.get_simplelabel_prediction()  # the probability (--link logistic)
                    finish(ws, ex)
            return np.clip(rhat, 0.0, 1.0, out=rhat)
        for i, text in enumerate(texts):
            ws = self.models[(start + i) % self.folds]
            ex = ws.parse(text)
            rhat[offsets[i] : offsets[i + 1]] = ws.predict(ex)
            ws.finish_example(ex)
        np.negative(rhat, out=rhat)  # VW predicts costs
        if self.low <= self.high:
            np.clip(rhat, self.low, self.high, out=rhat)
        return rhat

    def close(self) -> None:
        for ws in self.models:
            ws.finish()
        self.models = []


class _Simple:
    """VW's binding for one-line examples, called directly: the Python wrapper's checks cost
    three quarters of the logistic model's time (as ``policies._VW`` for multi-line ones)."""

    parse = pylibvw.vw._parse
    learn = pylibvw.vw.learn
    predict = pylibvw.vw.predict
    finish = pylibvw.vw._finish_example


def _lines(text: str) -> tuple[str, list[str]]:
    """A cb_adf example's context (its shared line's namespaces) and arm lines (without the label),
    to be joined into one plain example per arm: the same features, and ``-q`` crosses them alike."""
    lines = text.split("\n")
    return lines[0].removeprefix("shared "), [line[line.index("|") :] for line in lines[1:]]


def reward_model(log: ReplayLog, args: str = DEFAULT_REWARD_MODEL_ARGS, folds: int = 2, loss: str = "auto") -> FloatArray:
    """Predicted reward of every slot of a whole log, cross-fitted (see RewardModel); ``auto``
    is logistic when every reward of the log's offers is 0 or 1."""
    if loss_name(loss) == "auto":
        loss = "logistic" if binary_rewards(log.rewards[log.offered]) else "squared"
    model = RewardModel(args, folds, loss)
    try:
        model.learn(log, 0)
        return model.predict(log, 0)
    finally:
        model.close()

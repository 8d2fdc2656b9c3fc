"""DR's reward model: VW's direct method, cross-fitted over the log's chunks."""

from __future__ import annotations

import numpy as np
from vowpalwabbit import Workspace

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.policies import vw_args, workspace
from nextbest.bandit.offline.replay_log import FloatArray, ReplayLog

DEFAULT_REWARD_MODEL_ARGS = "-q UA"


class RewardModel:
    """DR's reward model, cross-fitted: event ``i`` (counted from the start of the log) falls in
    fold ``i % folds`` and is scored by the model that learned only the other folds, so DR's
    correction is not fooled by memorised rewards.

    Each model is VW's direct method (``--cb_adf --cb_type dm``): a regression of the chosen
    arm's reward on the context and arm features. ``learn`` takes the log's chunks in order (a
    first pass), then ``predict`` scores them (a second pass over the same chunks); memory holds
    the models, not the log.
    """

    def __init__(self, args: str = DEFAULT_REWARD_MODEL_ARGS, folds: int = 2) -> None:
        if folds < 2:
            raise InvalidInput("folds", f"must be at least 2, got {folds}")
        base = ["--cb_adf", "--cb_type", "dm", *vw_args(args, "reward_model_args")]
        self.folds = folds
        self.models: list[Workspace] = []
        try:
            for _ in range(folds):
                self.models.append(workspace(base, "reward_model_args"))
        except BaseException:
            self.close()
            raise

    def learn(self, chunk: ReplayLog, start: int) -> None:
        """Learn the chunk's events (the ``start``-th of the log first) in every other fold's model."""
        texts = chunk.vw_examples()
        folds = self.folds
        for i in np.flatnonzero(chunk.offered).tolist():
            own = (start + i) % folds
            for k, ws in enumerate(self.models):
                if k != own:
                    ex = ws.parse(texts[i])
                    ws.learn(ex)
                    ws.finish_example(ex)

    def predict(self, chunk: ReplayLog, start: int) -> FloatArray:
        """The predicted reward of every slot of the chunk, by its own fold's model."""
        texts = chunk.vw_examples()
        offsets = chunk.offsets.tolist()
        rhat = np.zeros(len(chunk.arm_index), np.float64)
        for i, text in enumerate(texts):  # predict ignores the label
            ws = self.models[(start + i) % self.folds]
            ex = ws.parse(text)
            rhat[offsets[i] : offsets[i + 1]] = ws.predict(ex)
            ws.finish_example(ex)
        return np.negative(rhat, out=rhat)  # VW predicts costs

    def close(self) -> None:
        for ws in self.models:
            ws.finish()
        self.models = []


def reward_model(log: ReplayLog, args: str = DEFAULT_REWARD_MODEL_ARGS, folds: int = 2) -> FloatArray:
    """Predicted reward of every slot of a whole log, cross-fitted (see RewardModel)."""
    model = RewardModel(args, folds)
    try:
        model.learn(log, 0)
        return model.predict(log, 0)
    finally:
        model.close()

"""Early stopping on a validation metric (or a weighted combination of them), keeping the best
epoch's weights."""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from mtlrec.tasks import higher_is_better


COMBINED = "combined"  # the name of a weighted combination of metrics in the epoch rows (valid/combined)


def combined_score(row: dict[str, float], weights: dict[str, float], prefix: str = "valid/") -> float:
    """sum_m w_m s_m v_m over the metrics named in `weights`, s_m = +1 where higher is better
    and -1 where lower is (loss, MSE): higher is better for the combination.

    Example:
        >>> combined_score({"valid/auc/click": 0.8, "valid/logloss/like": 0.3}, {"auc/click": 1.0, "logloss/like": 2.0})
        0.2...
    """
    return sum(w * (1.0 if higher_is_better(m) else -1.0) * row[prefix + m] for m, w in weights.items())


class EarlyStopping:
    """Watches `metric` after every epoch; `stop` once it has not improved by more than
    `min_delta` for `patience` epochs (never with patience None). A NaN score never counts as
    an improvement. `metric` "combined" is higher-is-better (`combined_score`).

    Example:
        >>> from torch import nn
        >>> stopping, model = EarlyStopping("auc/click", patience=2), nn.Linear(1, 1)
        >>> for score in (0.70, 0.72, 0.71, 0.72):
        ...     stopping.update(score, model)
        >>> stopping.best, stopping.best_epoch, stopping.waited, stopping.stop
        (0.72, 2, 2, True)
        >>> strict = EarlyStopping("auc/click", patience=2, min_delta=0.015)
        >>> for score in (0.70, 0.71, 0.72, 0.723):   # 0.71 is not better by more than 0.015; 0.72 is
        ...     strict.update(score, model)
        >>> strict.best, strict.best_epoch, strict.waited
        (0.72, 3, 1)
    """

    def __init__(self, metric: str, patience: int | None, min_delta: float = 0.0):
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.sign = 1.0 if metric == COMBINED or higher_is_better(metric) else -1.0
        self.best: float | None = None
        self.best_state: dict[str, Any] | None = None
        self.best_epoch = 0  # 1-based: the epoch of `best`
        self.epochs = 0  # epochs scored
        self.waited = 0

    def update(self, score: float, model: nn.Module) -> None:
        self.epochs += 1
        if self.best is None or (not math.isnan(score) and self.sign * (score - self.best) > self.min_delta):
            self.best, self.best_state, self.waited = score, copy.deepcopy(model.state_dict()), 0
            self.best_epoch = self.epochs
        else:
            self.waited += 1

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.waited >= self.patience

    @property
    def best_is_last(self) -> bool:
        """Whether the last epoch scored was the best: a run that ends so at its epoch cap may
        still have been improving."""
        return self.epochs > 0 and self.best_epoch == self.epochs

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model`, if an epoch was scored."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_state": self.best_state, "waited": self.waited,
                "best_epoch": self.best_epoch, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_state, self.waited = state["best"], state["best_state"], state["waited"]
        self.best_epoch, self.epochs = state.get("best_epoch", 0), state.get("epochs", 0)

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
        self.sign = 1.0 if higher_is_better(metric) else -1.0
        self.best: float | None = None
        self.best_state: dict[str, Any] | None = None
        self.best_epoch = 0  # 1-based: the epoch of `best`
        self.epochs = 0  # epochs scored
        self.waited = 0

    def observe(self, row: dict[str, float], model: nn.Module) -> None:
        """`update` with this stopper's metric read from an epoch row (`valid/<metric>`)."""
        self.update(row[f"valid/{self.metric}"], model)

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


def task_metric(metric: str, task: str, validation_keys: list[str]) -> str:
    """The metric a single-task network of `task` stops on, given the configured `metric`: the
    same metric of its own task (auc/click -> auc/like), its own loss for 'loss', 'combined' or a
    metric its task kind does not have.

    Example:
        >>> keys = ["loss", "loss/click", "loss/time", "auc/click", "mse/time"]
        >>> [task_metric("auc/click", t, keys) for t in ("click", "time")]
        ['auc/click', 'loss/time']
    """
    kind = metric.split("/")[0]
    own = f"{kind}/{task}"
    return own if metric not in ("loss", COMBINED) and own in validation_keys else f"loss/{task}"


class PerTaskStopping:
    """Early stopping for the single-task baseline (`SingleTaskModels`): one `EarlyStopping` per
    network, each on its own task's metric (`task_metric`), so each network keeps its own best
    epoch, as if trained alone. Training goes on until every network has run out of patience; a
    network past its best keeps training, but its best weights are what `restore_best` keeps. The
    networks share nothing, so the extra epochs of one leave the others as they would be alone.

    Example:
        >>> from torch import nn
        >>> class Two(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.nets = nn.ModuleList([nn.Linear(1, 1), nn.Linear(1, 1)])
        >>> stopping, model = PerTaskStopping(["auc/a", "auc/b"], patience=1), Two()
        >>> for a, b in ((0.7, 0.6), (0.8, 0.5), (0.6, 0.4)):
        ...     stopping.observe({"valid/auc/a": a, "valid/auc/b": b}, model)
        >>> [s.best_epoch for s in stopping.stoppers], stopping.stop
        ([2, 1], True)
    """

    def __init__(self, metrics: list[str], patience: int | None, min_delta: float = 0.0):
        self.stoppers = [EarlyStopping(m, patience, min_delta) for m in metrics]

    def observe(self, row: dict[str, float], model: nn.Module) -> None:
        for net, stopper in zip(model.nets, self.stoppers):
            stopper.observe(row, net)

    @property
    def stop(self) -> bool:
        return all(s.stop for s in self.stoppers)

    @property
    def best_is_last(self) -> bool:
        return any(s.best_is_last for s in self.stoppers)

    def restore_best(self, model: nn.Module) -> None:
        for net, stopper in zip(model.nets, self.stoppers):
            stopper.restore_best(net)

    def state_dict(self) -> dict[str, Any]:
        return {"per_task": [s.state_dict() for s in self.stoppers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stopper, saved in zip(self.stoppers, state["per_task"]):
            stopper.load_state_dict(saved)

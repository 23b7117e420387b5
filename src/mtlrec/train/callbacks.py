"""Hooks into the training loop: what experiment tracking and hyperparameter search listen to.

A `TrainingCallback` is told, on the process that writes (rank 0), when an epoch's row is
complete (training losses, task weights, validation metrics: the row `epochs.jsonl` gets)
and when training ends. An exception raised in a hook stops training and propagates out of
`Trainer.fit` (a search prunes a trial this way); nothing is written after it.

Example:
    >>> class Recorder(TrainingCallback):
    ...     def __init__(self):
    ...         self.rows = []
    ...     def on_epoch_end(self, row):
    ...         self.rows.append(row["epoch"])
    >>> recorder = Recorder()
    >>> recorder.on_epoch_end({"epoch": 1, "train/loss": 0.5})
    >>> recorder.rows
    [1]
"""

from __future__ import annotations


class TrainingCallback:
    """Override what you need; every hook does nothing by default."""

    def on_train_begin(self, trainer) -> None:
        """Before the first step (after a resume: before the first step still to run)."""

    def on_step_end(self, step: int, losses, weights) -> None:
        """After optimizer step `step` (1-based, counted over the run): this process's
        per-task losses `[T]` and task weights `[T]` of the step, detached, on the training
        device (reading them as numbers costs a device sync: do it every few steps)."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """After an epoch's validation: its row (`epoch`, `train/...`, `weight/...`, `valid/...`)."""

    def on_train_end(self, history: list[dict[str, float]]) -> None:
        """After the last epoch, with the best epoch's weights restored; not called when
        training stopped on an exception."""


__all__ = ["TrainingCallback"]

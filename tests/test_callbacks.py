"""The training loop's hooks (mtlrec.train.callbacks): what tracking and search listen to."""

import pytest

from mtlrec.config import load_config
from mtlrec.experiment import run_experiment
from mtlrec.train.callbacks import TrainingCallback


class Recorder(TrainingCallback):
    def __init__(self, stop_after: int | None = None):
        self.events, self.steps, self.rows, self.stop_after = [], [], [], stop_after

    def on_train_begin(self, trainer):
        self.events.append("begin")

    def on_step_end(self, step, losses, weights):
        self.steps.append((step, losses.shape, weights.shape))

    def on_epoch_end(self, row):
        self.rows.append(row)
        if self.stop_after is not None and row["epoch"] == self.stop_after:
            raise KeyboardInterrupt("stop here")

    def on_train_end(self, history):
        self.events.append(("end", len(history)))


def test_hooks_see_every_step_and_the_rows_of_the_epoch_log(tiny_config):
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 2}}
    recorder = Recorder()
    result = run_experiment(load_config(raw), callbacks=[recorder])
    assert recorder.rows == result.history
    assert recorder.events == ["begin", ("end", 2)]
    steps = [s for s, _, _ in recorder.steps]
    assert steps == list(range(1, len(steps) + 1))
    assert len(steps) == 2 * -(-2400 // 128)  # 3000 rows, 80% for training, every batch a step
    assert {shape for _, shape, _ in recorder.steps} == {(2,)}


def test_an_exception_in_a_hook_stops_training_and_propagates(tiny_config):
    recorder = Recorder(stop_after=1)
    with pytest.raises(KeyboardInterrupt, match="stop here"):
        run_experiment(load_config(tiny_config), callbacks=[recorder])
    assert [r["epoch"] for r in recorder.rows] == [1]
    assert recorder.events == ["begin"]

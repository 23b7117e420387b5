"""Experiment tracking: TensorBoard event files and MLflow runs, fed by the training callbacks.

`train.tracking: [tensorboard, mlflow]` (needs `pip install 'mtlrec[track]'`; a missing
package is an ImportError saying so, raised by `start_tracking` before any training). Only
the process of rank 0 tracks. What is tracked:

- every epoch row of `epochs.jsonl`, with step = the epoch: training losses (`train/...`),
  task weights (`weight/<task>`), learning rates (`lr/<group>`), validation metrics
  (`valid/...`), the epoch's seconds;
- gate utilisation, for models with gates: `utilisation/<gate>/<expert>`, the mean weight the
  gate gave the expert over the epoch's training rows of rank 0, read from the training
  forward passes (`ModelOutput.gates`, by a forward hook: no extra pass; the weights change
  along the epoch and dropout is on). `mtlrec.analysis.utilisation` gives the same mean for
  one fixed model over any table;
- TensorBoard only: the step loss, `step/loss` (sum_k w_k L_k) and `step/loss/<task>`, every
  `train.tracking_every` optimizer steps (step = the optimizer step; each read is a device sync);
- MLflow only: params = the resolved config flattened (`train.lr`, `model.expert_hidden`,
  `features.sparse.0.name`, ...; values as JSON, strings as they are), tag `mtlrec.folder`,
  and the finished model folder as the artifact `model/`. MLflow's metric names have '.'
  for '/' (`valid.auc.click`; `mlflow_key`).

Where it goes:

- TensorBoard: `FOLDER/tensorboard` (written in `FOLDER.partial/tensorboard` while training,
  so part of the model folder once published): `tensorboard --logdir runs`.
- MLflow: `train.mlflow_uri`, else a file store `mlruns/` beside the run's folder (one store
  for the runs under `runs/`); experiment = the config's `name`, run name = the folder's name.
  MLflow 3 keeps its file store in maintenance mode and refuses it unless the environment
  sets `MLFLOW_ALLOW_FILE_STORE`; for this default store mtlrec sets it to true (unless set
  otherwise). The run's id is kept in `FOLDER/mlflow_run.json`.

Both need the run's folder (`run_experiment(..., folder)`, `mtlrec train --out`); MLflow runs
without one when `train.mlflow_uri` is given (the model folder is then not logged).

A resumed run (`--resume`) goes on in the same TensorBoard folder (the step losses logged
after the checkpoint are purged by TensorBoard's purge_step) and the same MLflow run; each logs
the epochs of the checkpoint's log it lacks (their gate utilisation is not known again). Params
the MLflow run has stay; a changed one (e.g. `train.epochs`) is recorded as the tag
`resumed.<param>`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtlrec.config import Experiment
from mtlrec.train.callbacks import TrainingCallback
from mtlrec.train.distributed import world

TENSORBOARD_FOLDER, MLFLOW_STORE, MLFLOW_RUN = "tensorboard", "mlruns", "mlflow_run.json"
INSTALL = "pip install 'mtlrec[track]'"


def flatten_config(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists of dicts -> `{"a.b": value}`, values as JSON (strings as they are;
    an empty dict or list is a value too).

    Example:
        >>> flatten_config({"train": {"lr": 0.01, "tracking": ["mlflow"]}, "features": {"dense": [{"name": "age"}]},
        ...                 "models": {}})
        {'train.lr': '0.01', 'train.tracking': '["mlflow"]', 'features.dense.0.name': 'age', 'models': '{}'}
    """
    if tree and (isinstance(tree, dict) or (isinstance(tree, list) and all(isinstance(x, dict) for x in tree))):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out: dict[str, str] = {}
        for key, value in items:
            out |= flatten_config(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: tree if isinstance(tree, str) else json.dumps(tree)}


def mlflow_key(key: str) -> str:
    """An epoch row's key as an MLflow metric name: '.' for '/' (MLflow's file store keeps a
    metric per file, named by its key: `train/loss` could not be a file and `train/loss/y1`'s
    folder at once).

    Example:
        >>> mlflow_key("valid/auc/click")
        'valid.auc.click'
    """
    return key.replace("/", ".")


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch row but the epoch itself."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class GateUtilisation:
    """Sums each gate's weights `[B, experts]` over the training forward passes of `model`
    (a forward hook; the passes of evaluation, in eval mode, are left out); `epoch_means()`
    gives the means per expert and starts the next epoch's sums."""

    def __init__(self, model: nn.Module, gate_experts: dict[str, list[str]]):
        self.gate_experts = gate_experts
        self.sums: dict[str, Tensor] = {}
        self.rows = 0
        self.handle = model.register_forward_hook(self._add)

    def _add(self, module: nn.Module, inputs: Any, output: Any) -> None:
        gates = getattr(output, "gates", None)
        if not module.training or not gates:
            return
        for name, weights in gates.items():
            total = weights.detach().float().sum(0)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.rows += len(next(iter(gates.values())))

    def epoch_means(self) -> dict[str, float]:
        """`utilisation/<gate>/<expert>` -> mean weight over the rows since the last call (the
        expert named within the gate's level: `utilisation/level1/click/shared/0`)."""
        out: dict[str, float] = {}
        for gate, total in self.sums.items():
            level = gate.rpartition("/")[0] + "/"
            experts = [e.removeprefix(level) for e in self.gate_experts.get(gate, [])] or range(len(total))
            out |= {f"utilisation/{gate}/{e}": v for e, v in zip(experts, (total / self.rows).tolist())}
        self.sums, self.rows = {}, 0
        return out

    def remove(self) -> None:
        self.handle.remove()


class Tracker(TrainingCallback):
    """What every tracker shares: the epoch rows (and gate utilisation) to `log_epoch`, the
    epochs of a resumed run it has not logged yet, and the end of the run."""

    def __init__(self) -> None:
        self.gates: GateUtilisation | None = None

    def on_train_begin(self, trainer) -> None:
        base = getattr(trainer.plain_model, "backbone", None)
        self.gates = GateUtilisation(trainer.model, getattr(base, "gate_experts", {}))
        for row in trainer.history[self.logged_epochs():]:  # a resumed run: the epochs trained before
            self.log_epoch(row["epoch"], epoch_scalars(row))

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.log_epoch(row["epoch"], epoch_scalars(row) | (self.gates.epoch_means() if self.gates else {}))

    def on_train_end(self, history: list[dict[str, float]]) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self.gates is not None:
            self.gates.remove()
            self.gates = None

    def logged_epochs(self) -> int:
        """How many of a resumed run's epochs are logged already (0: log them all again)."""
        return 0

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, folder: Path | None) -> None:
        """After the model folder is published (`folder`; None without one)."""

    def fail(self) -> None:
        """Training ended on an exception."""
        self._remove_hook()


class TensorBoardTracker(Tracker):
    """Event files in `log_dir` (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, log_dir: Path, every: int):
        super().__init__()
        self.log_dir, self.every = log_dir, every
        self.writer = None
        self.tasks: list[str] = []

    def on_train_begin(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tasks = list(trainer.tasks.names)
        # a resumed run: events after the checkpoint's step are dropped (TensorBoard's purge_step)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.global_step + 1 if trainer.global_step else None)
        super().on_train_begin(trainer)

    def on_step_end(self, step: int, losses: Tensor, weights: Tensor) -> None:
        if step % self.every:
            return
        values = torch.cat([(weights * losses).sum().reshape(1), losses]).tolist()  # one device sync
        for tag, value in zip(["step/loss", *(f"step/loss/{t}" for t in self.tasks)], values):
            self.writer.add_scalar(tag, value, step)

    def logged_epochs(self) -> int:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(self.log_dir), size_guidance={"scalars": 0}).Reload()  # 0: every event
        return len(events.Scalars("train/loss")) if "train/loss" in events.Tags()["scalars"] else 0

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def on_train_end(self, history: list[dict[str, float]]) -> None:
        super().on_train_end(history)
        self._close()

    def fail(self) -> None:
        super().fail()
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowTracker(Tracker):
    """One MLflow run (through `mlflow.tracking.MlflowClient`, no global MLflow state): params
    at creation, metrics per epoch, the model folder as an artifact at `finish`."""

    def __init__(self, config: Experiment, uri: str, folder: Path | None, work: Path | None, resume: bool):
        super().__init__()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(config.name)
        except MlflowException as err:
            store = f"train.mlflow_uri {uri!r}" if config.train.mlflow_uri else f"the default MLflow store {uri}"
            raise ValueError(f"{store}: MLflow cannot open it ({err.message})") from None
        params = flatten_config(config.to_dict())
        saved = work / MLFLOW_RUN if work is not None else None
        earlier = json.loads(saved.read_text()) if resume and saved is not None and saved.is_file() else None
        if earlier is not None and earlier["tracking_uri"] == uri:  # go on with the interrupted run
            self.run_id = earlier["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
            self._log(params={k: v for k, v in params.items() if k not in logged},
                      tags={f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
            return
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.name)
        tags = {"mtlrec.folder": str(folder)} if folder is not None else {}
        run = self.client.create_run(experiment_id, run_name=folder.name if folder is not None else None, tags=tags)
        self.run_id = run.info.run_id
        self._log(params=params)
        if saved is not None:
            saved.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))

    def _log(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None,
             tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        entries = ([Metric(k, v, now, step) for k, v in (metrics or {}).items()],
                   [Param(k, v) for k, v in (params or {}).items()], [RunTag(k, v) for k, v in (tags or {}).items()])
        per_call = 100  # MLflow's limit on params (and tags) per log_batch
        for start in range(0, max(map(len, entries), default=0), per_call):
            m, p, t = (e[start:start + per_call] for e in entries)
            self.client.log_batch(self.run_id, metrics=m, params=p, tags=t)

    def logged_epochs(self) -> int:
        return len(self.client.get_metric_history(self.run_id, mlflow_key("train/loss")))

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self._log(metrics={mlflow_key(k): v for k, v in values.items()}, step=epoch)

    def finish(self, folder: Path | None) -> None:
        if folder is not None:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path="model")
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        super().fail()
        self.client.set_terminated(self.run_id, status="FAILED")


@dataclass
class Tracking:
    """The trackers of one run (none on ranks other than 0): `callbacks` for the Trainer,
    `finish` once the model folder is published, `ending_failed` around training."""

    trackers: list[Tracker] = field(default_factory=list)

    @property
    def callbacks(self) -> list[TrainingCallback]:
        return list(self.trackers)

    def finish(self, folder: Path | None) -> None:
        for tracker in self.trackers:
            tracker.finish(folder)

    @contextmanager
    def ending_failed(self) -> Iterator[None]:
        """Close the trackers (MLflow: the run marked FAILED) when the body raises."""
        try:
            yield
        except BaseException:
            for tracker in self.trackers:
                tracker.fail()
            raise


def start_tracking(config: Experiment, folder: Path | None, work: Path | None, resume: bool = False) -> Tracking:
    """The trackers `config.train.tracking` names, for the run that publishes `folder` and
    works in `work` (its `.partial` sibling). Checks before training, on every process, that
    the packages are installed and the run has the folder its trackers write."""
    train = config.train
    missing = [name for name, module in (("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow.tracking"))
               if name in train.tracking and not _importable(module)]
    if missing:
        raise ImportError(f"train.tracking {missing} needs {' and '.join(missing)}: {INSTALL}")
    if train.tracking and work is None and ("tensorboard" in train.tracking or train.mlflow_uri is None):
        raise ValueError(f"train.tracking {train.tracking} writes under the run's folder: give run_experiment a "
                         "folder (mtlrec train --out)" + (", or set train.mlflow_uri" if "mlflow" in train.tracking
                                                          and "tensorboard" not in train.tracking else ""))
    if world()[0] != 0:
        return Tracking()
    trackers: list[Tracker] = []
    if "tensorboard" in train.tracking:
        trackers.append(TensorBoardTracker(work / TENSORBOARD_FOLDER, train.tracking_every))
    if "mlflow" in train.tracking:
        uri = train.mlflow_uri
        if uri is None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to its file store
            uri = (folder.parent / MLFLOW_STORE).resolve().as_uri()
        trackers.append(MlflowTracker(config, uri, folder, work, resume))
    return Tracking(trackers)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


__all__ = ["GateUtilisation", "MlflowTracker", "TensorBoardTracker", "Tracker", "Tracking", "epoch_scalars",
           "flatten_config", "mlflow_key", "start_tracking"]

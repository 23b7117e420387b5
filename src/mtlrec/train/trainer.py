"""Joint training: every step minimises the weighted sum of all tasks' masked losses."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtlrec.config import TrainConfig
from mtlrec.data.streaming import ParquetStream
from mtlrec.data.tensors import TensorData
from mtlrec.losses import create_weighting, task_losses
from mtlrec.models.base import shared_parameters
from mtlrec.schema import Schema
from mtlrec.train.metrics import higher_is_better, task_metrics
from mtlrec.train.optim import build_optimizers, task_schedule

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return device


class Trainer:
    """Trains `model` on encoded data and reports per-task metrics on whole splits.

    Joint strategy: each step backpropagates the weighting of all task losses. Alternating:
    each step backpropagates one task's loss (round robin, or drawn by ratio), and the
    parameters other tasks own (their towers and gates) get no gradient, hence no update.

    Each epoch shuffles the training rows with a generator seeded from `seed`, so two runs
    with one seed see the same batches; validation runs after every epoch, and the best
    epoch's weights (by `config.early_stopping.metric`) are kept.
    """

    def __init__(self, model: nn.Module, schema: Schema, config: TrainConfig, seed: int = 0,
                 log_path: str | Path | None = None):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.schema = schema
        self.config = config
        self.seed = seed
        self.weighting = create_weighting(config.weighting, schema).to(self.device)
        self.eval_weights = torch.tensor([t.weight for t in schema.tasks], device=self.device)
        self.optimizers = build_optimizers({"": self.model, "weighting": self.weighting}, config)
        self.shared = shared_parameters(self.model, schema.num_tasks)
        self.task_params = [self.model.task_parameters(k) for k in range(schema.num_tasks)]
        self.schedule = task_schedule(config.alternating.order, schema.num_tasks, config.alternating.ratios, seed)
        self.binary = torch.tensor([t.type == "binary" for t in schema.tasks], device=self.device)
        self.log_path = Path(log_path) if log_path else None
        self.has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.history: list[dict[str, float]] = []

    def fit(self, train: TensorData | ParquetStream, valid: TensorData | ParquetStream | None = None
            ) -> list[dict[str, float]]:
        """Train for `config.epochs` (or until early stopping); returns one metrics row per epoch.

        In-memory data moves to the device once; a stream's batches move one by one."""
        cfg = self.config
        if isinstance(train, TensorData):
            train = train.to(self.device)
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: one batch order on every device
        stop = cfg.early_stopping
        monitor, best, best_state, waited = f"valid/{stop.metric}", None, None, 0
        sign = 1.0 if higher_is_better(stop.metric) else -1.0
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            row = {"epoch": epoch, **self._train_epoch(train, generator, epoch)}
            row["seconds"] = time.perf_counter() - start
            if valid is not None:
                row |= {f"valid/{k}": v for k, v in self.evaluate(valid).items()}
            self._log(row)
            if valid is None:
                continue
            score = row[monitor]
            if best is None or (not math.isnan(score) and sign * (score - best) > 0):
                best, best_state, waited = score, copy.deepcopy(self.model.state_dict()), 0
            else:
                waited += 1
                if stop.patience is not None and waited >= stop.patience:
                    break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return self.history

    def _train_epoch(self, train: TensorData, generator: torch.Generator, epoch: int) -> dict[str, float]:
        self.model.train()
        bs, t = self.config.batch_size, self.schema.num_tasks
        total = torch.zeros((), device=self.device)
        task_totals = torch.zeros(t, device=self.device)
        weights = torch.ones(t, device=self.device)
        steps = 0
        bar = tqdm(total=train.num_batches(bs), desc=f"epoch {epoch}", disable=None if self.config.progress else True,
                   leave=False, dynamic_ncols=True)
        refresh = max(1, train.num_batches(bs) // 50)  # a host sync for the shown loss ~50 times an epoch
        for batch in train.batches(bs, generator):
            if self.has_batch_norm and len(batch) == 1:
                continue  # batch norm cannot train on one row
            batch = batch.to(self.device)
            out = self.model(batch.sparse, batch.dense)
            losses = task_losses(out.logits, batch.labels, batch.mask, self.binary)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            if self.config.strategy == "alternating":
                weights = self._alternating_backward(losses, out.penalty)
            else:
                weights = self.weighting.backward(losses, self.shared, out.penalty)
            for opt in self.optimizers:
                opt.step()
            self.weighting.after_step()
            total += (weights * losses.detach()).sum()
            task_totals += losses.detach()
            steps += 1
            bar.update()
            if steps % refresh == 0:
                bar.set_postfix(loss=f"{total.item() / steps:.4f}")
        bar.close()
        mean_losses = task_totals / max(steps, 1)
        self.weighting.end_epoch(mean_losses)
        row = {"train/loss": total.item() / max(steps, 1)}
        row |= {f"train/loss/{n}": v for n, v in zip(self.schema.task_names, mean_losses.tolist())}
        row |= {f"weight/{n}": v for n, v in zip(self.schema.task_names, weights.tolist())}
        return row

    def _alternating_backward(self, losses: Tensor, penalty: Tensor | None) -> Tensor:
        """One task's (config-weighted) loss; the other tasks' own parameters get no update."""
        task = next(self.schedule)
        loss = self.eval_weights[task] * losses[task]
        (loss if penalty is None else loss + penalty).backward()
        for k, params in enumerate(self.task_params):
            if k != task:
                for p in params:
                    p.grad = None  # optimizers skip parameters without a gradient
        return torch.nn.functional.one_hot(torch.tensor(task), len(losses)).to(losses) * self.eval_weights

    @torch.no_grad()
    def predict_split(self, data: TensorData | ParquetStream) -> tuple[Tensor, TensorData]:
        """Logits `[N, T]` for every row, in order, and the rows' labels and masks."""
        self.model.eval()
        if isinstance(data, TensorData):
            data = data.to(self.device)
        logits, labels, masks = [], [], []
        for batch in data.batches(4 * self.config.batch_size):
            batch = batch.to(self.device)
            logits.append(self.model(batch.sparse, batch.dense).logits)
            labels.append(batch.labels)
            masks.append(batch.mask)
        empty = torch.zeros(0, 0)
        return torch.cat(logits), TensorData(empty, empty, torch.cat(labels), torch.cat(masks))

    def evaluate(self, data: TensorData | ParquetStream) -> dict[str, float]:
        """Weighted loss, per-task losses and metrics over the whole split."""
        logits, targets = self.predict_split(data)
        return evaluate_logits(self.schema, logits, targets, self.eval_weights)

    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if self.config.progress:
            shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            tqdm.write(shown)
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def evaluate_logits(schema: Schema, logits: Tensor, data: TensorData, weights: Tensor) -> dict[str, float]:
    binary = torch.tensor([t.type == "binary" for t in schema.tasks], device=logits.device)
    losses = task_losses(logits, data.labels, data.mask, binary)
    out = {"loss": float((weights * losses).sum())}
    out |= {f"loss/{name}": float(v) for name, v in zip(schema.task_names, losses)}
    predictions = torch.where(binary, torch.sigmoid(logits), logits)
    out |= task_metrics(schema, *(t.cpu().numpy() for t in (predictions, data.labels, data.mask)))
    return out


def constant_baseline(schema: Schema, train: TensorData, data: TensorData) -> dict[str, float]:
    """Metrics of predicting each task's training mean for every row (what a model must beat)."""
    mean = (train.labels * train.mask).sum(0) / train.mask.sum(0).clamp(min=1)
    binary = torch.tensor([t.type == "binary" for t in schema.tasks])
    p = mean.clamp(1e-6, 1 - 1e-6)
    logits = torch.where(binary, torch.log(p / (1 - p)), mean).expand(len(data), -1)
    weights = torch.tensor([t.weight for t in schema.tasks])
    return evaluate_logits(schema, logits, data.to("cpu"), weights)


__all__ = ["Trainer", "constant_baseline", "evaluate_logits", "resolve_device"]

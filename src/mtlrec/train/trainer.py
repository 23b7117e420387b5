"""The training loop: joint or alternating steps, whole-split evaluation, early stopping,
checkpoints that resume exactly, a stop on non-finite losses, and data parallel training."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtlrec.config import TrainConfig
from mtlrec.data.streaming import ParquetStream
from mtlrec.data.tensors import TensorData
from mtlrec.losses import binary_mask, create_weighting, task_losses, task_weights
from mtlrec.models.base import shared_parameters, to_predictions
from mtlrec.schema import Schema
from mtlrec.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mtlrec.train.metrics import higher_is_better, task_metrics
from mtlrec.train.optim import TaskSchedule, build_optimizers


class NonFiniteLoss(RuntimeError):
    """A task's loss became NaN or infinite; the message names the task and the step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return device


def world() -> tuple[int, int]:
    """(rank, world size) of a torch.distributed run, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains `model` on encoded data and reports per-task metrics on whole splits.

    Joint strategy: each step backpropagates the weighting of all task losses. Alternating:
    each step backpropagates one task's loss (round robin, or drawn by ratio), and the
    parameters other tasks own (their towers and gates) get no gradient, hence no update.

    Each epoch shuffles the training rows with a generator seeded from `seed`, so two runs
    with one seed see the same batches; validation runs after every epoch, and the best
    epoch's weights (by `config.early_stopping.metric`) are kept.

    With `checkpoint_dir` and `config.checkpoint_every`, a checkpoint is written every that
    many steps and at each epoch's end; `fit(..., resume=True)` continues from it and ends
    with the weights an uninterrupted run would have. A non-finite task loss raises
    `NonFiniteLoss` and leaves the last checkpoint written before it untouched.

    Under torch.distributed (torchrun), every rank takes its slice of each global batch of
    `config.batch_size` rows (a stream: its share of the files), gradients are averaged over
    the ranks, metrics are computed on the gathered predictions of the whole split, and rank 0
    alone writes logs and checkpoints.
    """

    def __init__(self, model: nn.Module, schema: Schema, config: TrainConfig, seed: int = 0,
                 log_path: str | Path | None = None, checkpoint_dir: str | Path | None = None):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.rank, self.world = world()
        if config.batch_size % self.world:
            raise ValueError(f"train.batch_size {config.batch_size} must divide by the {self.world} processes")
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.schema = schema
        self.config = config
        self.seed = seed
        self.weighting = create_weighting(config.weighting, schema).to(self.device)
        self.eval_weights = task_weights(schema, self.device)
        self.optimizers = build_optimizers({"": self.model, "weighting": self.weighting}, config)
        self.shared = shared_parameters(self.model, schema.num_tasks)
        self.task_params = [self.model.task_parameters(k) for k in range(schema.num_tasks)]
        self.schedule = TaskSchedule(config.alternating.order, schema.num_tasks, config.alternating.ratios, seed)
        self.binary = binary_mask(schema, self.device)
        self.log_path = Path(log_path) if log_path and self.rank == 0 else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.history: list[dict[str, float]] = []
        self.global_step = 0
        self.last_checkpoint: int | None = None
        self._first_bad = torch.full((schema.num_tasks,), -1, dtype=torch.long, device=self.device)
        self._stop = {"best": None, "best_state": None, "waited": 0}

    # ---------------------------------------------------------------- training
    def fit(self, train: TensorData | ParquetStream, valid: TensorData | ParquetStream | None = None,
            resume: bool = False) -> list[dict[str, float]]:
        """Train for `config.epochs` (or until early stopping); returns one metrics row per epoch.

        In-memory data moves to the device once; a stream's batches move one by one."""
        cfg = self.config
        if isinstance(train, TensorData):
            train = train.to(self.device)
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: one batch order on every device
        first_epoch, skip, partial = 1, 0, None
        if resume:
            first_epoch, skip, partial = self._restore(generator)
        stop = cfg.early_stopping
        sign = 1.0 if higher_is_better(stop.metric) else -1.0
        for epoch in range(first_epoch, cfg.epochs + 1):
            if self._finished():
                break
            start = time.perf_counter()
            row = {"epoch": epoch, **self._train_epoch(train, generator, epoch, skip, partial)}
            skip, partial = 0, None
            row["seconds"] = time.perf_counter() - start
            if valid is not None:
                row |= {f"valid/{k}": v for k, v in self.evaluate(valid).items()}
            self._log(row)
            if valid is not None:
                score, best = row[f"valid/{stop.metric}"], self._stop["best"]
                if best is None or (not math.isnan(score) and sign * (score - best) > 0):
                    self._stop.update(best=score, best_state=copy.deepcopy(self.model.state_dict()), waited=0)
                else:
                    self._stop["waited"] += 1
            self._checkpoint(generator.get_state(), epoch + 1, 0, None)
        if self._stop["best_state"] is not None:
            self.model.load_state_dict(self._stop["best_state"])
        return self.history

    def _finished(self) -> bool:
        patience = self.config.early_stopping.patience
        return patience is not None and self._stop["waited"] >= patience

    def _train_epoch(self, train, generator: torch.Generator, epoch: int, skip: int, partial) -> dict[str, float]:
        self.model.train()
        bs, t = self.config.batch_size, self.schema.num_tasks
        epoch_start = generator.get_state()
        sums = partial or {"total": torch.zeros((), device=self.device), "tasks": torch.zeros(t, device=self.device),
                           "steps": 0, "weights": torch.ones(t, device=self.device)}
        n_batches = train.num_batches(bs // self.world if isinstance(train, ParquetStream) else bs)
        bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=None if self.config.progress and self.rank == 0 else True)
        refresh = max(1, n_batches // 50)  # a host sync for the shown loss ~50 times an epoch
        check_every = 1 if self.device.type == "cpu" else refresh
        every = self.config.checkpoint_every
        for index, batch in enumerate(self._batches(train, generator)):
            if index < skip:
                continue  # resuming: these batches were trained on before the checkpoint
            if not (self.has_batch_norm and len(batch) == 1):  # batch norm cannot train on one row
                weights, losses = self._step(batch.to(self.device))
                sums["total"] += (weights * losses).sum()
                sums["tasks"] += losses
                sums["weights"] = weights
                sums["steps"] += 1
            bar.update()
            done = index + 1
            if self.global_step % check_every == 0:
                self._check_finite(epoch)
            if sums["steps"] and done % refresh == 0:
                bar.set_postfix(loss=f"{sums['total'].item() / sums['steps']:.4f}")
            if every and self.global_step % every == 0 and done < n_batches:
                self._checkpoint(epoch_start, epoch, done, sums)
        bar.close()
        self._check_finite(epoch)
        steps = self._all_mean(torch.tensor(float(max(sums["steps"], 1)), device=self.device)) * self.world
        mean_losses = self._all_mean(sums["tasks"]) * self.world / steps
        self.weighting.end_epoch(mean_losses)
        row = {"train/loss": (self._all_mean(sums["total"]) * self.world / steps).item()}
        row |= {f"train/loss/{n}": v for n, v in zip(self.schema.task_names, mean_losses.tolist())}
        row |= {f"weight/{n}": v for n, v in zip(self.schema.task_names, sums["weights"].tolist())}
        return row

    def _batches(self, train, generator):
        """This process's batches: a stream is already sharded by file; in-memory data gives
        every rank its slice of each global batch (so N ranks train as one process would)."""
        if isinstance(train, ParquetStream):
            yield from train.batches(self.config.batch_size // self.world, generator)
            return
        for batch in train.batches(self.config.batch_size, generator):
            share = -(-len(batch) // self.world)
            yield batch.rows(self.rank * share, (self.rank + 1) * share)

    def _forward(self, batch: TensorData):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            out = self.forward(batch.sparse, batch.dense)
        return out._replace(logits=out.logits.float())

    def _step(self, batch: TensorData) -> tuple[Tensor, Tensor]:
        out = self._forward(batch)
        losses = task_losses(out.logits, batch.labels, batch.mask, self.binary)
        nonfinite = ~torch.isfinite(losses.detach())
        self._first_bad = torch.where(nonfinite & (self._first_bad < 0), self.global_step, self._first_bad)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.config.strategy == "alternating":
            weights = self._alternating_backward(losses, out.penalty)
        else:
            weights = self.weighting.backward(losses, self.shared, out.penalty)
        if self.world > 1:
            self._average_gradients()
        for opt in self.optimizers:
            opt.step()
        self.weighting.after_step()
        self.global_step += 1
        return weights.detach(), losses.detach()

    def _alternating_backward(self, losses: Tensor, penalty: Tensor | None) -> Tensor:
        """One task's (config-weighted) loss; the other tasks' own parameters get no update."""
        task = self.schedule.task(self.global_step)
        loss = self.eval_weights[task] * losses[task]
        (loss if penalty is None else loss + penalty).backward()
        for k, params in enumerate(self.task_params):
            if k != task:
                for p in params:
                    p.grad = None  # optimizers skip parameters without a gradient
        return torch.nn.functional.one_hot(torch.tensor(task), len(losses)).to(losses) * self.eval_weights

    def _average_gradients(self) -> None:
        params = [p for p in list(self.model.parameters()) + list(self.weighting.parameters())]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is not None:
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def _all_mean(self, value: Tensor) -> Tensor:
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world

    def _check_finite(self, epoch: int) -> None:
        bad = self._first_bad.clone()
        if self.world > 1:  # the smallest bad step on any rank; -1 (none) counted as "infinity"
            big = torch.iinfo(torch.long).max
            bad = torch.where(bad < 0, big, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == big, -1, bad)
        if (bad < 0).all():
            return
        k = int(torch.where(bad < 0, torch.iinfo(torch.long).max, bad).argmin())
        kept = (f"the last good checkpoint, of step {self.last_checkpoint}, is {self.checkpoint_dir}"
                if self.last_checkpoint is not None else "no checkpoint was written (set train.checkpoint_every)")
        raise NonFiniteLoss(f"task {self.schema.task_names[k]!r}: non-finite loss at step {int(bad[k])} "
                            f"(epoch {epoch}); training stopped; {kept}")

    # ------------------------------------------------------------- checkpoints
    def _checkpoint(self, generator_state: Tensor, epoch: int, step_in_epoch: int, sums) -> None:
        if not (self.checkpoint_dir and self.config.checkpoint_every):
            return
        self._check_finite(epoch)  # never write a checkpoint after a bad step
        if self.rank == 0:
            save_checkpoint(self.checkpoint_dir, {
                "model": self.model.state_dict(), "weighting": self.weighting.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "global_step": self.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "generator": generator_state, "rng": rng_state(), "history": self.history,
                "stop": self._stop, "partial": sums,
            })
        if self.world > 1:
            dist.barrier()
        self.last_checkpoint = self.global_step

    def _restore(self, generator: torch.Generator):
        state = load_checkpoint(self.checkpoint_dir)
        self.model.load_state_dict(state["model"])
        self.weighting.load_state_dict(state["weighting"])
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        self.global_step = self.last_checkpoint = state["global_step"]
        self.history = state["history"]
        self._stop = state["stop"]
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        if self.log_path:  # the log as of the checkpoint; later lines belonged to the lost run
            self.log_path.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        partial = state["partial"]
        if partial is not None:
            partial = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in partial.items()}
        return state["epoch"], state["step_in_epoch"], partial

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_split(self, data: TensorData | ParquetStream) -> tuple[Tensor, TensorData]:
        """Logits `[N, T]` for every row of the split, with the rows' labels and masks. Under
        torch.distributed each rank predicts its share and all ranks receive the whole split."""
        self.model.eval()
        if isinstance(data, TensorData):
            share = -(-len(data) // self.world)
            data = data.rows(self.rank * share, (self.rank + 1) * share).to(self.device)
        logits, labels, masks = [], [], []
        for batch in data.batches(4 * self.config.batch_size):
            batch = batch.to(self.device)
            logits.append(self._forward(batch).logits)
            labels.append(batch.labels)
            masks.append(batch.mask)
        parts = [torch.cat(x) if x else torch.zeros(0, self.schema.num_tasks, device=self.device)
                 for x in (logits, labels, masks)]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, [p.cpu() for p in parts])
            parts = [torch.cat([g[i] for g in gathered]).to(self.device) for i in range(3)]
        empty = torch.zeros(0, 0)
        return parts[0], TensorData(empty, empty, parts[1], parts[2].bool())

    def evaluate(self, data: TensorData | ParquetStream) -> dict[str, float]:
        """Weighted loss, per-task losses and metrics over the whole split."""
        logits, targets = self.predict_split(data)
        return evaluate_logits(self.schema, logits, targets)

    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if self.config.progress and self.rank == 0:  # the headline numbers; epochs.jsonl has them all
            keys = ["train/loss", "valid/loss"] + [k for k in row if k.startswith(("valid/auc/", "valid/mse/"))]
            shown = "  ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
            tqdm.write(f"epoch {row['epoch']}  {shown}  ({row['seconds']:.1f} s)")
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def evaluate_logits(schema: Schema, logits: Tensor, data: TensorData) -> dict[str, float]:
    """The config-weighted loss, each task's loss and its metrics, from a split's logits `[N, T]`."""
    binary = binary_mask(schema, logits.device)
    losses = task_losses(logits, data.labels, data.mask, binary)
    out = {"loss": float((task_weights(schema, logits.device) * losses).sum())}
    out |= {f"loss/{name}": float(v) for name, v in zip(schema.task_names, losses)}
    predictions = to_predictions(logits, binary)
    out |= task_metrics(schema, *(t.cpu().numpy() for t in (predictions, data.labels, data.mask)))
    return out


def constant_baseline(schema: Schema, train: TensorData, data: TensorData) -> dict[str, float]:
    """Metrics of predicting each task's training mean for every row (what a model must beat)."""
    mean = (train.labels * train.mask).sum(0) / train.mask.sum(0).clamp(min=1)
    p = mean.clamp(1e-6, 1 - 1e-6)
    logits = torch.where(binary_mask(schema), torch.log(p / (1 - p)), mean).expand(len(data), -1)
    return evaluate_logits(schema, logits, data.to("cpu"))


__all__ = ["NonFiniteLoss", "Trainer", "constant_baseline", "evaluate_logits", "resolve_device", "world"]

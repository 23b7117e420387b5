"""The training loop: joint or alternating steps, whole-split evaluation, early stopping,
checkpoints that resume exactly, a stop on non-finite losses, and data parallel training."""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtlrec.config import TrainConfig
from mtlrec.data.features import Features
from mtlrec.data.source import BatchSource, Shard
from mtlrec.data.tensors import TensorData
from mtlrec.losses import create_weighting
from mtlrec.losses.weighting import WEIGHTINGS, split_spec
from mtlrec.models.base import SingleTaskModels, shared_parameters
from mtlrec.nn.stepped import stepped_modules
from mtlrec.schema import Schema
from mtlrec.tasks import TaskSet
from mtlrec.train import distributed
from mtlrec.train.alternating import TaskSchedule
from mtlrec.train.callbacks import TrainingCallback
from mtlrec.train.checkpoint import check_resumable, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mtlrec.train.early_stopping import COMBINED, EarlyStopping, PerTaskStopping, combined_score, task_metric
from mtlrec.train.evaluation import evaluate_logits, validation_keys
from mtlrec.train.gradients import SharedParameters
from mtlrec.train.graphs import GraphedCall, capture_blockers, matmul_precision
from mtlrec.train.optim import build_optimizers
from mtlrec.train.precision import resolve_precision
from mtlrec.train.schedules import LearningRates, group_schedules
from mtlrec.train.sharding import is_fused_table

if TYPE_CHECKING:
    from mtlrec.config import RankConfig
    from mtlrec.train.sharding import TorchRecTables


class NonFiniteLoss(RuntimeError):
    """A task's loss became NaN or infinite; the message names the task and the step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device {name!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device {name!r} asked for, but CUDA is not available (use cpu or auto)")
    return device


@dataclass
class EpochTotals:
    """Running sums over this process's steps of an epoch (on the training device)."""

    total: Tensor  # sum over steps of the weighted loss
    tasks: Tensor  # [T] sum over steps of each task's loss
    weights: Tensor  # [T] the last step's task weights
    steps: int = 0

    @classmethod
    def zeros(cls, num_tasks: int, device: torch.device) -> EpochTotals:
        return cls(torch.zeros((), device=device), torch.zeros(num_tasks, device=device),
                   torch.ones(num_tasks, device=device))

    def add(self, weights: Tensor, losses: Tensor) -> None:
        self.total += (weights * losses).sum()
        self.tasks += losses
        self.weights = weights
        self.steps += 1

    def state_dict(self) -> dict:
        return {"total": self.total, "tasks": self.tasks, "weights": self.weights, "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochTotals:
        return cls(state["total"].to(device), state["tasks"].to(device), state["weights"].to(device), state["steps"])


class Trainer:
    """Trains `model` on encoded data and reports per-task metrics on whole splits.

    Joint strategy: each step backpropagates the weighting of all task losses. Alternating:
    each step backpropagates one task's loss (round robin, or drawn by ratio), and the
    parameters other tasks own (their towers and gates) get no gradient, hence no update.

    Each epoch shuffles the training rows with a generator seeded from `seed`, so two runs
    with one seed see the same batches; validation runs after every epoch, and the best
    epoch's weights (by `config.early_stopping.metric`) are kept. Learning rates follow
    `config.schedule` and the groups' schedules (`mtlrec.train.schedules`; `lr/<group>` in each
    epoch row); `config.clip_grad_norm` clips the gradient the optimizers step with.

    With `checkpoint_dir` and `config.checkpoint_every`, a checkpoint is written every that
    many steps and at each epoch's end; `fit(..., resume=True)` continues from it and ends
    with the weights an uninterrupted run would have. A non-finite task loss raises
    `NonFiniteLoss` and leaves the last checkpoint written before it untouched.

    On CUDA, `config.cuda_graph` records the step as a CUDA graph (`mtlrec.train.graphs`): the
    training rows stay on the GPU, each batch is gathered there inside the graph, and the host
    reads the losses (non-finite check, progress) only every ~2 % of an epoch.

    Under torch.distributed (torchrun), every process reads its shard of the data
    (`mtlrec.data.source`), gradients are averaged over the processes, metrics are computed
    on the gathered predictions of the whole split, and rank 0 alone writes logs and checkpoints.
    """

    def __init__(self, model: nn.Module, schema: Schema, config: TrainConfig, seed: int = 0,
                 log_path: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                 run_config: dict | None = None, callbacks: Sequence[TrainingCallback] = (),
                 ranking: RankConfig | None = None):
        self.rank, self.world = distributed.world()
        self.ranking = ranking  # with ranking.group_by: GAUC and NDCG@k join the validation metrics
        self.callbacks = list(callbacks) if self.rank == 0 else []  # the process that writes tells them
        if config.batch_size % self.world:
            raise ValueError(f"train.batch_size {config.batch_size} must divide by the {self.world} processes")
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)  # auto: bf16 only where native
        if config.tf32 and self.device.type != "cuda":
            warnings.warn(f"train.tf32 applies to CUDA matrix products; this run's device is {self.device}",
                          RuntimeWarning, stacklevel=2)
        self.config = config
        self.plain_model = model.to(self.device)  # what fit leaves trained (the model folder's layout)
        # gradient methods take several gradient passes over one graph, which DistributedDataParallel's
        # reducer does not allow: with sharded tables the dense gradients are then averaged by hand
        self.dense_by_hand = WEIGHTINGS[split_spec(config.weighting)[0]].needs_task_gradients
        self.model, self.tables = self._with_tables(self.plain_model, schema)
        self.sharded = config.embedding_sharding != "none"
        # data parallel without TorchRec: the model under DistributedDataParallel, whose all-reduce
        # overlaps backward (not for gradient methods: several gradient passes per step, see dense_by_hand)
        self.ddp = self.world > 1 and self.tables is None and not self.dense_by_hand
        trained = self.model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(  # batch norm statistics stay per process, as before
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)  # top-k experts a batch leaves idle
        self.forward = torch.compile(trained) if config.compile else trained
        self.tasks = TaskSet(schema).to(self.device)
        self.seed = seed
        self.weighting = create_weighting(config.weighting, self.tasks).to(self.device)
        self.stepped = stepped_modules(self.model)  # state moved after each step, not by gradients
        self.graphed = self._graph_decision(schema)  # the step recorded as a CUDA graph
        fused = {id(p) for name, p in self.model.named_parameters() if is_fused_table(name)}  # none: plain tables
        dense_config = config
        if self.tables:  # an 'embedding' group sets the fused tables' optimizer; the rest of the embedding: 'rest'
            dense_config = config.model_copy(update={"optimizers": [g for g in config.optimizers
                                                                    if g.params != "embedding"]})
        self.optimizers = build_optimizers({"": self.model, "weighting": self.weighting}, dense_config,
                                           skip=is_fused_table if self.tables else None,  # tables update themselves
                                           capturable=self.graphed)
        self.lr_groups = group_schedules(dense_config)  # one per optimizer; `fit` makes the LearningRates
        self.learning_rates: LearningRates | None = None
        self.clipped = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        # gradient methods and alternating steps act on the parameters the torch optimizers update:
        # TorchRec's fused tables (their gradient never materialised) are left out; the tables take
        # the plain weighted sum of the task gradients
        base = self.model.module if self.sharded else self.model  # DistributedModelParallel: the model inside
        shared = shared_parameters(base, len(self.tasks))
        kept = [(p, m) for p, m in zip(shared.params, shared.masks) if id(p) not in fused]
        self.shared = SharedParameters([p for p, _ in kept], [m for _, m in kept])
        self.task_params = [[p for p in base.task_parameters(k) if id(p) not in fused] for k in range(len(self.tasks))]
        if self.weighting.reads_representation and self.shared.params:
            self._check_representation(base)
            base.request_representation()
        # data parallel: every gradient averaged after backward; sharded, DistributedDataParallel does the
        # model's (but the fused tables') unless a gradient method runs (`dense_by_hand`)
        by_hand = (not self.sharded or self.dense_by_hand) and not self.ddp
        dense = [p for p in self.model.parameters() if id(p) not in fused]
        self.averaged = [*(dense if by_hand else []), *self.weighting.parameters()]
        self.schedule = TaskSchedule(config.alternating.order, len(self.tasks), config.alternating.ratios, seed)
        self.stopping = self._early_stopping(config)
        self.log_path = Path(log_path) if log_path and self.rank == 0 else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        # what a checkpoint must match to be resumed: the whole experiment config when known
        self.run_config = run_config if run_config is not None else {"train": config.model_dump(mode="json"),
                                                                      "seed": seed}
        self.has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.history: list[dict[str, float]] = []
        self.global_step = 0
        self.last_checkpoint: int | None = None
        self._first_bad = torch.full((len(self.tasks),), -1, dtype=torch.long, device=self.device)

    def _check_representation(self, model: nn.Module) -> None:
        """A weighting with on: representation needs a model that gives its shared representation
        Z, and an uncompiled forward (a compiled graph gives Z as an output no loss reads)."""
        name = split_spec(self.config.weighting)[0]
        if not getattr(model, "has_representation", False):
            backbone = getattr(model, "backbone", None)
            which = type(model).__name__ + (f" (backbone {type(backbone).__name__})" if backbone is not None else "")
            raise ValueError(f"train.weighting {name!r} with on: representation needs a model that names its shared "
                             f"representation Z, and {which} names none (see its docstring; MoE levels with "
                             "dispatch: sparse form none); use on: parameters")
        if self.config.compile:
            raise ValueError(f"train.weighting {name!r} with on: representation cannot run with train.compile: the "
                             "compiled graph gives no gradient on the representation; use one or the other")

    def _graph_decision(self, schema: Schema) -> bool:
        """Whether the step is recorded as a CUDA graph (`config.cuda_graph`): `on` refuses a run
        that cannot be, naming why; `auto` says why once and trains eagerly."""
        config = self.config
        if config.cuda_graph == "off":
            return False
        name = split_spec(config.weighting)[0]
        groups = config.optimizers or [config]
        blockers = capture_blockers(
            device=self.device, world=self.world, fused_tables=self.tables is not None, strategy=config.strategy,
            weighting=name, weighting_capturable=type(self.weighting).capturable,
            optimizers=[g.optimizer for g in groups], lists=bool(schema.lists),
            compile=config.compile, stepped=sorted({type(m).__name__ for m in self.stepped}))
        return self._graph_or_why(blockers)

    def _graph_or_why(self, blockers: list[str]) -> bool:
        if not blockers:
            return True
        why = "; ".join(blockers)
        if self.config.cuda_graph == "on":
            raise ValueError(f"train.cuda_graph on: this run's step cannot be recorded as a CUDA graph: {why}; "
                             "set cuda_graph: auto (train eagerly where it cannot) or off")
        if self.rank == 0:
            warnings.warn(f"train.cuda_graph auto: training eagerly, as {why}", RuntimeWarning, stacklevel=4)
        return False

    def _early_stopping(self, config: TrainConfig) -> EarlyStopping | PerTaskStopping:
        """One stopper for the model; for the single-task baseline (plain tables) one per
        network, each on its own task's metric (`early_stopping.per_task`)."""
        o = config.early_stopping
        if o.per_task and isinstance(self.model, SingleTaskModels) and self.tables is None:  # TorchRec: one stopper
            keys = validation_keys(self.tasks, self.ranking)
            return PerTaskStopping([task_metric(o.metric, t, keys) for t in self.tasks.names], o.patience, o.min_delta)
        return EarlyStopping(o.metric, o.patience, o.min_delta)

    def _with_tables(self, model: nn.Module, schema: Schema) -> tuple[nn.Module, TorchRecTables | None]:
        """The module training runs: `model` itself with plain tables; with fused tables, `model`
        with TorchRec's tables swapped in; sharded, a copy of that under DistributedModelParallel."""
        config = self.config
        if not config.fused_tables:
            return model, None
        from mtlrec.train.sharding import EmbeddingOptimizer, TorchRecTables, check_fusable, shard_model

        check_fusable(model)
        tables = TorchRecTables(schema, EmbeddingOptimizer(*config.table_optimizer))
        if config.embedding_sharding == "none":
            if self.world > 1:
                raise ValueError("fused tables under torchrun must be sharded: set train.embedding_sharding "
                                 "(data_parallel copies every table to every process)")
            return tables.install(model, fused=True).to(self.device), tables
        work, initial = tables.sharded_copy(model)
        wrapped = shard_model(work, config.embedding_sharding, tables.optimizer, self.device, initial,
                              dense_ddp=not self.dense_by_hand)
        del initial
        tables.release(model)  # the shards hold the tables now; rank 0 gathers them back after training
        return wrapped, tables

    @property
    def holds_model(self) -> bool:
        """Whether this process's plain model holds every weight after `fit`: with sharded tables
        only rank 0 gathers them (the other processes' plain tables stay on the meta device)."""
        return not self.sharded or self.rank == 0

    def _plain_again(self) -> None:
        """Leave the trained weights in the plain model (the caller's, saved as the model folder):
        fused tables copied back; sharded, gathered on rank 0 (the process that saves)."""
        if self.tables is None:
            return
        if not self.sharded:
            self.tables.uninstall(self.plain_model)
            return
        from mtlrec.train.sharding import gathered_state_dict

        state = gathered_state_dict(self.model)
        if state is not None:
            self.tables.restore(self.plain_model, state, self.device)

    # ---------------------------------------------------------------- training
    def fit(self, train: BatchSource, valid: BatchSource | None = None, resume: bool = False) -> list[dict[str, float]]:
        """Train for `config.epochs` (or until early stopping); returns one metrics row per epoch."""
        if self.graphed and not isinstance(train, TensorData):
            self.graphed = self._graph_or_why(["data.streaming reads batches from the host; a graph gathers them "
                                               "from data on the GPU"])
        with self._matmul_precision():
            return self._fit(train, valid, resume)

    def _matmul_precision(self):
        """`config.tf32` on CUDA; elsewhere nothing changes."""
        return matmul_precision(self.config.tf32) if self.device.type == "cuda" else nullcontext()

    def _fit(self, train: BatchSource, valid: BatchSource | None, resume: bool) -> list[dict[str, float]]:
        source = train.shard(self.rank, self.world).to(self.device)
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: one batch order on every device
        if self.graphed:  # one process, in-memory rows (resident on the GPU now): the graph gathers each batch
            resident = source.data
            self._graphed_update = GraphedCall(lambda index: self._update(resident.take(index)),
                                               enabled=self.device.type == "cuda")
        self.learning_rates = LearningRates(self.optimizers, self.lr_groups,
                                            source.num_batches(self.config.batch_size // self.world),
                                            self.config.epochs, self.config.early_stopping.metric, valid is not None)
        first_epoch, skip, totals = 1, 0, None
        if resume:
            first_epoch, skip, totals = self._restore(generator)
        for callback in self.callbacks:
            callback.on_train_begin(self)
        for epoch in range(first_epoch, self.config.epochs + 1):
            if self.stopping.stop:
                break
            start = time.perf_counter()
            row = {"epoch": epoch, **self._train_epoch(source, generator, epoch, skip, totals)}
            skip, totals = 0, None
            row["seconds"] = time.perf_counter() - start
            if valid is not None:
                row |= {f"valid/{k}": v for k, v in self.evaluate(valid).items()}
                if self.config.early_stopping.combine:
                    row[f"valid/{COMBINED}"] = combined_score(row, self.config.early_stopping.combine)
                self.stopping.observe(row, self.model)
                self.learning_rates.observe(row)
            self._log(row)
            self._checkpoint(generator.get_state(), epoch + 1, 0, None)
            for callback in self.callbacks:
                callback.on_epoch_end(row)
        self.stopping.restore_best(self.model)
        self._plain_again()
        for callback in self.callbacks:
            callback.on_train_end(self.history)
        return self.history

    @property
    def hit_epoch_cap(self) -> bool:
        """Whether training ran all `config.epochs` with the last epoch the best (validated runs):
        it may have been stopped while still improving."""
        return bool(self.history) and self.history[-1]["epoch"] == self.config.epochs and self.stopping.best_is_last

    def _train_epoch(self, source: Shard, generator: torch.Generator, epoch: int, skip: int,
                     totals: EpochTotals | None) -> dict[str, float]:
        self.model.train()
        epoch_start = generator.get_state()
        totals = totals or EpochTotals.zeros(len(self.tasks), self.device)
        n_batches = source.num_batches(self.config.batch_size // self.world)
        bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=None if self.config.progress and self.rank == 0 else True)
        refresh = max(1, n_batches // 50)  # a host sync for the shown loss ~50 times an epoch
        check_every = 1 if self.device.type == "cpu" else refresh
        every = self.config.checkpoint_every
        for done, batch in enumerate(self._batches(source, generator, skip), start=skip + 1):
            if not (self.has_batch_norm and len(batch) == 1):  # batch norm cannot train on one row
                self.learning_rates.set(epoch, done)
                totals.add(*self._step(batch))
            bar.update()
            if self.global_step % check_every == 0:
                self._check_finite(epoch)
            if totals.steps and done % refresh == 0:
                bar.set_postfix(loss=f"{totals.total.item() / totals.steps:.4f}")
            if every and self.global_step % every == 0 and done < n_batches:
                self._checkpoint(epoch_start, epoch, done, totals)
        bar.close()
        self._check_finite(epoch)
        steps = distributed.total(torch.tensor(float(max(totals.steps, 1)), device=self.device))
        mean_losses = distributed.total(totals.tasks) / steps
        self.weighting.end_epoch(mean_losses)
        row = {"train/loss": (distributed.total(totals.total) / steps).item()}
        row |= {f"train/loss/{n}": v for n, v in zip(self.tasks.names, mean_losses.tolist())}
        row |= {f"weight/{n}": v for n, v in zip(self.tasks.names, totals.weights.tolist())}
        row |= self.learning_rates.row()  # the lr of the epoch's last step
        for module in self.stepped:
            row |= module.end_epoch()
        return row

    def _batches(self, source: Shard, generator: torch.Generator, skip: int) -> Iterator[TensorData | Tensor]:
        """This epoch's batches of this process, less the first `skip` (trained on before a resume).
        With a recorded step, each batch's row indices `[B]` (the graph gathers the rows)."""
        size = self.config.batch_size // self.world
        batches = source.data.batch_indices(size, generator) if self.graphed else source.batches(size, generator)
        for index, batch in enumerate(batches):
            if index >= skip:
                yield batch

    def _forward(self, batch: TensorData | Features):
        features = batch.features if isinstance(batch, TensorData) else batch
        # autocast's weight cache would hold tensors across a graph's replays: off when recorded
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                            cache_enabled=not self.graphed):
            out = self.forward(features)
        return out._replace(logits=out.logits.float())

    def _step(self, batch: TensorData | Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step on a batch (or, recorded, on the rows a `[B]` index picks); the task
        weights and losses `[T]`. Nothing here waits for the device."""
        weights, losses = self._graphed_update(batch) if isinstance(batch, Tensor) else self._update(batch)
        nonfinite = ~torch.isfinite(losses)  # read by _check_finite every few steps
        self._first_bad = torch.where(nonfinite & (self._first_bad < 0), self.global_step, self._first_bad)
        self.global_step += 1
        for callback in self.callbacks:
            callback.on_step_end(self.global_step, losses, weights)
        return weights, losses

    def _update(self, batch: TensorData) -> tuple[Tensor, Tensor]:
        """Forward, backward, optimizer step: all on the device (what a CUDA graph records)."""
        weights, losses = self._forward_backward(batch)
        distributed.average_gradients(self.averaged)
        if self.config.clip_grad_norm is not None:  # the combined gradient, averaged over the processes
            torch.nn.utils.clip_grad_norm_(self.clipped, self.config.clip_grad_norm)
        for opt in self.optimizers:
            opt.step()
        for module in self.stepped:
            module.after_optimizer_step()
        self.weighting.after_step()
        return weights.detach(), losses.detach()

    def _forward_backward(self, batch: TensorData) -> tuple[Tensor, Tensor]:
        out = self._forward(batch)
        losses = self.tasks.losses(out.logits, batch.labels, batch.mask, batch.weights)
        if self.world > 1:
            losses = self._over_all_processes(losses, batch)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.config.strategy == "alternating":
            weights = self._alternating_backward(losses, out.penalty)
        else:
            weights = self.weighting.backward(losses, self.shared, out.penalty, representation=out.representation)
        return weights, losses

    def _over_all_processes(self, losses: Tensor, batch: TensorData) -> Tensor:
        """Rescale this process's per-task losses (means over its rows) so that the average of the
        processes' gradients is the gradient of the mean over all processes' rows: each task's
        rows (or sample weights) in its space are counted over the processes (one all-reduce of
        `[T]`). Processes whose batches hold different numbers of a task's rows thus train
        exactly as one process on the global batch would."""
        mine = (batch.mask if batch.weights is None else batch.weights * batch.mask).sum(0).to(losses.dtype)
        every = distributed.total(mine.clone())
        return torch.where(every > 0, losses * mine * self.world / every.clamp(min=torch.finfo(every.dtype).tiny), 0.0)

    def _alternating_backward(self, losses: Tensor, penalty: Tensor | None) -> Tensor:
        """One task's (config-weighted) loss; the other tasks' own parameters get no update."""
        task = self.schedule.task(self.global_step)
        loss = self.tasks.weights[task] * losses[task]
        if self.sharded or self.ddp:  # every parameter in DistributedDataParallel's graph: the others' gradient 0
            loss = loss + 0.0 * losses.sum()
        (loss if penalty is None else loss + penalty).backward()
        for k, params in enumerate(self.task_params):
            if k != task:
                for p in params:
                    p.grad = None  # optimizers skip parameters without a gradient
        return torch.nn.functional.one_hot(torch.tensor(task), len(losses)).to(losses) * self.tasks.weights

    def _check_finite(self, epoch: int) -> None:
        bad = distributed.first_step(self._first_bad.clone())
        if (bad < 0).all():
            return
        k = int(torch.where(bad < 0, torch.iinfo(torch.long).max, bad).argmin())
        kept = (f"the last good checkpoint, of step {self.last_checkpoint}, is {self.checkpoint_dir}"
                if self.last_checkpoint is not None else "no checkpoint was written (set train.checkpoint_every)")
        raise NonFiniteLoss(f"task {self.tasks.names[k]!r}: non-finite loss at step {int(bad[k])} "
                            f"(epoch {epoch}); training stopped; {kept}")

    # ------------------------------------------------------------- checkpoints
    def _checkpoint(self, generator_state: Tensor, epoch: int, step_in_epoch: int, totals: EpochTotals | None) -> None:
        if not (self.checkpoint_dir and self.config.checkpoint_every):
            return
        self._check_finite(epoch)  # never write a checkpoint after a bad step
        stopping, tables = self.stopping.state_dict(), None
        if self.tables is not None:  # TorchRec tables: their state (sharded: in pieces) beside checkpoint.pt
            from mtlrec.train import sharding

            tables = sharding.save_tables(self.checkpoint_dir, self.global_step, self.model, stopping["best_state"])
            stopping = stopping | {"best_state": None, "best_in_tables": stopping["best_state"] is not None}
        if self.rank == 0:
            save_checkpoint(self.checkpoint_dir, {
                "model": self.model.state_dict() if tables is None else {}, "tables": tables,
                "weighting": self.weighting.state_dict(), "optimizers": [opt.state_dict() for opt in self.optimizers],
                "global_step": self.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "generator": generator_state, "rng": rng_state(), "history": self.history,
                "stopping": stopping, "totals": totals.state_dict() if totals else None,
                "learning_rates": self.learning_rates.state_dict(),
                "config": json.dumps(self.run_config),
            })
            if tables is not None:
                sharding.remove_old_tables(self.checkpoint_dir, keep=tables)
        distributed.barrier()
        self.last_checkpoint = self.global_step

    def _restore(self, generator: torch.Generator) -> tuple[int, int, EpochTotals | None]:
        state = load_checkpoint(self.checkpoint_dir)
        check_resumable(json.loads(state["config"]), self.run_config, self.checkpoint_dir)
        stopping = state["stopping"]
        if state.get("tables"):
            from mtlrec.train import sharding

            template = copy.deepcopy(self.model.state_dict()) if stopping.pop("best_in_tables") else None
            stopping["best_state"] = sharding.load_tables(self.checkpoint_dir, state["tables"], self.model, template)
        else:
            self.model.load_state_dict(state["model"])
        self.weighting.load_state_dict(state["weighting"])
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        self.learning_rates.load_state_dict(state["learning_rates"])
        self.global_step = self.last_checkpoint = state["global_step"]
        self.history = state["history"]
        self.stopping.load_state_dict(stopping)
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        if self.log_path:  # the log as of the checkpoint; later lines belonged to the lost run
            self.log_path.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        totals = state["totals"] and EpochTotals.from_state(state["totals"], self.device)
        return state["epoch"], state["step_in_epoch"], totals

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_split(self, data: BatchSource) -> tuple[Tensor, TensorData]:
        """Logits `[N, L]` for every row of the split, with the rows' labels and masks `[N, T]`.
        Under torch.distributed each process predicts its shard and all receive the whole split."""
        self.model.eval()
        logits, labels, masks, weights, groups = [], [], [], [], []
        shard, rows = self._evaluation_shard(data)
        # recorded: each batch of the split's first shape is a replay (the last, shorter one runs eagerly)
        graphed = GraphedCall(lambda ids, dense: (self._forward(Features(ids, dense)).logits,), warmup=1,
                              enabled=self.device.type == "cuda")
        for batch in shard.to(self.device).batches(4 * self.config.batch_size):
            logits.append(graphed(batch.sparse, batch.dense)[0] if self.graphed else self._forward(batch).logits)
            labels.append(batch.labels)
            masks.append(batch.mask)
            weights.append(batch.weights if batch.weights is not None else torch.ones_like(batch.labels))
            if batch.groups is not None:
                groups.append(batch.groups)
        widths = (self.tasks.num_logits, len(self.tasks), len(self.tasks), len(self.tasks))
        parts = [torch.cat(x)[:rows] if x else torch.zeros(0, width, device=self.device)
                 for x, width in zip((logits, labels, masks, weights), widths)]
        ranked = getattr(data, "groups", None) is not None  # the split's, so every process agrees
        if ranked:  # ranking lists (rank.group_by), coded within the split: they gather as they are
            parts.append(torch.cat(groups)[:rows] if groups else torch.zeros(0, dtype=torch.long, device=self.device))
        parts = distributed.gather_rows(parts)
        empty = torch.zeros(0, 0)
        return parts[0], TensorData(empty, empty, parts[1], parts[2].bool(),
                                    weights=parts[3] if self.tasks.weighted else None,
                                    groups=parts[4] if ranked else None)

    def _evaluation_shard(self, data: BatchSource) -> tuple[Shard, int | None]:
        """This process's rows of a split, and how many of the predictions are real. Sharded
        tables exchange lookups between processes at every forward, so every process must run
        as many batches: the last blocks are padded (with copies of a row) to the first's size,
        and the padding's predictions dropped."""
        shard = data.shard(self.rank, self.world)
        if not self.sharded:
            return shard, None
        if not isinstance(data, TensorData):
            raise ValueError("sharded tables evaluate in-memory splits only, not data.streaming")
        share = -(-len(data) // self.world)
        block = data.rows(self.rank * share, (self.rank + 1) * share)
        rows = len(block)
        if rows < share:
            filler = (block if rows else data).take(torch.zeros(share - rows, dtype=torch.long))
            block = block.concat(filler) if rows else filler
        return block, rows

    def evaluate(self, data: BatchSource) -> dict[str, float]:
        """Weighted loss, per-task losses and metrics over the whole split."""
        with self._matmul_precision():
            logits, targets = self.predict_split(data)
        return evaluate_logits(self.tasks, logits, targets, self.ranking)

    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if self.config.progress and self.rank == 0:  # the headline numbers; epochs.jsonl has them all
            keys = ["train/loss", "valid/loss"] + [f"valid/{m}" for m in self.tasks.primary_metrics]
            shown = "  ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
            tqdm.write(f"epoch {row['epoch']}  {shown}  ({row['seconds']:.1f} s)")
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


__all__ = ["EpochTotals", "NonFiniteLoss", "Trainer", "resolve_device"]

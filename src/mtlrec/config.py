"""The experiment config: one YAML file names the data, features, tasks, model, training and seed.

`load_config(path, overrides)` reads it, applies `key.sub=value` overrides and validates it;
a wrong or unknown field fails with a `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtlrec import gbdt, models
from mtlrec.data.formats import DATA_FORMATS
from mtlrec.data.synthetic import SyntheticConfig, synthetic_schema
from mtlrec.losses.weighting import WEIGHTINGS, create_weighting, split_spec
from mtlrec.train.sharding import SHARDINGS, TableOptimizer
from mtlrec.schema import ConfigBlock, DenseFeature, NamedBlock, Schema, SparseFeature, Task
from mtlrec.tasks import TaskSet
from mtlrec.train.optim import OPTIMIZERS

DataFormat = Literal[tuple(DATA_FORMATS)]  # type: ignore[valid-type]
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """The config is invalid; the message names the field."""


class DataConfig(ConfigBlock):
    source: Literal["synthetic", "files", "dataframes"] = Field(
        "synthetic", description="synthetic: made from data.synthetic; files: data.train (and valid, test); "
                                 "dataframes: the tables given to mtlrec.fit(config, train=..., valid=..., test=...)")
    synthetic: SyntheticConfig = SyntheticConfig()
    format: DataFormat = Field(
        "table", description="table: any CSV/Parquet; the others read a public data set's files and bring its schema"
    )
    train: str | None = Field(None, description="CSV/Parquet file (source: files)")
    valid: str | None = Field(None, description="optional; else split off train (or off test, see valid_from_test)")
    test: str | None = Field(None, description="optional; else split off train")
    valid_from_test: bool = Field(False, description="cut the validation split from half of the test file")
    streaming: bool = Field(False, description="read Parquet files or folders in chunks: data larger than memory")
    chunk_rows: int = Field(65_536, ge=1, description="streaming: rows read at a time")
    shuffle_buffer: int = Field(262_144, ge=1, description="streaming: rows shuffled together")
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split: Literal["random", "time", "leave_last_out", "group"] = Field(
        "random", description="how valid / test are cut from data.train (mtlrec.data.splits)")
    split_time: str | None = Field(None, description="split time / leave_last_out: the time column")
    split_group: str | None = Field(None, description="split leave_last_out: the user column; group: the group column")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        needs = {"time": ["split_time"], "leave_last_out": ["split_group", "split_time"], "group": ["split_group"],
                 "random": []}[self.split]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(f"split {self.split!r} needs data.{' and data.'.join(missing)}")
        if self.split != "random" and (self.valid or self.test or self.valid_from_test):
            raise ValueError(f"split {self.split!r} cuts valid and test from data.train: give no data.valid / "
                             "data.test files (nor valid_from_test)")
        if self.source == "files" and not self.train:
            raise ValueError("source 'files' needs data.train (a CSV or Parquet file)")
        if self.source == "dataframes" and (self.train or self.valid or self.test or self.streaming):
            raise ValueError("source 'dataframes' reads the tables given to mtlrec.fit: give no data.train / valid / "
                             "test paths (nor streaming)")
        if self.valid_from_test and (not self.test or self.valid):
            raise ValueError("valid_from_test needs data.test and no data.valid")
        if self.streaming and (self.source != "files" or self.format != "table" or not self.valid
                               or self.valid_from_test):
            raise ValueError("streaming reads Parquet files or folders in format 'table': give data.train and "
                             "data.valid (and data.test) as paths; splits cannot be cut from a stream")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("valid_fraction + test_fraction must be < 1")
        return self


class Features(ConfigBlock):
    """The input columns, and the column of per-row sample weights (see `mtlrec.schema.Schema`)."""

    sparse: list[SparseFeature] = []
    dense: list[DenseFeature] = []
    sample_weight: str | None = Field(None, description="a column of per-row loss weights (>= 0) for every task")
    weighted_metrics: bool = Field(False, description="compute the metrics with the sample weights too")


class ModelConfig(BaseModel):
    """`name` plus the model's own options (see `mtlrec models`), checked against the model."""

    model_config = ConfigDict(extra="allow")
    name: str = "ple"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        models.check_options(self.name, self.options)
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EarlyStopping(ConfigBlock):
    metric: str = Field("loss", description="validation metric: 'loss', 'loss/TASK', 'auc/TASK', 'mse/TASK', ...; "
                                            "'combined': the weighted sum of `combine`")
    patience: int | None = Field(3, ge=1, description="epochs without improvement; null = never stop early")
    min_delta: float = Field(0.0, ge=0.0, description="an epoch improves only by more than this")
    combine: dict[str, float] = Field({}, description="metric: 'combined' watches sum_m w_m s_m v_m over these "
                                                      "validation metrics (s_m = -1 where lower is better)")
    per_task: bool = Field(True, description="single_task: each task's network stops on its own task's metric "
                                             "(its own best epoch, as if trained alone)")


class Alternating(ConfigBlock):
    order: Literal["round_robin", "ratio"] = "round_robin"
    ratios: list[float] | None = Field(None, description="order: ratio: one relative frequency per task")


class Schedule(NamedBlock):
    """A learning-rate schedule (`mtlrec.train.schedules`): lr x linear warm-up x the decay of
    `name`; a bare name stands for `{name: ...}` (`schedule: cosine`)."""

    name: Literal["constant", "cosine", "step", "plateau"] = Field(
        "constant", description="constant: lr (after any warm-up); cosine: down to min_ratio x lr at the run's end; "
                                "step: x gamma every every_epochs epochs; plateau: x gamma after patience epochs "
                                "without improvement of train.early_stopping.metric")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up: step t (1-based) of the first N runs at lr x t / N")
    min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine: the final lr / lr; plateau: the lowest lr / lr")
    every_epochs: int | None = Field(None, ge=1, description="step: epochs between two cuts")
    gamma: float = Field(0.1, gt=0.0, lt=1.0, description="step, plateau: each cut multiplies the lr by this")
    patience: int = Field(2, ge=1, description="plateau: epochs without improvement before a cut")
    min_delta: float = Field(0.0, ge=0.0, description="plateau: an epoch improves only by more than this")

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        reads = {"constant": set(), "cosine": {"min_ratio"}, "step": {"every_epochs", "gamma"},
                 "plateau": {"gamma", "patience", "min_delta", "min_ratio"}}[self.name]
        defaults = {name: field.default for name, field in Schedule.model_fields.items()}
        unused = sorted(f for f in defaults.keys() - reads - {"name", "warmup_steps"} if getattr(self, f) != defaults[f])
        if unused:
            raise ValueError(f"{', '.join(unused)} would be ignored: schedule {self.name!r} reads "
                             f"{', '.join(sorted(reads | {'warmup_steps'}))}")
        if self.name == "step" and self.every_epochs is None:
            raise ValueError("schedule 'step' needs every_epochs")
        return self

    @property
    def changes_lr(self) -> bool:
        """Whether the lr ever differs from the base lr."""
        return self.name != "constant" or self.warmup_steps > 0


class OptimizerGroup(ConfigBlock):
    params: str = Field(description="module path ('embedding', 'backbone', 'towers', 'weighting', ...) or 'rest'")
    optimizer: OptimizerName | Literal["rowwise_adagrad"] = Field(
        "adam", description="rowwise_adagrad: the 'embedding' group with fused tables only (fbgemm's kernel)")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Schedule | None = Field(None, description="this group's lr schedule; null: train.schedule")


class TrainConfig(ConfigBlock):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(512, ge=1)
    optimizer: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    weighting: str | dict[str, Any] = Field(
        "fixed", description=f"a name, or {{name: ..., options}}: {', '.join(WEIGHTINGS)}"
    )
    strategy: Literal["joint", "alternating"] = "joint"
    alternating: Alternating = Alternating()
    optimizers: list[OptimizerGroup] = Field(
        [], description="one optimizer per parameter group, e.g. adagrad for 'embedding', adam for 'rest'"
    )
    early_stopping: EarlyStopping = EarlyStopping()
    fused_optimizer: bool = Field(False, description="one fused optimizer kernel for all parameters (torch fused=True)")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16: autocast the forward pass to bfloat16; auto: bf16 where the device computes it "
                            "natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else fp32")
    compile: bool = Field(False, description="torch.compile the model (first steps slower while it compiles)")
    cuda_graph: Literal["off", "on", "auto"] = Field(
        "off", description="CUDA: record the training step (and prediction) as a CUDA graph, replayed per batch "
                           "(mtlrec.train.graphs); on: a run that cannot be recorded is refused, naming why; auto: "
                           "such a run trains eagerly, saying why once")
    tf32: bool = Field(False, description="CUDA: fp32 matrix products in TF32 (10-bit mantissa, faster on Ampere and "
                                          "later); off: full fp32, the numbers a CPU run gives")
    lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none", description="scale every lr with the batch size: lr x (batch_size / lr_reference_batch), linear, or "
                            "its square root (sqrt: the rule for Adam); none: the lr as given")
    lr_reference_batch: int | None = Field(None, ge=1, description="the batch size the lr values were chosen at "
                                                                    "(read with lr_scaling)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="write a resumable checkpoint every N steps (and at each epoch's end)"
    )
    embedding_tables: Literal["plain", "fused"] = Field(
        "plain", description="plain: tables are model parameters; fused: TorchRec / fbgemm tables updated inside the "
                             "backward pass by embedding_optimizer (faster on large tables; needs TorchRec)")
    embedding_sharding: Literal[("none", *SHARDINGS)] = Field(  # type: ignore[valid-type]
        "none", description="under torchrun: how TorchRec places the tables (auto: its planner decides); implies "
                            "fused tables and runs the rest of the model under DistributedDataParallel")
    embedding_optimizer: TableOptimizer = Field(
        "rowwise_adagrad", description="the fused tables' optimizer (what fbgemm's CPU kernel offers)")
    embedding_lr: float | None = Field(None, gt=0.0, description="the fused tables' learning rate; null: lr")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto'")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default")
    progress: bool = True
    schedule: Schedule = Field(Schedule(), description="the lr schedule of every optimizer without its own "
                                                       "(mtlrec.train.schedules); a group's schedule overrides it")
    clip_grad_norm: float | None = Field(
        None, gt=0.0, description="clip the gradient of the parameters the torch optimizers update to this L2 norm "
                                  "(after the average over processes and any gradient method); null: no clipping")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        [], description="experiment trackers (pip install 'mtlrec[track]'; mtlrec.train.tracking): tensorboard "
                        "writes FOLDER/tensorboard, mlflow a run in mlflow_uri")
    tracking_every: int = Field(20, ge=1, description="tensorboard: log the step loss every N steps (a device sync)")
    mlflow_uri: str | None = Field(None, description="mlflow: the tracking URI; null: a file store, mlruns/ beside "
                                                     "the run's folder")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        name, _ = split_spec(self.weighting)
        prefixes = [g.params for g in self.optimizers]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"train.optimizers: a params group is named twice: {prefixes}")
        if self.strategy == "alternating" and name != "fixed":
            raise ValueError(f"train.weighting {name!r} would be ignored: strategy 'alternating' trains one task's "
                             "loss per step, weighted by its config weight; use weighting 'fixed'")
        if self.fused_tables:
            how = ("embedding_sharding " + self.embedding_sharding if self.embedding_sharding != "none"
                   else "embedding_tables fused")
            group = next((g for g in self.optimizers if g.params == "embedding"), None)
            if group is not None:  # the group sets the fused kernel's optimizer
                if group.optimizer not in get_args(TableOptimizer):
                    raise ValueError(f"with {how} the 'embedding' group's optimizer runs in fbgemm's fused kernel: "
                                     f"one of {list(get_args(TableOptimizer))}, not {group.optimizer!r}")
                if "embedding_optimizer" in self.model_fields_set or "embedding_lr" in self.model_fields_set:
                    raise ValueError("the tables' optimizer is set twice: by the 'embedding' group of "
                                     "train.optimizers and by train.embedding_optimizer / embedding_lr; keep one")
            tables_schedule = group.schedule if group is not None and group.schedule else self.schedule
            if tables_schedule.changes_lr:
                raise ValueError(f"with {how} the tables update inside fbgemm's kernel at a constant lr, which no "
                                 "schedule reaches: give the 'embedding' group of train.optimizers schedule: "
                                 "constant and schedule the other groups, or use plain tables")
        for g in self.optimizers:
            if g.optimizer == "rowwise_adagrad" and not (self.fused_tables and g.params == "embedding"):
                raise ValueError(f"train.optimizers: rowwise_adagrad is fbgemm's fused-table optimizer: the "
                                 f"'embedding' group with embedding_tables: fused only (not {g.params!r} here)")
        if self.alternating.ratios is not None and self.alternating.order != "ratio":
            raise ValueError("train.alternating.ratios is read with order 'ratio' only; set order: ratio or "
                             "remove the ratios")
        if (self.lr_scaling == "none") != (self.lr_reference_batch is None):
            raise ValueError("train.lr_scaling and train.lr_reference_batch go together: lr_scaling sqrt or linear "
                             "scales the lr from the batch size lr_reference_batch to train.batch_size")
        if len(set(self.tracking)) != len(self.tracking):
            raise ValueError(f"train.tracking names a tracker twice: {self.tracking}")
        for field, tracker in (("tracking_every", "tensorboard"), ("mlflow_uri", "mlflow")):
            if getattr(self, field) != TrainConfig.model_fields[field].default and tracker not in self.tracking:
                raise ValueError(f"train.{field} is read by the {tracker} tracker only: add {tracker} to "
                                 "train.tracking or remove it")
        return self


    def scaled_lr(self, lr: float) -> float:
        """A configured lr at this run's batch size (`lr_scaling`): unchanged without scaling;
        else lr x r (linear) or lr x sqrt(r) (sqrt), r = batch_size / lr_reference_batch.

        Example:
            >>> TrainConfig(batch_size=4096, lr_scaling="sqrt", lr_reference_batch=1024).scaled_lr(0.001)
            0.002
        """
        if self.lr_scaling == "none":
            return lr
        ratio = self.batch_size / self.lr_reference_batch
        return lr * (ratio if self.lr_scaling == "linear" else ratio**0.5)

    @property
    def table_optimizer(self) -> tuple[str, float]:
        """The fused tables' optimizer and learning rate: the 'embedding' group of `optimizers`
        when there is one, else embedding_optimizer and embedding_lr (or lr); scaled by `scaled_lr`."""
        group = next((g for g in self.optimizers if g.params == "embedding"), None)
        if group is not None:
            return group.optimizer, self.scaled_lr(group.lr)
        return self.embedding_optimizer, self.scaled_lr(self.embedding_lr or self.lr)

    @property
    def fused_tables(self) -> bool:
        """The embedding tables are TorchRec's, updated inside the backward pass."""
        return self.embedding_tables == "fused" or self.embedding_sharding != "none"


class ItemFactor(ConfigBlock):
    column: str = Field(description="item feature column, e.g. video_length")
    transform: Literal["identity", "log1p", "sqrt"] = "identity"
    power: float = Field(1.0, description="f(x) = transform(x) ** power")


class RankConfig(ConfigBlock):
    """The fused ranking score, PLE paper Eq. 1: score = prod_k p_k^w_k * f(item)."""

    weights: dict[str, float] = Field({}, description="w_k per task; empty: 1 for every task; unnamed tasks: 0")
    item: ItemFactor | None = Field(None, description="f of an item feature; none: f = 1")
    relevance: dict[str, float] = Field({}, description="NDCG relevance = sum_k r_k y_k; empty: the weights")
    group_by: str | None = Field(
        None, description="a column that defines ranking lists (user, request): GAUC of each probability task and "
                          "NDCG@ndcg_k of the fused score join the validation and test metrics (early stopping may "
                          "watch them)")
    ndcg_k: int = Field(10, ge=1, description="k of the NDCG@k computed with group_by")


class TuneRange(ConfigBlock):
    """The values `mtlrec tune` draws for one field: numbers from `low` to `high` (whole numbers
    when both bounds are written as whole numbers), or one of `choices` (any YAML values, lists
    included)."""

    low: int | float | None = Field(None, description="the smallest value (with high)")
    high: int | float | None = Field(None, description="the largest value, included")
    log: bool = Field(False, description="draw uniformly in log space (needs low > 0): learning rates, decays")
    step: int | float | None = Field(None, gt=0, description="draw only low, low + step, low + 2 step, ...")
    choices: list[Any] | None = Field(None, description="draw one of these values (instead of low and high)")

    @model_validator(mode="after")
    def _check(self) -> TuneRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low and high (with log or step), not both")
            if not self.choices:
                raise ValueError("choices is empty: give at least one value")
            written = [yaml.safe_dump(c, default_flow_style=True) for c in self.choices]
            if len(set(written)) != len(written):
                raise ValueError(f"choices repeat a value: {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"low must be < high (got low {self.low}, high {self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0 (got {self.low})")
        if self.step is not None:
            if self.log:
                raise ValueError("log and step do not go together: give one")
            if self.whole and not isinstance(self.step, int):
                raise ValueError(f"a range of whole numbers needs a whole step (got {self.step})")
            steps = (self.high - self.low) / self.step
            if abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"high - low must be a multiple of step (low {self.low}, high {self.high}, "
                                 f"step {self.step})")
        return self

    @property
    def whole(self) -> bool:
        """Whether the range draws whole numbers: both bounds are."""
        return isinstance(self.low, int) and isinstance(self.high, int)

    @property
    def ends(self) -> list[Any]:
        """The values checked when the config loads: the bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


# what a search may vary: training and the model; the data, features, tasks and seed are shared
# by every trial (one encoded data set), and the rest does not change training
SEARCHABLE = ("train", "model", "models")


class TuneConfig(ConfigBlock):
    """`mtlrec tune`: the fields to search, and how trials are judged and pruned (`mtlrec.tune`)."""

    space: dict[str, TuneRange] = Field(
        description="field path -> values, e.g. train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, "
                    "model.num_experts: {low: 2, high: 8}, train.weighting.name: {choices: [fixed, uncertainty]}")
    metric: str | None = Field(None, description="the validation metric a trial is judged by, at the epoch early "
                                                 "stopping keeps; null: train.early_stopping.metric")
    random_trials: int = Field(10, ge=1, description="TPE: trials drawn at random before it models the good ones")
    pruner: Literal["median", "none"] = Field(
        "median", description="median: stop a trial whose best metric so far is worse than the median of the "
                              "finished trials at that epoch; none: every trial runs to its end")
    pruner_startup_trials: int = Field(5, ge=0, description="finished trials before any trial is pruned")
    pruner_warmup_epochs: int = Field(1, ge=0, description="epochs every trial trains before it may be pruned")

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if not self.space:
            raise ValueError("tune.space names no field to search")
        for key in self.space:
            parts = key.split(".")
            if parts[0] in ("data", "features", "tasks", "seed"):
                raise ValueError(f"tune.space {key!r}: the trials share one encoded data set and one seed, so "
                                 "data, features, tasks and seed cannot be searched")
            if parts[0] not in SEARCHABLE:
                raise ValueError(f"tune.space {key!r}: only fields that change training can be searched: "
                                 "train.*, model.* and models.NAME.*")
            if key == "model.name" or len(parts) < (3 if parts[0] == "models" else 2) or "" in parts:
                raise ValueError(f"tune.space {key!r}: name one field, e.g. train.lr, model.num_experts or "
                                 "models.mmoe.num_experts (to compare models: mtlrec bench; search a bench "
                                 "model's options with mtlrec tune --model NAME)")
        return self


def with_field(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the config dict `raw` with the field at path `key` set to `value`. Mappings on
    the way are created; a field given as a name (`train.weighting: fixed`) becomes
    `{name: fixed}` when the path goes into it.

    Example:
        >>> with_field({"train": {"weighting": "fixed"}}, "train.weighting.name", "uncertainty")
        {'train': {'weighting': {'name': 'uncertainty'}}}
    """
    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str):
            child = node[part] = {"name": child}
        elif not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} holds {child!r}, not a mapping of fields")
        node = child
    node[leaf] = value
    return out


def check_search_space(config: Experiment) -> None:
    """`tune.metric` must be a validation metric, and each range's bounds (or each choice)
    written into the config must give a valid config; a ValueError names the key."""
    tune = config.tune
    stopping = config.train.early_stopping
    allowed = config.validation_keys + (["combined"] if stopping.combine else [])
    if tune.metric is not None and tune.metric not in allowed:
        raise ValueError(f"tune.metric {tune.metric!r} is not one of {allowed}")
    base = config.to_dict()
    del base["tune"]
    for key, values in tune.space.items():
        for value in values.ends:
            try:
                validate_config(with_field(base, key, value))
            except ConfigError as err:
                raise ValueError(f"tune.space {key!r}: the value {value!r} makes the config invalid: "
                                 f"{in_one_line(err)}") from None


def in_one_line(err: ConfigError) -> str:
    """The problems a ConfigError lists, on one line (to quote it inside another message)."""
    return "; ".join(line.strip() for line in str(err).removeprefix("invalid config:").splitlines() if line.strip())


class Experiment(ConfigBlock):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = DataConfig()
    features: Features | None = Field(None, description="required for file data; synthetic data brings its own")
    tasks: list[Task] | None = Field(None, description="required for file data; synthetic data brings its own")
    model: ModelConfig = ModelConfig()
    models: dict[str, dict[str, Any]] = Field(
        {}, description="options per model name, for `bench` and for `model.name` (a model not named here uses "
                        "its defaults; options in `model` win over these)"
    )
    train: TrainConfig = TrainConfig()
    rank: RankConfig = RankConfig()
    tune: TuneConfig | None = Field(None, description="the search space of `mtlrec tune`; other commands do "
                                                     "not read it")
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _complete(self) -> Experiment:
        if self.features is None or self.tasks is None:
            if self.data.source == "synthetic":
                default = synthetic_schema(self.data.synthetic)
                sparse, dense, tasks = default.sparse, default.dense, default.tasks
            elif DATA_FORMATS[self.data.format].schema is not None:
                sparse, dense, tasks = DATA_FORMATS[self.data.format].schema()
            else:
                raise ValueError("features and tasks are required for file data in format 'table'")
            if self.features is None:
                self.features = Features(sparse=sparse, dense=dense)
            if self.tasks is None:
                self.tasks = tasks
        schema = self.schema  # validates names
        from mtlrec.calibration import refuse_ordered_outputs

        refuse_ordered_outputs(self.model.name, schema)  # esmm's tasks keep pCTCVR <= pCTR: no calibration
        for name, options in self.models.items():
            if name == gbdt.NAME:  # the bench's non-neural reference row
                gbdt.reference_options(options)
            else:
                models.check_options(name, options)
        preset = self.models.get(self.model.name, {})
        if set(preset) - set(self.model.options):  # the model trained is the model `models` describes
            self.model = ModelConfig(name=self.model.name, **{**preset, **self.model.options})
        from mtlrec.nn.sequence import check_sequence_encoder

        encoder = models.spec(self.model.name).parse(self.model.options).sequence_encoder  # pooling: none's reader
        check_sequence_encoder(schema, encoder, fused_tables=self.train.fused_tables)
        tasks = TaskSet(schema)
        create_weighting(self.train.weighting, tasks)  # its options' values, checked against the tasks
        stopping = self.train.early_stopping
        from mtlrec.train.evaluation import validation_keys

        allowed = validation_keys(tasks, self.rank)  # the task set built above
        if stopping.metric not in [*allowed, "combined"]:
            raise ValueError(f"train.early_stopping.metric {stopping.metric!r} is not one of {allowed} or 'combined'")
        unknown = sorted(set(stopping.combine) - set(allowed))
        if unknown:
            raise ValueError(f"train.early_stopping.combine names unknown metric(s) {unknown}; allowed: {allowed}")
        if (stopping.metric == "combined") != bool(stopping.combine):
            raise ValueError("train.early_stopping: metric 'combined' and combine {metric: weight, ...} go together")
        for field in ("weights", "relevance"):
            unknown = sorted(set(getattr(self.rank, field)) - set(schema.task_names))
            if unknown:
                raise ValueError(f"rank.{field} names unknown task(s) {unknown}; tasks: {schema.task_names}")
        if self.rank.group_by is not None and self.data.streaming:
            raise ValueError("rank.group_by (GAUC / NDCG during training) reads in-memory splits, not data.streaming")
        if self.train.embedding_sharding != "none" and self.data.streaming:
            raise ValueError("train.embedding_sharding with data.streaming is not supported yet: sharded tables need "
                             "every process to run as many batches, which file shards do not give")
        ratios = self.train.alternating.ratios
        if ratios is not None and (len(ratios) != len(schema.tasks) or min(ratios) < 0 or sum(ratios) <= 0):
            raise ValueError(f"train.alternating.ratios needs {len(schema.tasks)} non-negative values, not all 0")
        if self.tune is not None:
            check_search_space(self)
        return self

    @property
    def validation_keys(self) -> list[str]:
        """What early stopping (and a search) may watch: the tasks' losses and metrics, and with
        `rank.group_by` the ranking metrics (`mtlrec.train.evaluation.validation_keys`)."""
        from mtlrec.train.evaluation import validation_keys

        return validation_keys(TaskSet(self.schema), self.rank)

    @property
    def schema(self) -> Schema:
        f = self.features
        return Schema(sparse=f.sparse, dense=f.dense, tasks=self.tasks, sample_weight=f.sample_weight,
                      weighted_metrics=f.weighted_metrics)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_model(self, name: str, seed: int | None = None, progress: bool | None = None) -> Experiment:
        """A new experiment: this one with model `name` (options from `models[name]`) and, if
        given, another seed and progress display."""
        raw = self.to_dict()
        raw["model"] = {"name": name, **self.models.get(name, {})}
        if seed is not None:
            raw["seed"] = seed
        if progress is not None:
            raw["train"]["progress"] = progress
        return validate_config(raw)

    def with_device(self, device: str) -> Experiment:
        """A new experiment: this one training on `device`."""
        return self.model_copy(update={"train": self.train.model_copy(update={"device": device})})


def load_config(source: str | Path | dict, overrides: list[str] = ()) -> Experiment:
    """Read a YAML file (or a dict), apply `a.b=value` overrides, validate."""
    return validate_config(apply_overrides(read_raw_config(source), overrides))


def read_raw_config(source: str | Path | dict) -> dict[str, Any]:
    """The fields of a YAML config file (or the dict itself), not yet validated."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"no such config file: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of fields")
    return raw


def validate_config(raw: dict[str, Any]) -> Experiment:
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(e) for e in err.errors())) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=0.01", "model.name=mmoe"]` -> a copy of raw with those set (values parsed as YAML)."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    return raw


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(error["loc"][:-1])
        message = f"unknown field; allowed: {allowed}" if allowed else "unknown field"
    return f"  {loc}: {message}"


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the config block at `loc` (e.g. ("train", "early_stopping"))."""
    cls: Any = Experiment
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            inner = getattr(candidate, "__args__", (candidate,))
            found = [c for c in (candidate, *inner) if isinstance(c, type) and issubclass(c, BaseModel)]
            if found:
                cls = found[0]
                break
        else:
            return []
    return sorted(cls.model_fields)

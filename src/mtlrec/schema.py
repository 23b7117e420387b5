"""What the columns mean: sparse and dense input features, and the tasks to predict.

A `Schema` is the one place that names the model's inputs and outputs. Tensors index
features and tasks in schema order: `sparse` ids are `[B, S]` with S = len(schema.sparse),
`dense` values `[B, D]`, labels `[B, T]` with T = len(schema.tasks); logits `[B, L]`, one
column per task but C for a multiclass task of C classes (`mtlrec.tasks.TaskSet.slices`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from mtlrec.expression import ExpressionError, parse
from mtlrec.tasks import TaskKind, kind_of


class ConfigBlock(BaseModel):
    """Base for every config block: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class NamedBlock(ConfigBlock):
    """A config block with a `name`, for which a bare string stands for `{name: <string>}`
    (`dense: [age, price]`, `tasks: [click, like]`).

    Example:
        >>> DenseFeature.model_validate("age")
        DenseFeature(name='age')
    """

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def typed_options(what: str, options_class: type[BaseModel], values: dict[str, Any], allowed: list[str],
                  fixed: dict[str, Any] | None = None) -> BaseModel:
    """`values` (plus `fixed` ones) validated into `options_class`; a ValueError names `what`
    (e.g. "model 'ple'") and the unknown or ill-typed options, listing `allowed`."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{what} has no option(s) {unknown}; allowed: {allowed}")
    try:
        return options_class(**values, **(fixed or {}))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{what} option {problems}") from None


class Attention(ConfigBlock):
    """Target attention over a list (DIN, Zhou et al. KDD 2018): each element k of the list is
    scored against the embedding q of the `target` feature by an MLP over [q, k, q - k, q * k]
    (`hidden` layers, PReLU, one output); the pooled vector is sum_i score_i * k_i over the
    row's elements. As in the paper the scores are not normalised; `softmax: true`
    normalises them over each row's elements instead. Padding never gets a score."""

    target: str = Field(description="a single-valued sparse feature of the same embedding size, e.g. item_id")
    hidden: list[PositiveInt] = [36]
    softmax: bool = False


class SparseFeature(NamedBlock):
    """A categorical column, embedded through a learned table.

    `vocab_size` counts every id the table holds, the out-of-vocabulary id 0 included; the
    encoder sets it from the training split, so a config normally leaves it out. With
    `hash_buckets` the ids are 1 + hash(value) mod hash_buckets (missing: 0), no vocabulary.

    `multi_valued: true` makes the column a list of categories per row (a Parquet list column,
    a list in a DataFrame cell, or text split at `separator`), embedded element by element
    and pooled into one vector (`pooling`). Features naming one `embedding` table share its
    parameters and its vocabulary (e.g. `item_id` and `clicked_items`). `pooling: none` keeps
    the list as a sequence for the model's `sequence_encoder` (`mtlrec.nn.sequence`), with
    `sequence_target` as the candidate it is read against.
    """

    name: str
    embedding_dim: PositiveInt = 8
    vocab_size: PositiveInt | None = None
    min_freq: PositiveInt = Field(1, description="rarer categories map to the out-of-vocabulary id 0")
    hash_buckets: PositiveInt | None = Field(
        None, description="hash values into this many ids instead of keeping a vocabulary (very high cardinality)"
    )
    embedding: str | None = Field(None, description="the table's name; features naming one table share it")
    multi_valued: bool = Field(False, description="the column holds a list of categories per row")
    separator: str = Field("|", min_length=1, description="splits a text cell into its list (multi-valued)")
    max_length: PositiveInt | None = Field(None, description="keep only the last max_length elements of a list")
    pooling: Literal["sum", "mean", "max", "attention", "none"] = Field(
        "mean", description="how a list becomes one vector; none: kept as a sequence for model.sequence_encoder")
    attention: Attention | None = Field(None, description="the target and MLP of pooling: attention")
    sequence_target: str | None = Field(
        None, description="pooling none: a single-valued sparse feature of the same embedding size (e.g. item_id) "
                          "the sequence encoder reads with the list; null: the list alone")
    weights: str | None = Field(None, description="a list column of the same lengths holding element weights")
    weight_separator: str | None = Field(
        None, min_length=1, description="elements carry their weight inline after this, e.g. ':' in 'drama:0.7'"
    )

    @model_validator(mode="after")
    def _check(self) -> SparseFeature:
        listed = {"max_length": self.max_length, "attention": self.attention, "weights": self.weights,
                  "weight_separator": self.weight_separator, "sequence_target": self.sequence_target}
        if not self.multi_valued:
            given = sorted(k for k, v in listed.items() if v is not None)
            if given or self.pooling != "mean":
                given += ["pooling"] if self.pooling != "mean" else []
                raise ValueError(f"sparse feature {self.name!r}: {given} apply to lists only; set multi_valued: true")
            return self
        if (self.pooling == "attention") != (self.attention is not None):
            raise ValueError(f"sparse feature {self.name!r}: pooling: attention and an attention block go together")
        if self.pooling in ("attention", "none") and self.max_length is None:
            raise ValueError(f"sparse feature {self.name!r}: pooling {self.pooling} needs max_length (it pads lists "
                             "to it)")
        if self.sequence_target is not None and self.pooling != "none":
            raise ValueError(f"sparse feature {self.name!r}: sequence_target is read with pooling: none only")
        if self.weights and self.weight_separator:
            raise ValueError(f"sparse feature {self.name!r}: give element weights as a column or inline, not both")
        if (self.weights or self.weight_separator) and self.pooling in ("max", "attention", "none"):
            raise ValueError(f"sparse feature {self.name!r}: element weights work with sum and mean pooling, "
                             f"not {self.pooling}")
        if self.weight_separator == self.separator:
            raise ValueError(f"sparse feature {self.name!r}: weight_separator must differ from separator")
        return self

    @property
    def table(self) -> str:
        """The name of the embedding table the feature reads (its own name unless shared)."""
        return self.embedding or self.name

    @property
    def target(self) -> str | None:
        """The single-valued feature a list is read against: its attention target or its sequence_target."""
        return self.attention.target if self.attention is not None else self.sequence_target


class DenseFeature(NamedBlock):
    """A numeric column, standardised with the training split's mean and std."""

    name: str


class Task(NamedBlock):
    """One prediction target.

    `type` is the task's kind (`mtlrec.tasks`): binary (label 0/1, log loss, AUC), regression
    (real label, squared error, MSE), count (label >= 0, Poisson loss on a log link), focal
    (label 0/1, focal loss), tweedie (label >= 0, Tweedie loss on a log link), lognormal
    (label > 0, squared error of log y), multiclass (label 0..C-1, softmax cross-entropy over
    C logits). `options` are the kind's (e.g. focal's gamma and alpha, tweedie's power,
    multiclass's classes), checked against its `Options`.
    The label is a column (`label`, optionally mapped through `values`) or an `expression`
    over other columns (True/False become 1/0), so a new task setup needs no code. Expressions
    and spaces are conditions in a closed grammar (`mtlrec.expression`), never code.
    A task's sample space is the rows where its label exists and, if `space` is given, where
    that condition on other columns holds (e.g. conversion only where `click == 1`); the
    task's loss and metrics see only those rows.
    `calibration` (binary and focal tasks) maps the probability after training, fitted on the
    validation split (`mtlrec.calibration`).
    """

    name: str
    type: str = Field("binary", description="the task's kind, a name registered in mtlrec.tasks")
    options: dict[str, Any] = Field({}, description="the kind's options, e.g. {'gamma': 2.0} for focal")
    label: str | None = Field(None, description="label column; defaults to the task name")
    values: dict[str, float] | None = Field(
        None, description="map the label column's raw values to labels, e.g. {'yes': 1, 'no': 0}"
    )
    expression: str | None = Field(
        None, description="derive the label from other columns instead, e.g. \"marital == 'Never married'\""
    )
    weight: float = Field(1.0, ge=0.0, description="fixed weight of this task's loss")
    sample_weight: str | None = Field(
        None, description="a column of per-row weights for this task's loss (instead of the schema's)"
    )
    space: str | None = Field(
        None, description="sample space: a condition on the table's columns, e.g. 'click == 1'"
    )
    within: str | None = Field(
        None, description="a binary task whose event this one implies (five_star within like): predicted as "
                          "P(parent) * P(this | parent), so never above the parent's")
    calibration: Literal["platt", "isotonic"] | None = Field(
        None, description="post-hoc calibration of a binary or focal task's probability, fitted on the validation "
                          "split after training (mtlrec.calibration): platt (z' = a z + b) or isotonic")

    @field_validator("type")
    @classmethod
    def _registered_kind(cls, value: str) -> str:
        kind_of(value)  # checked when the config is read, so kinds registered after import count
        return value

    @model_validator(mode="after")
    def _check(self) -> Task:
        kind = self.kind  # its options, validated: a ValueError names the task and the option
        if self.calibration and not (kind.probability and kind.width == 1):
            raise ValueError(f"task {self.name!r}: calibration {self.calibration!r} applies to tasks predicting one "
                             f"probability (binary, focal), not type {self.type!r}")
        if self.expression and (self.label or self.values):
            raise ValueError(f"task {self.name!r}: give either expression or label/values, not both")
        for what, text in (("expression", self.expression), ("space", self.space)):
            if text is not None:
                try:
                    parse(text)
                except ExpressionError as err:
                    raise ValueError(f"task {self.name!r}: {what} {text!r}: {err}") from None
        return self

    @property
    def kind(self) -> TaskKind:
        """The task's kind, carrying its options; a ValueError names the task and the option."""
        cls = type(kind_of(self.type))
        return cls(typed_options(f"task {self.name!r}", cls.Options, self.options, list(cls.Options.model_fields)))

    @property
    def column(self) -> str | None:
        """The label column, or None for a label derived by `expression`."""
        return None if self.expression else (self.label or self.name)


class Schema(ConfigBlock):
    """Features and tasks. `sample_weight` names a column of per-row weights (>= 0) for every
    task's loss (a task's own `sample_weight` takes precedence); `weighted_metrics` computes
    the metrics with them too."""

    sparse: list[SparseFeature] = []
    dense: list[DenseFeature] = []
    tasks: list[Task]
    sample_weight: str | None = None
    weighted_metrics: bool = False

    @model_validator(mode="after")
    def _check(self) -> Schema:
        if not self.tasks:
            raise ValueError("at least one task is needed")
        if not self.sparse and not self.dense:
            raise ValueError("at least one sparse or dense feature is needed")
        for kind, names in (
            ("feature", [f.name for f in self.sparse] + [f.name for f in self.dense]),
            ("task", [t.name for t in self.tasks]),
        ):
            seen = {n for n in names if names.count(n) > 1}
            if seen:
                raise ValueError(f"duplicate {kind} names: {sorted(seen)}")
        if all(t.weight == 0 for t in self.tasks):
            raise ValueError("every task has weight 0: nothing would be trained; give a task a positive weight")
        labels = {t.column for t in self.tasks if t.column}
        inputs = {f.name for f in self.sparse} | {f.name for f in self.dense}
        if labels & inputs:
            raise ValueError(f"label columns used as input features: {sorted(labels & inputs)}")
        weight_columns = {c for c in [self.sample_weight] + [t.sample_weight for t in self.tasks] if c}
        if weight_columns & inputs:
            raise ValueError(f"sample weight columns used as input features: {sorted(weight_columns & inputs)}")
        if self.weighted_metrics and not weight_columns:
            raise ValueError("weighted_metrics needs a sample_weight column")
        self._check_tables()
        self.nested_order()
        nested = {t.name: t.within for t in self.tasks if t.within}
        for t in self.tasks:  # calibrating one task of a nested pair could put the child above the parent
            if t.calibration and (t.name in nested or t.name in nested.values()):
                pair = next(f"{c} within {p}" for c, p in nested.items() if t.name in (c, p))
                raise ValueError(f"task {t.name!r}: calibration cannot apply to a task of a nested pair ({pair}): "
                                 "it would no longer keep P(child) <= P(parent)")
        return self

    def nested_order(self) -> list[Task]:
        """The tasks `within` another, each after its parent (ValueError: an unknown or non-binary
        parent, a non-binary task, a cycle)."""
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:
            if t.within is None:
                continue
            parent = by_name.get(t.within)
            if parent is None:
                raise ValueError(f"task {t.name!r}: within {t.within!r} is not a task; tasks: {list(by_name)}")
            if not (t.kind.probability and parent.kind.probability):
                raise ValueError(f"task {t.name!r} within {t.within!r}: both must predict a probability "
                                 "(binary or focal)")
        order: list[Task] = []
        placed: set[str] = set()
        pending = [t for t in self.tasks if t.within is not None]
        while pending:
            ready = [t for t in pending if t.within not in {p.name for p in pending}]
            if not ready:
                raise ValueError("tasks' within form a cycle: " + ", ".join(f"{t.name} within {t.within}" for t in pending))
            order += ready
            placed |= {t.name for t in ready}
            pending = [t for t in pending if t.name not in placed]
        return order

    def _check_tables(self) -> None:
        """Features sharing a table agree on what the table is; attention and sequence targets exist."""
        by_name = {f.name: f for f in self.sparse}
        first: dict[str, SparseFeature] = {}
        for f in self.sparse:
            other = first.setdefault(f.table, f)
            for field in ("embedding_dim", "min_freq", "hash_buckets", "vocab_size"):
                if getattr(f, field) != getattr(other, field):
                    raise ValueError(f"sparse features {other.name!r} and {f.name!r} share table {f.table!r} but "
                                     f"differ in {field} ({getattr(other, field)} vs {getattr(f, field)})")
            if f.target is not None:
                what = "attention target" if f.attention is not None else "sequence_target"
                target = by_name.get(f.target)
                if target is None or target.multi_valued:
                    raise ValueError(f"sparse feature {f.name!r}: {what} {f.target!r} must be a single-valued sparse "
                                     "feature")
                if target.embedding_dim != f.embedding_dim:
                    raise ValueError(f"sparse feature {f.name!r}: {what} {target.name!r} has embedding_dim "
                                     f"{target.embedding_dim}, the list {f.embedding_dim}; they must match")

    @property
    def singles(self) -> list[SparseFeature]:
        """The single-valued sparse features: the columns of `ids [B, S]`."""
        return [f for f in self.sparse if not f.multi_valued]

    @property
    def lists(self) -> list[SparseFeature]:
        """The multi-valued sparse features, one `Jagged` each."""
        return [f for f in self.sparse if f.multi_valued]

    @property
    def sequences(self) -> list[SparseFeature]:
        """The lists kept as sequences (`pooling: none`), for the model's sequence encoder."""
        return [f for f in self.lists if f.pooling == "none"]

    @property
    def tables(self) -> dict[str, list[SparseFeature]]:
        """Table name -> the features reading it, in schema order (tables in order of first use)."""
        out: dict[str, list[SparseFeature]] = {}
        for f in self.sparse:
            out.setdefault(f.table, []).append(f)
        return out

    def weight_column(self, task: Task) -> str | None:
        """The column of per-row weights of a task's loss, or None (every row weighs 1)."""
        return task.sample_weight or self.sample_weight

    @property
    def weighted(self) -> bool:
        return any(self.weight_column(t) for t in self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def require_vocab(self) -> None:
        """Raise if a sparse feature has no vocabulary size yet (the encoder sets it)."""
        missing = [f.name for f in self.sparse if f.vocab_size is None]
        if missing:
            raise ValueError(
                f"sparse features without vocab_size: {missing}; fit an Encoder on the data "
                "or set vocab_size in the schema"
            )

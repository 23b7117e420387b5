"""The model shape every architecture shares: embedding -> backbone -> one tower per task.

Only the backbone differs between architectures. It maps the embedded input `x [B, I]` to
per-task representations `[B, T, H]` (and, for expert models, the gate weights); the
embedding, towers and heads around it are written once, here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from mtlrec.data.features import Features
from mtlrec.nn import MLP, FeatureEmbedding
from mtlrec.nn.sequence import sequence_encoders
from mtlrec.schema import Schema
from mtlrec.train.gradients import SharedParameters

if TYPE_CHECKING:
    from mtlrec.models.options import ModelOptions


class BackboneOutput(NamedTuple):
    """What a backbone returns. `representation` is Z, the backbone's shared representation:
    the last tensor every task reads, with the shared parameters upstream of it
    (`Backbone.has_representation` says whether a backbone gives one; each backbone's
    docstring says which tensor it is). Its shape is the backbone's own (`[B, H]`,
    `[B, E, H]`, ...): gradient methods with `on: representation` take the task gradients on
    it (`mtlrec.losses.weighting.base`)."""

    task_reps: Tensor  # [B, T, H]
    gates: dict[str, Tensor]  # gate name -> [B, experts the gate mixes]
    penalty: Tensor | None = None  # the backbone's own loss term (load balance, sparsity), added to the training loss
    representation: Tensor | None = None  # Z [B, ...]; None: the backbone names none


class ModelOutput(NamedTuple):
    logits: Tensor  # [B, L]: each task's tower's logits side by side (L = T unless a task has several, `TaskSet`)
    gates: dict[str, Tensor]
    extra_logits: dict[str, Tensor] = {}  # more predictions by name, e.g. ESMM's pCVR: name -> [B]
    penalty: Tensor | None = None  # a model's own loss term, added to the training loss (AITM)
    representation: Tensor | None = None  # Z, the backbone's shared representation (`BackboneOutput`); None: none


class Backbone(nn.Module):
    """Interface: built as `Backbone(in_dim, task_names, options)` (its typed options);
    `forward(x [B, I]) -> BackboneOutput`, with `out_dim` = H.

    `gate_experts` names, for every gate, the experts its weights refer to, in order
    (e.g. `"level1/click" -> ["click/0", "click/1", "shared/0"]`); empty without gates.
    `task_modules(k)` lists the modules only task k uses (its gates), for alternating training;
    `task_slices(k)` the entries of fused tensors only task k uses (its own experts in a bank
    shared with other experts), which gradient methods leave out of the shared parameters.
    `has_representation`: whether `forward` gives the shared representation Z
    (`BackboneOutput.representation`); False by default.
    """

    out_dim: int
    gate_experts: dict[str, list[str]] = {}
    has_representation: bool = False

    def request_representation(self) -> None:
        """From now on, `forward` gives Z (a weighting reads it). Backbones whose Z costs nothing
        give it always; expert levels form it only when asked (it costs a copy of the
        experts' outputs)."""

    def task_modules(self, task: int) -> list[nn.Module]:
        return []

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Parameters only task k uses outside `task_modules` (e.g. AdaTT's native weights)."""
        return []

    def task_slices(self, task: int) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, bool mask) of the entries of shared tensors only task k uses."""
        return []


class MultiTaskModel(nn.Module):
    """FeatureEmbedding -> backbone -> towers (one MLP per task, ending in its kind's `width`
    logits: one, or C for a multiclass task).

    Each tower has its own parameters, so a step on one task's loss alone (alternating
    training) can leave every other tower untouched.

    Input: `Features` (ids `[B, S]`, dense `[B, D]`, lists). Output: `ModelOutput` with logits `[B, L]`,
    task k's in the columns `TaskSet.slices[k]` (L = T when every task has one logit;
    `mtlrec.tasks.TaskSet.predict` turns them into what each task reports).

    Example:
        >>> import torch
        >>> from mtlrec.models.moe import MMoE, MoEOptions
        >>> from mtlrec.schema import Schema, SparseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="item", vocab_size=100, embedding_dim=4)],
        ...                 tasks=[Task(name="click"), Task(name="finish")])
        >>> model = MultiTaskModel(schema, MMoE, MoEOptions(num_experts=3, expert_hidden=[16]))
        >>> out = model(Features(torch.tensor([[5], [42], [0]]), torch.zeros(3, 0)))
        >>> out.logits.shape, out.gates["gate/click"].shape
        (torch.Size([3, 2]), torch.Size([3, 3]))
    """

    def __init__(self, schema: Schema, backbone: type[Backbone], options: ModelOptions):
        super().__init__()
        self.embedding = FeatureEmbedding(schema)
        self.sequence_encoders = sequence_encoders(schema, options.sequence_encoder)  # one per pooling: none list
        self.input_dim = self.embedding.out_dim + sum(encoder.out_dim for encoder in self.sequence_encoders)
        self.backbone = backbone(self.input_dim, schema.task_names, options)
        self.towers = nn.ModuleList(
            MLP(self.backbone.out_dim, options.tower_hidden, output_dim=task.kind.width,
                activation=options.activation, dropout=options.tower_dropout)
            for task in schema.tasks
        )

    def forward(self, features: Features) -> ModelOutput:
        out = self.backbone(self.inputs(features))
        return ModelOutput(self.tower_logits(out.task_reps), out.gates, penalty=out.penalty,
                           representation=out.representation)

    def inputs(self, features: Features, embedding: FeatureEmbedding | None = None) -> Tensor:
        """x `[B, input_dim]`, what the backbone reads: the embedded row (`embedding`, default the
        model's own), then each `pooling: none` list encoded by its sequence encoder."""
        embedding = self.embedding if embedding is None else embedding
        x = embedding(features)
        if not self.sequence_encoders:
            return x
        encoded = [encoder(s) for encoder, s in zip(self.sequence_encoders, embedding.sequences(features))]
        return torch.cat([x, *encoded], dim=1)

    def request_representation(self) -> None:
        """Make `forward` give the backbone's shared representation Z (`Backbone.request_representation`)."""
        self.backbone.request_representation()

    @property
    def has_representation(self) -> bool:
        """Whether `forward` gives the backbone's shared representation Z (`ModelOutput.representation`)."""
        return self.backbone.has_representation

    def tower_logits(self, reps: Tensor) -> Tensor:
        """`[B, T, H]` task representations -> `[B, L]` logits, tower k reading reps[:, k]."""
        return torch.cat([tower(reps[:, k]) for k, tower in enumerate(self.towers)], dim=1)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Parameters only task `task` uses: its tower and the backbone's task modules."""
        modules = [self.towers[task], *self.backbone.task_modules(task)]
        return [p for m in modules for p in m.parameters()] + self.backbone.task_parameters(task)


class SingleTaskModels(nn.Module):
    """The single-task baseline: T independent networks, each with its own embedding,
    bottom MLP and tower, trained on its task alone. Nothing is shared, so training them
    together on the summed loss moves each exactly as training it alone would.
    """

    def __init__(self, schema: Schema, backbone: type[Backbone], options: ModelOptions):
        super().__init__()
        self.nets = nn.ModuleList(
            MultiTaskModel(schema.model_copy(update={"tasks": [task]}), backbone, options)
            for task in schema.tasks
        )

    def forward(self, features: Features) -> ModelOutput:
        logits = torch.cat([net(features).logits for net in self.nets], dim=1)
        return ModelOutput(logits, {})

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return list(self.nets[task].parameters())


def shared_parameters(model: nn.Module, num_tasks: int) -> SharedParameters:
    """The parameters no single task owns (embedding, experts, shared layers), in model order,
    less the fused-tensor entries one task owns (`Backbone.task_slices`)."""
    owned = {id(p) for k in range(num_tasks) for p in model.task_parameters(k)}
    backbone = getattr(model, "backbone", None)
    owned_entries: dict[int, Tensor] = {}
    for k in range(num_tasks):
        for param, mask in (backbone.task_slices(k) if backbone is not None else []):
            owned_entries[id(param)] = owned_entries.get(id(param), torch.zeros_like(mask)) | mask
    params = [p for p in model.parameters() if id(p) not in owned]
    return SharedParameters(params, [~owned_entries[id(p)] if id(p) in owned_entries else None for p in params])

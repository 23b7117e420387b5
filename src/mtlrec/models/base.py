"""The model shape every architecture shares: embedding -> backbone -> one tower per task.

Only the backbone differs between architectures. It maps the embedded input `x [B, I]` to
per-task representations `[B, T, H]` (and, for expert models, the gate weights); the
embedding, towers and heads around it are written once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtlrec.nn import ExpertBank, FeatureEmbedding
from mtlrec.schema import Schema


class BackboneOutput(NamedTuple):
    task_reps: Tensor  # [B, T, H]
    gates: dict[str, Tensor]  # gate name -> [B, experts the gate mixes]


class ModelOutput(NamedTuple):
    logits: Tensor  # [B, T]
    gates: dict[str, Tensor]


class Backbone(nn.Module):
    """Interface: built as `Backbone(in_dim, task_names, **options)`;
    `forward(x [B, I]) -> BackboneOutput`, with `out_dim` = H.

    `gate_experts` names, for every gate, the experts its weights refer to, in order
    (e.g. `"level1/click" -> ["click/0", "click/1", "shared/0"]`); empty without gates.
    """

    out_dim: int
    gate_experts: dict[str, list[str]] = {}


class MultiTaskModel(nn.Module):
    """FeatureEmbedding -> backbone -> towers (one MLP per task, ending in one logit).

    Input: sparse ids `[B, S]`, dense values `[B, D]`. Output: `ModelOutput` with logits `[B, T]`.
    `predict` turns logits into what each task reports: a probability (binary) or a value.
    """

    def __init__(
        self,
        schema: Schema,
        backbone: type[Backbone],
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        **backbone_options,
    ):
        super().__init__()
        self.embedding = FeatureEmbedding(schema)
        self.backbone = backbone(self.embedding.out_dim, schema.task_names, **backbone_options)
        t = schema.num_tasks
        self.towers = ExpertBank(
            self.backbone.out_dim,
            t,
            [*tower_hidden, 1],
            activation=backbone_options.get("activation", "relu"),
            dropout=tower_dropout,
            groups=range(t),
            activate_last=False,
        )
        self.register_buffer(
            "binary", torch.tensor([task.type == "binary" for task in schema.tasks]), persistent=False
        )

    def forward(self, sparse: Tensor, dense: Tensor) -> ModelOutput:
        reps, gates = self.backbone(self.embedding(sparse, dense))
        logits = self.towers(reps.transpose(0, 1)).squeeze(-1)  # [B, T]
        return ModelOutput(logits, gates)

    def predict(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """Per-task predictions `[B, T]`: sigmoid(logit) for binary tasks, the value for regression."""
        return to_predictions(self(sparse, dense).logits, self.binary)


def to_predictions(logits: Tensor, binary: Tensor) -> Tensor:
    """`[B, T]` logits -> probabilities where `binary[t]`, raw values elsewhere."""
    return torch.where(binary, torch.sigmoid(logits), logits)


class SingleTaskModels(nn.Module):
    """The single-task baseline: T independent networks, each with its own embedding,
    bottom MLP and tower, trained on its task alone. Nothing is shared, so training them
    together on the summed loss moves each exactly as training it alone would.
    """

    def __init__(self, schema: Schema, backbone: type[Backbone], **options):
        super().__init__()
        self.nets = nn.ModuleList(
            MultiTaskModel(schema.model_copy(update={"tasks": [task]}), backbone, **options)
            for task in schema.tasks
        )
        self.register_buffer(
            "binary", torch.tensor([task.type == "binary" for task in schema.tasks]), persistent=False
        )

    def forward(self, sparse: Tensor, dense: Tensor) -> ModelOutput:
        logits = torch.cat([net(sparse, dense).logits for net in self.nets], dim=1)
        return ModelOutput(logits, {})

    def predict(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return to_predictions(self(sparse, dense).logits, self.binary)

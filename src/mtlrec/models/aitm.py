"""AITM, the Adaptive Information Transfer Multi-task framework (Xi et al., KDD 2021).

Tasks form a conversion funnel in config order (e.g. click -> purchase), all labelled on
every impression. Task t's tower input q_t comes from its own network over the shared
embedding; the AIT module lets task t read what task t-1 learned:
    z_1 = q_1;   p_{t-1} = g_{t-1}(z_{t-1})   (a transfer layer),
    z_t = sum_{u in {p_{t-1}, q_t}} w_u h_3(u),   w_u = softmax_u(<h_1(u), h_2(u)> / sqrt(k)),
with h_1, h_2, h_3 linear maps to k dims. The prediction is y_t = sigmoid(tower_t(z_t)).
The behavioural expectation calibrator penalises a later step predicted likelier than the
step before it:  L_lc = alpha * sum_{t>=2} mean(max(y_t - y_{t-1}, 0)),  added to the loss.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.data.features import Features
from mtlrec.models.base import Backbone, ModelOutput, MultiTaskModel
from mtlrec.models.options import MLPOptions
from mtlrec.models.registry import register_model
from mtlrec.models.separate import SeparateBottoms
from mtlrec.nn import activation_layer
from mtlrec.schema import Schema
from mtlrec.tasks import kind_of


class AdaptiveInformationTransfer(nn.Module):
    """(p `[B, H]`, q `[B, H]`) -> z `[B, k]`, an attention over the two inputs."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, attention_dim) for _ in range(3))
        self.scale = 1.0 / math.sqrt(attention_dim)

    def forward(self, p: Tensor, q: Tensor) -> Tensor:
        u = torch.stack([p, q], dim=1)  # [B, 2, H]
        scores = (self.query(u) * self.key(u)).sum(-1) * self.scale  # [B, 2]
        return (torch.softmax(scores, dim=1).unsqueeze(-1) * self.value(u)).sum(1)


class AITMOptions(MLPOptions):
    calibration: float = Field(0.6, ge=0.0, description="alpha, the calibrator's weight (0 turns it off)")


@register_model("aitm", AITMOptions, "a funnel of tasks passing information forward, with a calibrator loss "
                "(Xi et al. 2021)", backbone=SeparateBottoms)
class AITM(MultiTaskModel):
    """Logits `[B, T]` for the funnel's tasks; `penalty` is the calibrator loss. The AIT
    module works at the backbone's width H (k = H), so z_1 = q_1 exactly.

    Options (`AITMOptions`): calibration, alpha, the calibrator's weight (0 turns it off);
    and those of the backbone (one MLP per task) and the towers.

    No shared representation Z: the transfer layers, which later tasks share, read the tasks'
    outputs, so no one tensor has every shared parameter upstream of it.
    """

    has_representation = False

    def __init__(self, schema: Schema, backbone: type[Backbone], options: AITMOptions):
        if len(schema.tasks) < 2 or not all(kind_of(t.type).probability for t in schema.tasks):
            raise ValueError("aitm needs two or more binary tasks, in funnel order (e.g. click, then purchase)")
        if any(t.space for t in schema.tasks):
            raise ValueError("aitm trains every task on the entire impression space: remove the tasks' space")
        super().__init__(schema, backbone, options)
        self.calibration = options.calibration
        h = self.backbone.out_dim
        activation = activation_layer(options.activation)
        self.transfers = nn.ModuleList(nn.Sequential(nn.Linear(h, h), activation) for _ in schema.tasks[1:])
        self.ait = nn.ModuleList(AdaptiveInformationTransfer(h, h) for _ in schema.tasks[1:])

    def forward(self, features: Features) -> ModelOutput:
        out = self.backbone(self.inputs(features))  # its backbone has no penalty
        q, gates = out.task_reps, out.gates  # q [B, T, H]
        z = [q[:, 0]]
        for t in range(1, q.shape[1]):
            z.append(self.ait[t - 1](self.transfers[t - 1](z[-1]), q[:, t]))
        logits = self.tower_logits(torch.stack(z, dim=1))
        probs = torch.sigmoid(logits)
        penalty = self.calibration * torch.relu(probs[:, 1:] - probs[:, :-1]).mean(0).sum()
        return ModelOutput(logits, gates, penalty=penalty)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        own = super().task_parameters(task)
        return own + (list(self.ait[task - 1].parameters()) if task > 0 else [])

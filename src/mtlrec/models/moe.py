"""Mixture-of-experts backbones (Ma et al., KDD 2018).

Experts f_i(x), i = 1..E, read the same input.
OMoE: one gate for all tasks, every task reads   h = sum_i g_i(x) f_i(x).
MMoE: one gate per task,                         h_k = sum_i g_k,i(x) f_i(x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.ple import ExtractionLevel
from mtlrec.nn import ExpertBank, Gate


class OMoE(Backbone):
    """One-gate mixture of experts: x `[B, I]` -> the same mixture for every task `[B, T, H]`.

    Args:
        num_experts: E.
        expert_hidden: layer sizes of each expert MLP.
        gate_hidden: hidden layers of the gate (empty: a linear gate, as in the paper).
        activation, dropout, batch_norm: of the experts.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        gate_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.num_tasks = len(task_names)
        self.experts = ExpertBank(in_dim, num_experts, expert_hidden, activation, dropout, batch_norm)
        self.gate = Gate(in_dim, num_experts, gate_hidden, activation)
        self.out_dim = self.experts.out_dim
        self.gate_experts = {"gate": [f"shared/{i}" for i in range(num_experts)]}

    def forward(self, x: Tensor) -> BackboneOutput:
        experts = self.experts(x)  # [B, E, H]
        weights = self.gate(x)  # [B, E]
        mixed = torch.bmm(weights.unsqueeze(1), experts)  # [B, 1, H]
        return BackboneOutput(mixed.expand(-1, self.num_tasks, -1), {"gate": weights})


class MMoE(Backbone):
    """Multi-gate mixture of experts: x `[B, I]` -> one mixture per task `[B, T, H]`.

    The same computation as one CGC level without task-specific experts, and built as one.

    Args:
        num_experts: E, shared by all tasks.
        expert_hidden, gate_hidden, activation, dropout, batch_norm: as in OMoE.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        gate_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.level = ExtractionLevel(
            in_dim, task_names, [0] * len(task_names), num_experts, expert_hidden, gate_hidden,
            shared_gate=False, first=True, activation=activation, dropout=dropout,
            batch_norm=batch_norm, name="gate",
        )
        self.out_dim = self.level.out_dim
        self.gate_experts = self.level.gate_experts

    def task_modules(self, task: int) -> list[nn.Module]:
        return self.level.task_modules(task)

    def forward(self, x: Tensor) -> BackboneOutput:
        task_reps, _, gates = self.level(x)
        return BackboneOutput(task_reps, gates)

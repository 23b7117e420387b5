"""Multi-level MMoE: MMoE levels stacked, as the AdaTT authors' baseline (Li et al., "AdaTT:
Adaptive Task-to-Task Fusion Network for Multitask Learning in Recommendations", KDD 2023;
the multi-level extension of MMoE, Ma et al. KDD 2018, in their reference code).

Level j = 1..L has E_j experts f_i^(j), i = 1..E_j, MLPs shared by every task. Every gate of
every level reads the backbone's input x (not the level's input):
    g(x) = softmax(W h(x) + b)                          (h: the gate's hidden layers, or none)
Level 1's experts all read x. A level below the top has one gate per expert of the level
above, and expert i of level j+1 reads the mixture of its gate:
    z_i^(1) = x,     z_i^(j+1) = sum_m g_i^(j)(x)_m f_m^(j)(z_m^(j)),    i = 1..E_{j+1}
The top level has one gate per task, and task k's tower reads
    h_k = sum_m g_k^(L)(x)_m f_m^(L)(z_m^(L)).
With L = 1 this is MMoE (Ma et al. 2018, Eq. 5-6). The reference code has one expert count for
every level; a count per level (level j then has E_{j+1} gates) is this library's extension.
Its gates' hidden layers may differ per level; here `gate_hidden` is one list for every gate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import ExpertOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import ExpertBank, Gate


class MLMMoEOptions(ExpertOptions):
    num_levels: PositiveInt = Field(2, description="levels of experts (1 = MMoE)")
    num_experts: PositiveInt | list[PositiveInt] = Field(
        4, description="experts per level: one count for every level, or one count per level")
    expert_hidden: list[PositiveInt] | list[list[PositiveInt]] = Field(
        [256, 128], description="expert layer sizes, the same on every level, or one list per level")

    @model_validator(mode="after")
    def _one_value_per_level(self) -> MLMMoEOptions:
        if isinstance(self.num_experts, list) and len(self.num_experts) != self.num_levels:
            raise ValueError(f"num_experts has {len(self.num_experts)} counts for {self.num_levels} levels")
        hidden = self.expert_hidden
        if hidden and not isinstance(hidden[0], int) and len(hidden) != self.num_levels:
            raise ValueError(f"expert_hidden has {len(hidden)} lists for {self.num_levels} levels")
        if not hidden or any(not h for h in hidden if isinstance(h, list)):
            raise ValueError("expert_hidden needs at least one layer on every level")
        return self

    def experts_per_level(self) -> list[int]:
        count = self.num_experts
        return list(count) if isinstance(count, list) else [count] * self.num_levels

    def hidden_per_level(self) -> list[list[int]]:
        hidden = self.expert_hidden
        return [list(h) for h in hidden] if isinstance(hidden[0], list) else [list(hidden)] * self.num_levels


class MixtureLevel(nn.Module):
    """One level: E experts in one fused bank and G softmax gates over them.

    Input: the experts' input, x `[B, I]` on the first level (every expert reads it) or
    `[E, B, I]` above it (expert i reads row i), and the gates' input x `[B, X]`.
    Output: the G mixtures `[B, G, H]` and the gate weights, G tensors `[B, E]`.
    """

    def __init__(self, expert_in: int, gate_in: int, num_experts: int, num_gates: int, hidden: Sequence[int],
                 gate_hidden: Sequence[int], first: bool, activation: str, dropout: float, batch_norm: bool):
        super().__init__()
        self.experts = ExpertBank(expert_in, num_experts, hidden, activation, dropout, batch_norm,
                                  groups=None if first else range(num_experts))
        self.gates = nn.ModuleList(Gate(gate_in, num_experts, gate_hidden, activation) for _ in range(num_gates))
        self.out_dim = self.experts.out_dim

    def forward(self, inputs: Tensor, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        experts = self.experts(inputs)  # [B, E, H]
        weights = [gate(x) for gate in self.gates]  # G x [B, E]
        mixed = torch.bmm(torch.stack(weights, dim=1).to(experts.dtype), experts)  # [B, G, H]
        return mixed, weights


@register_model("ml_mmoe", MLMMoEOptions, "stacked MMoE levels, every gate reading the input (AdaTT's baseline, "
                "Li et al. 2023)")
class MLMMoE(Backbone):
    """Multi-level MMoE: x `[B, I]` -> one mixture of the top level's experts per task `[B, T, H]`.

    Options (`MLMMoEOptions`): num_levels L (1 = MMoE); num_experts, one count for every level
    or one per level; expert_hidden, the same on every level (`[256, 128]`) or one list per
    level (`[[96], [48]]`); gate_hidden, the hidden layers of every gate (empty: linear gates);
    activation, dropout, batch_norm of the experts.

    Gates are named `level{j}/expert{i}` (level j's gate feeding expert i of level j+1) and
    `level{L}/{task}`; experts `level{j}/shared/{i}`, since every task reads every expert.

    Example:
        >>> import torch
        >>> backbone = MLMMoE(6, ["click", "buy"], MLMMoEOptions(num_experts=[3, 2], expert_hidden=[[8], [4]]))
        >>> out = backbone(torch.randn(5, 6))
        >>> out.task_reps.shape, out.gates["level1/expert1"].shape, out.gates["level2/buy"].shape
        (torch.Size([5, 2, 4]), torch.Size([5, 3]), torch.Size([5, 2]))
    """

    def __init__(self, in_dim: int, task_names: Sequence[str], options: MLMMoEOptions):
        super().__init__()
        o = options
        counts, hidden = o.experts_per_level(), o.hidden_per_level()
        self.levels = nn.ModuleList()
        self.gate_names: list[list[str]] = []  # per level, its gates' names in order
        self.gate_experts = {}
        width = in_dim
        for j, (count, sizes) in enumerate(zip(counts, hidden)):
            top = j == len(counts) - 1
            gate_owners = list(task_names) if top else [f"expert{i}" for i in range(counts[j + 1])]
            level = MixtureLevel(width, in_dim, count, len(gate_owners), sizes, o.gate_hidden, first=j == 0,
                                 activation=o.activation, dropout=o.dropout, batch_norm=o.batch_norm)
            self.levels.append(level)
            self.gate_names.append([f"level{j + 1}/{owner}" for owner in gate_owners])
            experts = [f"level{j + 1}/shared/{i}" for i in range(count)]
            self.gate_experts |= {name: experts for name in self.gate_names[-1]}
            width = level.out_dim
        self.out_dim = width

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.levels[-1].gates[task]]

    def forward(self, x: Tensor) -> BackboneOutput:
        gates: dict[str, Tensor] = {}
        inputs = x
        for level, names in zip(self.levels, self.gate_names):
            mixed, weights = level(inputs, x)
            gates |= dict(zip(names, weights))
            inputs = mixed.transpose(0, 1)  # [E_{j+1}, B, H]: expert i of the next level reads row i
        return BackboneOutput(mixed, gates)

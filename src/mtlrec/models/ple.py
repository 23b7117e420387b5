"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE), Tang et al., RecSys 2020.

One extraction level has, per task k, m_k task-specific experts E_k and m_s shared experts E_s.
Task k's gate mixes its own and the shared experts, computed from task k's input x_k:
    g_k(x_k) = softmax(W_k x_k),   y_k = g_k(x_k)^T [E_k(x_k); E_s(x_s)]        (paper Eq. 2-4)
Every level but the last also has a shared gate over all experts of the level, from x_s:
    y_s = g_s(x_s)^T [E_1(x_1); ...; E_T(x_T); E_s(x_s)]
Level 1 reads x everywhere (x_k = x_s = x). Level j > 1 reads level j-1's outputs:
x_k = y_k, x_s = y_s (Eq. 5). The towers read the last level's y_k. CGC is PLE with one level.

With `top_k` (DeepSeekMoE routing, `mtlrec.models.moe.RoutingOptions`) every gate of every level
keeps its top_k experts among those it mixes above (task k's gate: E_k and E_s; the shared gate:
all of the level's), g = the kept softmax values, 0 elsewhere; `always_on_experts` A_j per level,
read from x_s, are added to every gate's mixture with weight 1:
    y_k = sum_j A_j(x_s) + g_k(x_k)^T [E_k(x_k); E_s(x_s)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.moe import RoutingOptions
from mtlrec.models.options import ExpertOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import ExtractionLevel


class LevelOptions(ExpertOptions):
    """Stacked extraction levels of task-specific and shared experts (PLE, AdaTT)."""

    num_levels: PositiveInt = Field(2, description="extraction levels (1 = CGC)")
    task_experts: NonNegativeInt | list[NonNegativeInt] = Field(
        1, description="experts per task on every level: one count for all tasks, or one per task")
    shared_experts: NonNegativeInt = Field(1, description="shared experts per level")
    expert_hidden: list[PositiveInt] | list[list[PositiveInt]] = Field(
        [256, 128], description="expert layer sizes, the same on every level, or one list per level")


class PLEOptions(LevelOptions, RoutingOptions):  # LevelOptions first: its expert_hidden (one list per level allowed)
    @model_validator(mode="after")
    def _top_k_within_experts(self) -> PLEOptions:
        counts = [self.task_experts] if isinstance(self.task_experts, int) else self.task_experts
        fewest = min(counts, default=0) + self.shared_experts
        if self.top_k is not None and self.top_k > fewest:
            raise ValueError(f"top_k = {self.top_k} exceeds the {fewest} experts a task's gate routes among "
                             "(its task_experts and the shared_experts)")
        return self


class AdaTTOptions(LevelOptions):
    task_experts: NonNegativeInt | list[NonNegativeInt] = Field(
        2, description="experts per task on every level (at least 1 each)")
    shared_experts: NonNegativeInt = Field(0, description="shared experts per level (0: the paper's AdaTT-sp)")


@register_model("ple", PLEOptions, "stacked CGC levels with a shared gate on all but the last (Tang et al. 2020)")
@register_model("cgc", PLEOptions, "task-specific and shared experts, each task's gate over its own and the shared "
                "(Tang et al. 2020)", fixed={"num_levels": 1})
class PLE(Backbone):
    """Progressive Layered Extraction: `num_levels` stacked CGC levels. x `[B, I]` -> `[B, T, H]`.

    Options (`PLEOptions`): num_levels (1 = CGC, registered as `cgc`); task_experts, per task
    on every level (one count, or one per task); shared_experts per level; expert_hidden, the
    same on every level (`[256, 128]`) or one list per level (`[[256, 128], [64]]`);
    gate_hidden (empty: the paper's linear softmax gate); activation, dropout, batch_norm;
    the routing options (`RoutingOptions`): top_k, each gate's kept experts among those it
    mixes (None: all); always_on_experts per level; renormalise; balance (none, aux_loss,
    bias) with balance_weight or bias_step; dispatch (dense or sparse).

    Shared representation Z: the last level's shared experts' outputs `[B, m_s, H]` (with
    always-on experts, their sum as one more row), which every task's gate mixes. Paths
    through the last level's task experts and gates reach the losses around Z: in CGC the
    embedding reaches them so, in PLE also the lower levels. With `dispatch: sparse`, or
    without shared and always-on experts, there is no Z.

    Example:
        >>> import torch
        >>> options = PLEOptions(num_levels=2, task_experts=3, shared_experts=2, expert_hidden=[4],
        ...                      top_k=2, always_on_experts=1, balance="aux_loss")
        >>> out = PLE(in_dim=6, task_names=["click", "buy"], options=options).train()(torch.randn(5, 6))
        >>> out.task_reps.shape, (out.gates["level1/shared"] > 0).sum(1).tolist(), out.penalty.shape
        (torch.Size([5, 2, 4]), [2, 2, 2, 2, 2], torch.Size([]))
    """

    fusion = "own"  # task gates mix their own and the shared experts
    native = False

    def __init__(self, in_dim: int, task_names: Sequence[str], options: PLEOptions):
        super().__init__()
        o = options
        num_levels, task_experts, expert_hidden = o.num_levels, o.task_experts, o.expert_hidden
        t = len(task_names)
        counts = [task_experts] * t if isinstance(task_experts, int) else list(task_experts)
        if expert_hidden and not isinstance(expert_hidden[0], int):
            per_level = [list(h) for h in expert_hidden]
            if len(per_level) != num_levels:
                raise ValueError(f"expert_hidden has {len(per_level)} lists for {num_levels} levels")
        else:
            per_level = [list(expert_hidden)] * num_levels
        routed = options if isinstance(options, RoutingOptions) else None  # AdaTT's options do not route
        routing = routed.routing() if routed else None
        always_on = routed.always_on_experts if routed else 0
        self.levels = nn.ModuleList()
        width = in_dim
        for j, hidden in enumerate(per_level):
            level = ExtractionLevel(
                width, task_names, counts, o.shared_experts, hidden, o.gate_hidden,
                shared_gate=j < num_levels - 1 and (o.shared_experts > 0 or self.fusion == "own"),
                first=j == 0, activation=o.activation, dropout=o.dropout, batch_norm=o.batch_norm,
                name=f"level{j + 1}", fusion=self.fusion, native=self.native,
                always_on_experts=always_on, routing=routing,
            )
            self.levels.append(level)
            width = level.out_dim
        self.out_dim = width
        self.gate_experts = {g: e for level in self.levels for g, e in level.gate_experts.items()}
        self.gate_top_k = {g: k for level in self.levels for g, k in level.gate_top_k.items()}
        for level in self.levels[:-1]:  # Z is the last level's: the others need not form theirs
            level.has_representation = False
        self.has_representation = self.levels[-1].has_representation

    def request_representation(self) -> None:
        self.levels[-1].form_representation = self.levels[-1].has_representation  # Z is the last level's

    def task_modules(self, task: int) -> list[nn.Module]:
        return [m for level in self.levels for m in level.task_modules(task)]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for level in self.levels for p in level.task_parameters(task)]

    def task_slices(self, task: int) -> list[tuple[nn.Parameter, Tensor]]:
        return [s for level in self.levels for s in level.task_slices(task)]

    def forward(self, x: Tensor) -> BackboneOutput:
        gates: dict[str, Tensor] = {}
        penalty = None
        for level in self.levels:
            out = level(x)
            gates.update(out.gates)
            if out.penalty is not None:
                penalty = out.penalty if penalty is None else penalty + out.penalty
            reps = out.task_reps
            inputs = reps if out.shared is None else torch.cat([reps, out.shared.unsqueeze(1)], dim=1)
            x = inputs.transpose(0, 1)  # [T(+1), B, H]: the next level's inputs
        return BackboneOutput(out.task_reps, gates, penalty, out.representation)  # Z: the last level's


@register_model("adatt", AdaTTOptions, "task expert levels, each task fusing all experts plus its own native ones "
                "(Li et al. 2023)")
class AdaTT(PLE):
    """AdaTT, Adaptive Task-to-Task Fusion (Li et al., KDD 2023). x `[B, I]` -> `[B, T, H]`.

    Levels of task-specific experts, as in PLE, but every task fuses every expert of the level:
        f_t = v_t^T E_t(x_t) + g_t(x_t)^T [E_1(x_1); ...; E_T(x_T); E_s(x_s)],
    g_t = softmax over all experts, v_t a learned weight per native expert of task t (starting
    at 1/m_t). With `shared_experts` = 0 this is the paper's AdaTT-sp; with shared experts a
    shared gate over all experts feeds them on the next level (every level but the last).

    Shared representation Z: every expert's output on the last level `[B, E, H]` (every task's
    gate mixes them all).

    Options (`AdaTTOptions`): as PLE, with `task_experts` at least 1 per task, without routing.
    """

    fusion = "all"
    native = True

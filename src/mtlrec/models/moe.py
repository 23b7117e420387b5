"""Mixture-of-experts backbones (Ma et al., KDD 2018), with optional top-k routing (DeepSeekMoE).

Experts f_i(x), i = 1..E, read the same input.
OMoE: one gate for all tasks, every task reads   h = sum_i g_i(x) f_i(x).
MMoE: one gate per task,                         h_k = sum_i g_k,i(x) f_i(x).

Routing (`RoutingOptions`, also taken by CGC and PLE; Dai et al., ACL 2024, Eq. 9-11): each gate
keeps its top_k experts, g_k,i = s_k,i = softmax_i(W_k x) for those and 0 for the others
(rescaled to sum to 1 with `renormalise`, as DeepSeek-V3), and `always_on_experts` A_j are added
with weight 1:   h_k = sum_j A_j(x) + sum_i g_k,i(x) f_i(x).
Load balance by DeepSeekMoE's expert-level loss or DeepSeek-V3's selection bias: `mtlrec.nn.routing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import ExpertOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import ExpertBank, ExtractionLevel, Gate
from mtlrec.nn.routing import Routing


class OMoEOptions(ExpertOptions):
    num_experts: PositiveInt = Field(4, description="E, experts shared by all tasks")


class RoutingOptions(ExpertOptions):
    """Top-k routing of every gate, with always-on experts (DeepSeekMoE): MMoE, CGC and PLE take
    these. The defaults (top_k None, no always-on expert) are the dense softmax gates."""

    top_k: PositiveInt | None = Field(
        None, description="experts each gate keeps per row (None: all, the dense softmax gate)")
    always_on_experts: NonNegativeInt = Field(
        0, description="experts on every level added to every gate's mixture with weight 1 (DeepSeekMoE's shared)")
    renormalise: bool = Field(
        False, description="rescale the kept weights to sum to 1 (DeepSeek-V3); False keeps the softmax values")
    balance: Literal["none", "aux_loss", "bias"] = Field(
        "none", description="load balance: DeepSeekMoE's loss (aux_loss) or DeepSeek-V3's selection bias (bias)")
    balance_weight: float = Field(0.01, gt=0.0, le=1.0, description="alpha_1, the weight of the aux_loss")
    bias_step: float = Field(0.001, gt=0.0, le=1.0, description="gamma, the bias change per step (balance bias)")
    dispatch: Literal["dense", "sparse"] = Field(
        "dense", description="dense: every expert on every row, weight 0 where unchosen; sparse: each expert "
        "on the rows that chose it (same numbers)")

    @model_validator(mode="after")
    def _combinations(self) -> RoutingOptions:
        if self.top_k is None:
            for option, value, default in (("renormalise", self.renormalise, False), ("balance", self.balance, "none"),
                                           ("dispatch", self.dispatch, "dense")):
                if value != default:
                    raise ValueError(f"{option} = {value!r} needs top_k (it routes each row to top_k experts)")
        defaults = type(self).model_fields
        if self.balance != "aux_loss" and self.balance_weight != defaults["balance_weight"].default:
            raise ValueError(f"balance_weight is the weight of balance = 'aux_loss', not of {self.balance!r}")
        if self.balance != "bias" and self.bias_step != defaults["bias_step"].default:
            raise ValueError(f"bias_step is the step of balance = 'bias', not of {self.balance!r}")
        if self.dispatch == "sparse" and self.batch_norm:
            raise ValueError("dispatch = 'sparse' cannot run batch_norm in the experts; use dispatch = 'dense'")
        return self

    def routing(self) -> Routing | None:
        """The routing of each level's gates; None for dense softmax gates (top_k None)."""
        if self.top_k is None:
            return None
        return Routing(self.top_k, self.renormalise, self.balance, self.balance_weight, self.bias_step, self.dispatch)


class MoEOptions(RoutingOptions, OMoEOptions):
    @model_validator(mode="after")
    def _top_k_within_experts(self) -> MoEOptions:
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        return self


class RoutedMoEOptions(MoEOptions):
    """MMoE options with DeepSeekMoE's defaults: many small experts, two kept per row and gate,
    one always-on expert, balanced by DeepSeek-V3's bias."""

    num_experts: PositiveInt = Field(16, description="E, routed experts shared by all tasks")
    expert_hidden: list[PositiveInt] = Field([64], description="layer sizes of each (small) expert MLP")
    top_k: PositiveInt | None = Field(2, description="experts each gate keeps per row (None: all)")
    always_on_experts: NonNegativeInt = Field(1, description="experts added to every gate's mixture with weight 1")
    balance: Literal["none", "aux_loss", "bias"] = Field("bias", description="load balance: none, aux_loss or bias")


@register_model("omoe", OMoEOptions, "experts mixed by one gate for all tasks (Ma et al. 2018)")
class OMoE(Backbone):
    """One-gate mixture of experts: x `[B, I]` -> the same mixture for every task `[B, T, H]`.

    Shared representation Z: the gate's mixture `[B, 1, H]`, which every tower reads; the
    experts, the gate (shared by all tasks) and the embedding are upstream of it and every
    path to a loss passes through it.

    Options (`OMoEOptions`): num_experts E; expert_hidden, each expert's layer sizes;
    gate_hidden, the gate's hidden layers (empty: a linear gate, as in the paper);
    activation, dropout, batch_norm of the experts.
    """

    has_representation = True

    def __init__(self, in_dim: int, task_names: Sequence[str], options: OMoEOptions):
        super().__init__()
        o = options
        self.num_tasks = len(task_names)
        self.experts = ExpertBank(in_dim, o.num_experts, o.expert_hidden, o.activation, o.dropout, o.batch_norm)
        self.gate = Gate(in_dim, o.num_experts, o.gate_hidden, o.activation)
        self.out_dim = self.experts.out_dim
        self.gate_experts = {"gate": [f"shared/{i}" for i in range(o.num_experts)]}

    def forward(self, x: Tensor) -> BackboneOutput:
        experts = self.experts(x)  # [B, E, H]
        weights = self.gate(x)  # [B, E]
        mixed = torch.bmm(weights.unsqueeze(1), experts)  # [B, 1, H]
        return BackboneOutput(mixed.expand(-1, self.num_tasks, -1), {"gate": weights}, representation=mixed)


@register_model("routed_moe", RoutedMoEOptions, "MMoE with DeepSeekMoE routing: each gate keeps its top-k of many "
                "small experts, plus always-on experts (Dai et al. 2024)")
@register_model("mmoe", MoEOptions, "experts mixed by one gate per task (Ma et al. 2018)")
class MMoE(Backbone):
    """Multi-gate mixture of experts: x `[B, I]` -> one mixture per task `[B, T, H]`.

    The same computation as one CGC level without task-specific experts, and built as one.
    Shared representation Z: the experts' outputs `[B, E, H]` (with always-on experts, their
    sum joins as one more row: `[B, E + 1, H]`), which every gate mixes. The per-task
    mixtures are not a Z (each task reads only its own). The gates are task-owned, but they
    read x, so the embedding also reaches the losses around Z, through the gates. With
    `dispatch: sparse` the experts' outputs are never formed densely: no Z.
    Options (`MoEOptions`): as OMoE, and the routing options (`RoutingOptions`): top_k, each
    gate's kept experts among the num_experts (None: all, the paper's dense gate);
    always_on_experts, added with weight 1 to every task's mixture; renormalise; balance
    (none, aux_loss, bias) with balance_weight or bias_step; dispatch (dense or sparse).
    Registered also as `routed_moe`, with DeepSeekMoE's defaults (`RoutedMoEOptions`).

    Example:
        >>> import torch
        >>> options = MoEOptions(num_experts=8, expert_hidden=[4], top_k=2, always_on_experts=1)
        >>> out = MMoE(in_dim=6, task_names=["click", "buy"], options=options)(torch.randn(5, 6))
        >>> out.task_reps.shape, (out.gates["gate/click"] > 0).sum(1).tolist()
        (torch.Size([5, 2, 4]), [2, 2, 2, 2, 2])
    """

    def __init__(self, in_dim: int, task_names: Sequence[str], options: MoEOptions):
        super().__init__()
        o = options
        self.level = ExtractionLevel(
            in_dim, task_names, [0] * len(task_names), o.num_experts, o.expert_hidden, o.gate_hidden,
            shared_gate=False, first=True, activation=o.activation, dropout=o.dropout,
            batch_norm=o.batch_norm, name="gate", always_on_experts=o.always_on_experts, routing=o.routing(),
        )
        self.out_dim = self.level.out_dim
        self.gate_experts = self.level.gate_experts
        self.gate_top_k = self.level.gate_top_k
        self.has_representation = self.level.has_representation

    def task_modules(self, task: int) -> list[nn.Module]:
        return self.level.task_modules(task)

    def task_slices(self, task: int) -> list[tuple[nn.Parameter, Tensor]]:
        return self.level.task_slices(task)

    def request_representation(self) -> None:
        self.level.form_representation = self.level.has_representation

    def forward(self, x: Tensor) -> BackboneOutput:
        out = self.level(x)
        return BackboneOutput(out.task_reps, out.gates, out.penalty, out.representation)

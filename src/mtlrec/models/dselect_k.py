"""DSelect-k, a differentiable sparse gate for mixtures of experts (Hazimeh, Zhao, Chowdhery,
Sathiamoorthy, Chen, Mazumder, Hong and Chi, NeurIPS 2021, arXiv 2106.03760).

The model is MMoE (moe.py) with each task's softmax gate replaced by a DSelect-k gate. Such a
gate gives at most k of the n experts a nonzero weight, and it stays differentiable while it
learns which experts those are.

Smooth-step: a cubic from 0 to 1 on a band of width gamma, flat outside it (C^1 everywhere):
    S(t) = 0                                          if t <= -gamma/2
         = -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2       if -gamma/2 <= t <= gamma/2
         = 1                                          if t >= gamma/2
Single expert selector: m = ceil(log2 n) numbers z in R^m act as m soft bits, and expert i
gets the weight of the bit pattern that spells i in binary (bit j = (i >> j) & 1):
    r(z)_i = prod_{j=0..m-1} ( S(z_j) if bit j of i is 1 else 1 - S(z_j) ),   i = 0..n-1
Once every z_j is outside the band, r(z) is one-hot: the selector has chosen one expert.
The gate mixes k selectors z^(1), ..., z^(k) by softmax weights over alpha in R^k:
    q(x) = sum_{i=1..k} softmax(alpha)_i r(z^(i)),        y_t = sum_e q_t(x)_e f_e(x)
for each task t, f_e the experts. Per-example gating (the paper's form for multi-task
learning): z^(i) = W_i x + b_i and alpha = G x + c, linear in the gate's input x. Static
gating: z^(i) and alpha are learned vectors, the same for every row.

Entropy regularisation pushes each selector towards one-hot, which speeds up the selection:
    penalty = lambda * sum_t sum_i h(r(z_t^(i))),    h(v) = -sum_e v_e log v_e  (0 log 0 = 0),
averaged over the batch's rows for per-example gates.

n not a power of two: the paper assumes n = 2^m. Here, as in the authors' reference
implementation (github.com/google-research/google-research, dselect_k_moe), m = ceil(log2 n)
and the codes n..2^m-1 name no expert: a selector's weight on them is lost (q sums to less
than 1), and the penalty adds, per selector and row,
    1 / sum_{e<n} r(z)_e - 1
(the authors' 1 / sum less its least value 1: the same gradient, and 0 once the selectors keep
to the experts there are), which keeps every selector on a real expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
)
from torch import Tensor, nn

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import ExpertOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import MLP, ExpertBank

ALPHA_INIT = 0.05  # alpha's parameters start uniform in [-0.05, 0.05] (the authors' default)


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """S(t), elementwise: 0 below -gamma/2, 1 above gamma/2, the cubic between.

    Written as u = clamp(t / gamma, -1/2, 1/2), S = -2 u^3 + 3/2 u + 1/2: the same function, with
    S exactly 0 or 1 outside the band and a zero gradient there.

    Example:
        >>> smooth_step(torch.tensor([-1.0, 0.0, 0.25, 1.0]), gamma=1.0)
        tensor([0.0000, 0.5000, 0.8438, 1.0000])
    """
    u = torch.clamp(t / gamma, -0.5, 0.5)
    return u * (1.5 - 2.0 * u * u) + 0.5


def selector_entropy(selectors: Tensor) -> Tensor:
    """h(r) = -sum_e r_e log r_e (0 log 0 = 0) of each selector `[..., E]` -> `[...]`."""
    return -(selectors * selectors.clamp_min(torch.finfo(selectors.dtype).tiny).log()).sum(-1)


class Selection(NamedTuple):
    weights: Tensor  # [B, E]: q(x), the gate's weights over the experts
    selectors: Tensor  # [B, k, E] (static gates: [1, k, E]): r(z^(i)) of each single expert selector


class DSelectKGate(nn.Module):
    """A DSelect-k gate over `num_experts` experts: x `[B, I]` -> `Selection` (weights `[B, E]`,
    at most k nonzero once every z is outside the smooth band; the selectors `[B, k, E]`).

    Per-example (default): z = W x + b `[B, k, m]` and alpha = G x + c `[B, k]`, after an optional
    MLP (`hidden`) over x; output i*m + j of `z_layer` is z^(i)_j. Static: z `[k, m]` and
    alpha `[k]` are parameters. z's parameters start uniform in [-z_init gamma, z_init gamma]
    (inside the band: every expert weighed), alpha's in [-0.05, 0.05].

    Example:
        >>> import torch
        >>> gate = DSelectKGate(in_dim=6, num_experts=5, k=2)
        >>> weights, selectors = gate(torch.randn(3, 6))
        >>> weights.shape, selectors.shape
        (torch.Size([3, 5]), torch.Size([3, 2, 5]))
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        k: int,
        gamma: float = 1.0,
        per_example: bool = True,
        z_init: float = 0.01,
        entropy_weight: float = 0.0,
        hidden: Sequence[int] = (),
        activation: str = "relu",
    ):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"num_experts = {num_experts}: a DSelect-k gate selects among at least 2 experts")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k = {k} must be between 1 and num_experts = {num_experts}")
        if hidden and not per_example:
            raise ValueError("gate_hidden needs per_example gates (a static gate reads no input)")
        self.num_experts, self.k, self.gamma = num_experts, k, gamma
        self.num_bits = math.ceil(math.log2(num_experts))  # m
        self.power_of_two = num_experts == 2**self.num_bits
        self.entropy_weight = entropy_weight
        codes = [[(i >> j) & 1 == 1 for j in range(self.num_bits)] for i in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes), persistent=False)  # [E, m]: bit j of i
        z_bound = z_init * gamma
        self.per_example = per_example
        if per_example:
            self.body = MLP(in_dim, hidden, activation=activation)
            self.z_layer = nn.Linear(self.body.out_dim, k * self.num_bits)
            self.alpha_layer = nn.Linear(self.body.out_dim, k)
            for param in self.z_layer.parameters():
                nn.init.uniform_(param, -z_bound, z_bound)
            for param in self.alpha_layer.parameters():
                nn.init.uniform_(param, -ALPHA_INIT, ALPHA_INIT)
        else:
            self.z = nn.Parameter(torch.empty(k, self.num_bits).uniform_(-z_bound, z_bound))
            self.alpha = nn.Parameter(torch.empty(k).uniform_(-ALPHA_INIT, ALPHA_INIT))

    def forward(self, x: Tensor) -> Selection:
        z, alpha = self.selector_parameters(x)  # [B or 1, k, m], [B or 1, k]
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 under autocast: select in float32
        soft_bits = smooth_step(z, self.gamma).unsqueeze(-2)  # [B, k, 1, m]
        factors = torch.where(self.codes, soft_bits, 1.0 - soft_bits)  # [B, k, E, m]
        selectors = factors.prod(-1)  # [B, k, E]
        mixing = torch.softmax(alpha.to(z.dtype), dim=-1)  # [B, k]
        weights = (mixing.unsqueeze(-1) * selectors).sum(-2)  # [B, E]
        return Selection(weights if self.per_example else weights.expand(x.shape[0], -1), selectors)

    def selector_parameters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z `[B, k, m]`, alpha `[B, k]`) from x per example; `[1, k, m]`, `[1, k]` when static."""
        if not self.per_example:
            return self.z.unsqueeze(0), self.alpha.unsqueeze(0)
        h = self.body(x)
        return self.z_layer(h).view(-1, self.k, self.num_bits), self.alpha_layer(h)

    def penalty(self, selectors: Tensor) -> Tensor | None:
        """lambda * mean over rows of sum_i h(r^(i)), plus, for n not a power of two, the mean
        over rows of sum_i (1 / sum_e r^(i)_e - 1); None when neither applies."""
        terms = []
        if self.entropy_weight > 0:
            terms.append(self.entropy_weight * selector_entropy(selectors).sum(-1).mean())
        if not self.power_of_two:
            # floored: a selector wholly on missing codes (flat S, no gradient) costs 1/eps, not inf
            reachable = selectors.sum(-1).clamp_min(torch.finfo(selectors.dtype).eps)  # [B, k]
            terms.append((1.0 / reachable - 1.0).sum(-1).mean())
        return torch.stack(terms).sum() if terms else None


class DSelectKOptions(ExpertOptions):
    num_experts: PositiveInt = Field(4, ge=2, description="n, experts shared by all tasks")
    k: PositiveInt = Field(2, description="selectors per gate: at most k experts get a nonzero weight")
    gamma: PositiveFloat = Field(1.0, description="width of the smooth-step's band: S rises from 0 to 1 "
                                                 "over -gamma/2 <= t <= gamma/2")
    entropy_weight: NonNegativeFloat = Field(1e-3, description="lambda, the weight of the selectors' entropy "
                                                              "(0 turns it off)")
    per_example: bool = Field(True, description="z and alpha linear in the input (the paper's MTL gate); "
                                                "false: static, the same selection for every row")
    z_init: float = Field(0.01, gt=0.0, le=0.5, description="z's parameters start uniform in "
                                                            "[-z_init gamma, z_init gamma] (the authors' gamma/100)")

    @field_validator("k")
    @classmethod
    def _k_at_most_num_experts(cls, k: int, info: ValidationInfo) -> int:
        n = info.data.get("num_experts")
        if n is not None and k > n:
            raise ValueError(f"k = {k} exceeds num_experts = {n}: a gate selects at most num_experts experts")
        return k

    @field_validator("per_example")
    @classmethod
    def _static_gates_read_no_input(cls, per_example: bool, info: ValidationInfo) -> bool:
        if not per_example and info.data.get("gate_hidden"):
            raise ValueError("per_example: false (static gates) takes no gate_hidden: a static gate reads no input")
        return per_example


@register_model("dselect_k", DSelectKOptions, "experts mixed by one sparse DSelect-k gate per task "
                "(Hazimeh et al. 2021)")
class DSelectK(Backbone):
    """MMoE with DSelect-k gates: x `[B, I]` -> one mixture of at most k experts per task `[B, T, H]`.

    Gate `gate/<task>` weighs the experts `shared/0..n-1`; `task_modules(t)` is task t's gate.
    In training, `penalty` holds the gates' entropy term (and, for n not a power of two, the
    term keeping the selectors on real experts); in evaluation it is None.

    Options (`DSelectKOptions`): num_experts n; k; gamma; entropy_weight lambda; per_example
    (false: static gates); z_init; expert_hidden, activation, dropout, batch_norm of the
    experts; gate_hidden, an MLP before the per-example gate's linear z and alpha (empty: the
    paper's linear gate).

    Shared representation Z: the experts' outputs `[B, E, H]`, as MMoE's.

    Example:
        >>> import torch
        >>> backbone = DSelectK(6, ["click", "like"], DSelectKOptions(num_experts=5, k=2, expert_hidden=[8]))
        >>> out = backbone(torch.randn(3, 6))
        >>> out.task_reps.shape, out.gates["gate/like"].shape, out.penalty.dim()
        (torch.Size([3, 2, 8]), torch.Size([3, 5]), 0)
    """

    has_representation = True

    def __init__(self, in_dim: int, task_names: Sequence[str], options: DSelectKOptions):
        super().__init__()
        o = options
        self.experts = ExpertBank(in_dim, o.num_experts, o.expert_hidden, o.activation, o.dropout, o.batch_norm)
        self.gates = nn.ModuleList(
            DSelectKGate(in_dim, o.num_experts, o.k, o.gamma, o.per_example, o.z_init, o.entropy_weight,
                         o.gate_hidden, o.activation)
            for _ in task_names
        )
        self.gate_names = [f"gate/{task}" for task in task_names]
        self.gate_experts = {g: [f"shared/{e}" for e in range(o.num_experts)] for g in self.gate_names}
        self.out_dim = self.experts.out_dim

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.gates[task]]

    def forward(self, x: Tensor) -> BackboneOutput:
        experts = self.experts(x)  # [B, E, H]: Z
        selections = [gate(x) for gate in self.gates]
        weights = [s.weights for s in selections]
        mixed = torch.bmm(torch.stack(weights, dim=1).to(experts.dtype), experts)  # [B, T, H]
        penalty = None
        if self.training:
            terms = [p for gate, s in zip(self.gates, selections) if (p := gate.penalty(s.selectors)) is not None]
            penalty = torch.stack(terms).sum() if terms else None
        return BackboneOutput(mixed, dict(zip(self.gate_names, weights)), penalty, representation=experts)

"""A bank of equally shaped MLP experts, computed together instead of one by one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.nn.mlp import activation_layer


class ExpertBank(nn.Module):
    """E MLPs with the same layer sizes, run as a few large matrix products.

    Layer l of every expert is stored stacked: weight `[E, in_l, out_l]`, bias `[E, out_l]`.
    When all experts read one input, the first layer is a single `[B, I] x [I, E*h]` product;
    later layers (and first layers over several inputs) are one batched product over E.

    Experts may read different inputs: `groups[e]` names the input group expert e reads
    (PLE levels above the first: one group per task plus one for the shared experts;
    towers: one group per task).

    Input: `[B, I]` (one group) or `[G, B, I]`. Output: `[B, E, H]`, H = hidden[-1].
    With `activate_last=False` the last layer has no activation (towers ending in a logit).
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        groups: Sequence[int] | None = None,
        activate_last: bool = True,
    ):
        super().__init__()
        if num_experts < 1 or not hidden:
            raise ValueError("an expert bank needs at least one expert and one layer")
        groups = list(groups) if groups is not None else [0] * num_experts
        if len(groups) != num_experts:
            raise ValueError(f"groups has {len(groups)} entries for {num_experts} experts")
        self.num_experts = num_experts
        self.num_groups = max(groups) + 1
        self.register_buffer("groups", torch.tensor(groups, dtype=torch.long), persistent=False)
        sizes = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per expert
            self.weights.append(nn.Parameter(torch.empty(num_experts, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, fan_out).uniform_(-bound, bound)))
        n_layers = len(hidden)
        active = [i < n_layers - 1 or activate_last for i in range(n_layers)]
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(num_experts * h) if batch_norm and act else nn.Identity()
            for h, act in zip(hidden, active)
        )
        self.activations = nn.ModuleList(
            activation_layer(activation) if act else nn.Identity() for act in active
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = active
        self.out_dim = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        w0, b0 = self._layer(0)
        if x.dim() == 3 and x.shape[0] == 1:
            x = x[0]
        if x.dim() == 2:  # one input for all experts: one wide matmul
            e, i, h = w0.shape
            out = torch.addmm(b0.reshape(-1), x, w0.transpose(0, 1).reshape(i, e * h))
            out = out.view(x.shape[0], e, h).transpose(0, 1)  # [E, B, h]
        else:
            if x.shape[0] < self.num_groups:
                raise ValueError(f"expected at least {self.num_groups} input groups, got {x.shape[0]}")
            out = torch.baddbmm(b0.unsqueeze(1), x.index_select(0, self.groups), w0)
        for layer in range(len(self.weights)):
            if layer > 0:
                w, b = self._layer(layer)
                out = torch.baddbmm(b.unsqueeze(1), out, w)
            out = self._activate(out, layer)
        return out.transpose(0, 1)  # [B, E, H]

    def _layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """(weight `[E, in, out]`, bias `[E, out]`) of a layer; in evaluation a batch norm that
        follows it is folded in (its running statistics make it an affine map per unit)."""
        w, b = self.weights[layer], self.biases[layer]
        norm = self.norms[layer]
        if self.training or not isinstance(norm, nn.BatchNorm1d) or norm.running_var is None:
            return w, b
        e, _, h = w.shape
        scale = (norm.weight * torch.rsqrt(norm.running_var + norm.eps)).view(e, h)
        shift = norm.bias.view(e, h) - norm.running_mean.view(e, h) * scale
        return w * scale.unsqueeze(1), b * scale + shift

    def _activate(self, out: Tensor, layer: int) -> Tensor:
        if not self.active[layer]:
            return out
        norm = self.norms[layer]
        if isinstance(norm, nn.BatchNorm1d) and (norm.training or norm.running_var is None):
            out = expert_batch_norm(out, norm)  # in evaluation it is folded into the layer
        return self.dropout(self.activations[layer](out))

    def expert_layers(self, expert: int) -> list[tuple[Tensor, Tensor]]:
        """(weight `[in, out]`, bias `[out]`) of each layer of one expert, for inspection."""
        return [(w[expert], b[expert]) for w, b in zip(self.weights, self.biases)]


def expert_batch_norm(out: Tensor, norm: nn.BatchNorm1d) -> Tensor:
    """Batch norm (batch statistics) per expert and unit of `[E, B, h]`: what `norm`, a
    BatchNorm1d over E*h features, does to the `[B, E*h]` view. Runs torch's kernel on that
    view (a transposed copy each way; a hand-written version with autograd was slower)."""
    e, b, h = out.shape
    return norm(out.transpose(0, 1).reshape(b, e * h)).view(b, e, h).transpose(0, 1)

"""A bank of equally shaped MLP experts, computed together instead of one by one.

Every activation of the bank lives in one layout, `[B, E*h]` ("wide"): row b holds expert 0's
h units, then expert 1's, and so on. The matrix products write each expert's block of it in
place (a batched product into a strided view), batch norm is BatchNorm1d over its E*h units
(each unit's statistics over the batch, as per expert), activation and dropout are elementwise,
and the backward pass reads and writes the same layout. So no activation or gradient is
transposed or copied between the steps of a layer, and the bank's output `[B, E, H]` is a view
of the last layer's `[B, E*H]`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtlrec.nn.mlp import activation_layer


class Run(NamedTuple):
    """Experts first..last-1 (consecutive) all read input group `group`."""

    group: int
    first: int
    last: int


def runs_of(groups: Sequence[int]) -> tuple[Run, ...]:
    """The groups list cut into runs of consecutive experts reading the same group.

    Example:
        >>> runs_of([0, 0, 1, 1, 2])
        (Run(group=0, first=0, last=2), Run(group=1, first=2, last=4), Run(group=2, first=4, last=5))
    """
    runs: list[Run] = []
    for expert, group in enumerate(groups):
        if runs and runs[-1].group == group:
            runs[-1] = runs[-1]._replace(last=expert + 1)
        else:
            runs.append(Run(group, expert, expert + 1))
    return tuple(runs)


def blocks(wide: Tensor, num_experts: int) -> Tensor:
    """The `[E, B, h]` view of a wide `[B, E*h]` tensor (no copy): expert e's block is `[e]`."""
    return wide.view(wide.shape[0], num_experts, -1).transpose(0, 1)


def products(x: Tensor, weight: Tensor, bias: Tensor | None, runs: tuple[Run, ...] | None) -> Tensor:
    """z_e = x_e W_e + b_e for every expert e, as a wide `[B, E*h]` (no autograd).

    x is a wide `[B, E*I]` whose block e expert e reads (`runs` None: a layer above the first),
    or the bank's input `[G, B, I]` with `runs` naming the group each expert reads (a run's
    experts share one input: it is broadcast, never copied). weight `[E, I, h]`, bias `[E, h]`
    (None: no bias). Each batched product writes its experts' blocks of z in place.
    """
    e, i, h = weight.shape
    rows = x.shape[-2]
    out = x.new_empty(rows, e * h)
    out_blocks = blocks(out, e)
    spans = [(blocks(x, e), 0, e)] if runs is None else [(x[g].expand(last - first, rows, i), first, last)
                                                         for g, first, last in runs]
    for inputs, first, last in spans:
        if bias is None:
            torch.bmm(inputs, weight[first:last], out=out_blocks[first:last])
        else:
            torch.baddbmm(bias[first:last].unsqueeze(1), inputs, weight[first:last], out=out_blocks[first:last])
    return out


def product_grads(x: Tensor, weight: Tensor, runs: tuple[Run, ...] | None, grad: Tensor,
                  need_x: bool = True, need_bias: bool = True) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The gradients of `products` (x's in x's layout, weight's `[E, I, h]`, bias's `[E, h]`;
    None where not needed) from z's wide gradient `[B, E*h]`, read in place."""
    e, _, h = weight.shape
    grad = grad.contiguous()
    grad_blocks = blocks(grad, e)  # [E, B, h]
    grad_bias = grad.sum(0).view(e, h) if need_bias else None
    grad_x = None
    if runs is None:
        grad_weight = torch.bmm(blocks(x, e).transpose(1, 2), grad_blocks)
        if need_x:
            grad_x = x.new_empty(x.shape)
            torch.bmm(grad_blocks, weight.transpose(1, 2), out=blocks(grad_x, e))
        return grad_x, grad_weight, grad_bias
    grad_weight = torch.empty_like(weight)
    for group, first, last in runs:
        shared = x[group].expand(last - first, *x.shape[1:]).transpose(1, 2)
        torch.bmm(shared, grad_blocks[first:last], out=grad_weight[first:last])
    if need_x:  # a group's gradient: the sum over the experts that read it
        grad_x = x.new_zeros(x.shape) if len({r.group for r in runs}) < x.shape[0] else x.new_empty(x.shape)
        written = set()
        for group, first, last in runs:
            for expert in range(first, last):
                if group in written:
                    grad_x[group].addmm_(grad_blocks[expert], weight[expert].t())
                else:
                    torch.mm(grad_blocks[expert], weight[expert].t(), out=grad_x[group])
                    written.add(group)
    return grad_x, grad_weight, grad_bias


class ExpertMatmul(torch.autograd.Function):
    """`products` with its gradient (`product_grads`): one layer's matrix products, wide.

    Autograd's own `baddbmm` would give `[E, B, h]`, which batch norm over the units reads
    only after a transposing copy (and its gradient after another); this keeps the layout.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, runs: tuple[Run, ...] | None) -> Tensor:
        ctx.runs = runs
        ctx.save_for_backward(x, weight)
        return products(x, weight, bias, runs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        return *product_grads(x, weight, ctx.runs, grad, ctx.needs_input_grad[0]), None


class LayerPlan(NamedTuple):
    """What `FusedExperts` does after a layer's products: batch norm over the batch (with its
    running statistics, to update, and nn.BatchNorm1d's momentum and eps), then ReLU or not."""

    norm: bool
    relu: bool
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    momentum: float = 0.0
    eps: float = 1e-5


class FusedExperts(torch.autograd.Function):
    """A whole bank of Linear -> [BatchNorm] -> [ReLU] layers, forward and backward, wide.

    The same numbers as `ExpertMatmul` followed by nn.BatchNorm1d and an in-place ReLU, in
    fewer passes over memory. Forward: where batch norm follows, the products skip the bias
    (a pass to broadcast it into the output, and the product's read of it): batch norm
    subtracts the batch mean, so the bias changes only the running mean, where it is added.
    Backward: the pass owns every gradient between the bank's input and output, so ReLU's
    mask is applied in place on the buffer the layer above wrote, not into a fresh one; and
    the gradient of a bias that batch norm follows is its exact value, 0, not a sum over the
    batch (which would give 0 up to rounding).

    Arguments: x (as `products` reads it), the runs of layer 0, one `LayerPlan` per layer,
    then per layer weight, bias, batch norm weight and bias (None without batch norm).
    """

    @staticmethod
    def forward(ctx, x: Tensor, runs: tuple[Run, ...], plans: tuple[LayerPlan, ...], *params: Tensor | None) -> Tensor:
        ctx.runs, ctx.plans = runs, plans
        saved: list[Tensor | None] = [x]
        h = x
        for layer, plan in enumerate(plans):
            weight, bias, gamma, beta = params[4 * layer: 4 * layer + 4]
            # batch norm subtracts the batch mean: the bias changes only the running mean, added there
            z = products(h, weight, None if plan.norm else bias, runs if layer == 0 else None)
            mean = invstd = None
            if plan.norm:
                y, mean, invstd = torch.native_batch_norm(z, gamma, beta, plan.running_mean, plan.running_var,
                                                          True, plan.momentum, plan.eps)
                if plan.running_mean is not None:
                    plan.running_mean.add_(bias.reshape(-1), alpha=plan.momentum)
            else:
                y, z = z, None  # no batch norm: its backward needs no z
            if plan.relu:
                y.relu_()
            saved += [weight, gamma, z, y, mean, invstd]
            h = y
        ctx.save_for_backward(*saved)
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *saved = ctx.saved_tensors
        plans = ctx.plans
        grads: list[Tensor | None] = [None] * (4 * len(plans))
        owned = False  # whether `grad` is a buffer of this backward pass (free to overwrite)
        for layer in reversed(range(len(plans))):
            plan = plans[layer]
            weight, gamma, z, y, mean, invstd = saved[6 * layer: 6 * layer + 6]
            if plan.relu:
                if owned:
                    torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=grad)
                else:
                    grad, owned = torch.ops.aten.threshold_backward(grad, y, 0), True
            if plan.norm:
                grad, grads[4 * layer + 2], grads[4 * layer + 3] = torch.ops.aten.native_batch_norm_backward(
                    grad, z, gamma, plan.running_mean, plan.running_var, mean, invstd, True, plan.eps,
                    [True, True, True])
            below = x if layer == 0 else saved[6 * layer - 3]  # the layer's input: the one below's y
            grad, grads[4 * layer], grads[4 * layer + 1] = product_grads(
                below, weight, ctx.runs if layer == 0 else None, grad, layer > 0 or ctx.needs_input_grad[0],
                need_bias=not plan.norm)
            if plan.norm:  # the bias cancels in batch norm: its gradient is 0 (the sum would be rounding)
                grads[4 * layer + 1] = weight.new_zeros(weight.shape[0], weight.shape[2])
            owned = True
        return grad, None, None, *grads


def expert_matmul(x: Tensor, weight: Tensor, bias: Tensor, runs: tuple[Run, ...] | None) -> Tensor:
    """`ExpertMatmul` under autocast too: there its products run in the autocast dtype, as
    autocast runs a plain `baddbmm` (autocast itself cannot write into a given output)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return ExpertMatmul.apply(x, weight, bias, runs)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return ExpertMatmul.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), runs)


def batch_norm_momentum(norm: nn.BatchNorm1d) -> float:
    """The running statistics' update factor of this training step, counting the step, as
    nn.BatchNorm1d's forward does (momentum None: the cumulative average)."""
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return 0.0 if norm.momentum is None else norm.momentum


class ExpertBank(nn.Module):
    """E MLPs with the same layer sizes, run as a few large matrix products.

    Layer l of every expert is stored stacked: weight `[E, in_l, out_l]`, bias `[E, out_l]`.
    Each layer is a batched product over the experts in the wide layout of the module
    docstring, followed by batch norm, activation and dropout on that layout. Batch norm
    (Linear -> BatchNorm -> activation, per expert and unit) runs as BatchNorm1d over the
    `[B, E*h]` layout in training; in evaluation it is folded into the layer's weight and
    bias, so it costs nothing.

    Three paths compute the same numbers: with ReLU (the default) and no dropout in training,
    the whole bank is one `FusedExperts` function; other activations, dropout and autocast
    run layer by layer (`ExpertMatmul`, then the modules); a tracer (ONNX, TorchScript) or
    `torch.compile` records plain operators (`_matmul`).

    Experts may read different inputs: `groups[e]` names the input group expert e reads
    (PLE levels above the first: one group per task plus one for the shared experts;
    Cross-Stitch layers above the first: one group per task column).

    Input: `[B, I]` (every expert reads it) or `[G, B, I]`. Output: `[B, E, H]`, H = hidden[-1].
    With `activate_last=False` the last layer has no activation (towers ending in a logit).

    Example:
        >>> import torch
        >>> bank = ExpertBank(in_dim=10, num_experts=3, hidden=[16, 8])
        >>> bank(torch.randn(4, 10)).shape
        torch.Size([4, 3, 8])
        >>> w, b = bank.expert_layers(1)[0]  # expert 1's first layer, as a plain Linear would hold it
        >>> x = torch.randn(4, 10)
        >>> torch.allclose(bank(x)[:, 1], torch.relu(torch.relu(x @ w + b) @ bank.expert_layers(1)[1][0]
        ...                                             + bank.expert_layers(1)[1][1]), atol=1e-6)
        True
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
        self.runs = runs_of(groups)  # who reads which input group, for `ExpertMatmul`
        self.one_run = (Run(0, 0, num_experts),)  # every expert reading one input
        sizes = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
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
        if x.dim() == 3 and x.shape[0] == 1:
            x = x[0]
        if x.dim() == 3 and x.shape[0] < self.num_groups:
            raise ValueError(f"expected at least {self.num_groups} input groups, got {x.shape[0]}")
        traced = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not traced and self._fusable(x):
            runs = self.one_run if x.dim() == 2 else self.runs
            inputs = x.unsqueeze(0) if x.dim() == 2 else x
            plans, params = self._fused_layers()
            if inputs.shape[1] == 1 and any(plan.norm for plan in plans):  # as nn.BatchNorm1d says it
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{list(inputs.shape[1:])}")
            wide = FusedExperts.apply(inputs, runs, plans, *params)
        else:
            wide = x
            for layer in range(len(self.weights)):
                wide = self._activate(self._matmul(wide, layer, traced), layer)
        return wide.view(wide.shape[0], self.num_experts, -1)  # [B, E, H]

    def _fusable(self, x: Tensor) -> bool:
        """Whether `FusedExperts` computes this forward: ReLU (or nothing) after every layer,
        no dropout in training, no autocast (the other cases run layer by layer)."""
        return (all(isinstance(a, nn.ReLU | nn.Identity) for a in self.activations)
                and not (self.training and isinstance(self.dropout, nn.Dropout))
                and not torch.is_autocast_enabled(x.device.type))

    def _fused_layers(self) -> tuple[tuple[LayerPlan, ...], list[Tensor | None]]:
        """`FusedExperts`' layer plans and parameters (folded in evaluation, see `_layer`)."""
        plans, params = [], []
        for layer, norm in enumerate(self.norms):
            params += [*self._layer(layer), None, None]
            if self.active[layer] and self._normalises(layer):
                plans.append(LayerPlan(True, True, norm.running_mean, norm.running_var,
                                       batch_norm_momentum(norm), norm.eps))
                params[-2:] = [norm.weight, norm.bias]
            else:
                plans.append(LayerPlan(False, self.active[layer]))
        return tuple(plans), params

    def _matmul(self, x: Tensor, layer: int, traced: bool) -> Tensor:
        """Layer `layer`'s products, wide `[B, E*h]`, from the bank's input (layer 0) or the
        previous layer's wide output. `traced` (a tracer: ONNX, TorchScript; or a compiler):
        the same from operators it records: one wide `addmm` where all experts read one
        input, else a batched product over `[E, B, I]` and a transposing copy."""
        w, b = self._layer(layer)
        if not traced:
            if layer > 0:
                return expert_matmul(x, w, b, None)
            return expert_matmul(x.unsqueeze(0), w, b, self.one_run) if x.dim() == 2 else expert_matmul(x, w, b, self.runs)
        e, i, h = w.shape
        if layer == 0 and x.dim() == 2:
            return torch.addmm(b.reshape(-1), x, w.transpose(0, 1).reshape(i, e * h))
        inputs = blocks(x, e) if layer > 0 else x.index_select(0, self.groups)
        out = torch.baddbmm(b.unsqueeze(1), inputs, w)  # [E, B, h]
        return out.transpose(0, 1).reshape(out.shape[1], e * h)

    def _layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """(weight `[E, in, out]`, bias `[E, out]`) of a layer; in evaluation a batch norm that
        follows it is folded in (its running statistics make it an affine map per unit)."""
        w, b = self.weights[layer], self.biases[layer]
        norm = self.norms[layer]
        if not isinstance(norm, nn.BatchNorm1d) or self._normalises(layer):
            return w, b
        e, _, h = w.shape
        scale = (norm.weight * torch.rsqrt(norm.running_var + norm.eps)).view(e, h)
        shift = norm.bias.view(e, h) - norm.running_mean.view(e, h) * scale
        return w * scale.unsqueeze(1), b * scale + shift

    def _activate(self, wide: Tensor, layer: int) -> Tensor:
        """Batch norm (BatchNorm1d over the E*h units), activation, dropout of a wide `[B, E*h]`.
        The tensor is fresh (never a view), so an in-place ReLU costs autograd nothing."""
        if not self.active[layer]:
            return wide
        if self._normalises(layer):
            wide = self.norms[layer](wide)
        return self.dropout(self.activations[layer](wide))

    def _normalises(self, layer: int) -> bool:
        """Whether this layer's batch norm runs as such (in evaluation it is folded instead)."""
        norm = self.norms[layer]
        return isinstance(norm, nn.BatchNorm1d) and (norm.training or norm.running_var is None)

    def expert_masks(self, experts: Sequence[int]) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, bool mask of its shape) marking the entries of these experts, for every
        tensor of the bank (stacked weights and biases, batch norm units)."""
        chosen = torch.zeros(self.num_experts, dtype=torch.bool)
        chosen[list(experts)] = True
        found = []
        for w, b in zip(self.weights, self.biases):
            found += [(w, chosen.view(-1, 1, 1).expand_as(w).clone()), (b, chosen.view(-1, 1).expand_as(b).clone())]
        for norm, h in zip(self.norms, (w.shape[2] for w in self.weights)):
            if isinstance(norm, nn.BatchNorm1d):
                units = chosen.repeat_interleave(h)
                found += [(norm.weight, units.clone()), (norm.bias, units.clone())]
        return found

    def expert_layers(self, expert: int) -> list[tuple[Tensor, Tensor]]:
        """(weight `[in, out]`, bias `[out]`) of each layer of one expert, for inspection."""
        return [(w[expert], b[expert]) for w, b in zip(self.weights, self.biases)]

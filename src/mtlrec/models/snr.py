"""Sub-Network Routing (SNR), Ma, Zhao, Chen, Li, Hong & Chi, AAAI 2019 ("SNR: Sub-Network
Routing for Flexible Parameter Sharing in Multi-Task Learning").

The shared bottom is split into L layers of sub-networks (experts); the sub-networks of layer 1
read the input x. Sub-network i of a layer outputs u_i; the input v_j of sub-network j of the
next layer, and the input of task k's tower after the last layer, are routed from the layer
below through connections coded by scalar variables z_ij:
    SNR-Trans:  v_j = sum_i z_ij W_ij u_i      (a transformation W_ij per connection)
    SNR-Aver:   v_j = sum_i z_ij u_i           (a weighted sum: v_j has the width of the u_i)
z_ij = 0 cuts a connection; all z = 1 shares everything.

Each z is a hard concrete variable (Louizos, Welling & Kingma, ICLR 2018, Eq. 10) with its own
learned log_alpha, temperature beta and stretch interval (gamma, zeta), gamma < 0 < 1 < zeta:
    r ~ U(0, 1),   s = sigmoid((log r - log(1 - r) + log_alpha) / beta),
    s_bar = s (zeta - gamma) + gamma,   z = min(1, max(0, s_bar))
(r is the uniform noise, called u in that paper.) In training z is sampled, one r per
connection per forward pass (per batch), from torch's global generator; the gradient reaches
log_alpha through the sample (the reparameterisation estimator of Louizos et al.). In
evaluation z is their deterministic test-time estimator (Eq. 13):
    z_hat = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma)).
The L0 penalty, lambda times the expected number of open connections (Eq. 12), is returned as
the backbone's penalty and added to the training loss:
    penalty = lambda * sum_ij P(z_ij != 0) = lambda * sum_ij sigmoid(log_alpha_ij - beta log(-gamma / zeta)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pydantic import Field, PositiveInt

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import ModelOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import ExpertBank


class SNROptions(ModelOptions):
    variant: Literal["trans", "aver"] = Field(
        "trans", description="connections: 'trans' (z_ij W_ij u_i) or 'aver' (z_ij u_i); fixed by the model name")
    num_layers: PositiveInt = Field(2, description="L, layers of sub-networks")
    subnetworks: PositiveInt | list[PositiveInt] = Field(
        3, description="sub-networks per layer: one count for every layer, or one per layer")
    expert_hidden: list[PositiveInt] | list[list[PositiveInt]] = Field(
        [64], description="layer sizes of each sub-network: the same on every layer, or one list per layer")
    transform_dim: PositiveInt | None = Field(
        None, description="snr_trans: width of the routed inputs v_j = sum_i z_ij W_ij u_i (unset: the width "
                          "of the u_i); snr_aver has none, its v_j have the width of the u_i")
    beta: float = Field(2 / 3, gt=0.0, le=10.0, description="temperature of the hard concrete distribution")
    gamma: float = Field(-0.1, lt=0.0, ge=-10.0, description="lower end of the stretched interval (< 0)")
    zeta: float = Field(1.1, gt=1.0, le=10.0, description="upper end of the stretched interval (> 1)")
    l0_weight: float = Field(1e-3, ge=0.0, description="lambda, the weight of the L0 penalty in the training loss")
    log_alpha_init: float = Field(
        3.0, ge=-10.0, le=10.0, description="initial log_alpha of every connection: 3 (the default) starts "
                         "nearly fully connected (z_hat = 1, P(z = 1) = 0.8 in training); 0 starts at z_hat = 0.5")


class HardConcrete(nn.Module):
    """One hard concrete variable z per entry of `shape`, each with a learned log_alpha
    (Louizos et al. 2018, Eq. 10, 12, 13; see the module docstring).

    `forward(noise=None)` -> z `shape`: sampled from `noise` `shape` (uniform in (0, 1)) when
    given, else from torch's global generator in training, else the test-time z_hat.
    `open_probability()` -> P(z != 0) `shape`, what the L0 penalty sums.
    """

    def __init__(self, shape: Sequence[int], beta: float, gamma: float, zeta: float, log_alpha_init: float):
        super().__init__()
        if beta <= 0 or gamma >= 0 or zeta <= 1:
            raise ValueError(f"hard concrete needs beta > 0 and gamma < 0 < 1 < zeta, not beta = {beta}, "
                             f"gamma = {gamma}, zeta = {zeta}")
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), float(log_alpha_init)))
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def forward(self, noise: Tensor | None = None) -> Tensor:
        if noise is None and not self.training:
            return self.deterministic()
        return self.sample(torch.rand_like(self.log_alpha) if noise is None else noise)

    def sample(self, noise: Tensor) -> Tensor:
        """z for uniform noise r: min(1, max(0, sigmoid((logit r + log_alpha) / beta) (zeta - gamma) + gamma))."""
        if noise.shape != self.log_alpha.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the connections {tuple(self.log_alpha.shape)}")
        s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + self.log_alpha) / self.beta)
        return self.stretch_and_clip(s)

    def deterministic(self) -> Tensor:
        """The test-time z_hat = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))."""
        return self.stretch_and_clip(torch.sigmoid(self.log_alpha))

    def stretch_and_clip(self, s: Tensor) -> Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def open_probability(self) -> Tensor:
        """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))


class Routing(nn.Module):
    """Coded connections from `n_in` sub-networks to `n_out` receivers (the next layer's
    sub-networks, or one task's tower).

    Input: the sub-networks' outputs u `[B, n_in, h]`. Output: (v `[B, n_out, d]`, z
    `[n_out, n_in]`), with z[j, i] = z_ij the code of the connection from u_i to v_j:
        `transform_dim` given (SNR-Trans): v_j = sum_i z_ij W_ij u_i, W_ij = `weight[j, i]` `[h, d]`;
        `transform_dim` None (SNR-Aver):   v_j = sum_i z_ij u_i, d = h.
    """

    def __init__(self, n_in: int, n_out: int, width: int, transform_dim: int | None, codes: HardConcrete):
        super().__init__()
        self.codes = codes
        if tuple(codes.log_alpha.shape) != (n_out, n_in):
            raise ValueError(f"a routing from {n_in} to {n_out} needs codes of shape ({n_out}, {n_in})")
        bound = 1.0 / math.sqrt(n_in * width)  # nn.Linear's initialisation, for the fan-in n_in * h of v_j
        self.weight = None if transform_dim is None else nn.Parameter(
            torch.empty(n_out, n_in, width, transform_dim).uniform_(-bound, bound))
        self.out_dim = width if transform_dim is None else transform_dim

    def forward(self, u: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self.codes(noise)  # [n_out, n_in]
        if self.weight is None:
            return torch.matmul(z, u), z  # [B, n_out, h]
        n_out, n_in, h, d = self.weight.shape
        # the block matrix [z_ij W_ij] (rows: u's n_in * h units, columns: v's n_out * d units): one product
        blocks = (self.weight * z[:, :, None, None]).permute(1, 2, 0, 3).reshape(n_in * h, n_out * d)
        return (u.reshape(u.shape[0], n_in * h) @ blocks).view(-1, n_out, d), z


@register_model("snr_trans", SNROptions, "layers of sub-networks joined by L0-coded transformations z_ij W_ij "
                "(Ma et al. 2019)", fixed={"variant": "trans"})
@register_model("snr_aver", SNROptions, "layers of sub-networks joined by L0-coded weighted sums z_ij u_i "
                "(Ma et al. 2019)", fixed={"variant": "aver"})
class SNR(Backbone):
    """Sub-Network Routing: x `[B, I]` -> `[B, T, H]`, task k's tower reading its routed v_k.

    Layer l holds `subnetworks[l]` MLP sub-networks (one fused `ExpertBank`); a `Routing` joins
    each layer to the next (`layer_routes`) and the last layer to each task's tower
    (`task_routes[k]`, task k's own: its `task_modules`). `routes` lists them all, in that order;
    `forward(x, noise)` takes one uniform noise tensor `[n_out, n_in]` per route, in that order,
    to sample z from (tests), else z is drawn in training and z_hat in evaluation.

    Gates: each receiver's z over the sub-networks it reads, `[B, n_in]` (the same row for every
    row of the batch; codes in [0, 1], not a distribution): `layer{l}/sub{j}` for sub-network j
    of layer l >= 2 and `tower/{task}` for a tower; the sub-networks are `layer{l}/shared/{i}`.
    Penalty: l0_weight * the expected number of open connections (None when l0_weight = 0).

    Options (`SNROptions`): variant (fixed by the name: `snr_trans`, `snr_aver`); num_layers;
    subnetworks per layer; expert_hidden, each sub-network's layer sizes, the same on every layer
    or one list per layer; transform_dim (snr_trans only); beta, gamma, zeta of the hard concrete
    distribution; l0_weight; log_alpha_init; activation, dropout, batch_norm of the sub-networks.

    Example:
        >>> import torch
        >>> backbone = SNR(6, ["click", "like"], SNROptions(subnetworks=[3, 2], expert_hidden=[8]))
        >>> out = backbone.eval()(torch.randn(4, 6))
        >>> out.task_reps.shape, out.gates["tower/click"].shape, backbone.gate_experts["layer2/sub0"]
        (torch.Size([4, 2, 8]), torch.Size([4, 2]), ['layer1/shared/0', 'layer1/shared/1', 'layer1/shared/2'])
        >>> out.gates["tower/click"][0].tolist()  # z_hat = min(1, sigmoid(3) * 1.2 - 0.1): open at the start
        [1.0, 1.0]
        >>> round(out.penalty.item(), 4)  # 1e-3 * (3 * 2 + 2 * 2 connections) * sigmoid(3 - (2/3) log(0.1 / 1.1))
        0.0099
    """

    def __init__(self, in_dim: int, task_names: Sequence[str], options: SNROptions):
        super().__init__()
        o = options
        counts = self._per_layer(o.subnetworks, o.num_layers)
        hidden = self._per_layer_sizes(o.expert_hidden, o.num_layers)
        if o.variant == "aver" and o.transform_dim is not None:
            raise ValueError(f"transform_dim = {o.transform_dim}: snr_aver sums the sub-networks' outputs "
                             "unchanged, so each routed input has their width; transform_dim is for snr_trans")

        def route(n_in: int, n_out: int, width: int) -> Routing:
            codes = HardConcrete((n_out, n_in), o.beta, o.gamma, o.zeta, o.log_alpha_init)
            dim = (o.transform_dim or width) if o.variant == "trans" else None
            return Routing(n_in, n_out, width, dim, codes)

        self.layers = nn.ModuleList()
        self.layer_routes = nn.ModuleList()
        width = in_dim
        for layer, (n, sizes) in enumerate(zip(counts, hidden)):
            if layer > 0:  # sub-network j reads its own routed input v_j
                self.layer_routes.append(route(counts[layer - 1], n, width))
                width = self.layer_routes[-1].out_dim
            groups = None if layer == 0 else list(range(n))
            bank = ExpertBank(width, n, sizes, o.activation, o.dropout, o.batch_norm, groups=groups)
            self.layers.append(bank)
            width = bank.out_dim
        self.task_routes = nn.ModuleList(route(counts[-1], 1, width) for _ in task_names)
        self.out_dim = self.task_routes[0].out_dim
        self.l0_weight = o.l0_weight

        names = [[f"layer{layer + 1}/shared/{i}" for i in range(n)] for layer, n in enumerate(counts)]
        self.gate_names = [[f"layer{layer + 1}/sub{j}" for j in range(counts[layer])]
                           for layer in range(1, len(counts))] + [[f"tower/{task}"] for task in task_names]
        readers = [names[layer] for layer in range(len(counts) - 1)] + [names[-1]] * len(task_names)
        self.gate_experts = {g: list(read) for gates, read in zip(self.gate_names, readers) for g in gates}

    @staticmethod
    def _per_layer(count: int | list[int], num_layers: int) -> list[int]:
        if isinstance(count, int):
            return [count] * num_layers
        if len(count) != num_layers:
            raise ValueError(f"subnetworks has {len(count)} counts for num_layers = {num_layers}")
        return list(count)

    @staticmethod
    def _per_layer_sizes(sizes: list[int] | list[list[int]], num_layers: int) -> list[list[int]]:
        if not sizes or any(isinstance(s, list) and not s for s in sizes):
            raise ValueError("expert_hidden needs at least one layer size for every sub-network")
        if isinstance(sizes[0], int):
            return [list(sizes)] * num_layers
        if len(sizes) != num_layers:
            raise ValueError(f"expert_hidden has {len(sizes)} lists for num_layers = {num_layers}")
        return [list(s) for s in sizes]

    @property
    def routes(self) -> list[Routing]:
        """Every routing, in order: between layers 1-2, 2-3, ..., then to each task's tower."""
        return [*self.layer_routes, *self.task_routes]

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.task_routes[task]]

    def penalty(self) -> Tensor | None:
        """l0_weight * sum over every connection of P(z != 0); None when l0_weight is 0."""
        if self.l0_weight == 0:
            return None
        return self.l0_weight * sum(r.codes.open_probability().sum() for r in self.routes)

    def forward(self, x: Tensor, noise: Sequence[Tensor] | None = None) -> BackboneOutput:
        routes = self.routes
        if noise is not None and len(noise) != len(routes):
            raise ValueError(f"noise has {len(noise)} tensors for {len(routes)} routes")
        draws = iter(noise if noise is not None else [None] * len(routes))
        codes: list[Tensor] = []
        u = self.layers[0](x)  # [B, n_1, h_1]
        for route, bank in zip(self.layer_routes, self.layers[1:]):
            v, z = route(u, next(draws))
            codes.append(z)
            u = bank(v.transpose(0, 1))  # sub-network j reads v_j
        task_inputs = []
        for route in self.task_routes:
            v, z = route(u, next(draws))
            codes.append(z)
            task_inputs.append(v)
        gates = {name: z[j].expand(x.shape[0], -1)
                 for names, z in zip(self.gate_names, codes) for j, name in enumerate(names)}
        return BackboneOutput(torch.cat(task_inputs, dim=1), gates, self.penalty())

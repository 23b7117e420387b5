"""Top-k routing over many small experts, with load balancing (DeepSeekMoE, DeepSeek-V3).

Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language
Models", ACL 2024 (arXiv 2401.06066), Sec. 3. A gate scores the experts it routes among and keeps
its K largest scores; K_s "isolated shared" experts are always on, added with weight 1:
    s_i = softmax_i(u^T e_i)            (over the routed experts)                    (Eq. 11)
    g_i = s_i if s_i is among the K largest of {s_j}, else 0                           (Eq. 10)
    h = sum_{always-on i} FFN_i(u) + sum_{routed i} g_i FFN_i(u)                       (Eq. 9, less the residual u)
DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2, Eq. 13) rescales the kept weights: g_i / sum_j g_j
(`renormalise`).

Load balance, one of two ways (T: the rows of the batch, the papers' tokens; N': the experts
the gate routes among; K' = K):
- the expert-level balance loss of DeepSeekMoE (Eq. 12-14), added to the training loss:
      L = alpha_1 sum_i f_i P_i,   f_i = N' / (K' T) sum_t 1(row t keeps expert i),
                                   P_i = (1/T) sum_t s_{i,t};
- DeepSeek-V3's auxiliary-loss-free bias (Sec. 2.1.2, Eq. 16): a per-expert bias b_i is added to
  s_i for choosing the top K only (the weight stays g_i = s_i), and after each optimizer step
      b_i <- b_i + gamma * sign(mean_j load_j - load_i),
  load_i: the rows that kept expert i in the last training forward (summed over the processes
  of a distributed run, so that every process keeps the same bias).

In a multi-task model every gate routes on its own: one bias vector and one loss term per gate
(the terms summed). `Router` does the selection and the balancing for all gates of a level;
`sparse_mix` computes only the experts a row chose, an alternative to running every expert on
every row and weighting the unchosen ones by 0 (the same numbers either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.stepped import SteppedModule

BALANCES = ("none", "aux_loss", "bias")
DISPATCHES = ("dense", "sparse")


@dataclass(frozen=True)
class Routing:
    """How the gates of a level route: keep `top_k` experts per row (`renormalise`: rescale their
    weights to sum to 1); `balance` the load by "aux_loss" (weight `balance_weight`, alpha_1) or
    "bias" (step `bias_step`, gamma) or not ("none"); `dispatch` "dense" (every expert on every
    row) or "sparse" (each expert on the rows that chose it).

    Example:
        >>> Routing(top_k=2, balance="bias").bias_step
        0.001
        >>> Routing(top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: top_k must be at least 1, not 0
    """

    top_k: int
    renormalise: bool = False
    balance: str = "none"
    balance_weight: float = 0.01
    bias_step: float = 0.001
    dispatch: str = "dense"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, not {self.top_k}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, not {self.balance!r}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, not {self.dispatch!r}")
        if self.balance_weight <= 0 or self.bias_step <= 0:
            raise ValueError("balance_weight and bias_step must be > 0")


class RoutedGates(NamedTuple):
    weights: Tensor  # [B, G, E]: g, each gate's weight on the experts it keeps, 0 elsewhere
    chosen: Tensor  # [B, G, E] bool: the experts each gate keeps for each row
    penalty: Tensor | None  # the balance loss (balance="aux_loss", in training), else None


def imbalance(load: Tensor) -> Tensor:
    """max load / mean load over the last axis (1 when balanced, E / K when one gate always
    keeps the same K of E experts); `load` `[..., E]`: rows per expert, or their fractions."""
    return load.max(-1).values / load.mean(-1)


class Router(SteppedModule):
    """Top-k selection for the G gates of a level over its E experts, and its load balance.

    `candidates` `[G, E]` bool: the experts each gate routes among. Input: the affinities s
    `[B, G, E]`, each gate's softmax over its candidates (0 elsewhere). Output: `RoutedGates`.
    Buffers (kept in checkpoints): `bias` `[G, E]`, b (balance="bias"); `load` `[G, E]`, the rows
    each gate sent to each expert in the last forward in training; `epoch_load`, the same summed
    since the last `end_epoch()`.

    Example:
        >>> import torch
        >>> router = Router(torch.ones(1, 4, dtype=torch.bool), Routing(top_k=2), ["gate/a"])
        >>> s = torch.tensor([[[0.1, 0.4, 0.2, 0.3]]])
        >>> router(s).weights
        tensor([[[0.0000, 0.4000, 0.0000, 0.3000]]])
    """

    def __init__(self, candidates: Tensor, routing: Routing, gate_names: Sequence[str]):
        super().__init__()
        sizes = candidates.sum(1).tolist()
        if len(gate_names) != len(sizes):
            raise ValueError(f"{len(gate_names)} gate names for {len(sizes)} gates")
        for name, size in zip(gate_names, sizes):
            if routing.top_k > size:
                raise ValueError(f"top_k = {routing.top_k} exceeds the {size} experts gate {name!r} routes among")
        self.routing = routing
        self.gate_names = list(gate_names)
        self.register_buffer("candidates", candidates.clone(), persistent=False)
        self.register_buffer("bias", torch.zeros(candidates.shape))
        self.register_buffer("load", torch.zeros(candidates.shape))
        self.register_buffer("epoch_load", torch.zeros(candidates.shape))

    def forward(self, affinity: Tensor) -> RoutedGates:
        r = self.routing
        score = affinity.detach()
        if r.balance == "bias":
            score = score + self.bias.to(score.dtype)  # chooses; the weights stay s
        top = score.masked_fill(~self.candidates, float("-inf")).topk(r.top_k, dim=-1).indices  # [B, G, K]
        kept = affinity.gather(-1, top)
        if r.renormalise:
            kept = kept / kept.sum(-1, keepdim=True)
        weights = torch.zeros_like(affinity).scatter(-1, top, kept)
        chosen = torch.zeros(affinity.shape, dtype=torch.bool, device=affinity.device)
        chosen = chosen.scatter(-1, top, torch.ones_like(top, dtype=torch.bool))
        penalty = None
        if self.training:
            rows = chosen.sum(0).to(self.load.dtype)  # [G, E]
            with torch.no_grad():
                self.load.copy_(rows)
                self.epoch_load.add_(rows)
            if r.balance == "aux_loss":
                penalty = self._balance_loss(affinity, rows)
        return RoutedGates(weights, chosen, penalty)

    def _balance_loss(self, affinity: Tensor, rows: Tensor) -> Tensor:
        """alpha_1 sum_gates sum_i f_i P_i (DeepSeekMoE Eq. 12-14), rows `[G, E]` kept per expert."""
        t = affinity.shape[0]
        n = self.candidates.sum(1, keepdim=True).to(affinity.dtype)  # N' per gate
        f = n / (self.routing.top_k * t) * rows.to(affinity.dtype)
        p = affinity.mean(0)
        return self.routing.balance_weight * (f * p).sum()

    def after_optimizer_step(self) -> None:
        """b_i += gamma sign(mean load - load_i) over each gate's candidates (balance="bias")."""
        if self.routing.balance != "bias":
            return
        load = _summed_over_processes(self.load)
        cand = self.candidates.to(load.dtype)
        mean = (load * cand).sum(1, keepdim=True) / cand.sum(1, keepdim=True)
        self.bias.add_(self.routing.bias_step * torch.sign(mean - load) * cand)

    def end_epoch(self) -> dict[str, float]:
        """`load_imbalance/<gate>` -> max / mean rows per candidate expert since the last call
        (over every process), for the epoch's log; starts the count again."""
        load = _summed_over_processes(self.epoch_load)
        found = {f"load_imbalance/{name}": float(imbalance(load[g][self.candidates[g]]))
                 for g, name in enumerate(self.gate_names)}
        self.epoch_load.zero_()
        return found


def _summed_over_processes(counts: Tensor) -> Tensor:
    """`counts` summed in place over the processes of a torch.distributed run (itself otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def sparse_mix(bank: ExpertBank, x: Tensor, weights: Tensor, chosen: Tensor) -> Tensor:
    """sum_e weights[b, g, e] f_e(x[b]) `[B, G, H]`, each expert run only on the rows that chose it.

    The rows each expert serves (chosen by any gate) are gathered into an `[E, C, I]` block, C the
    most rows any expert serves (the others padded with zeros, whose outputs are never read); the
    experts run on it as one batched product per layer, and each row gets its experts' outputs
    back, weighted (index_add). Equals `bmm(weights, bank(x))`. x: `[B, I]`, or `[G_in, B, I]`
    read by the bank's input groups; the bank must have no batch norm (its statistics would be
    over other rows).
    """
    b, g, e = weights.shape
    serves = chosen.any(1).t()  # [E, B]
    expert, row = serves.nonzero(as_tuple=True)  # sorted by expert, then row
    counts = serves.sum(1)
    capacity = int(counts.max())
    slot = torch.arange(row.numel(), device=row.device) - (counts.cumsum(0) - counts)[expert]
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    picked = x[row] if x.dim() == 2 else x[bank.groups[expert], row]  # [P, I]
    h = picked.new_zeros(e, capacity, picked.shape[1]).index_put((expert, slot), picked)
    for layer in range(len(bank.weights)):
        h = torch.baddbmm(bank.biases[layer].unsqueeze(1), h, bank.weights[layer])  # [E, C, h]
        if bank.active[layer]:
            h = bank.dropout(bank.activations[layer](h))
    out = h[expert, slot]  # [P, H]
    w = weights[row, :, expert].to(out.dtype)  # [P, G]
    parts = (w.unsqueeze(-1) * out.unsqueeze(1)).flatten(1)  # [P, G*H]
    return parts.new_zeros(b, g * out.shape[1]).index_add(0, row, parts).view(b, g, -1)

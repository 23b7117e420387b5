"""One extraction level of CGC / PLE (Tang et al., RecSys 2020), and AdaTT's variant of it.

Per task k, m_k task-specific experts E_k, and m_s shared experts E_s. Task k's gate mixes its
own and the shared experts, from task k's input x_k:
    g_k(x_k) = softmax(W_k x_k),   y_k = g_k(x_k)^T [E_k(x_k); E_s(x_s)]        (paper Eq. 2-4)
with a shared gate over all experts of the level, from x_s, where the level has one:
    y_s = g_s(x_s)^T [E_1(x_1); ...; E_T(x_T); E_s(x_s)]
MMoE is one level without task experts; PLE stacks levels; AdaTT's gates mix every expert.

Routed levels (DeepSeekMoE, `mtlrec.nn.routing`): every gate keeps the top k of the experts it
mixes above (task k's gate: its own and the shared experts; the shared gate: every task's and the
shared experts; MMoE's gates: all experts), its weights g the kept softmax values (0 for the
others), and every gate adds the level's always-on experts A_1..A_a with weight 1:
    y_k = sum_i A_i(x_s) + g_k(x_k)^T [E_k(x_k); E_s(x_s)]
Always-on experts read the shared input (x on the first level), as the shared experts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.routing import Router, Routing, sparse_mix


class LevelOutput(NamedTuple):
    task_reps: Tensor  # [B, T, H], each task's mixture y_k
    shared: Tensor | None  # [B, H], the shared gate's mixture y_s; None without a shared gate
    gates: dict[str, Tensor]  # gate name -> [B, experts it mixes]
    penalty: Tensor | None = None  # the routers' balance loss (routing with balance="aux_loss")
    representation: Tensor | None = None  # Z [B, S, H], the outputs several tasks read (`ExtractionLevel`)


class ExtractionLevel(nn.Module):
    """One CGC level, with every expert of the level in one fused bank.

    Experts are ordered task 0's, task 1's, ..., then the shared ones. Each gate's weights are
    scattered into a `[B, gates, E]` matrix (zeros for the experts it does not mix), so all
    gates mix their experts in one batched product. On the first level, linear gates (the
    papers' kind) read the same x and are computed together: one matmul, one softmax.

    With `routing` (a `Routing`), a `Router` keeps each gate's top k experts (its weights
    `[B, gates, E]` take the place of the softmax ones) and, for dispatch "sparse", only the
    chosen experts run (`sparse_mix`; traced for export, the level runs densely: same numbers).
    `always_on_experts` > 0 adds a second bank, summed with weight 1 into every gate's output.

    Input: x `[B, I]` on the first level, else `[T+1, B, I]` (each task's input, then the
    shared input). Output: `LevelOutput`, task outputs `[B, T, H]`, shared output `[B, H]`
    (None without a shared gate), the gate weights by name, the balance loss (or None), and
    the level's shared representation Z `[B, S, H]`: the outputs of the experts no task owns
    alone (the shared experts; every expert where no task owns any), then, with always-on
    experts, their sum as one more row. The mixtures read the experts from Z (the same
    values), so every path from them to a task passes through it. With dispatch "sparse" the
    experts' outputs are never formed densely: Z is None (`has_representation` False; PLE
    turns it off on its lower levels, whose Z nobody reads).
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        task_experts: Sequence[int],
        shared_experts: int,
        expert_hidden: Sequence[int],
        gate_hidden: Sequence[int],
        shared_gate: bool,
        first: bool,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        name: str = "level1",
        fusion: str = "own",
        native: bool = False,
        always_on_experts: int = 0,
        routing: Routing | None = None,
    ):
        super().__init__()
        t = len(task_names)
        if len(task_experts) != t:
            raise ValueError(f"task_experts has {len(task_experts)} entries for {t} tasks")
        if any(m < 0 for m in task_experts) or shared_experts < 0 or always_on_experts < 0:
            raise ValueError("expert counts must be >= 0")
        if routing is not None and native:
            raise ValueError("routing is not defined for AdaTT's native experts")
        if routing is not None and routing.dispatch == "sparse" and batch_norm:
            raise ValueError("dispatch = 'sparse' cannot run batch norm in the experts (its statistics "
                             "would be over each expert's rows); use dispatch = 'dense'")
        for task, m in zip(task_names, task_experts):
            if m + shared_experts == 0 or (native and m == 0):
                raise ValueError(f"task {task!r} has no expert to read: give it task or shared experts"
                                 + (" (AdaTT: at least one task expert each)" if native else ""))
        self.first = first
        self.num_tasks = t
        expert_groups = [k for k, m in enumerate(task_experts) for _ in range(m)] + [t] * shared_experts
        num_experts = len(expert_groups)
        self.experts = ExpertBank(
            in_dim, num_experts, expert_hidden, activation, dropout, batch_norm,
            groups=[0] * num_experts if first else expert_groups,
        )
        shared_columns = list(range(num_experts - shared_experts, num_experts))
        own = [[e for e, g in enumerate(expert_groups) if g == k] for k in range(t)]
        if fusion == "own":  # PLE: own experts, then the shared ones
            columns = [own[k] + shared_columns for k in range(t)]
        elif fusion == "all":  # AdaTT: every expert of the level
            columns = [list(range(num_experts)) for _ in range(t)]
        else:
            raise ValueError(f"fusion must be 'own' or 'all', not {fusion!r}")
        owners = [task_names[g] if g < t else "shared" for g in expert_groups]
        labels = [f"{owner}/{owners[:e].count(owner)}" for e, owner in enumerate(owners)]
        self.gate_names = [f"{name}/{task}" for task in task_names]
        if shared_gate:
            columns.append(list(range(num_experts)))
            self.gate_names.append(f"{name}/shared")
        self.gates = nn.ModuleList(Gate(in_dim, len(c), gate_hidden, activation) for c in columns)
        self.gate_experts = {
            g: [f"{name}/{labels[e]}" for e in c] for g, c in zip(self.gate_names, columns)
        }
        flat = [g * num_experts + e for g, c in enumerate(columns) for e in c]
        self.register_buffer("mix_index", torch.tensor(flat), persistent=False)
        # AdaTT's native-expert unit: task k adds v_k^T E_k, v_k learned, starting at the mean
        self.native = nn.ParameterList(nn.Parameter(torch.full((len(o),), 1.0 / len(o))) for o in own) if native else None
        if native:
            native_flat = [k * num_experts + e for k, o in enumerate(own) for e in o]
            self.register_buffer("native_index", torch.tensor(native_flat), persistent=False)
        # a task's own experts serve that task alone where no other gate reads them: without a
        # shared gate (the last PLE level, CGC, MMoE) and where gates mix only their own task's
        self.exclusive = [] if shared_gate or fusion != "own" else own
        self.num_experts = num_experts
        self.representation_experts = num_experts - sum(len(o) for o in self.exclusive)  # the last ones
        self.shared_gate = shared_gate
        self.out_dim = self.experts.out_dim
        # linear gates that read one input (the first level) run as one matmul
        self.fused_gates = first and not gate_hidden
        self.gate_sizes = [len(c) for c in columns]
        # DeepSeekMoE's isolated shared experts: every gate adds them with weight 1
        self.always_on = (ExpertBank(in_dim, always_on_experts, expert_hidden, activation, dropout, batch_norm)
                          if always_on_experts else None)
        self.router = None
        self.gate_top_k: dict[str, int] = {}  # routed gates -> the experts each keeps per row
        if routing is not None:
            candidates = torch.zeros(len(columns), num_experts, dtype=torch.bool)
            for g, c in enumerate(columns):
                candidates[g, c] = True
            self.router = Router(candidates, routing, self.gate_names)
            self.gate_top_k = {g: routing.top_k for g in self.gate_names}
        self.sparse = routing is not None and routing.dispatch == "sparse"
        self.has_representation = not self.sparse and (self.representation_experts > 0 or self.always_on is not None)
        self.form_representation = False  # set by `Backbone.request_representation`: forming Z costs a copy

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.gates[task]]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [] if self.native is None else [self.native[task]]

    def task_slices(self, task: int) -> list[tuple[nn.Parameter, Tensor]]:
        """The entries of the fused expert tensors only this task uses (its own experts, where
        no other gate reads them), as (parameter, bool mask)."""
        return self.experts.expert_masks(self.exclusive[task]) if self.exclusive and self.exclusive[task] else []

    def forward(self, x: Tensor) -> LevelOutput:
        sparse = self.sparse and not torch.jit.is_tracing()  # a trace (export) runs densely
        experts = None if sparse else self.experts(x)  # [B, E, H]
        always_on = None if sparse else self._always_on(x)  # [B, 1, H]
        representation = None
        if experts is not None and self.form_representation and torch.is_grad_enabled():  # Z serves training alone
            experts, always_on, representation = self._through_representation(experts, always_on)
        b, n_gates = x.shape[-2], len(self.gates)
        if self.fused_gates:
            mix = self._fused_gate_mix(x)
            flat = mix.view(b, -1).index_select(1, self.mix_index)
        else:
            flat = torch.cat([gate(x if self.first else x[g]) for g, gate in enumerate(self.gates)], dim=1)
            mix = flat.new_zeros(b, n_gates * self.num_experts)  # in the gates' dtype (float32 under CUDA autocast)
            mix = mix.index_copy(1, self.mix_index, flat).view(b, n_gates, self.num_experts)
        routed = None
        if self.router is not None:
            routed = self.router(mix)
            mix = routed.weights
            flat = mix.view(b, -1).index_select(1, self.mix_index)
        weights = list(flat.split(self.gate_sizes, dim=1))
        if self.native is not None:
            native = torch.cat(list(self.native)).to(flat.dtype)
            v = flat.new_zeros(n_gates * self.num_experts).index_copy(0, self.native_index, native)
            mix = mix + v.view(n_gates, self.num_experts)
        if experts is None:
            mixed = sparse_mix(self.experts, x, mix, routed.chosen)  # [B, gates, H]
            always_on = self._always_on(x)
        else:
            mixed = torch.bmm(mix.to(experts.dtype), experts)  # [B, gates, H]
        if always_on is not None:
            mixed = mixed + always_on
        shared = mixed[:, self.num_tasks] if self.shared_gate else None
        penalty = routed.penalty if routed is not None else None
        return LevelOutput(mixed[:, : self.num_tasks], shared, dict(zip(self.gate_names, weights)), penalty,
                           representation)

    def _always_on(self, x: Tensor) -> Tensor | None:
        """The always-on experts' sum `[B, 1, H]`, from the shared input; None without them."""
        if self.always_on is None:
            return None
        return self.always_on(x if self.first else x[self.num_tasks]).sum(1, keepdim=True)

    def _through_representation(self, experts: Tensor, always_on: Tensor | None
                                ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Z `[B, S, H]` from the experts' outputs `[B, E, H]` and the always-on sum `[B, 1, H]`
        (or None), and both read back from it: (experts, always-on sum, Z), the same values."""
        owned = self.num_experts - self.representation_experts  # the experts one task owns: the first ones
        if not owned and always_on is None:
            return experts, None, experts
        shared = experts[:, owned:]
        z = shared if always_on is None else torch.cat([shared, always_on], dim=1)
        from_z = z[:, : self.representation_experts]
        experts = torch.cat([experts[:, :owned], from_z], dim=1) if owned else from_z.contiguous()
        return experts, None if always_on is None else z[:, self.representation_experts:], z

    def _fused_gate_mix(self, x: Tensor) -> Tensor:
        """Every linear gate from one matmul over x `[B, I]`: the logits land in a `[B, gates, E]`
        matrix holding -inf for the experts a gate does not mix, so one softmax over its last
        axis gives each gate's weights and zeros elsewhere. Equal to running the gates one by one."""
        linears = [gate.net[0] for gate in self.gates]
        weight = torch.cat([lin.weight for lin in linears])  # [sum of gate sizes, I]
        bias = torch.cat([lin.bias for lin in linears])
        logits = torch.addmm(bias, x, weight.t())
        masked = logits.new_full((x.shape[0], len(self.gates) * self.num_experts), float("-inf"))
        masked = masked.index_copy(1, self.mix_index, logits).view(x.shape[0], len(self.gates), -1)
        return torch.softmax(masked, dim=-1)

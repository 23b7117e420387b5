"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE), Tang et al., RecSys 2020.

One extraction level has, per task k, m_k task-specific experts E_k and m_s shared experts E_s.
Task k's gate mixes its own and the shared experts, computed from task k's input x_k:
    g_k(x_k) = softmax(W_k x_k),   y_k = g_k(x_k)^T [E_k(x_k); E_s(x_s)]        (paper Eq. 2-4)
Every level but the last also has a shared gate over all experts of the level, from x_s:
    y_s = g_s(x_s)^T [E_1(x_1); ...; E_T(x_T); E_s(x_s)]
Level 1 reads x everywhere (x_k = x_s = x). Level j > 1 reads level j-1's outputs:
x_k = y_k, x_s = y_s (Eq. 5). The towers read the last level's y_k. CGC is PLE with one level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.nn import ExpertBank, Gate


class ExtractionLevel(nn.Module):
    """One CGC level, with every expert of the level in one fused bank.

    Experts are ordered task 0's, task 1's, ..., then the shared ones. Each gate's weights are
    scattered into a `[B, gates, E]` matrix (zeros for the experts it does not mix), so all
    gates mix their experts in one batched product. On the first level, linear gates (the
    papers' kind) read the same x and are computed together: one matmul, one softmax.

    Input: x `[B, I]` on the first level, else `[T+1, B, I]` (each task's input, then the
    shared input). Output: task outputs `[B, T, H]`, shared output `[B, H]` (None without a
    shared gate), and the gate weights by name.
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
    ):
        super().__init__()
        t = len(task_names)
        if len(task_experts) != t:
            raise ValueError(f"task_experts has {len(task_experts)} entries for {t} tasks")
        if any(m < 0 for m in task_experts) or shared_experts < 0:
            raise ValueError("expert counts must be >= 0")
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
        self.num_experts = num_experts
        self.shared_gate = shared_gate
        self.out_dim = self.experts.out_dim
        # linear gates that read one input (the first level) run as one matmul
        self.fused_gates = first and not gate_hidden
        self.gate_sizes = [len(c) for c in columns]

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.gates[task]]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [] if self.native is None else [self.native[task]]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        experts = self.experts(x)  # [B, E, H]
        b, n_gates = experts.shape[0], len(self.gates)
        if self.fused_gates:
            mix = self._fused_gate_mix(x)
            flat = mix.view(b, -1).index_select(1, self.mix_index)
            weights = list(flat.split(self.gate_sizes, dim=1))
        else:
            weights = [gate(x if self.first else x[g]) for g, gate in enumerate(self.gates)]
            flat = torch.cat(weights, dim=1)  # in the gates' dtype (float32 under CUDA autocast)
            mix = flat.new_zeros(b, n_gates * self.num_experts)
            mix = mix.index_copy(1, self.mix_index, flat).view(b, n_gates, self.num_experts)
        if self.native is not None:
            native = torch.cat(list(self.native)).to(flat.dtype)
            v = flat.new_zeros(n_gates * self.num_experts).index_copy(0, self.native_index, native)
            mix = mix + v.view(n_gates, self.num_experts)
        mixed = torch.bmm(mix.to(experts.dtype), experts)  # [B, gates, H]
        shared = mixed[:, self.num_tasks] if self.shared_gate else None
        return mixed[:, : self.num_tasks], shared, dict(zip(self.gate_names, weights))

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


class PLE(Backbone):
    """Progressive Layered Extraction: `num_levels` stacked CGC levels. x `[B, I]` -> `[B, T, H]`.

    Args:
        num_levels: extraction levels (1 = CGC).
        task_experts: experts per task on every level: an int for all tasks, or one per task.
        shared_experts: shared experts per level.
        expert_hidden: expert layer sizes, the same on every level (e.g. `[256, 128]`), or one
            list per level (e.g. `[[256, 128], [64]]`).
        gate_hidden: hidden layers of every gate (empty: the paper's linear softmax gate).
        activation, dropout, batch_norm: of the experts.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_levels: int = 2,
        task_experts: int | Sequence[int] = 1,
        shared_experts: int = 1,
        expert_hidden: Sequence[int] | Sequence[Sequence[int]] = (256, 128),
        gate_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        if num_levels < 1:
            raise ValueError("num_levels must be >= 1")
        t = len(task_names)
        counts = [task_experts] * t if isinstance(task_experts, int) else list(task_experts)
        if expert_hidden and not isinstance(expert_hidden[0], int):
            per_level = [list(h) for h in expert_hidden]
            if len(per_level) != num_levels:
                raise ValueError(f"expert_hidden has {len(per_level)} lists for {num_levels} levels")
        else:
            per_level = [list(expert_hidden)] * num_levels
        self.levels = nn.ModuleList()
        width = in_dim
        for j, hidden in enumerate(per_level):
            level = ExtractionLevel(
                width, task_names, counts, shared_experts, hidden, gate_hidden,
                shared_gate=j < num_levels - 1 and (shared_experts > 0 or self.fusion == "own"),
                first=j == 0, activation=activation, dropout=dropout, batch_norm=batch_norm,
                name=f"level{j + 1}", fusion=self.fusion, native=self.native,
            )
            self.levels.append(level)
            width = level.out_dim
        self.out_dim = width
        self.gate_experts = {g: e for level in self.levels for g, e in level.gate_experts.items()}

    fusion = "own"  # task gates mix their own and the shared experts
    native = False

    def task_modules(self, task: int) -> list[nn.Module]:
        return [m for level in self.levels for m in level.task_modules(task)]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for level in self.levels for p in level.task_parameters(task)]

    def forward(self, x: Tensor) -> BackboneOutput:
        gates: dict[str, Tensor] = {}
        for level in self.levels:
            task_reps, shared, level_gates = level(x)
            gates.update(level_gates)
            inputs = task_reps if shared is None else torch.cat([task_reps, shared.unsqueeze(1)], dim=1)
            x = inputs.transpose(0, 1)  # [T(+1), B, H]: the next level's inputs
        return BackboneOutput(task_reps, gates)


class CGC(PLE):
    """Customized Gate Control: one PLE level (no shared gate). x `[B, I]` -> `[B, T, H]`.

    Args: as PLE, without num_levels.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        task_experts: int | Sequence[int] = 1,
        shared_experts: int = 1,
        expert_hidden: Sequence[int] = (256, 128),
        gate_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__(
            in_dim, task_names, 1, task_experts, shared_experts, expert_hidden, gate_hidden,
            activation, dropout, batch_norm,
        )


class AdaTT(PLE):
    """AdaTT, Adaptive Task-to-Task Fusion (Li et al., KDD 2023). x `[B, I]` -> `[B, T, H]`.

    Levels of task-specific experts, as in PLE, but every task fuses every expert of the level:
        f_t = v_t^T E_t(x_t) + g_t(x_t)^T [E_1(x_1); ...; E_T(x_T); E_s(x_s)],
    g_t = softmax over all experts, v_t a learned weight per native expert of task t (starting
    at 1/m_t). With `shared_experts` = 0 this is the paper's AdaTT-sp; with shared experts a
    shared gate over all experts feeds them on the next level (every level but the last).

    Args: as PLE (`task_experts` at least 1 per task).
    """

    fusion = "all"
    native = True

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_levels: int = 2,
        task_experts: int | Sequence[int] = 2,
        shared_experts: int = 0,
        expert_hidden: Sequence[int] | Sequence[Sequence[int]] = (256, 128),
        gate_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__(in_dim, task_names, num_levels, task_experts, shared_experts, expert_hidden,
                         gate_hidden, activation, dropout, batch_norm)

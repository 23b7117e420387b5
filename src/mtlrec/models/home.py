"""HoME, Hierarchy of Multi-Gate Experts (Wang, Cao, Fu, Gai, Zhou; Kuaishou, arXiv 2408.05430, 2024).

HoME is a two-level mixture of experts with three changes to MMoE / PLE, each one an option here
so that it can be switched off, as in the paper's ablations. Notation: v the input, Sum(g, {E_i})
= sum_i g_i E_i a gate's mixture, Gate(.) = softmax(MLP_G(.)) (the MMoE gate the paper starts from),
[a, b] a concatenation. Equation numbers are not given: these forms follow public summaries of
the paper; where they leave a detail open, the choice made here is listed at the end.

Expert normalisation & Swish (`expert_norm`): the paper's MMoE expert ReLU(MLP_E(v)) becomes
    E(v) = Swish(BN(MLP_E(v))),   BN(z) = gamma (z - mu_B) / sqrt(var_B + eps) + beta,   Swish(z) = z sigmoid(z),
a batch norm per expert and unit, so that all experts' outputs are on one scale before a gate
weighs them, and no expert's output is mostly zeros (off: the experts' layers use `activation`).

Hierarchy mask (`hierarchy`): tasks are split into groups C (the paper's passive watch-time and
interactive categories). A meta level reads v and holds global shared experts E_s and experts E_c
per group; each group, and the shared side, mix what they may see:
    z_c = Sum(Gate_c(v), {E_c(v), E_s(v)}),   z_s = Sum(Gate_s(v), {E_1(v), ..., E_C(v), E_s(v)}).
The task level holds, again, shared experts F_s, experts F_c per group and experts F_k per task;
task k of group c reads
    h_k = Sum(Gate_k([z_c, z_s]), {F_k(z_c), F_c(z_c), F_s(z_s)}),
so a task never sees another group's task-level experts; the towers read h_k. Off: no meta level,
and every expert and gate of the task level reads v.

Feature-gate (`feature_gate`): each expert e reads its own scaling of its input x (v or z):
    x_e = x * 2 sigmoid(x D_e U_e),   D_e: [I, r], U_e: [r, I]   (a LoRA-like low-rank gate in (0, 2)).

Self-gate (`self_gate`): each output also adds its owner's own experts once more, weighted by a
second gate that reads the same input as the owner's gate: Sigmoid(MLP_G(.)) over one expert,
softmax over several. For task k,
    h_k = Sum(Gate_k([z_c, z_s]), {F_k, F_c, F_s}) + Sum(SelfGate_k([z_c, z_s]), {F_k}),
a residual path from each owner's experts to the next level that no other expert competes for.

Choices made here where the summaries leave room:
- What a task's gate reads is the least settled point: [z_c, z_s] (default) or z_c alone
  (`task_gate_input: group`); the experts read z_c (task and group experts) and z_s (shared
  experts) either way.
- With several expert layers (`expert_hidden`), every layer is Linear -> BatchNorm -> Swish.
- z_s mixes every meta expert, as PLE's shared gate does; it is computed whenever the task level
  reads it (shared experts, or the task gates).
- Self-gates sit on every output of both levels (an owner without experts has none).
- A feature-gate per expert on both levels; U starts at zero, so every gate starts at exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import ExpertOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import ExpertBank, Gate


class HoMEOptions(ExpertOptions):
    task_groups: list[list[str]] | None = Field(
        None, description="tasks grouped into categories, e.g. [[click, long_view], [like, comment]]; "
                          "every task in exactly one group (default: one group holding every task)")
    meta_shared_experts: NonNegativeInt = Field(1, description="meta level: experts shared by all groups")
    meta_group_experts: NonNegativeInt = Field(1, description="meta level: experts of each group")
    shared_experts: NonNegativeInt = Field(1, description="task level: experts shared by all tasks")
    group_experts: NonNegativeInt = Field(1, description="task level: experts shared by the tasks of a group")
    task_experts: NonNegativeInt = Field(1, description="task level: experts of each task")
    expert_norm: bool = Field(True, description="experts' layers are Linear -> BatchNorm -> Swish")
    hierarchy: bool = Field(True, description="a meta level per task group below the task level")
    feature_gate: bool = Field(True, description="each expert reads its input scaled by a low-rank gate")
    feature_gate_rank: PositiveInt = Field(8, description="rank r of each feature-gate")
    self_gate: bool = Field(True, description="each output adds its own experts again through a self-gate")
    task_gate_input: Literal["group_and_shared", "group"] = Field(
        "group_and_shared", description="with the hierarchy, what each task's gate and self-gate read: "
                                        "its group's and the shared meta output concatenated, or its group's alone")

    @field_validator("task_groups")
    @classmethod
    def _groups_are_disjoint(cls, groups: list[list[str]] | None) -> list[list[str]] | None:
        seen: set[str] = set()
        for c, group in enumerate(groups or []):
            if not group:
                raise ValueError(f"group {c} is empty")
            for task in group:
                if task in seen:
                    raise ValueError(f"task {task!r} is in two groups (or twice in one)")
                seen.add(task)
        return groups

    @model_validator(mode="after")
    def _every_gate_has_experts(self) -> HoMEOptions:
        if self.hierarchy and self.meta_shared_experts + self.meta_group_experts == 0:
            raise ValueError("meta_shared_experts and meta_group_experts are both 0: the meta level has no expert")
        if self.shared_experts + self.group_experts + self.task_experts == 0:
            raise ValueError("shared_experts, group_experts and task_experts are all 0: a task has no expert")
        if not self.hierarchy and "task_gate_input" in self.model_fields_set:
            raise ValueError("task_gate_input chooses between meta outputs: it needs hierarchy: true "
                             "(without it every task gate reads the input)")
        return self


class Mixture(NamedTuple):
    """One output of a level: the gate of `owner` reads the level's inputs `reads`, concatenated
    in that order, and mixes the experts of the owners in `mixes`, in that order (with
    self-gates, the owner's experts once more)."""

    owner: str
    reads: tuple[int, ...]
    mixes: list[str]


class LowRankFeatureGates(nn.Module):
    """HoME's feature-gates, one per expert, in two batched products:
    g_e(x_e) = 2 sigmoid(x_e D_e U_e), D `[E, I, r]`, U `[E, r, I]`.

    Input `[E, B, I]` (expert e's input at e), output `[E, B, I]` in (0, 2). U starts at zero,
    as LoRA's up-projection does, so every gate starts at exactly 1: the expert reads x unchanged.
    """

    def __init__(self, num_experts: int, in_dim: int, rank: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.down = nn.Parameter(torch.empty(num_experts, in_dim, rank).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.zeros(num_experts, rank, in_dim))

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * torch.sigmoid(torch.bmm(torch.bmm(x, self.down), self.up))

    def expert_masks(self, experts: Sequence[int]) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, bool mask) of these experts' entries."""
        chosen = torch.zeros(self.down.shape[0], dtype=torch.bool)
        chosen[list(experts)] = True
        return [(p, chosen.view(-1, 1, 1).expand_as(p).clone()) for p in (self.down, self.up)]


class SelfGate(Gate):
    """HoME's self-gate over an owner's own experts `[B, I]` -> `[B, n]`: sigmoid(MLP(x)) for
    one expert (a softmax over one would be constant 1), softmax(MLP(x)) for several."""

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)


class HoMELevel(nn.Module):
    """One HoME level: experts, each with an owner and the input it reads, and one output per
    `Mixture`. All experts of the level are one fused `ExpertBank`.

    `experts` lists (owner, input index, count); experts are labelled `{level}/{owner}/{i}`,
    gates `{level}/{owner}` and self-gates `{level}_self/{owner}`. Every gate's weights are
    placed into a `[B, outputs, E]` mixing matrix by one product with a constant 0/1 matrix
    (a self-gate adds onto its owner's columns), then one batched product mixes the experts.

    Input: `[N, B, I]` (the level's N inputs; a gate reading k of them has k*I inputs).
    Output: `[B, outputs, H]` and the gate weights by name.
    """

    def __init__(self, level: str, in_dim: int, experts: Sequence[tuple[str, int, int]],
                 mixtures: Sequence[Mixture], options: HoMEOptions):
        super().__init__()
        o = options
        owners = [owner for owner, _, count in experts for _ in range(count)]
        reads = [source for _, source, count in experts for _ in range(count)]
        self.num_experts = len(owners)
        self.labels = [f"{level}/{owner}/{owners[:e].count(owner)}" for e, owner in enumerate(owners)]
        columns = {owner: [e for e, who in enumerate(owners) if who == owner] for owner in dict.fromkeys(owners)}
        activation, batch_norm = ("silu", True) if o.expert_norm else (o.activation, o.batch_norm)
        self.feature_gates = LowRankFeatureGates(self.num_experts, in_dim, o.feature_gate_rank) if o.feature_gate else None
        self.experts = ExpertBank(in_dim, self.num_experts, o.expert_hidden, activation, o.dropout, batch_norm,
                                  groups=list(range(self.num_experts)) if o.feature_gate else reads)
        self.register_buffer("expert_reads", torch.tensor(reads), persistent=False)
        self.out_dim = self.experts.out_dim
        self.num_outputs = len(mixtures)
        self.columns = columns

        gates, names, gate_reads, places = [], [], [], []
        self.gate_experts: dict[str, list[str]] = {}
        for out, m in enumerate(mixtures):
            specs = [(Gate, f"{level}/{m.owner}", [e for owner in m.mixes for e in columns.get(owner, [])])]
            if o.self_gate and columns.get(m.owner):
                specs.append((SelfGate, f"{level}_self/{m.owner}", columns[m.owner]))
            for kind, name, cols in specs:
                gates.append(kind(in_dim * len(m.reads), len(cols), o.gate_hidden, o.activation))
                names.append(name)
                gate_reads.append(m.reads)
                places += [out * self.num_experts + e for e in cols]  # where its weights go in the mix
                self.gate_experts[name] = [self.labels[e] for e in cols]
        self.gates = nn.ModuleList(gates)
        self.gate_names = names
        self.gate_reads = gate_reads
        self.gate_owners = [name.rpartition("/")[2] for name in names]
        placement = torch.zeros(len(places), self.num_outputs * self.num_experts)
        placement[torch.arange(len(places)), torch.tensor(places)] = 1.0
        self.register_buffer("placement", placement, persistent=False)

    def gate_modules(self, owner: str) -> list[nn.Module]:
        """The gate and self-gate of `owner`."""
        return [g for g, o in zip(self.gates, self.gate_owners) if o == owner]

    def expert_masks(self, owners: Sequence[str]) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, bool mask) of these owners' experts in the fused tensors (bank, feature-gates)."""
        chosen = [e for owner in owners for e in self.columns.get(owner, [])]
        if not chosen:
            return []
        found = self.experts.expert_masks(chosen)
        return found + (self.feature_gates.expert_masks(chosen) if self.feature_gates is not None else [])

    def forward(self, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.feature_gates is None:
            experts = self.experts(inputs)  # [B, E, H]; the bank picks each expert's input
        else:
            private = inputs.index_select(0, self.expert_reads)  # [E, B, I]
            experts = self.experts(private * self.feature_gates(private))
        read = {reads: inputs[reads[0]] if len(reads) == 1 else torch.cat([inputs[i] for i in reads], dim=-1)
                for reads in set(self.gate_reads)}  # [B, k*I]: each input combination once, side by side
        weights = [gate(read[reads]) for gate, reads in zip(self.gates, self.gate_reads)]
        mix = torch.cat(weights, dim=1) @ self.placement.to(weights[0].dtype)  # [B, outputs * E]
        mix = mix.view(-1, self.num_outputs, self.num_experts).to(experts.dtype)
        return torch.bmm(mix, experts), dict(zip(self.gate_names, weights))


def task_group_of(task_names: Sequence[str], task_groups: list[list[str]] | None) -> list[int]:
    """The group index of every task; ValueError naming `task_groups` where a task is unknown or in no group."""
    if task_groups is None:
        return [0] * len(task_names)
    group = {task: c for c, tasks in enumerate(task_groups) for task in tasks}
    unknown = [task for task in group if task not in task_names]
    if unknown:
        raise ValueError(f"task_groups names unknown task(s) {unknown}; tasks: {list(task_names)}")
    missing = [task for task in task_names if task not in group]
    if missing:
        raise ValueError(f"task_groups leaves task(s) {missing} in no group; every task must be in exactly one")
    return [group[task] for task in task_names]


@register_model("home", HoMEOptions, "meta level per task group below task-level experts, normalised Swish "
                "experts, feature- and self-gates (Wang et al. 2024)")
class HoME(Backbone):
    """Hierarchy of Multi-Gate Experts: x `[B, I]` -> `[B, T, H]`.

    Meta level (with `hierarchy`): experts `meta/shared/i` and `meta/group{c}/i`, gates
    `meta/group{c}` and `meta/shared`, giving z_c and z_s. Task level: experts `task/{task}/i`,
    `task/group{c}/i`, `task/shared/i`, one gate `task/{task}` per task; self-gates are named
    `{level}_self/{owner}`. Groups are numbered in the order of `task_groups`.

    Options (`HoMEOptions`): task_groups; expert counts meta_shared_experts, meta_group_experts
    (meta level), shared_experts, group_experts, task_experts (task level); expert_hidden, the
    experts' layer sizes on both levels; gate_hidden (empty: linear gates); the switches
    expert_norm, hierarchy, feature_gate (rank feature_gate_rank), self_gate; task_gate_input
    (what the task gates read with the hierarchy: [z_c, z_s] or z_c). Without expert_norm the
    experts use activation and batch_norm; dropout follows each expert layer.

    Example:
        >>> import torch
        >>> options = HoMEOptions(task_groups=[["click"], ["like", "share"]], expert_hidden=[8])
        >>> home = HoME(6, ["click", "like", "share"], options)
        >>> out = home(torch.randn(4, 6))
        >>> out.task_reps.shape, out.gates["task/like"].shape
        (torch.Size([4, 3, 8]), torch.Size([4, 3]))
        >>> home.gate_experts["task/like"]
        ['task/like/0', 'task/group1/0', 'task/shared/0']
        >>> home.gate_experts["meta/group1"]
        ['meta/group1/0', 'meta/shared/0']
        >>> gates = dict(zip(home.tasks.gate_names, home.tasks.gates))
        >>> gates["task/like"].net[0].in_features  # [z_1, z_s]: two meta outputs of 8
        16
    """

    def __init__(self, in_dim: int, task_names: Sequence[str], options: HoMEOptions):
        super().__init__()
        o = options
        self.task_names = list(task_names)
        self.group_of = task_group_of(task_names, o.task_groups)
        groups = [f"group{c}" for c in range(max(self.group_of) + 1)]
        clash = sorted(set(task_names) & {"shared", *groups})
        if clash:
            raise ValueError(f"task name(s) {clash} clash with HoME's expert names (shared, group0, ...): rename them")
        width = in_dim
        self.meta: HoMELevel | None = None
        reads_shared = o.hierarchy and o.task_gate_input == "group_and_shared"
        if o.hierarchy:
            # z_s: for the task level's shared experts and, by default, for every task gate
            shared_side = [Mixture("shared", (0,), [*groups, "shared"])] if o.shared_experts or reads_shared else []
            self.meta = HoMELevel("meta", in_dim, [(g, 0, o.meta_group_experts) for g in groups]
                                  + [("shared", 0, o.meta_shared_experts)],
                                  [Mixture(g, (0,), [g, "shared"]) for g in groups] + shared_side, o)
            width = self.meta.out_dim
        # the task level's inputs: z_0, ..., z_{C-1}, z_s with the hierarchy; x alone without
        group_input = list(range(len(groups))) if o.hierarchy else [0] * len(groups)
        shared_input = len(groups) if o.hierarchy else 0
        gate_reads = [(group_input[c], shared_input) if reads_shared else (group_input[c],) for c in range(len(groups))]
        self.tasks = HoMELevel(
            "task", width,
            [(t, group_input[c], o.task_experts) for t, c in zip(task_names, self.group_of)]
            + [(g, group_input[c], o.group_experts) for c, g in enumerate(groups)]
            + [("shared", shared_input, o.shared_experts)],
            [Mixture(t, gate_reads[c], [t, groups[c], "shared"]) for t, c in zip(task_names, self.group_of)], o)
        self.out_dim = self.tasks.out_dim
        self.gate_experts = {**(self.meta.gate_experts if self.meta is not None else {}), **self.tasks.gate_experts}

    def task_modules(self, task: int) -> list[nn.Module]:
        return self.tasks.gate_modules(self.task_names[task])

    def task_slices(self, task: int) -> list[tuple[nn.Parameter, Tensor]]:
        """Task k's task-level experts, and its group's where k is the group's only task."""
        group = self.group_of[task]
        alone = self.group_of.count(group) == 1
        return self.tasks.expert_masks([self.task_names[task]] + ([f"group{group}"] if alone else []))

    def forward(self, x: Tensor) -> BackboneOutput:
        inputs = x.unsqueeze(0)  # [1, B, I]
        gates: dict[str, Tensor] = {}
        if self.meta is not None:
            meta, gates = self.meta(inputs)  # [B, C + 1, H]: z_0, ..., z_{C-1}, z_s
            inputs = meta.transpose(0, 1)
        task_reps, task_gates = self.tasks(inputs)
        return BackboneOutput(task_reps, gates | task_gates)

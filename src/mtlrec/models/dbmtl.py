"""DBMTL, Deep Bayesian Multi-Target Learning (Wang, Ji, Liu & Zhao, "Deep Bayesian Multi-Target
Learning for Recommender Systems", Alibaba, arXiv:1902.09154, 2019), built as EasyRec's DBMTL.

The targets form a Bayesian network: instead of taking them as independent given x,
    p(y_1, ..., y_T | x) = prod_k p(y_k | y_parents(k), x),
each conditional learned by hidden layers that read the representations of the task's
parents. Given `dependencies` (task -> the tasks it depends on, a directed acyclic graph):
    b = MLP_bottom(x);   u_k = b, or the k-th mixture of an MMoE over b      (shared layers)
    t_k = MLP_k(u_k)                                                          (task layers)
    r_k = R_k([t_k; r_p1; ...; r_pm]),   p1..pm the parents of k, as listed    (Bayesian layer)
    logit_k = w_k^T r_k + c_k
The r_k are computed parents first. A child reads its parents' r_p without a stop-gradient,
so a child's loss trains its parents' task and relation layers (R_p, MLP_p, their gate and
the shared layers) too; a parent's output layer (w_p, c_p) it does not reach.

EasyRec's config maps onto the options: bottom_dnn -> hidden, num_expert / expert_dnn ->
num_experts / expert_hidden, a tower's dnn -> tower_hidden, relation_dnn -> relation_hidden,
relation_tower_names -> dependencies. EasyRec needs parents listed before their children;
here the tasks may come in any order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from torch import Tensor, nn

from mtlrec.data.features import Features
from mtlrec.models.base import Backbone, BackboneOutput, ModelOutput, MultiTaskModel
from mtlrec.models.moe import MMoE, MoEOptions
from mtlrec.models.options import MLPOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import MLP
from mtlrec.schema import Schema


def bayes_order(task_names: Sequence[str], dependencies: Mapping[str, Sequence[str]]) -> list[str]:
    """The tasks ordered so that each comes after the tasks it depends on, in the given order
    where the dependencies allow. ValueError naming an unknown task, a parent listed twice,
    or a cycle.

    Example:
        >>> bayes_order(["repeat", "buy", "click"], {"buy": ["click"], "repeat": ["buy"]})
        ['click', 'buy', 'repeat']
        >>> bayes_order(["a", "b"], {"a": ["b"], "b": ["a"]})
        Traceback (most recent call last):
        ...
        ValueError: dependencies form a cycle: a depends on b, b depends on a
    """
    unknown = sorted({t for child, parents in dependencies.items() for t in [child, *parents]} - set(task_names))
    if unknown:
        raise ValueError(f"dependencies name unknown task(s) {unknown}; tasks: {list(task_names)}")
    for child, parents in dependencies.items():
        if len(set(parents)) < len(parents):
            raise ValueError(f"dependencies of {child!r} list a task twice: {list(parents)}")
    order: list[str] = []
    while len(order) < len(task_names):
        ready = [t for t in task_names if t not in order and set(dependencies.get(t, ())) <= set(order)]
        if not ready:
            raise ValueError(f"dependencies form a cycle: {_cycle([t for t in task_names if t not in order], dependencies)}")
        order.append(ready[0])
    return order


def _cycle(waiting: list[str], dependencies: Mapping[str, Sequence[str]]) -> str:
    """A cycle among tasks that all wait on another waiting task, as 'a depends on b, ...'."""
    path = [waiting[0]]
    while True:
        parent = next(p for p in dependencies[path[-1]] if p in waiting)
        if parent in path:
            loop = path[path.index(parent):] + [parent]
            return ", ".join(f"{a} depends on {b}" for a, b in pairwise(loop))
        path.append(parent)


class DBMTLOptions(MLPOptions):
    hidden: list[PositiveInt] = Field([256, 128], description="layer sizes of the shared bottom MLP (empty: none)")
    num_experts: NonNegativeInt = Field(
        0, description="0: the tasks read the bottom MLP; E > 0: an MMoE of E experts over it, a mixture per task")
    expert_hidden: list[PositiveInt] = Field([128], min_length=1, description="layer sizes of each MMoE expert")
    gate_hidden: list[PositiveInt] = Field([], description="hidden layers of each MMoE gate (empty: linear gate)")
    relation_hidden: list[PositiveInt] = Field(
        [32], description="layer sizes of each task's relation MLP, over its tower's output and its parents' relation "
                          "outputs (empty: their concatenation)")
    dependencies: dict[str, list[str]] = Field(
        {}, description="task -> the tasks it depends on (its parents in the Bayesian network), e.g. {buy: [click]}")

    @model_validator(mode="after")
    def _check(self) -> DBMTLOptions:
        if self.num_experts == 0:
            ignored = sorted({"expert_hidden", "gate_hidden"} & self.model_fields_set)
            if ignored:
                raise ValueError(f"{', '.join(ignored)} shape the MMoE bottom: set num_experts > 0 too")
        mentioned = [t for child, parents in self.dependencies.items() for t in [child, *parents]]
        bayes_order(list(dict.fromkeys(mentioned)), self.dependencies)  # cycles, before any task is known
        return self


class DBMTLBottom(Backbone):
    """DBMTL's shared layers: x `[B, I]` -> b = MLP(x), the same for every task `[B, T, H]`;
    with `num_experts` > 0, an MMoE over b gives each task its own mixture `[B, T, H]`
    (gates `gate/{task}`, as `mmoe`'s)."""

    def __init__(self, in_dim: int, task_names: Sequence[str], options: DBMTLOptions):
        super().__init__()
        o = options
        self.num_tasks = len(task_names)
        self.bottom = MLP(in_dim, o.hidden, activation=o.activation, dropout=o.dropout, batch_norm=o.batch_norm)
        self.mixture = None
        if o.num_experts:
            self.mixture = MMoE(self.bottom.out_dim, task_names, MoEOptions(
                num_experts=o.num_experts, expert_hidden=o.expert_hidden, gate_hidden=o.gate_hidden,
                activation=o.activation, dropout=o.dropout, batch_norm=o.batch_norm))
            self.gate_experts = self.mixture.gate_experts
        self.out_dim = self.bottom.out_dim if self.mixture is None else self.mixture.out_dim

    def task_modules(self, task: int) -> list[nn.Module]:
        return [] if self.mixture is None else self.mixture.task_modules(task)

    def forward(self, x: Tensor) -> BackboneOutput:
        b = self.bottom(x)
        if self.mixture is None:
            return BackboneOutput(b.unsqueeze(1).expand(-1, self.num_tasks, -1), {})
        return self.mixture(b)


class BayesTower(nn.Module):
    """Task k's tower: (u_k `[B, H]`, its parents' relation outputs r_p `[B, R_p]`) ->
    (r_k `[B, R]`, logit_k `[B, width]`), with t_k = `task_layers`(u_k),
    r_k = `relation`([t_k; r_p1; ...]), logit_k = `output`(r_k); width is the task kind's
    (1, or C for a multiclass task)."""

    def __init__(self, in_dim: int, parent_widths: Sequence[int], options: DBMTLOptions, width: int = 1):
        super().__init__()
        o = options
        self.task_layers = MLP(in_dim, o.tower_hidden, activation=o.activation, dropout=o.tower_dropout)
        self.relation = MLP(self.task_layers.out_dim + sum(parent_widths), o.relation_hidden,
                            activation=o.activation, dropout=o.tower_dropout)
        self.output = nn.Linear(self.relation.out_dim, width)
        self.out_dim = self.relation.out_dim

    def forward(self, u: Tensor, parents: list[Tensor]) -> tuple[Tensor, Tensor]:
        r = self.relation(torch.cat([self.task_layers(u), *parents], dim=1))
        return r, self.output(r)


@register_model("dbmtl", DBMTLOptions, "task towers reading their parent tasks' towers in a Bayesian network "
                "(Wang et al. 2019)", backbone=DBMTLBottom)
class DBMTL(MultiTaskModel):
    """Logits `[B, L]` in schema order (`TaskSet.slices`); the towers run parents first (`order`).

    Options (`DBMTLOptions`): dependencies, task -> its parent tasks (unknown names and cycles
    are errors); hidden, the shared bottom MLP; num_experts (0: no MMoE), expert_hidden,
    gate_hidden of the MMoE over it; tower_hidden, each task's own layers; relation_hidden,
    each task's relation MLP; activation, dropout, batch_norm (bottom, experts), tower_dropout.

    Example:
        >>> from mtlrec.schema import DenseFeature, Schema, Task
        >>> schema = Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="buy"), Task(name="click")])
        >>> model = DBMTL(schema, DBMTLBottom, DBMTLOptions(hidden=[8], dependencies={"buy": ["click"]}))
        >>> [schema.task_names[k] for k in model.order], model.parents
        (['click', 'buy'], [[1], []])
        >>> model(Features(torch.zeros(3, 0, dtype=torch.long), torch.randn(3, 1))).logits.shape
        torch.Size([3, 2])
    """

    def __init__(self, schema: Schema, backbone: type[Backbone], options: DBMTLOptions):
        names = schema.task_names
        order = bayes_order(names, options.dependencies)
        super().__init__(schema, backbone, options)
        self.order = [names.index(t) for t in order]
        self.parents = [[names.index(p) for p in options.dependencies.get(t, [])] for t in names]
        self.has_children = [any(k in parents for parents in self.parents) for k in range(len(names))]
        towers: list[BayesTower | None] = [None] * len(names)
        for k in self.order:  # parents first: a tower's input width includes its parents' outputs
            towers[k] = BayesTower(self.backbone.out_dim, [towers[p].out_dim for p in self.parents[k]], options,
                                   schema.tasks[k].kind.width)
        self.towers = nn.ModuleList(towers)  # in place of the plain towers MultiTaskModel builds

    def forward(self, features: Features) -> ModelOutput:
        out = self.backbone(self.inputs(features))
        reps, gates, penalty = out.task_reps, out.gates, out.penalty
        relation: dict[int, Tensor] = {}  # task -> r_k, filled parents first
        logits: dict[int, Tensor] = {}
        for k in self.order:
            relation[k], logits[k] = self.towers[k](reps[:, k], [relation[p] for p in self.parents[k]])
        return ModelOutput(torch.cat([logits[k] for k in range(len(self.towers))], dim=1), gates, penalty=penalty)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Parameters only this task's prediction uses: its output layer and, unless another
        task depends on it (and so reads its relation output), its tower and gate."""
        if self.has_children[task]:
            return list(self.towers[task].output.parameters())
        return super().task_parameters(task)

"""STEM-Net, Shared and Task-specific EMbeddings (Su et al., AAAI 2024, "STEM: Unleashing the
Power of Embeddings for Multi-task Recommendation", arXiv 2308.13537).

With one embedding table, every task sees users and items the same way. STEM gives every
feature T + 1 embeddings: a shared one v^S and one per task, v^t. Let x^S and x^t be the
input rows built from them (each feature's embedding, then the dense values). Then

    task experts     E^t_i(x^t),  i = 1..m_t    (task t's experts read task t's embeddings)
    shared experts   E^S_j(x^S),  j = 1..m_s    (they read the shared embeddings)
    gate of task t   g^t = softmax(W^t (x^t + x^S))          (an MLP before W^t with gate_hidden)

and the All Forward Task-specific Backward (AFTB) gate mixes every expert of every task:

    h^t = sum_i g^t_{t,i} E^t_i(x^t) + sum_{u != t} sum_i g^t_{u,i} sg(E^u_i(x^u))
          + sum_j g^t_{S,j} E^S_j(x^S),                       y^t = tower^t(h^t),

sg being the stop-gradient (the identity forward, zero gradient backward). Every task's
prediction reads every embedding, but task t's loss trains only task t's embeddings, experts
and gate, the shared embeddings and the shared experts: dL_t / dv^u = 0 for u != t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from mtlrec.data.features import Features
from mtlrec.models.base import Backbone, BackboneOutput, ModelOutput, MultiTaskModel
from mtlrec.models.options import ExpertOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import ExpertBank, FeatureEmbedding, Gate
from mtlrec.schema import Schema


class STEMOptions(ExpertOptions):
    task_experts: PositiveInt = Field(1, description="m_t, experts per task, reading that task's embeddings")
    shared_experts: NonNegativeInt = Field(1, description="m_s, experts reading the shared embeddings")


class AllForwardTaskBackward(Backbone):
    """STEM-Net's experts and AFTB gates: x `[T+1, B, I]` (task 0's input row, ..., task T-1's,
    then the shared one) -> task representations `[B, T, H]`, gates `gate/<task>` `[B, E]`.

    Experts are ordered task 0's, ..., task T-1's, then the shared ones (`gate_experts`); every
    gate mixes all E = T * m_t + m_s of them. Task t's experts and gate serve task t alone
    (`task_modules`): no other task's loss reaches them.
    """

    def __init__(self, in_dim: int, task_names: Sequence[str], options: STEMOptions):
        super().__init__()
        o = options
        t = len(task_names)

        def bank(count: int) -> ExpertBank:
            return ExpertBank(in_dim, count, o.expert_hidden, o.activation, o.dropout, o.batch_norm)

        self.task_experts = nn.ModuleList(bank(o.task_experts) for _ in task_names)
        self.shared_experts = bank(o.shared_experts) if o.shared_experts else None
        owners = [k for k in range(t) for _ in range(o.task_experts)] + [t] * o.shared_experts  # t: shared
        names = [*task_names, "shared"]
        labels = [f"{names[k]}/{owners[:e].count(k)}" for e, k in enumerate(owners)]
        self.gates = nn.ModuleList(Gate(in_dim, len(owners), o.gate_hidden, o.activation) for _ in task_names)
        self.gate_experts = {f"gate/{name}": labels for name in task_names}
        # reached[k, e]: whether task k's loss trains expert e (its own and the shared experts)
        reached = torch.tensor([[owner in (k, t) for owner in owners] for k in range(t)])
        self.register_buffer("reached", reached, persistent=False)
        self.out_dim = self.task_experts[0].out_dim

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.gates[task], self.task_experts[task]]

    def forward(self, x: Tensor) -> BackboneOutput:
        task_inputs, shared = x[:-1], x[-1]
        outputs = [bank(x_k) for bank, x_k in zip(self.task_experts, task_inputs)]
        if self.shared_experts is not None:
            outputs.append(self.shared_experts(shared))
        experts = torch.cat(outputs, dim=1)  # [B, E, H]
        weights = torch.stack([gate(x_k + shared) for gate, x_k in zip(self.gates, task_inputs)], dim=1)  # [B, T, E]
        # all forward: each task mixes every expert; task-specific backward: the weights on
        # other tasks' experts multiply a detached copy, so no gradient reaches those experts
        reached = self.reached.to(weights.dtype)
        mixed = (torch.bmm((weights * reached).to(experts.dtype), experts)
                 + torch.bmm((weights * (1 - reached)).to(experts.dtype), experts.detach()))
        return BackboneOutput(mixed, {name: weights[:, k] for k, name in enumerate(self.gate_experts)})


@register_model("stem", STEMOptions, "shared and per-task embeddings; each task's gate reads every task's "
                "experts but trains only its own (Su et al. 2024)", backbone=AllForwardTaskBackward)
class STEM(MultiTaskModel):
    """`embedding` holds the shared embeddings, `task_embeddings[t]` task t's: T + 1
    `FeatureEmbedding`s of the same schema, each giving a row `[B, I]`. The backbone
    (`AllForwardTaskBackward`) reads them stacked `[T+1, B, I]`; logits `[B, T]`.

    `task_parameters(t)` holds task t's embeddings, experts, gate and tower: only task t's
    loss reaches them. The tables cost T + 1 times a shared-embedding model's. Lists kept as
    sequences (`pooling: none`) are read from each embedding by one shared sequence encoder.

    Options (`STEMOptions`): task_experts m_t (at least 1), shared_experts m_s; expert_hidden,
    each expert's layer sizes; gate_hidden (empty: the linear softmax gate); activation,
    dropout, batch_norm of the experts; and the towers'. Every table has the schema's
    embedding size (the gate adds x^t and x^S).

    Example:
        >>> import torch
        >>> from mtlrec.schema import Schema, SparseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="item", vocab_size=100, embedding_dim=4)],
        ...                 tasks=[Task(name="click"), Task(name="like")])
        >>> model = STEM(schema, AllForwardTaskBackward, STEMOptions(shared_experts=2, expert_hidden=[8]))
        >>> out = model(Features(torch.tensor([[5], [42], [0]]), torch.zeros(3, 0)))
        >>> out.logits.shape, out.gates["gate/click"].shape
        (torch.Size([3, 2]), torch.Size([3, 4]))
        >>> model.backbone.gate_experts["gate/like"]
        ['click/0', 'like/0', 'shared/0', 'shared/1']
    """

    def __init__(self, schema: Schema, backbone: type[Backbone], options: STEMOptions):
        super().__init__(schema, backbone, options)
        self.task_embeddings = nn.ModuleList(FeatureEmbedding(schema) for _ in schema.tasks)

    def forward(self, features: Features) -> ModelOutput:
        rows = [self.inputs(features, embedding) for embedding in self.task_embeddings] + [self.inputs(features)]
        out = self.backbone(torch.stack(rows))  # its backbone has no penalty
        return ModelOutput(self.tower_logits(out.task_reps), out.gates)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return super().task_parameters(task) + list(self.task_embeddings[task].parameters())

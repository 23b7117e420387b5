"""PEPNet, the Parameter and Embedding Personalized Network (Chang et al., KDD 2023).

Prior information (which domain a row comes from, who the user, item and author are) scales
the network rather than entering it as one more input. Every scale comes from a Gate NU:
    x' = relu(x W + b),   delta = gamma * sigmoid(x' W' + b'),   delta in (0, gamma)      (1), (2)
with gamma = 2 in the paper: delta = 1 (no change) at the sigmoid's midpoint, and a gate can
shrink what it scales to nothing or up to double it.

EPNet personalizes the general embedding E (all features, `FeatureEmbedding`'s output) per
domain, reading the domain-side features' embeddings E(F_d) and E with its gradient stopped:
    delta_domain = U_ep(E(F_d) (+) sg(E)),   O_ep = delta_domain (x) E                     (4), (5)
PPNet personalizes every layer of each task's tower, reading the prior (user / item / author
side) features' embeddings and O_ep with its gradient stopped:
    O_prior = E(F_u) (+) E(F_i) (+) E(F_a)                                                 (6)
    delta_task^(l) = U_pp^(l)(O_prior (+) sg(O_ep))                                        (7)
    O_pp^(l) = delta_task^(l) (x) H^(l),   H^(l+1) = f(O_pp^(l) W^(l) + b^(l))             (9), (10)
where H^(1) is the tower input and l runs over the tower's layers, the logit layer included.
As in the paper, one Gate NU per layer produces every task's scales: its output, T times the
layer's input width, is split into T consecutive parts, part k scaling task k's tower.
(+) is concatenation, (x) the element-wise product, sg the stop-gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from mtlrec.data.features import Features
from mtlrec.models.base import Backbone, ModelOutput, MultiTaskModel
from mtlrec.models.options import MLPOptions
from mtlrec.models.registry import register_model
from mtlrec.models.shared_bottom import SharedBottom
from mtlrec.nn import MLP, FeatureEmbedding
from mtlrec.schema import Schema


class GateNU(nn.Module):
    """delta = gamma * sigmoid(W_L relu(... relu(W_1 x + b_1)) + b_L): input `[B, I]`, output
    `[B, out_dim]` in (0, gamma). `hidden=(h,)` is the paper's two-layer unit."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (64,), gamma: float = 2.0):
        super().__init__()
        self.net = MLP(in_dim, hidden, output_dim=out_dim, activation="relu")
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.sigmoid(self.net(x))


class EPNet(nn.Module):
    """E `[B, I]` -> O_ep = delta_domain (x) E `[B, I]`, the gate reading E's domain columns
    and E with its gradient stopped."""

    def __init__(self, width: int, domain_columns: Tensor, hidden: Sequence[int], gamma: float):
        super().__init__()
        self.register_buffer("domain_columns", domain_columns, persistent=False)
        self.gate = GateNU(len(domain_columns) + width, width, hidden, gamma)

    def scales(self, e: Tensor) -> Tensor:
        """delta_domain `[B, I]`."""
        return self.gate(torch.cat([e.index_select(1, self.domain_columns), e.detach()], dim=1))

    def forward(self, e: Tensor) -> Tensor:
        return self.scales(e) * e


class PPNet(nn.Module):
    """(E `[B, I]`, O_ep `[B, I]`) -> delta_task^(l) `[B, T, widths[l]]` for every tower layer l,
    one Gate NU per layer over E's prior columns and O_ep with its gradient stopped."""

    def __init__(self, width: int, prior_columns: Tensor, widths: Sequence[int], num_tasks: int,
                 hidden: Sequence[int], gamma: float):
        super().__init__()
        self.num_tasks = num_tasks
        self.register_buffer("prior_columns", prior_columns, persistent=False)
        self.gates = nn.ModuleList(
            GateNU(len(prior_columns) + width, num_tasks * w, hidden, gamma) for w in widths
        )

    def forward(self, e: Tensor, o_ep: Tensor) -> list[Tensor]:
        x = torch.cat([e.index_select(1, self.prior_columns), o_ep.detach()], dim=1)
        return [gate(x).unflatten(1, (self.num_tasks, -1)) for gate in self.gates]


def personalized_tower(tower: MLP, h: Tensor, scales: list[Tensor]) -> Tensor:
    """The tower over `h` `[B, H]`, the input of its l-th Linear layer multiplied by
    `scales[l]` first (O_pp^(l) = delta^(l) (x) H^(l)). Returns `[B, width]`, the tower's logits."""
    layer = 0
    for module in tower:
        if isinstance(module, nn.Linear):
            h = h * scales[layer]
            layer += 1
        h = module(h)
    return h


class PEPNetOptions(MLPOptions):
    hidden: list[PositiveInt] = Field(
        [], description="layers shared by the tasks between O_ep and the towers (the paper: none)")
    domain_features: list[str] = Field(
        [], description="features EPNet's gate reads (domain id, domain statistics); empty: no EPNet")
    prior_features: list[str] = Field(
        [], description="features PPNet's gates read besides O_ep (user, item, author side)")
    gate_hidden: list[PositiveInt] = Field([64], description="hidden layers of each Gate NU (the paper: one)")
    gamma: float = Field(2.0, gt=0.0, description="scale of the Gate NU's sigmoid: gates lie in (0, gamma)")

    @field_validator("domain_features", "prior_features")
    @classmethod
    def _no_repeats(cls, names: list[str]) -> list[str]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"names {repeated} more than once")
        return names

    @model_validator(mode="after")
    def _shared_layers(self) -> PEPNetOptions:
        if not self.hidden and (self.dropout > 0 or self.batch_norm):
            raise ValueError("dropout and batch_norm act on the shared layers, and hidden is empty: "
                             "set hidden, or use tower_dropout")
        return self


def columns_of(embedding: FeatureEmbedding, names: list[str], option: str) -> Tensor:
    """The embedding's output columns of features `names`; a ValueError names `option`."""
    try:
        return embedding.feature_columns(names)
    except ValueError as err:
        raise ValueError(f"pepnet {option}: {err}") from None


@register_model("pepnet", PEPNetOptions, "embedding and tower layers scaled per row by gates over domain and "
                "prior features (Chang et al. 2023)", backbone=SharedBottom)
class PEPNet(MultiTaskModel):
    """E = the model's input `[B, I]` (`MultiTaskModel.inputs`: the embedded row, then any encoded
    sequence) -> O_ep = EPNet(E) (E itself without domain features)
    -> the shared layers `hidden` (none by default, as in the paper) -> one tower per task,
    every Linear layer of tower k reading its input scaled by PPNet's part k. Logits `[B, L]`.
    `gates` is empty: the Gate NUs scale units, they do not mix experts. PPNet's gates serve
    every task (one gate per layer, split), so they are shared parameters, as EPNet is; task k
    owns its tower.

    Options (`PEPNetOptions`): domain_features and prior_features, names of sparse or dense
    features of the schema (a list feature gives its pooled vector); gate_hidden, the Gate
    NUs' hidden layers (ReLU, as in the paper); gamma, their scale (2 in the paper); hidden,
    activation, dropout, batch_norm of the shared layers; tower_hidden, tower_dropout and
    activation of the towers.

    Example:
        >>> import torch
        >>> from mtlrec.data.features import Features
        >>> from mtlrec.models import create
        >>> from mtlrec.schema import Schema, SparseFeature, Task
        >>> schema = Schema(sparse=[SparseFeature(name="domain", vocab_size=3, embedding_dim=2),
        ...                         SparseFeature(name="user", vocab_size=50, embedding_dim=4)],
        ...                 tasks=[Task(name="click"), Task(name="like")])
        >>> model = create("pepnet", schema, domain_features=["domain"], prior_features=["user"],
        ...                tower_hidden=[8])
        >>> [tuple(s.shape) for s in model.ppnet(torch.zeros(5, 6), torch.zeros(5, 6))]  # per tower layer
        [(5, 2, 6), (5, 2, 8)]
        >>> model(Features(torch.tensor([[0, 7], [2, 49]]), torch.zeros(2, 0))).logits.shape
        torch.Size([2, 2])
    """

    has_representation = False  # PPNet's gates, shared, scale the towers: they reach the losses around any Z

    def __init__(self, schema: Schema, backbone: type[Backbone], options: PEPNetOptions):
        super().__init__(schema, backbone, options)
        o = options
        width = self.input_dim  # the embedded row, then any encoded sequences
        domain = columns_of(self.embedding, o.domain_features, "domain_features")
        prior = columns_of(self.embedding, o.prior_features, "prior_features")
        self.epnet = EPNet(width, domain, o.gate_hidden, o.gamma) if o.domain_features else None
        widths = [m.in_features for m in self.towers[0] if isinstance(m, nn.Linear)]
        self.ppnet = PPNet(width, prior, widths, len(schema.tasks), o.gate_hidden, o.gamma)

    def forward(self, features: Features) -> ModelOutput:
        e = self.inputs(features)
        o_ep = self.epnet(e) if self.epnet is not None else e
        reps = self.backbone(o_ep).task_reps  # shared layers: no gates, no penalty
        scales = self.ppnet(e, o_ep)
        logits = [personalized_tower(tower, reps[:, k], [s[:, k] for s in scales])
                  for k, tower in enumerate(self.towers)]
        return ModelOutput(torch.cat(logits, dim=1), {})


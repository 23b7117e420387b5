"""PEPNet against its paper (Chang et al., KDD 2023): a plain float64 implementation of
Eq. 1-10 written here, reading the weights out of the model; the stop-gradients; the Gate
NU's range; `FeatureEmbedding.feature_columns`; option errors; ONNX export."""

import pytest
import torch
from helpers import exported_equals_predict
from helpers import linear_layers as layers_of
from helpers import plain_mlp as mlp

from mtlrec import models
from mtlrec.data.features import Features, Jagged
from mtlrec.models.pepnet import GateNU
from mtlrec.schema import Schema

TOL = 1e-6

SCHEMA = Schema(
    sparse=[{"name": "domain", "vocab_size": 3, "embedding_dim": 2},
            {"name": "user", "vocab_size": 20, "embedding_dim": 3},
            {"name": "item", "vocab_size": 30, "embedding_dim": 2},
            {"name": "seen", "vocab_size": 30, "embedding_dim": 2, "embedding": "item", "multi_valued": True}],
    dense=[{"name": "x0"}, {"name": "x1"}],
    tasks=[{"name": "a"}, {"name": "b", "type": "regression"}, {"name": "c"}],
)
# the documented layout: single ids by embedding size (2: domain, item; 3: user), lists, dense
COLUMNS = {"domain": [0, 1], "item": [2, 3], "user": [4, 5, 6], "seen": [7, 8], "x0": [9], "x1": [10]}
SEEN = [[1, 4, 4], [], [29], [0, 7], [3], [5, 6, 8, 9], [2]]


def batch(rows=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, n, (rows,), generator=g) for n in (3, 20, 30)], 1)  # domain, user, item
    return Features(ids, torch.randn(rows, 2, generator=g, dtype=torch.float64), (Jagged.from_lists(SEEN[:rows]),))


def build(**options):
    torch.manual_seed(0)
    model = models.create("pepnet", SCHEMA, **options).double()
    with torch.no_grad():
        for table in model.embedding.tables:
            table.weight.normal_()  # embeddings of order 1, so that the gates vary over rows
    return model


def cols(names):
    return [c for name in names for c in COLUMNS[name]]


def gate_nu(x, gate, gamma):
    """Eq. 1-2: gamma * sigmoid(W' relu(x W + b) + b')."""
    return gamma * torch.sigmoid(mlp(x, layers_of(gate), activate_last=False))


def plain_pepnet(model, e, domain, prior, gamma=2.0, stop=True):
    """Eq. 4-10 over the general embedding e `[B, I]`; `stop=False` drops both stop-gradients."""
    sg = torch.Tensor.detach if stop else (lambda t: t)
    o_ep = gate_nu(torch.cat([e[:, cols(domain)], sg(e)], 1), model.epnet.gate, gamma) * e if domain else e
    gate_input = torch.cat([e[:, cols(prior)], sg(o_ep)], 1)
    shared = mlp(o_ep, layers_of(model.backbone))  # the `hidden` layers (none in the paper)
    logits = []
    for k, tower in enumerate(model.towers):
        h, linears = shared, layers_of(tower)
        for l, ((w, b), gate) in enumerate(zip(linears, model.ppnet.gates)):
            width = w.shape[0]
            delta = gate_nu(gate_input, gate, gamma)[:, k * width:(k + 1) * width]  # task k's part of the split
            h = (delta * h) @ w + b
            h = torch.relu(h) if l < len(linears) - 1 else h
        logits.append(h)
    return torch.cat(logits, 1)


CASES = [
    (["domain", "x0"], ["user", "item", "seen"], [], 2.0),
    (["seen"], ["user", "x1"], [6], 3.0),  # shared layers, another gamma, a list feature as the domain side
    ([], ["user"], [], 2.0),  # EPNet off
    (["domain"], [], [], 2.0),  # PPNet's gates read sg(O_ep) alone
]


@pytest.mark.parametrize("domain, prior, hidden, gamma", CASES)
def test_pepnet_equals_the_paper(domain, prior, hidden, gamma):
    model = build(domain_features=domain, prior_features=prior, hidden=hidden, gamma=gamma,
                  tower_hidden=[5, 4], gate_hidden=[7])
    f = batch()
    e = model.embedding(f)
    torch.testing.assert_close(model(f).logits, plain_pepnet(model, e, domain, prior, gamma), atol=TOL, rtol=0)
    widths = [len(e[0]) if not hidden else hidden[-1], 5, 4]  # each tower layer's input
    assert [g.net[-1].out_features for g in model.ppnet.gates] == [3 * w for w in widths]  # one gate per layer, T parts
    assert (model.epnet is None) == (not domain)
    assert any(name.startswith("epnet.") for name, _ in model.named_parameters()) == bool(domain)


def test_the_gradient_on_e_stops_where_the_paper_stops_it():
    domain, prior = ["domain", "x0"], ["user", "seen"]
    model = build(domain_features=domain, prior_features=prior, tower_hidden=[5], gate_hidden=[7])
    f = batch()
    e = model.embedding(f).detach().requires_grad_()
    handle = model.embedding.register_forward_hook(lambda module, args, out: e)  # the model reads this leaf as E
    weights = torch.randn(7, 3, dtype=torch.float64)
    (model(f).logits * weights).sum().backward()
    handle.remove()
    e_plain = e.detach().requires_grad_()
    (want,) = torch.autograd.grad((plain_pepnet(model, e_plain, domain, prior) * weights).sum(), e_plain)
    (without_stop,) = torch.autograd.grad((plain_pepnet(model, e_plain, domain, prior, stop=False) * weights).sum(),
                                          e_plain)
    torch.testing.assert_close(e.grad, want, atol=TOL, rtol=0)
    assert (e.grad - without_stop).abs().max() > 1e-3  # the stop-gradients change E's gradient
    for gate in [model.epnet.gate, *model.ppnet.gates]:  # the loss reaches every gate
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in gate.parameters())


def test_the_gates_reach_e_only_through_their_feature_columns():
    domain, prior = ["domain", "x0"], ["user", "seen"]
    model = build(domain_features=domain, prior_features=prior, tower_hidden=[5], gate_hidden=[7])
    e = model.embedding(batch()).detach().requires_grad_()
    for own, scales in ((cols(domain), lambda: [model.epnet.scales(e)]),
                        (cols(prior), lambda: model.ppnet(e, model.epnet(e)))):  # O_ep from e, stopped inside
        e.grad = None
        sum(s.sum() for s in scales()).backward()
        others = [c for c in range(e.shape[1]) if c not in own]
        assert e.grad[:, others].abs().max() == 0  # not through sg(E) nor sg(O_ep)
        assert (e.grad[:, own].abs().sum(0) > 0).all()  # E(F_d), O_prior: not stopped


def test_gate_nu_lies_between_zero_and_gamma():
    torch.manual_seed(0)
    gate = GateNU(4, 6, hidden=[8], gamma=2.5).double()
    x = torch.randn(500, 4, dtype=torch.float64)
    delta = gate(x)
    torch.testing.assert_close(delta, gate_nu(x, gate, 2.5), atol=TOL, rtol=0)
    assert (delta > 0).all() and (delta < 2.5).all()
    wide = gate(10 * x)  # large inputs reach both ends of the range
    assert wide.min() < 0.05 * 2.5 and wide.max() > 0.95 * 2.5 and (wide <= 2.5).all()


def test_gates_at_one_leave_the_plain_network():
    """Gamma 2 and a zero last layer: every delta is 1, and PEPNet is embedding -> towers."""
    model = build(domain_features=["domain"], prior_features=["user"], tower_hidden=[5], hidden=[6])
    with torch.no_grad():
        for gate in [model.epnet.gate, *model.ppnet.gates]:
            gate.net[-1].weight.zero_()
            gate.net[-1].bias.zero_()
    f = batch()
    plain = model.tower_logits(model.backbone(model.embedding(f)).task_reps)  # the towers, ungated
    torch.testing.assert_close(model(f).logits, plain, atol=TOL, rtol=0)


def test_feature_columns_follow_the_embedding_layout():
    model = build()
    embed, f = model.embedding, batch()
    e = embed(f)
    ids, dense, _ = f
    small, large = (t.weight for t in embed.tables)  # tables of size 2 (domain rows, then item rows), size 3
    item_rows = 3  # item's rows follow domain's 3 in the size-2 table
    pooled = torch.stack([small[item_rows + torch.tensor(s, dtype=torch.long)].mean(0) if s else torch.zeros(2,
                          dtype=torch.float64) for s in SEEN])
    expected = {"domain": small[ids[:, 0]], "user": large[ids[:, 1]], "item": small[item_rows + ids[:, 2]],
                "seen": pooled, "x0": dense[:, :1], "x1": dense[:, 1:]}
    for name, values in expected.items():
        torch.testing.assert_close(e[:, embed.feature_columns([name])], values, atol=1e-12, rtol=0)
    assert embed.feature_columns(["seen", "x1", "user"]).tolist() == cols(["seen", "x1", "user"])
    assert embed.feature_columns([]).shape == (0,)
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['age'\]; features: \[.*'user'.*\]"):
        embed.feature_columns(["user", "age"])


@pytest.mark.parametrize("options, message", [
    ({"domain_features": ["domain", "nope"]},
     (r"pepnet domain_features: unknown feature\(s\) \['nope'\]; "
      r"features: \['domain', 'user', 'item', 'seen', 'x0', 'x1'\]")),
    ({"prior_features": ["age"]}, r"pepnet prior_features: unknown feature\(s\) \['age'\]"),
    ({"prior_features": ["user", "user"]}, r"option prior_features: .*names \['user'\] more than once"),
    ({"gamma": 0}, r"option gamma: Input should be greater than 0"),
    ({"gate_hidden": [0]}, r"option gate_hidden"),
    ({"batch_norm": True}, r"dropout and batch_norm act on the shared layers, and hidden is empty"),
])
def test_bad_options_are_errors_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        models.create("pepnet", SCHEMA, **options)


def test_onnx_export_equals_pytorch(tmp_path):
    raw = {"seed": 1, "data": {"synthetic": {"rows": 800, "dim": 4, "sparse_features": 3,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": "pepnet", "domain_features": ["c0"], "prior_features": ["c1", "x3"],
                     "tower_hidden": [4], "gate_hidden": [8]},
           "train": {"epochs": 2, "progress": False}}
    result, _, _, _ = exported_equals_predict(raw, tmp_path / "model")
    assert result.history[-1]["valid/loss"] < result.history[0]["valid/loss"]

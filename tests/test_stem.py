"""STEM-Net (Su et al., AAAI 2024) against its definition: a plain float64 implementation written
here (weights read from the model) for the predictions and for the gradients of every task's
loss; the stop-gradient keeps each task's loss off the other tasks' embeddings and experts,
while every task's prediction reads every embedding; ONNX export equals PyTorch."""

import copy

import pytest
import torch
from helpers import exported_equals_predict, linear_layers, mix, plain_gate, plain_mlp

import mtlrec.models.stem  # noqa: F401  (registers "stem")
from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.models.base import shared_parameters
from mtlrec.schema import DenseFeature, Schema, SparseFeature, Task

TOL = 1e-6
ROWS = 24
VOCAB = (10, 7)  # two single-valued features, one embedding size: one table, rows [0, 10) then [10, 17)


def build(tasks=("a", "b"), **options):
    schema = Schema(sparse=[SparseFeature(name="u", vocab_size=VOCAB[0], embedding_dim=3),
                            SparseFeature(name="i", vocab_size=VOCAB[1], embedding_dim=3)],
                    dense=[DenseFeature(name="d0"), DenseFeature(name="d1")],
                    tasks=[Task(name=t) for t in tasks])
    torch.manual_seed(0)
    model = models.create("stem", schema, expert_hidden=[6, 4], tower_hidden=[8], **options).double()
    for embedding in [model.embedding, *model.task_embeddings]:  # away from N(0, 0.01^2): visible effects
        torch.nn.init.normal_(embedding.tables[0].weight, std=1.0)
    ids = torch.stack([torch.randint(0, VOCAB[0], (ROWS,)), torch.randint(0, VOCAB[1], (ROWS,))], 1)
    features = Features(ids, torch.randn(ROWS, 2, dtype=torch.float64))
    return model, features


def plain_row(embedding, features):
    """x: each feature's embedding read from the table, then the dense values."""
    table = embedding.tables[0].weight
    ids, dense, _ = features
    return torch.cat([table[ids[:, 0]], table[VOCAB[0] + ids[:, 1]], dense], 1)


def plain_stem(model, features):
    """logits [B, T] and gates g^t [B, E] by the module docstring's equations, one expert at a
    time; task t's mixture reads the other tasks' experts through a stop-gradient (detach)."""
    bb = model.backbone
    x = [plain_row(e, features) for e in model.task_embeddings]
    x_shared = plain_row(model.embedding, features)
    own = [[plain_mlp(x[k], bank.expert_layers(i)) for i in range(bank.num_experts)]
           for k, bank in enumerate(bb.task_experts)]
    shared = ([plain_mlp(x_shared, bb.shared_experts.expert_layers(j)) for j in range(bb.shared_experts.num_experts)]
              if bb.shared_experts is not None else [])
    logits, gates = [], []
    for t, tower in enumerate(model.towers):
        experts = [e if u == t else e.detach() for u, group in enumerate(own) for e in group] + shared
        g = plain_gate(x[t] + x_shared, bb.gates[t])
        gates.append(g)
        logits.append(plain_mlp(mix(g, experts), linear_layers(tower), activate_last=False))
    return torch.cat(logits, 1), gates


SETTINGS = [
    {"tasks": ("a", "b"), "task_experts": 1, "shared_experts": 1},
    {"tasks": ("a", "b", "c"), "task_experts": 2, "shared_experts": 2, "gate_hidden": [5]},
    {"tasks": ("a", "b"), "task_experts": 2, "shared_experts": 0},
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_predictions_and_gates_equal_the_papers_equations(setting):
    model, features = build(**setting)
    out = model(features)
    expected, gates = plain_stem(model, features)
    torch.testing.assert_close(out.logits, expected, atol=TOL, rtol=0)
    t, m, s = len(setting["tasks"]), setting["task_experts"], setting["shared_experts"]
    assert list(out.gates) == [f"gate/{name}" for name in setting["tasks"]]
    for (name, got), g in zip(out.gates.items(), gates):
        torch.testing.assert_close(got, g, atol=TOL, rtol=0)
        assert got.shape == (ROWS, t * m + s) == (ROWS, len(model.backbone.gate_experts[name]))
    labels = model.backbone.gate_experts["gate/b"]
    assert labels[:m] == [f"a/{i}" for i in range(m)] and labels[t * m:] == [f"shared/{j}" for j in range(s)]


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_tasks_loss_trains_its_own_and_the_shared_embeddings_only(setting):
    """The gradient of task k's loss equals the plain one's (stop-gradient included) on every
    parameter; it is zero on the other tasks' embeddings, experts, gates and towers, and
    nonzero on task k's own parameters, the shared embeddings and the shared experts."""
    model, features = build(**setting)
    params = dict(model.named_parameters())
    shared = {n for n, p in params.items() if n.startswith(("embedding.", "backbone.shared_experts."))}
    weights = torch.randn(ROWS, dtype=torch.float64)  # a loss that is not a plain sum
    for k in range(len(setting["tasks"])):
        model.zero_grad(set_to_none=True)
        (model(features).logits[:, k] * weights).sum().backward()
        expected = torch.autograd.grad((plain_stem(model, features)[0][:, k] * weights).sum(), list(params.values()),
                                       allow_unused=True)
        own = {n for n, p in params.items() if any(p is q for q in model.task_parameters(k))}
        assert {n for n in params if n.startswith(f"task_embeddings.{k}.")} <= own
        for (name, p), want in zip(params.items(), expected):
            got = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got, torch.zeros_like(p) if want is None else want, atol=TOL, rtol=0)
            reached = name in own or name in shared
            assert (got.abs().max() > 0) == reached, (k, name)


def test_without_the_stop_gradient_the_other_tasks_tables_would_move():
    """The detach is what keeps task a's loss off task b's table: the same mixture without it
    sends task a's gradient into task b's embeddings."""
    model, features = build()
    bb = model.backbone
    x = [plain_row(e, features) for e in model.task_embeddings]
    x_shared = plain_row(model.embedding, features)
    experts = [plain_mlp(x[u], bank.expert_layers(0)) for u, bank in enumerate(bb.task_experts)]
    experts.append(plain_mlp(x_shared, bb.shared_experts.expert_layers(0)))
    h = mix(plain_gate(x[0] + x_shared, bb.gates[0]), experts)
    (grad,) = torch.autograd.grad(h.sum(), [model.task_embeddings[1].tables[0].weight])
    assert grad.abs().max() > 0
    model(features).logits[:, 0].sum().backward()
    assert model.task_embeddings[1].tables[0].weight.grad.abs().max() == 0


def test_every_tasks_prediction_reads_every_embedding():
    """Changing any one table (a task's or the shared one) changes every task's logits."""
    model, features = build(tasks=("a", "b", "c"), task_experts=1, shared_experts=1)
    before = model(features).logits
    for j in range(4):  # tasks a, b, c, then the shared table
        changed = copy.deepcopy(model)
        table = (list(changed.task_embeddings) + [changed.embedding])[j].tables[0].weight
        with torch.no_grad():
            table.add_(torch.randn_like(table))
        diff = (changed(features).logits - before).abs().amax(0)  # [T]
        assert (diff > 1e-6).all(), (j, diff)


def test_shared_parameters_are_the_shared_embeddings_and_experts():
    model, _ = build(tasks=("a", "b", "c"), task_experts=2, shared_experts=1)
    names = {id(p): n for n, p in model.named_parameters()}
    shared = shared_parameters(model, 3)
    assert [names[id(p)] for p in shared.params] == [
        n for n in names.values() if n.startswith(("embedding.", "backbone.shared_experts."))]
    assert all(m is None for m in shared.masks)
    for k in range(3):
        owned = {id(p) for p in model.task_parameters(k)}
        assert {id(p) for p in model.task_embeddings[k].parameters()} <= owned
        assert {id(p) for p in model.backbone.task_experts[k].parameters()} <= owned
        assert not owned & {id(p) for j in range(3) if j != k for p in model.task_embeddings[j].parameters()}


def test_options_are_checked():
    with pytest.raises(ValueError, match="task_experts: Input should be greater than 0"):
        models.check_options("stem", {"task_experts": 0})
    with pytest.raises(ValueError, match="shared_experts"):
        models.check_options("stem", {"shared_experts": -1})
    with pytest.raises(ValueError, match=r"no option\(s\) \['embedding_dim'\]"):
        models.check_options("stem", {"embedding_dim": 4})


def test_trained_model_exports_to_onnx_and_its_gates_are_analysed(tmp_path):

    from mtlrec.analysis.utilisation import gate_utilisation, utilisation_table

    raw = {"seed": 1, "data": {"synthetic": {"rows": 600, "dim": 4, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": "stem", "task_experts": 1, "shared_experts": 2, "expert_hidden": [8],
                     "tower_hidden": [4], "batch_norm": True},
           "train": {"epochs": 1, "batch_size": 64, "progress": False}}
    _, trained, table, _ = exported_equals_predict(raw, tmp_path / "model")

    rows = utilisation_table(trained, gate_utilisation(trained, table))
    counts = rows.groupby(["gate", "owner"]).size().to_dict()
    assert counts == {(g, owner): n for g in ("gate/y1", "gate/y2")
                      for owner, n in (("own", 1), ("other task", 1), ("shared", 2))}
    assert rows.groupby("gate")["weight"].sum().to_numpy() == pytest.approx([1.0, 1.0])

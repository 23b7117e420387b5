"""DSelect-k (Hazimeh et al., NeurIPS 2021) against the paper's definitions: a plain
implementation written here (float64, python scalars, weights read from the model) of the
smooth-step S, the binary-encoded single expert selector r, the gate q = sum_i softmax(alpha)_i
r(z^(i)) and the entropy penalty; then training, errors and the ONNX export."""

import doctest
import math

import pytest
import torch
from helpers import dense_schema, exported_equals_predict, linear_layers, plain_mlp

from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.models import dselect_k
from mtlrec.models.dselect_k import DSelectKGate, smooth_step

TOL = 1e-6


# ------------------------------------------------------------------ the paper's equations, plainly
def plain_s(t: float, gamma: float) -> float:
    """S(t): 0 for t <= -gamma/2, 1 for t >= gamma/2, -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 between."""
    if t <= -gamma / 2:
        return 0.0
    if t >= gamma / 2:
        return 1.0
    return -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5


def plain_selector(z: list[float], gamma: float, n: int) -> list[float]:
    """r(z)_e = prod_j (S(z_j) if bit j of e is 1 else 1 - S(z_j)), e = 0..n-1."""
    out = []
    for e in range(n):
        p = 1.0
        for j, zj in enumerate(z):
            p *= plain_s(zj, gamma) if (e >> j) & 1 else 1.0 - plain_s(zj, gamma)
        out.append(p)
    return out


def plain_softmax(a: list[float]) -> list[float]:
    exps = [math.exp(v) for v in a]
    return [v / sum(exps) for v in exps]


def plain_gate(gate, x, gamma):
    """Per row: (q [n], selectors [k][n]), reading z and alpha off the gate's weights."""
    n, k = gate.num_experts, gate.k
    m = math.ceil(math.log2(n))
    rows = []
    for b in range(x.shape[0]):
        if gate.per_example:
            h = plain_mlp(x[b : b + 1], linear_layers(gate.body))[0] if len(gate.body) else x[b]
            z_all = (gate.z_layer.weight @ h + gate.z_layer.bias).tolist()  # output i*m + j is z^(i)_j
            z = [z_all[i * m : (i + 1) * m] for i in range(k)]
            alpha = (gate.alpha_layer.weight @ h + gate.alpha_layer.bias).tolist()
        else:
            z, alpha = gate.z.tolist(), gate.alpha.tolist()
        selectors = [plain_selector(z[i], gamma, n) for i in range(k)]
        w = plain_softmax(alpha)
        rows.append(([sum(w[i] * selectors[i][e] for i in range(k)) for e in range(n)], selectors))
    return rows


def plain_penalty(gates, x, gamma, entropy_weight):
    """sum over gates of: lambda * mean over rows of sum_i h(r^(i)), h(v) = -sum v log v (0 log 0 = 0);
    plus, n not a power of two, mean over rows of sum_i (1 / sum_e r^(i)_e - 1)."""
    total = 0.0
    for gate in gates:
        rows = plain_gate(gate, x, gamma) if gate.per_example else plain_gate(gate, x[:1], gamma)
        n = gate.num_experts
        for _, selectors in rows:
            entropy = sum(-v * math.log(v) for r in selectors for v in r if v > 0)
            total += entropy_weight * entropy / len(rows)
            if n & (n - 1):
                total += sum(1.0 / sum(r) - 1.0 for r in selectors) / len(rows)
    return total


def build(n_tasks=2, seed=0, **options):
    torch.manual_seed(seed)
    schema = dense_schema(6, tasks=[f"t{k}" for k in range(n_tasks)])
    model = models.create("dselect_k", schema, **options).double()
    return model, torch.randn(7, 6, dtype=torch.float64)


def spread_z(model, scale):
    """Move z (and alpha) away from their start so that some z are inside the band and some outside."""
    with torch.no_grad():
        for gate in model.backbone.gates:
            params = ([gate.z_layer.weight, gate.z_layer.bias, gate.alpha_layer.weight, gate.alpha_layer.bias]
                      if gate.per_example else [gate.z, gate.alpha])
            for p in params:
                p.normal_(0.0, scale)


def all_z(model, x):
    return torch.cat([gate.selector_parameters(x)[0].flatten() for gate in model.backbone.gates])


def no_ids(x):
    return x[:, :0].long()


# ------------------------------------------------------------------ smooth-step
@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_smooth_step_equals_its_definition(gamma):
    t = torch.cat([torch.linspace(-gamma, gamma, 301, dtype=torch.float64),
                   torch.tensor([-gamma / 2, gamma / 2, 0.0, -10 * gamma, 10 * gamma], dtype=torch.float64)])
    t.requires_grad_(True)
    s = smooth_step(t, gamma)
    expected = torch.tensor([plain_s(v, gamma) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(s, expected, atol=TOL, rtol=0)
    # exactly 0 and 1 outside the band, including its edges
    outside = t.detach().abs() >= gamma / 2
    assert set(s[outside].tolist()) == {0.0, 1.0}
    # continuous at the edges: just inside, S is within O(delta^2) of 0 and 1
    delta = 1e-4 * gamma
    edges = smooth_step(torch.tensor([-gamma / 2 + delta, gamma / 2 - delta], dtype=torch.float64), gamma)
    torch.testing.assert_close(edges, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-7, rtol=0)
    # derivative: the cubic's inside the band, exactly zero outside it
    (grad,) = torch.autograd.grad(s.sum(), t)
    inside = ~outside
    cubic = -6 / gamma**3 * t.detach() ** 2 + 3 / (2 * gamma)
    torch.testing.assert_close(grad[inside], cubic[inside], atol=TOL, rtol=0)
    assert (grad[outside & (t.detach().abs() > gamma / 2)] == 0).all()
    assert grad[inside].min() > 0  # strictly rising in the band


# ------------------------------------------------------------------ the gate and the model
@pytest.mark.parametrize("per_example, gate_hidden", [(True, []), (True, [5]), (False, [])])
@pytest.mark.parametrize("num_experts, k", [(8, 3), (5, 2), (4, 1)])
def test_model_equals_the_paper(per_example, gate_hidden, num_experts, k):
    gamma = 0.8
    model, x = build(3, num_experts=num_experts, k=k, gamma=gamma, per_example=per_example,
                     gate_hidden=gate_hidden, expert_hidden=[7, 4], tower_hidden=[3])
    spread_z(model, 0.3 if per_example else 0.6)
    bb = model.backbone
    z = all_z(model, x).abs()
    assert (z < gamma / 2).any() and (z > gamma / 2).any()  # both regimes of S are exercised
    experts = [plain_mlp(x, bb.experts.expert_layers(e)) for e in range(num_experts)]
    reps, gates, _, _ = bb(x)
    expected_reps = []
    for t, gate in enumerate(bb.gates):
        q = torch.tensor([row[0] for row in plain_gate(gate, x, gamma)], dtype=torch.float64)  # [B, n]
        torch.testing.assert_close(gates[f"gate/t{t}"], q, atol=TOL, rtol=0)
        expected_reps.append(sum(q[:, e : e + 1] * experts[e] for e in range(num_experts)))
    expected_reps = torch.stack(expected_reps, 1)
    torch.testing.assert_close(reps, expected_reps, atol=TOL, rtol=0)
    logits = torch.stack([plain_mlp(expected_reps[:, t], linear_layers(model.towers[t]), activate_last=False)[:, 0]
                          for t in range(3)], 1)
    torch.testing.assert_close(model(Features(no_ids(x), x)).logits, logits, atol=TOL, rtol=0)
    assert bb.gate_experts == {f"gate/t{t}": [f"shared/{e}" for e in range(num_experts)] for t in range(3)}
    if not per_example:
        assert (gates["gate/t0"] == gates["gate/t0"][:1]).all()  # one selection for every row


@pytest.mark.parametrize("per_example", [True, False])
def test_start_weighs_every_expert_within_the_band(per_example):
    model, x = build(num_experts=6, k=2, gamma=2.0, z_init=0.01, per_example=per_example)
    for gate in model.backbone.gates:
        z_params = [gate.z_layer.weight, gate.z_layer.bias] if per_example else [gate.z]
        assert all(p.abs().max() <= 0.01 * 2.0 for p in z_params)
        assert (gate(x).weights > 0).all()


@pytest.mark.parametrize("per_example", [True, False])
def test_rows_sum_to_one_and_at_most_k_experts_are_nonzero_outside_the_band(per_example):
    n, k, gamma = 8, 3, 0.5
    model, x = build(num_experts=n, k=k, gamma=gamma, per_example=per_example)
    gate = model.backbone.gates[0]
    # inside the band every expert has weight and the rows sum to 1 (n = 2^m)
    spread_z(model, 0.02)
    inside = gate(x).weights
    assert (inside > 0).all()
    torch.testing.assert_close(inside.sum(1), torch.ones(7, dtype=torch.float64), atol=TOL, rtol=0)
    # push every z out of the band: z = W x + b with |b| >> |W x|
    torch.manual_seed(1)
    with torch.no_grad():
        if per_example:
            gate.z_layer.weight.normal_(0.0, 0.05)
            gate.z_layer.bias.copy_(torch.where(torch.rand(k * 3) < 0.5, -3.0, 3.0) * gamma)
            gate.alpha_layer.weight.normal_(0.0, 1.0)
        else:
            gate.z.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, -1.0, 1.0]]) * gamma)
            gate.alpha.normal_(0.0, 1.0)
    z, _ = gate.selector_parameters(x)
    assert (z.abs() > gamma / 2).all()
    weights, selectors = gate(x)
    torch.testing.assert_close(weights.sum(1), torch.ones(7, dtype=torch.float64), atol=TOL, rtol=0)
    assert ((weights != 0).sum(1) <= k).all()
    # each selector is one-hot on the expert whose binary code its signs spell
    codes = ((z > 0).long() * (2 ** torch.arange(3))).sum(-1)  # [B, k]
    torch.testing.assert_close(selectors, torch.nn.functional.one_hot(codes, n).to(selectors).expand_as(selectors))
    for b in range(7):
        assert set(torch.nonzero(weights[b]).flatten().tolist()) == set(codes[b if per_example else 0].tolist())
    if not per_example:
        assert (weights != 0).sum(1).tolist() == [2] * 7  # selectors 1 and 3 chose the same expert, 5


def test_experts_beyond_a_power_of_two_lose_their_weight_and_rows_sum_below_one():
    model, x = build(num_experts=5, k=2, gamma=1.0, per_example=False)
    gate = model.backbone.gates[0]
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))  # selector 1 -> code 7 (no expert)
    weights, selectors = gate(x)
    assert selectors[0, 0].sum() == 0  # all of selector 1's weight is on a code that names no expert
    torch.testing.assert_close(selectors[0, 1], torch.full((5,), 1 / 8, dtype=torch.float64))
    share = torch.softmax(gate.alpha, 0)[1]
    torch.testing.assert_close(weights.sum(1), (5 / 8 * share).expand(7), atol=TOL, rtol=0)


# ------------------------------------------------------------------ the penalty
@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("num_experts", [8, 6])
def test_penalty_equals_the_plain_formula(per_example, num_experts):
    gamma, weight = 1.2, 0.3
    model, x = build(3, num_experts=num_experts, k=3, gamma=gamma, per_example=per_example, entropy_weight=weight)
    spread_z(model, 0.2 if per_example else 0.6)
    z = all_z(model, x).abs()
    assert (z < gamma / 2).any() and (z > gamma / 2).any()
    reachable = torch.cat([gate(x).selectors.sum(-1).flatten() for gate in model.backbone.gates])
    assert (reachable > 0).all() and (num_experts == 8 or (reachable < 1).any())
    penalty = model(Features(no_ids(x), x)).penalty
    expected = plain_penalty(model.backbone.gates, x, gamma, weight)
    torch.testing.assert_close(penalty, torch.tensor(expected, dtype=torch.float64), atol=TOL, rtol=0)
    assert model.eval()(Features(no_ids(x), x)).penalty is None  # only training adds it


def test_no_penalty_without_entropy_weight_for_a_power_of_two():
    model, x = build(num_experts=4, k=2, entropy_weight=0.0)
    assert model(Features(no_ids(x), x)).penalty is None
    model, x = build(num_experts=3, k=2, entropy_weight=0.0)  # the missing-expert term stays
    assert model(Features(no_ids(x), x)).penalty > 0


def test_entropy_gradient_moves_selectors_towards_one_hot():
    model, x = build(num_experts=4, k=2, entropy_weight=1.0, per_example=False)
    spread_z(model, 0.1)
    gate = model.backbone.gates[0]
    before = dselect_k.selector_entropy(gate(x).selectors).sum()
    penalty = model(Features(no_ids(x), x)).penalty
    penalty.backward()
    with torch.no_grad():
        gate.z -= 0.01 * gate.z.grad
    assert dselect_k.selector_entropy(gate(x).selectors).sum() < before


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("per_example", [True, False])
def test_gradients_reach_z_and_alpha_of_the_task_gate_only(per_example):
    model, x = build(num_experts=4, k=2, per_example=per_example, entropy_weight=0.0)
    model(Features(no_ids(x), x)).logits[:, 0].sum().backward()  # task t0's output alone
    g0, g1 = model.backbone.gates
    z0, alpha0 = ([g0.z_layer.weight, g0.alpha_layer.weight] if per_example else [g0.z, g0.alpha])
    assert z0.grad.abs().max() > 0 and alpha0.grad.abs().max() > 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in g1.parameters())
    assert model.backbone.task_modules(1) == [g1]
    owned = {id(p) for p in model.task_parameters(1)}
    assert {id(p) for p in g1.parameters()} <= owned
    assert not owned & {id(p) for p in model.backbone.experts.parameters()}  # the experts are shared


def test_a_saturated_selector_gets_no_gradient_but_alpha_still_does():
    model, x = build(num_experts=4, k=2, per_example=False, entropy_weight=0.0)
    gate = model.backbone.gates[0]
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[2.0, -2.0], [-2.0, 2.0]]))  # outside the band: experts 1 and 2
    model(Features(no_ids(x), x)).logits[:, 0].sum().backward()
    assert (gate.z.grad == 0).all()
    assert gate.alpha.grad.abs().max() > 0


def test_an_alternating_step_on_one_task_leaves_the_other_gates_unchanged(tiny_config):
    """The penalty reaches every gate, yet a step on task a alone moves only a's gate and tower."""
    from mtlrec.config import load_config
    from mtlrec.data import TensorData
    from mtlrec.train.alternating import TaskSchedule
    from mtlrec.train.trainer import Trainer

    schema = dense_schema(6, tasks=("a", "b", "c"))
    torch.manual_seed(0)
    model = models.create("dselect_k", schema, num_experts=5, k=2, expert_hidden=[8], entropy_weight=0.1)
    cfg = load_config(tiny_config | {"train": {"strategy": "alternating", "batch_size": 32, "progress": False,
                                               "epochs": 1}}).train
    trainer = Trainer(model, schema, cfg)
    trainer.schedule = TaskSchedule("round_robin", 1, None, 0)  # task a at every step
    def own(k):  # task k's gate and tower
        return [*model.backbone.gates[k].parameters(), *model.towers[k].parameters()]

    before = [[p.detach().clone() for p in own(k)] for k in range(3)]
    experts = [p.detach().clone() for p in model.backbone.experts.parameters()]
    data = TensorData(torch.zeros(64, 0, dtype=torch.long), torch.randn(64, 6),
                      torch.randint(0, 2, (64, 3)).float(), torch.ones(64, 3, dtype=torch.bool))
    trainer.fit(data)
    assert model(Features(data.sparse, data.dense)).penalty > 0
    for k in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(before[k], own(k)))
    assert all(not torch.equal(a, b) for a, b in zip(before[0], own(0)))
    assert any(not torch.equal(a, b) for a, b in zip(experts, model.backbone.experts.parameters()))


# ------------------------------------------------------------------ options and errors
@pytest.mark.parametrize("options, message", [
    ({"num_experts": 4, "k": 5}, "option k: .*k = 5 exceeds num_experts = 4"),
    ({"k": 0}, "option k: Input should be greater than 0"),
    ({"num_experts": 1}, "option num_experts: Input should be greater than or equal to 2"),
    ({"gamma": 0.0}, "option gamma: Input should be greater than 0"),
    ({"entropy_weight": -0.1}, "option entropy_weight: Input should be greater than or equal to 0"),
    ({"z_init": 0.7}, "option z_init: Input should be less than or equal to 0.5"),
    ({"per_example": False, "gate_hidden": [4]}, "option per_example: .*takes no gate_hidden"),
])
def test_bad_options_are_errors_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        models.create("dselect_k", dense_schema(3), **options)


def test_the_gate_refuses_bad_k_itself():
    with pytest.raises(ValueError, match="k = 3 must be between 1 and num_experts = 2"):
        DSelectKGate(4, num_experts=2, k=3)
    with pytest.raises(ValueError, match="k = 0 must be between"):
        DSelectKGate(4, num_experts=2, k=0)
    with pytest.raises(ValueError, match="at least 2 experts"):
        DSelectKGate(4, num_experts=1, k=1)


def test_examples_in_the_docstrings_run():
    result = doctest.testmod(dselect_k, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("per_example", [True, False])
def test_onnx_export_equals_pytorch(per_example, tmp_path):
    raw = {"seed": 2, "data": {"synthetic": {"rows": 600, "dim": 5, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": "dselect_k", "num_experts": 5, "k": 2, "expert_hidden": [8], "tower_hidden": [4],
                     "per_example": per_example},
           "train": {"epochs": 1, "progress": False}}
    exported_equals_predict(raw, tmp_path / "model")

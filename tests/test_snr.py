"""SNR (Ma et al., AAAI 2019) against its definition: a plain float64 implementation written here,
sub-network by sub-network and connection by connection, reading the model's weights; the hard
concrete codes and the L0 penalty (Louizos et al., ICLR 2018) against their formulas."""

import doctest
import math

import numpy as np
import pytest
import torch
from helpers import dense_schema, exported_equals_predict, linear_layers, plain_mlp

from mtlrec import models
from mtlrec.models import snr
from mtlrec.analysis import gate_utilisation, utilisation_table
from mtlrec.data.features import Features

TOL = 1e-6
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # the papers' defaults


def build(name, tasks=("a", "b"), **options):
    torch.manual_seed(0)
    model = models.create(name, dense_schema(5, tasks=tasks), tower_hidden=[3], **options).double()
    with torch.no_grad():  # codes away from their common start, some of them clipped to exactly 0 or 1
        for route in model.backbone.routes:
            route.codes.log_alpha.copy_(torch.randn_like(route.codes.log_alpha) * 3)
    return model, torch.randn(7, 5, dtype=torch.float64)


def plain_sampled_z(log_alpha, r, beta=BETA, gamma=GAMMA, zeta=ZETA):
    """Louizos et al. Eq. 10, entry by entry."""
    z = torch.empty_like(log_alpha)
    for idx in np.ndindex(*log_alpha.shape):
        a, u = float(log_alpha[idx]), float(r[idx])
        s = 1 / (1 + math.exp(-(math.log(u) - math.log(1 - u) + a) / beta))
        z[idx] = min(1.0, max(0.0, s * (zeta - gamma) + gamma))
    return z


def plain_test_time_z(log_alpha, beta=BETA, gamma=GAMMA, zeta=ZETA):
    """Louizos et al. Eq. 13, entry by entry."""
    z = torch.empty_like(log_alpha)
    for idx in np.ndindex(*log_alpha.shape):
        z[idx] = min(1.0, max(0.0, (1 / (1 + math.exp(-float(log_alpha[idx])))) * (zeta - gamma) + gamma))
    return z


def plain_snr(bb, x, codes, trans):
    """The towers' inputs [B, T, d] for codes z (one [n_out, n_in] per route, `bb.routes` order)."""

    def routed(route, z, u, j):  # v_j = sum_i z_ij W_ij u_i  or  sum_i z_ij u_i
        return sum(z[j, i] * (u[i] @ route.weight[j, i] if trans else u[i]) for i in range(len(u)))

    first = bb.layers[0]
    u = [plain_mlp(x, first.expert_layers(i)) for i in range(first.num_experts)]  # layer 1 reads x
    for route, z, bank in zip(bb.layer_routes, codes, bb.layers[1:]):
        u = [plain_mlp(routed(route, z, u, j), bank.expert_layers(j)) for j in range(bank.num_experts)]
    task_codes = codes[len(bb.layer_routes):]
    return torch.stack([routed(route, z, u, 0) for route, z in zip(bb.task_routes, task_codes)], dim=1)


def plain_towers(model, reps):
    return torch.stack([plain_mlp(reps[:, k], linear_layers(tower), activate_last=False)[:, 0]
                        for k, tower in enumerate(model.towers)], dim=1)


SHAPES = [  # num_layers, subnetworks, expert_hidden, tasks
    (2, [3, 2], [[5, 4], [3]], ("a", "b", "c")),  # unequal counts and sizes per layer, three tasks
    (3, 2, [4], ("a", "b")),
    (1, 3, [5], ("a", "b")),  # one layer: the towers route from it directly
]


@pytest.mark.parametrize("name, extra", [("snr_trans", {}), ("snr_trans", {"transform_dim": 6}), ("snr_aver", {})])
@pytest.mark.parametrize("num_layers, subnetworks, expert_hidden, tasks", SHAPES)
def test_sampled_codes_and_outputs_equal_the_paper(name, extra, num_layers, subnetworks, expert_hidden, tasks):
    model, x = build(name, tasks, num_layers=num_layers, subnetworks=subnetworks, expert_hidden=expert_hidden, **extra)
    bb = model.backbone
    noise = [torch.rand(r.codes.log_alpha.shape, dtype=torch.float64) for r in bb.routes]
    reps, gates, _, _ = bb(x, noise)
    codes = [plain_sampled_z(r.codes.log_alpha.detach(), n) for r, n in zip(bb.routes, noise)]
    expected = plain_snr(bb, x, codes, trans=name == "snr_trans")
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(model.tower_logits(reps), plain_towers(model, expected), atol=TOL, rtol=0)
    last_width = expert_hidden[-1] if isinstance(expert_hidden[-1], int) else expert_hidden[-1][-1]
    assert reps.shape[2] == bb.out_dim == extra.get("transform_dim", last_width)
    # gates: each receiver's codes over the sub-networks it reads, the same for every row
    z_tower = codes[len(bb.layer_routes):]
    for k, task in enumerate(tasks):
        torch.testing.assert_close(gates[f"tower/{task}"], z_tower[k][0].expand(7, -1), atol=0, rtol=0)
    for route_index, z in enumerate(codes[:len(bb.layer_routes)]):
        for j in range(z.shape[0]):
            torch.testing.assert_close(gates[f"layer{route_index + 2}/sub{j}"], z[j].expand(7, -1), atol=0, rtol=0)
    assert {g: len(e) for g, e in bb.gate_experts.items()} == {g: w.shape[1] for g, w in gates.items()}


@pytest.mark.parametrize("name", ["snr_trans", "snr_aver"])
def test_evaluation_codes_are_deterministic_and_equal_the_formula(name):
    model, x = build(name, subnetworks=[3, 2], expert_hidden=[4])
    bb = model.eval().backbone
    first, second = bb(x), bb(x)
    codes = [plain_test_time_z(r.codes.log_alpha.detach()) for r in bb.routes]
    expected = plain_snr(bb, x, codes, trans=name == "snr_trans")
    torch.testing.assert_close(first.task_reps, expected, atol=TOL, rtol=0)
    assert torch.equal(first.task_reps, second.task_reps)
    assert all(torch.equal(first.gates[g], second.gates[g]) for g in first.gates)
    logits = model(Features(x[:, :0].long(), x)).logits  # the whole model: embedding -> SNR -> towers
    torch.testing.assert_close(logits, plain_towers(model, expected), atol=TOL, rtol=0)


def test_training_draws_the_noise_from_the_global_generator():
    model, x = build("snr_trans", subnetworks=[3, 2], expert_hidden=[4])
    bb = model.train().backbone
    torch.manual_seed(11)
    drawn = bb(x)
    torch.manual_seed(11)
    noise = [torch.rand(r.codes.log_alpha.shape, dtype=torch.float64) for r in bb.routes]
    given = bb(x, noise)
    torch.testing.assert_close(drawn.task_reps, given.task_reps, atol=0, rtol=0)
    again = bb(x)  # the generator has moved on: other codes
    assert not all(torch.equal(drawn.gates[g], again.gates[g]) for g in drawn.gates)


def test_codes_lie_in_the_unit_interval_and_are_exactly_0_or_1_at_extreme_log_alpha():
    torch.manual_seed(0)
    codes = snr.HardConcrete((5, 20000), BETA, GAMMA, ZETA, 0.0).double()
    log_alpha = torch.tensor([-30.0, -1.0, 0.0, 1.5, 30.0], dtype=torch.float64)
    with torch.no_grad():
        codes.log_alpha.copy_(log_alpha[:, None].expand(5, 20000))
    r = torch.rand(5, 20000, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    z = codes(r)
    assert ((z >= 0) & (z <= 1)).all()
    assert (z[0] == 0).all() and (z[4] == 1).all()  # log_alpha -30: always cut; +30: always open
    middle = z[1:4]
    assert (middle == 0).any() and (middle == 1).any() and ((middle > 0) & (middle < 1)).any()
    # the sampler's P(z != 0) is what the L0 penalty counts (Eq. 12), to sampling error
    expected_open = [1 / (1 + math.exp(-(a - BETA * math.log(-GAMMA / ZETA)))) for a in (-1.0, 0.0, 1.5)]
    torch.testing.assert_close((middle > 0).double().mean(1), torch.tensor(expected_open, dtype=torch.float64),
                               atol=0.015, rtol=0)
    codes.eval()
    z_hat = codes()
    assert (z_hat[0] == 0).all() and (z_hat[4] == 1).all()
    assert z_hat[2, 0].item() == pytest.approx(0.5 * (ZETA - GAMMA) + GAMMA)


def test_l0_penalty_equals_its_formula_and_its_gradient_lowers_every_log_alpha():
    model, x = build("snr_trans", subnetworks=[3, 2], expert_hidden=[4], l0_weight=0.05, beta=0.5, gamma=-0.2, zeta=1.3)
    bb = model.backbone
    log_alphas = [r.codes.log_alpha for r in bb.routes]
    expected = 0.05 * sum(1 / (1 + math.exp(-(a - 0.5 * math.log(0.2 / 1.3))))
                          for la in log_alphas for a in la.detach().flatten().tolist())
    out = model(Features(x[:, :0].long(), x))
    assert out.penalty.item() == pytest.approx(expected, rel=1e-12)
    out.penalty.backward()
    assert all((la.grad > 0).all() for la in log_alphas)  # a descent step lowers every log_alpha
    others = [p for n, p in model.named_parameters() if not n.endswith("log_alpha")]
    assert all(p.grad is None for p in others)  # the penalty reads the codes' parameters alone
    with torch.no_grad():
        for la in log_alphas:
            la -= 10.0 * la.grad
    assert model(Features(x[:, :0].long(), x)).penalty.item() < expected
    free = models.create("snr_aver", dense_schema(5), l0_weight=0.0)
    assert free(Features(x[:, :0].long(), x.float())).penalty is None


def test_task_loss_reaches_codes_through_the_sample_and_no_cut_connection():
    model, x = build("snr_trans", subnetworks=[3, 2], expert_hidden=[4])
    bb = model.train().backbone
    route = bb.layer_routes[0]
    with torch.no_grad():
        for r in bb.routes:
            r.codes.log_alpha.fill_(0.0)
        route.codes.log_alpha[1, 2] = -30.0  # connection layer1/2 -> layer2/1: always cut
    noise = [torch.full(r.codes.log_alpha.shape, 0.5, dtype=torch.float64) for r in bb.routes]  # z = 0.5, or 0 if cut
    reps = bb(x, noise).task_reps
    model.tower_logits(reps)[:, 0].sum().backward()  # task a's loss alone
    assert route.codes.log_alpha.grad.abs().sum() > 0  # the reparameterised sample passes the gradient
    assert route.codes.log_alpha.grad[1, 2] == 0 and route.weight.grad[1, 2].abs().max() == 0
    assert route.weight.grad[0, 2].abs().max() > 0
    own_b = bb.task_modules(1)
    assert own_b == [bb.task_routes[1]]
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in own_b[0].parameters())  # task b's route: untouched
    assert all(p.grad.abs().max() > 0 for p in bb.task_modules(0)[0].parameters())
    assert set(map(id, model.task_parameters(0))) >= set(map(id, bb.task_routes[0].parameters()))


def test_bad_options_raise_naming_the_option():
    schema = dense_schema(5)
    with pytest.raises(ValueError, match="transform_dim = 8: snr_aver sums"):
        models.create("snr_aver", schema, transform_dim=8)  # identity connections need v_j as wide as u_i
    with pytest.raises(ValueError, match="subnetworks has 2 counts for num_layers = 3"):
        models.create("snr_trans", schema, num_layers=3, subnetworks=[3, 2])
    with pytest.raises(ValueError, match="expert_hidden has 3 lists for num_layers = 2"):
        models.create("snr_trans", schema, expert_hidden=[[4], [4], [4]])
    with pytest.raises(ValueError, match="expert_hidden needs at least one layer size"):
        models.create("snr_trans", schema, expert_hidden=[])
    with pytest.raises(ValueError, match="fixes variant = 'trans'"):
        models.create("snr_trans", schema, variant="aver")
    for option, value in [("gamma", 0.0), ("zeta", 1.0), ("beta", 0.0), ("l0_weight", -1.0)]:
        with pytest.raises(ValueError, match=option):
            models.create("snr_aver", schema, **{option: value})
    bb = models.create("snr_trans", schema).backbone
    with pytest.raises(ValueError, match="noise has 1 tensors for 3 routes"):
        bb(torch.zeros(2, 5), [torch.rand(3, 3)])


def test_doctest_runs():
    result = doctest.testmod(snr, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["snr_trans", "snr_aver"])
def test_trained_model_exports_and_its_gates_are_analysed(name, tmp_path):
    raw = {"seed": 2, "data": {"synthetic": {"rows": 600, "dim": 4, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": name, "subnetworks": [3, 2], "expert_hidden": [6], "tower_hidden": [4],
                     "batch_norm": True},
           "train": {"epochs": 1, "progress": False}}
    _, trained, table, _ = exported_equals_predict(raw, tmp_path / "m", rows=31, torchscript=True)
    # `mtlrec analyze`: every gate's mean codes, over sub-networks all shared by the tasks
    means = gate_utilisation(trained, table)
    bb = trained.model.backbone
    assert set(means) == set(bb.gate_experts) == {"layer2/sub0", "layer2/sub1", "tower/y1", "tower/y2"}
    receiver = {g: (r, j) for r, names in enumerate(bb.gate_names) for j, g in enumerate(names)}
    for g, mean in means.items():  # evaluation: each gate's mean is its receiver's z_hat row
        r, j = receiver[g]
        torch.testing.assert_close(mean, bb.routes[r].codes.deterministic()[j].detach(), atol=1e-6, rtol=0)
    rows = utilisation_table(trained, means)
    assert set(rows["owner"]) == {"shared"} and set(rows["level"]) == {"layer2", "tower"}

"""Asymmetric sharing, Cross-Stitch, AdaTT, ESMM and AITM against their papers' definitions,
each with a plain implementation written here (float64, weights read from the model)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import dense_schema
from helpers import linear_layers as layers_of
from helpers import plain_mlp as mlp

from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.tasks import TaskSet

TOL = 1e-6


def build(name, tasks=("a", "b"), types=None, **options):
    torch.manual_seed(0)
    model = models.create(name, dense_schema(5, tasks=tasks, types=types), **options).double()
    return model, torch.randn(7, 5, dtype=torch.float64)


def no_ids(x):
    return x[:, :0].long()


def test_asymmetric_sharing_reads_the_source_task_detached():
    model, x = build("asymmetric", tasks=("a", "b", "c"), hidden=[6, 4], source="b")
    bb = model.backbone
    own = [mlp(x, layers_of(f)) for f in bb.bottoms]
    expected = [mlp(torch.cat([own[k], own[1]], 1), layers_of(bb.fuse[k])) if k != 1 else own[1] for k in range(3)]
    reps = bb(x).task_reps
    torch.testing.assert_close(reps, torch.stack(expected, 1), atol=TOL, rtol=0)
    model(Features(no_ids(x), x)).logits[:, 0].sum().backward()  # task a's loss
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in bb.bottoms[1].parameters())  # b's bottom: untouched
    assert all(p.grad.abs().max() > 0 for p in bb.bottoms[0].parameters())
    with pytest.raises(ValueError, match="source 'z' is not a task"):
        models.create("asymmetric", dense_schema(5), source="z")


def test_cross_stitch_mixes_columns_after_every_layer():
    model, x = build("cross_stitch", tasks=("a", "b", "c"), hidden=[6, 4], self_weight=0.8)
    bb = model.backbone
    torch.testing.assert_close(bb.stitches[0], torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]],
                                                              dtype=torch.float64))
    with torch.no_grad():
        bb.stitches.add_(torch.randn_like(bb.stitches) * 0.3)  # away from the start, to test the mixing
    h = [x, x, x]
    for layer, alpha in zip(bb.columns, bb.stitches):
        out = [mlp(h[k], layer.expert_layers(k)) for k in range(3)]  # column k, its own weights
        h = [sum(alpha[k, j] * out[j] for j in range(3)) for k in range(3)]
    reps = bb(x).task_reps
    torch.testing.assert_close(reps, torch.stack(h, 1), atol=TOL, rtol=0)


def plain_adatt(bb, x, counts, shared):
    t = len(counts)
    xs, x_shared = [x] * t, x
    for level in bb.levels:
        bank = level.experts
        start = [sum(counts[:k]) for k in range(t)]
        native = [[mlp(xs[k], bank.expert_layers(start[k] + i)) for i in range(m)] for k, m in enumerate(counts)]
        shared_out = [mlp(x_shared, bank.expert_layers(sum(counts) + i)) for i in range(shared)]
        every = [e for group in native for e in group] + shared_out
        outs = []
        for k in range(t):
            g = torch.softmax(mlp(xs[k], layers_of(level.gates[k]), activate_last=False), 1)
            fused = sum(g[:, j : j + 1] * e for j, e in enumerate(every))
            outs.append(fused + sum(level.native[k][i] * e for i, e in enumerate(native[k])))  # + v_t^T E_t
        if len(level.gates) > t:
            g = torch.softmax(mlp(x_shared, layers_of(level.gates[t]), activate_last=False), 1)
            x_shared = sum(g[:, j : j + 1] * e for j, e in enumerate(every))
        xs = outs
    return torch.stack(xs, 1)


@pytest.mark.parametrize("levels, counts, shared", [(2, [1, 3], 0), (3, [2, 1, 2], 1), (1, [2, 2], 2)])
def test_adatt_equals_the_paper(levels, counts, shared):
    tasks = tuple("abc"[: len(counts)])
    model, x = build("adatt", tasks=tasks, num_levels=levels, task_experts=counts, shared_experts=shared,
                     expert_hidden=[5, 3], gate_hidden=[4])
    with torch.no_grad():
        for level in model.backbone.levels:
            for v in level.native:
                v.add_(torch.randn_like(v))  # native weights away from their start
    reps, gates, _, _ = model.backbone(x)
    torch.testing.assert_close(reps, plain_adatt(model.backbone, x, counts, shared), atol=TOL, rtol=0)
    assert gates["level1/a"].shape[1] == sum(counts) + shared  # every expert of the level
    assert ("level1/shared" in gates) == (shared > 0 and levels > 1)


def test_adatt_needs_a_native_expert_per_task():
    with pytest.raises(ValueError, match="at least one task expert each"):
        models.create("adatt", dense_schema(5), task_experts=[1, 0], shared_experts=1)


def test_esmm_ctcvr_is_the_product_and_cvr_is_reported():
    model, x = build("esmm", tasks=("click", "buy"), hidden=[6])
    out = model(Features(no_ids(x), x))
    reps = model.backbone(x).task_reps
    ctr = mlp(reps[:, 0], layers_of(model.towers[0]), activate_last=False)[:, 0]
    cvr = mlp(reps[:, 1], layers_of(model.towers[1]), activate_last=False)[:, 0]
    torch.testing.assert_close(out.logits[:, 0], ctr)
    torch.testing.assert_close(out.extra_logits["cvr"], cvr)
    torch.testing.assert_close(torch.sigmoid(out.logits[:, 1]), torch.sigmoid(ctr) * torch.sigmoid(cvr), atol=1e-12, rtol=0)
    # the CTCVR loss over the whole space is the log loss of pCTR * pCVR
    y = torch.tensor([1.0, 0, 0, 1, 0, 0, 1], dtype=torch.float64)
    loss = TaskSet(dense_schema(5, tasks=("click", "buy"))).losses(out.logits, torch.stack([y, y], 1),
                                                                  torch.ones(7, 2, dtype=torch.bool))[1]
    torch.testing.assert_close(loss, F.binary_cross_entropy(torch.sigmoid(ctr) * torch.sigmoid(cvr), y))
    with pytest.raises(ValueError, match="exactly two binary tasks"):
        models.create("esmm", dense_schema(5, tasks=("c", "t"), types=["binary", "regression"]))
    spaced = dense_schema(5, tasks=("click", "buy"))
    spaced.tasks[1].space = "click == 1"
    with pytest.raises(ValueError, match="entire impression space"):
        models.create("esmm", spaced)
    with pytest.raises(ValueError, match="entire impression space"):
        models.create("aitm", spaced)


def test_product_logit_is_accurate_at_the_extremes():
    from mtlrec.tasks import product_logit
    a = torch.tensor([-30.0, -5.0, 0.0, 5.0, 30.0], dtype=torch.float64)
    b = torch.tensor([-30.0, 2.0, 0.0, 5.0, 10.0], dtype=torch.float64)
    p = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(torch.sigmoid(product_logit(a, b)), p, atol=1e-12, rtol=1e-6)


def test_aitm_transfer_attention_and_calibrator():
    model, x = build("aitm", tasks=("click", "buy", "repeat"), hidden=[6], calibration=0.5)
    q = model.backbone(x).task_reps
    z = [q[:, 0]]
    for t in (1, 2):
        p = mlp(z[-1], layers_of(model.transfers[t - 1]))
        ait = model.ait[t - 1]
        u = [p, q[:, t]]
        score = [((v @ ait.query.weight.T + ait.query.bias) * (v @ ait.key.weight.T + ait.key.bias)).sum(1) / math.sqrt(6)
                 for v in u]
        w = torch.softmax(torch.stack(score, 1), 1)
        z.append(sum(w[:, i : i + 1] * (v @ ait.value.weight.T + ait.value.bias) for i, v in enumerate(u)))
    logits = torch.stack([mlp(z[t], layers_of(model.towers[t]), activate_last=False)[:, 0] for t in range(3)], 1)
    out = model(Features(no_ids(x), x))
    torch.testing.assert_close(out.logits, logits, atol=TOL, rtol=0)
    y = torch.sigmoid(logits)
    expected_penalty = 0.5 * (torch.relu(y[:, 1] - y[:, 0]).mean() + torch.relu(y[:, 2] - y[:, 1]).mean())
    torch.testing.assert_close(out.penalty, expected_penalty)


def test_aitm_calibrator_pushes_a_later_step_below_the_earlier_one():
    model, x = build("aitm", tasks=("click", "buy"), hidden=[6], calibration=1.0)
    with torch.no_grad():
        model.towers[1][-1].bias.fill_(5.0)  # buy predicted likelier than click
    out = model(Features(no_ids(x), x))
    assert out.penalty > 0
    logits = out.logits
    grad_click, grad_buy = torch.autograd.grad(out.penalty, logits)[0].unbind(1)
    assert (grad_buy >= 0).all() and (grad_click <= 0).all() and grad_buy.abs().sum() > 0

"""IMTL, GradVac, GradDrop and Aligned-MTL against their defining properties and plain
computations, and end to end on a model: shared entries changed as the method says,
task-owned entries left with their plain gradient."""

import math

import pytest
import torch
from helpers import dense_schema

from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.losses import WEIGHTINGS, create_weighting
from mtlrec.losses.weighting.aligned_mtl import align_gradients
from mtlrec.losses.weighting.graddrop import drop_signs, uniform_draws
from mtlrec.losses.weighting.gradvac import vaccinate
from mtlrec.losses.weighting.imtl import impartial_weights
from mtlrec.models.base import shared_parameters
from mtlrec.tasks import TaskSet

TWO = dense_schema(tasks=("c", "r"), types=["binary", "regression"])


def random_gradients(tasks, size=7, seed=0):
    return torch.randn(tasks, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cosine(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def linear_losses(theta, grads):
    """Losses g_k . theta: their gradient on theta is g_k, whatever theta."""
    return grads @ theta


# ----------------------------------------------------------------------------- registry
def test_the_four_methods_are_registered_with_typed_options():
    assert {"imtl", "gradvac", "graddrop", "aligned_mtl"} <= set(WEIGHTINGS)
    with pytest.raises(ValueError, match="mode"):
        create_weighting({"name": "imtl", "mode": "loss_and_gradient"}, TaskSet(TWO))
    with pytest.raises(ValueError, match="beta"):
        create_weighting({"name": "gradvac", "beta": 0.0}, TaskSet(TWO))
    with pytest.raises(ValueError, match="leak"):
        create_weighting({"name": "graddrop", "leak": 1.5}, TaskSet(TWO))
    with pytest.raises(ValueError, match="leak has 3 values for 2 tasks"):
        create_weighting({"name": "graddrop", "leak": [0.0, 0.5, 1.0]}, TaskSet(TWO))
    with pytest.raises(ValueError, match="min_eigenvalue_ratio"):
        create_weighting({"name": "aligned_mtl", "min_eigenvalue_ratio": 0}, TaskSet(TWO))


# ----------------------------------------------------------------------------- IMTL
@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_imtl_gradient_projects_equally_onto_every_task(tasks):
    grads = random_gradients(tasks, seed=tasks)
    alpha = impartial_weights(grads)
    update = alpha @ grads
    projections = grads / grads.norm(dim=1, keepdim=True) @ update  # g . u_k
    torch.testing.assert_close(projections, projections[:1].expand(tasks), atol=1e-5, rtol=0)
    assert alpha.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the paper's formula, literally: D, U [T-1, P] against the first task
    units = grads / grads.norm(dim=1, keepdim=True)
    d, u = grads[0] - grads[1:], units[0] - units[1:]
    rest = grads[0] @ u.T @ torch.linalg.inv(d @ u.T)
    torch.testing.assert_close(alpha, torch.cat([1 - rest.sum(0, keepdim=True), rest]))


def test_imtl_gradient_for_two_tasks_weighs_each_by_the_other_norm():
    grads = random_gradients(2, seed=5) * torch.tensor([[1.0], [30.0]], dtype=torch.float64)
    n1, n2 = grads.norm(dim=1)
    torch.testing.assert_close(impartial_weights(grads), torch.stack([n2, n1]) / (n1 + n2))


def test_imtl_gradient_ignores_a_task_without_shared_gradient():
    grads = random_gradients(3, seed=2)
    grads[1] = 0
    alpha = impartial_weights(grads)
    assert alpha[1] == 0 and torch.isfinite(alpha).all()
    torch.testing.assert_close(alpha[[0, 2]], impartial_weights(grads[[0, 2]]))


@pytest.mark.parametrize("mode", ["loss", "both"])
def test_imtl_loss_scales_reach_their_optimum_exp_s_times_loss_equal_one(mode):
    losses = torch.tensor([0.8, 2.0])
    w = create_weighting({"name": "imtl", "mode": mode}, TaskSet(TWO))
    opt = torch.optim.Adam(w.parameters(), lr=0.03)
    for _ in range(600):
        opt.zero_grad()
        w.backward(losses, [])
        opt.step()
    torch.testing.assert_close(torch.exp(w.log_scales.detach()) * losses, torch.ones(2), atol=1e-3, rtol=0)
    assert "log_scales" in w.state_dict()


def test_imtl_loss_balancing_refuses_a_non_positive_loss():
    w = create_weighting("imtl", TaskSet(TWO))
    with pytest.raises(ValueError, match="task 'r' has loss -0.5; use mode 'gradient'"):
        w.backward(torch.tensor([0.3, -0.5]), [])
    losses = torch.tensor([0.3, -0.5], requires_grad=True)
    create_weighting({"name": "imtl", "mode": "gradient"}, TaskSet(TWO)).backward(losses, [])  # IMTL-G alone: fine
    torch.testing.assert_close(losses.grad, torch.ones(2))


def test_imtl_gradient_on_a_parameter_vector():
    grads = random_gradients(3, size=4, seed=7).float()
    theta = torch.nn.Parameter(torch.zeros(4))
    w = create_weighting({"name": "imtl", "mode": "gradient"}, TaskSet(dense_schema(tasks=("a", "b", "c"))))
    assert list(w.parameters()) == []
    used = w.backward(linear_losses(theta, grads), [theta])
    torch.testing.assert_close(theta.grad, used @ grads)
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ theta.grad
    torch.testing.assert_close(projections, projections[:1].expand(3), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- GradVac
def test_gradvac_correction_reaches_the_target_similarity():
    grads = random_gradients(2, size=6, seed=3)
    grads[1] -= 1.5 * torch.dot(grads[0], grads[1]) / grads[0].dot(grads[0]) * grads[0] + 0.5 * grads[0]
    before = cosine(grads[0], grads[1]).item()
    assert before < 0.3
    targets = torch.tensor([[0.0, 0.6], [0.3, 0.0]], dtype=torch.float64)
    coefficients = vaccinate(grads, targets, beta=0.25, generator=torch.Generator().manual_seed(0))
    modified = coefficients @ grads
    assert cosine(modified[0], grads[1]).item() == pytest.approx(0.6, abs=1e-5)
    assert cosine(modified[1], grads[0]).item() == pytest.approx(0.3, abs=1e-5)
    # g_i' = g_i + a g_j with the paper's a
    phi = 0.6
    a = grads[0].norm() * (phi * math.sqrt(1 - before**2) - before * math.sqrt(1 - phi**2)) / (
        grads[1].norm() * math.sqrt(1 - phi**2))
    torch.testing.assert_close(modified[0], grads[0] + a * grads[1])
    torch.testing.assert_close(targets, torch.tensor([[0.0, 0.75 * 0.6 + 0.25 * before],
                                                      [0.75 * 0.3 + 0.25 * before, 0.0]], dtype=torch.float64))


def test_gradvac_leaves_pairs_at_or_above_their_target_alone():
    grads = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    targets = torch.zeros(3, 3, dtype=torch.float64)  # every pair has cos >= 0
    coefficients = vaccinate(grads, targets, beta=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(coefficients, torch.eye(3, dtype=torch.float64))
    cos = torch.stack([torch.stack([cosine(a, b) for b in grads]) for a in grads])
    torch.testing.assert_close(targets, 0.5 * cos * (1 - torch.eye(3, dtype=torch.float64)))


def test_gradvac_targets_follow_the_ema_across_steps():
    """Two conflicting tasks, constant gradients: step 1 is PCGrad (targets 0), later steps
    align to the EMA target, which moves by phi <- (1 - beta) phi + beta cos."""
    grads = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.0]])
    theta = torch.nn.Parameter(torch.zeros(3))
    w = create_weighting({"name": "gradvac", "beta": 0.3}, TaskSet(TWO))
    c = cosine(grads[0], grads[1]).item()
    phi = 0.0
    for _ in range(3):
        theta.grad = None
        used = w.backward(linear_losses(theta, grads), [theta])
        expected = grads.sum(0).clone()
        if c < phi:
            for i, j in ((0, 1), (1, 0)):
                a = grads[i].norm() * (phi * math.sqrt(1 - c**2) - c * math.sqrt(1 - phi**2)) / (
                    grads[j].norm() * math.sqrt(1 - phi**2))
                expected += a * grads[j]
        torch.testing.assert_close(theta.grad, expected)
        torch.testing.assert_close(used @ grads, theta.grad)  # the weights it reports
        phi = 0.7 * phi + 0.3 * c
        torch.testing.assert_close(w.targets, torch.tensor([[0.0, phi], [phi, 0.0]]))
    assert "targets" in w.state_dict()
    resumed = create_weighting({"name": "gradvac", "beta": 0.3}, TaskSet(TWO))
    resumed.load_state_dict(w.state_dict())
    assert torch.equal(resumed.targets, w.targets)


# ----------------------------------------------------------------------------- GradDrop
def test_graddrop_keeps_everything_where_all_tasks_agree_in_sign():
    grads = random_gradients(3, size=20, seed=4).abs()
    uniform = torch.rand(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    no_leak = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(drop_signs(grads, uniform, no_leak), grads.sum(0))
    torch.testing.assert_close(drop_signs(-grads, uniform, no_leak), -grads.sum(0))


def test_graddrop_keeps_one_sign_per_entry_by_the_rule():
    grads = random_gradients(3, size=50, seed=6)
    uniform = uniform_draws(seed=5, step=2, size=50, dtype=torch.float64)
    documented = torch.Generator().manual_seed((5 * 0x9E3779B97F4A7C15 + 2) % 2**64)
    assert torch.equal(uniform, torch.rand(50, generator=documented, dtype=torch.float64))
    out = drop_signs(grads, uniform, torch.zeros(3, dtype=torch.float64))
    for p in range(50):
        column = grads[:, p]
        purity = 0.5 * (1 + column.sum() / column.abs().sum())
        positive = uniform[p] < purity
        expected = column[column > 0].sum() if positive else column[column < 0].sum()
        torch.testing.assert_close(out[p], expected)
    # a leak lets that fraction of a task's gradient through whatever its sign; leak 1: plain sum
    leak = torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64)
    kept = torch.where(uniform < 0.5 * (1 + grads.sum(0) / grads.abs().sum(0)), grads > 0, grads < 0)
    expected = (grads * (leak[:, None] + (1 - leak[:, None]) * kept)).sum(0)
    torch.testing.assert_close(drop_signs(grads, uniform, leak), expected)
    torch.testing.assert_close(drop_signs(grads, uniform, torch.ones(3, dtype=torch.float64)), grads.sum(0))


def test_graddrop_in_expectation_weighs_positive_by_purity_and_negative_by_its_complement():
    grads = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-0.5, 1.0, -1.5, 1.0], [2.0, -1.0, -0.5, -1.0]],
                         dtype=torch.float64)
    draws = 20000
    uniform = torch.rand(draws * 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tiled = grads.repeat(1, draws)  # entry p of draw n at n * 4 + p
    mean = drop_signs(tiled, uniform, torch.zeros(3, dtype=torch.float64)).view(draws, 4).mean(0)
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0))
    expected = grads.clamp(min=0).sum(0) * purity + grads.clamp(max=0).sum(0) * (1 - purity)
    torch.testing.assert_close(mean, expected, atol=0.05, rtol=0)


def test_graddrop_draws_depend_on_seed_and_step_only():
    grads = random_gradients(2, size=30, seed=8).float()
    results = []
    for seed in (0, 0, 1):
        theta = torch.nn.Parameter(torch.zeros(30))
        w = create_weighting({"name": "graddrop", "seed": seed}, TaskSet(TWO))
        w.backward(linear_losses(theta, grads), [theta])
        step0 = theta.grad.clone()
        theta.grad = None
        w.backward(linear_losses(theta, grads), [theta])
        results.append((step0, theta.grad.clone()))
        torch.testing.assert_close(step0, drop_signs(grads, uniform_draws(seed, 0, 30), torch.zeros(2)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[0][1])  # a new step, new draws
    assert not torch.equal(results[0][0], results[2][0])  # another seed, other draws


# ----------------------------------------------------------------------------- Aligned-MTL
def test_aligned_gradients_are_orthogonal_with_equal_norms():
    grads = random_gradients(3, size=8, seed=9) * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    aligned = align_gradients(grads) @ grads
    smallest = torch.linalg.eigvalsh(grads @ grads.T).min()
    torch.testing.assert_close(aligned @ aligned.T, smallest * torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.cond(aligned).item() == pytest.approx(1.0, abs=1e-6)
    # the same from the SVD G = U S V^T: G B = s_min U V^T
    u, s, vh = torch.linalg.svd(grads.T, full_matrices=False)
    torch.testing.assert_close(aligned.T, s.min() * u @ vh)


def test_aligned_mtl_drops_the_directions_of_a_rank_deficient_system():
    grads = random_gradients(4, size=8, seed=10)
    grads[2] = grads[0] + 2 * grads[1]  # rank 3
    grads[3] = 0  # a task without shared gradient
    alignment = align_gradients(grads)
    aligned = alignment @ grads
    assert torch.isfinite(alignment).all()
    singular = torch.linalg.svdvals(aligned)
    eigenvalues = torch.linalg.eigvalsh(grads @ grads.T)
    smallest_kept = eigenvalues[eigenvalues > 1e-10 * eigenvalues.max()].min()
    torch.testing.assert_close(singular[:2], smallest_kept.sqrt().expand(2))
    assert singular[2] < 1e-6 * singular[0]  # only two independent directions remain
    torch.testing.assert_close(alignment[3], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(align_gradients(torch.zeros(2, 5)), torch.zeros(2, 2))


def test_aligned_mtl_update_is_the_sum_of_aligned_gradients_times_the_task_weights():
    schema = dense_schema(tasks=("a", "b"))
    schema.tasks[1].weight = 3.0
    grads = random_gradients(2, size=5, seed=11).float()
    theta = torch.nn.Parameter(torch.zeros(5))
    used = create_weighting("aligned_mtl", TaskSet(schema)).backward(linear_losses(theta, grads), [theta])
    u, s, vh = torch.linalg.svd(grads.T.double(), full_matrices=False)
    aligned = s.min() * u @ vh  # [P, T]
    torch.testing.assert_close(theta.grad, (aligned @ torch.tensor([1.0, 3.0], dtype=torch.float64)).float())
    torch.testing.assert_close(used @ grads, theta.grad)


# ----------------------------------------------------------------------------- end to end
def model_and_losses(tasks):
    """A CGC model (fused expert bank: each task's own expert is not shared) and a losses
    function on a fixed batch; the regression task conflicts with the first binary task."""
    schema = dense_schema(5, tasks=("a", "b", "c")[:tasks], types=["binary", "regression", "binary"][:tasks])
    torch.manual_seed(0)
    model = models.create("cgc", schema, expert_hidden=[8]).double()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.stack([(x[:, 0] > 0), -10 * (x[:, 0] > 0), (x[:, 1] > 0)][:tasks], 1).double()
    task_set = TaskSet(schema)
    sparse, mask = torch.zeros(32, 0, dtype=torch.long), torch.ones(32, tasks, dtype=torch.bool)
    return model, task_set, lambda: task_set.losses(model(Features(sparse, x)).logits, labels, mask)


def plain_gradients(model, losses_fn, tasks):
    """Per-task gradients of every parameter `[T, N]`, and the entries a single task owns `[N]`."""
    params = list(model.parameters())
    rows = []
    for k in range(tasks):
        g = torch.autograd.grad(losses_fn()[k], params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, g)]))
    owned = {}
    for k in range(tasks):
        for p in model.task_parameters(k):
            owned[id(p)] = torch.ones_like(p, dtype=torch.bool)
        for p, m in model.backbone.task_slices(k):
            owned[id(p)] = owned.get(id(p), torch.zeros_like(m)) | m
    owned_flat = torch.cat([owned.get(id(p), torch.zeros_like(p, dtype=torch.bool)).reshape(-1) for p in params])
    return torch.stack(rows), owned_flat


def run_method(spec, tasks):
    model, task_set, losses_fn = model_and_losses(tasks)
    grads, owned = plain_gradients(model, losses_fn, tasks)
    assert owned.any() and (~owned).any()
    model.zero_grad()
    weighting = create_weighting(spec, task_set).double()
    used = weighting.backward(losses_fn(), shared_parameters(model, tasks))
    got = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(used).all() and used.shape == (tasks,)
    torch.testing.assert_close(got[owned], grads.sum(0)[owned])  # task-owned: the plain gradient
    shared_grads = grads * ~owned
    return got * ~owned, shared_grads, weighting


def test_imtl_end_to_end_balances_the_shared_update():
    update, grads, weighting = run_method("imtl", 3)
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ update
    torch.testing.assert_close(projections, projections[:1].expand(3), atol=1e-8, rtol=0)
    assert not torch.allclose(update, grads.sum(0))
    assert weighting.log_scales.grad is not None  # IMTL-L's scales learn too


def test_gradvac_end_to_end_projects_a_conflict_at_zero_targets():
    update, grads, weighting = run_method({"name": "gradvac", "beta": 0.5}, 2)
    g1, g2 = grads
    dot = torch.dot(g1, g2)
    assert dot < 0
    expected = (g1 - dot / g2.dot(g2) * g2) + (g2 - dot / g1.dot(g1) * g1)  # PCGrad when phi = 0
    torch.testing.assert_close(update, expected)
    c = cosine(g1, g2)
    off_diagonal = 1 - torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(weighting.targets, 0.5 * c * off_diagonal)


def test_graddrop_end_to_end_keeps_one_sign_per_shared_entry():
    update, grads, _ = run_method({"name": "graddrop", "seed": 3}, 3)
    # U of step 0, one draw per entry of the tensors no task owns wholly, in model order
    model, _, _ = model_and_losses(3)
    owned_tensors = {id(p) for k in range(3) for p in model.task_parameters(k)}
    in_shared_tensor = torch.cat([torch.full((p.numel(),), id(p) not in owned_tensors) for p in model.parameters()])
    uniform = torch.zeros(grads.shape[1], dtype=torch.float64)
    documented = torch.Generator().manual_seed(3 * 0x9E3779B97F4A7C15 % 2**64)
    uniform[in_shared_tensor] = torch.rand(int(in_shared_tensor.sum()), generator=documented, dtype=torch.float64)
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0).clamp(min=1e-300))
    positive = uniform < purity
    expected = torch.where(positive, grads.clamp(min=0).sum(0), grads.clamp(max=0).sum(0))
    torch.testing.assert_close(update, expected)


def test_aligned_mtl_end_to_end_sums_orthogonal_equal_norm_gradients():
    update, grads, _ = run_method("aligned_mtl", 3)
    u, s, vh = torch.linalg.svd(grads.T, full_matrices=False)
    torch.testing.assert_close(update, (s.min() * u @ vh).sum(1))

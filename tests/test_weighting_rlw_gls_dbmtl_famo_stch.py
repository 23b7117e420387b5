"""RLW, GLS, DB-MTL, FAMO and STCH against plain computations of their defining equations."""

import io
import math
from itertools import pairwise

import pytest
import torch
from helpers import dense_schema

from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.losses import WEIGHTINGS, create_weighting
from mtlrec.losses.weighting import db_mtl, famo, gls, rlw, stch  # noqa: F401  (registers them)
from mtlrec.losses.weighting.db_mtl import magnitude_scales
from mtlrec.models.base import shared_parameters
from mtlrec.tasks import TaskSet

TWO = dense_schema(5, tasks=("c", "r"), types=["binary", "regression"])
THREE = dense_schema(5, tasks=("a", "b", "c"))


def weighted_schema(weights):
    schema = dense_schema(5, tasks=tuple("abcd"[: len(weights)]))
    for task, w in zip(schema.tasks, weights):
        task.weight = w
    return schema


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def grad_wrt_losses(weighting, values):
    """Backpropagate losses given as a leaf: (the weights returned, dL/dL_k)."""
    losses = leaf(values)
    used = weighting.backward(losses * 1.0, [])
    return used, losses.grad


# ---------------------------------------------------------------- every method on a real model
SPECS = ["rlw", "gls", "db_mtl", {"name": "db_mtl", "beta": 0.0}, "famo",
         {"name": "famo", "logit_optimizer": "sgd"}, "stch", {"name": "stch", "ideal": "running_min", "mu": 0.1}]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_each_method_trains_a_cgc_model_with_finite_gradients(spec):
    torch.manual_seed(0)
    model = models.create("cgc", TWO, expert_hidden=[8])
    tasks = TaskSet(TWO)
    weighting = create_weighting(spec, tasks)
    shared = shared_parameters(model, 2)
    x = torch.randn(16, 5)
    labels = torch.stack([(x[:, 0] > 0).float(), 3 * x[:, 1]], 1)
    mask = torch.ones(16, 2, dtype=torch.bool)
    for _ in range(3):
        model.zero_grad()
        losses = tasks.losses(model(Features(torch.zeros(16, 0, dtype=torch.long), x)).logits, labels, mask)
        used = weighting.backward(losses, shared)
        weighting.after_step()
        assert used.shape == (2,) and torch.isfinite(used).all() and (used > 0).all()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in (p.grad for p in shared.params if p.grad is not None))
    assert int(weighting.steps) == 3


def test_registered_with_validated_options():
    assert {"rlw", "gls", "db_mtl", "famo", "stch"} <= set(WEIGHTINGS)
    for spec, problem in [({"name": "famo", "lr": 0}, "lr"), ({"name": "stch", "mu": 0}, "mu"),
                          ({"name": "db_mtl", "beta": 1.0}, "beta"), ({"name": "stch", "ideal": "nadir"}, "ideal"),
                          ({"name": "famo", "logit_optimizer": "sgdm"}, "logit_optimizer")]:
        with pytest.raises(ValueError, match=problem):
            create_weighting(spec, TaskSet(TWO))


# ---------------------------------------------------------------- RLW
def test_rlw_draws_softmax_of_seeded_standard_normals():
    weighting = create_weighting({"name": "rlw", "seed": 7}, TaskSet(THREE))
    generator = torch.Generator().manual_seed(7)
    for _ in range(4):
        used, grad = grad_wrt_losses(weighting, [0.3, 1.0, 2.0])
        expected = torch.softmax(torch.randn(3, generator=generator), dim=0)
        torch.testing.assert_close(used, expected)
        torch.testing.assert_close(grad, expected.double())  # the model trains on sum_k w_k L_k
        assert used.sum().item() == pytest.approx(1.0)  # the paper's scale: sums to 1, not T
    weighted = create_weighting({"name": "rlw", "seed": 7}, TaskSet(weighted_schema([1.0, 2.0, 1.0])))
    draw = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(7)), dim=0)
    torch.testing.assert_close(weighted.weights(None), draw * torch.tensor([1.0, 2.0, 1.0]))


def test_rlw_resumed_from_a_state_dict_continues_the_same_sequence():
    first = create_weighting({"name": "rlw", "seed": 3}, TaskSet(TWO))
    for _ in range(5):
        first.weights(None)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = create_weighting({"name": "rlw", "seed": 3}, TaskSet(TWO))
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    fresh = create_weighting({"name": "rlw", "seed": 3}, TaskSet(TWO))
    for _ in range(3):
        expected = first.weights(None)
        torch.testing.assert_close(resumed.weights(None), expected, rtol=0, atol=0)
        assert not torch.equal(fresh.weights(None), expected)


# ---------------------------------------------------------------- GLS
def test_gls_gradient_is_that_of_the_geometric_mean():
    values = [0.3, 1.2, 2.0]
    used, grad = grad_wrt_losses(create_weighting("gls", TaskSet(THREE)), values)
    mean = (0.3 * 1.2 * 2.0) ** (1 / 3)
    expected = torch.tensor([mean / (3 * v) for v in values], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(used.double(), expected)
    # config weights are exponents: L = (L_1^1 L_2^2 L_3^1)^(1/4)
    used, grad = grad_wrt_losses(create_weighting("gls", TaskSet(weighted_schema([1.0, 2.0, 1.0]))), values)
    weighted = (0.3 * 1.2**2 * 2.0) ** (1 / 4)
    expected = torch.tensor([c * weighted / (4 * v) for c, v in zip([1, 2, 1], values)], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_gls_direction_is_unchanged_when_one_loss_is_rescaled():
    theta = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

    def gradient(scale):
        theta.grad = None
        losses = torch.stack([(theta[0] - theta[1]) ** 2 + 0.1, torch.exp(theta[2] * theta[0])])
        create_weighting("gls", TaskSet(TWO)).backward(losses * torch.tensor([scale, 1.0], dtype=torch.float64),
                                                      [theta])
        return theta.grad.clone()

    plain, rescaled = gradient(1.0), gradient(9.0)
    torch.testing.assert_close(rescaled, 9.0 ** (1 / 2) * plain)  # same direction, length x 9^(1/T)
    assert torch.dot(plain / plain.norm(), rescaled / rescaled.norm()).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- DB-MTL
def test_magnitude_scales_give_every_task_the_largest_norm():
    grads = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.1], [2.0], [5.0]])
    scaled = magnitude_scales(grads)[:, None] * grads
    largest = max(g.norm() for g in grads)
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((3,), float(largest)))
    with_zero = torch.cat([grads, torch.zeros(1, 10)])  # a task without gradient: nothing to scale
    torch.testing.assert_close(magnitude_scales(with_zero), torch.cat([magnitude_scales(grads), torch.ones(1)]))


def test_db_mtl_balances_the_average_log_loss_gradients_on_shared_parameters():
    shared = torch.nn.Parameter(torch.tensor([0.4, -0.3, 0.5], dtype=torch.float64))
    own = [torch.nn.Parameter(torch.tensor([0.7], dtype=torch.float64)) for _ in range(2)]

    def losses_at(step):
        a, b = 1.0 + step, 2.0 - 0.5 * step  # different data each step
        return torch.stack([torch.exp(own[0][0] * shared[0]) * a + shared[1] ** 2,
                            10 * own[1][0] ** 2 * (shared[2] - b) ** 2 + 1.0])

    def plain_log_gradients(step):
        """g_k = grad log L_k on the shared and on task k's own parameters, one task at a time."""
        out = []
        for k in range(2):
            loss = losses_at(step)[k]
            g_shared, g_own = torch.autograd.grad(torch.log(loss), [shared, own[k]])
            out.append((g_shared, g_own, loss.item()))
        return out

    beta, sigma = 0.9, 0.5
    weighting = create_weighting({"name": "db_mtl", "beta": beta, "beta_sigma": sigma}, TaskSet(TWO)).double()
    average = torch.zeros(2, 3, dtype=torch.float64)
    for step in (1, 2):
        expected = plain_log_gradients(step)
        for p in [shared, *own]:
            p.grad = None
        used = weighting.backward(losses_at(step), [shared])
        beta_t = beta / step**sigma
        average = beta_t * average + (1 - beta_t) * torch.stack([g for g, _, _ in expected])
        norms = average.norm(dim=1)
        alpha = norms.max() / norms
        torch.testing.assert_close(weighting.grad_average, average)
        torch.testing.assert_close(shared.grad, alpha[0] * average[0] + alpha[1] * average[1])
        for k in range(2):  # task-owned parameters: the plain gradient of log L_k = g_k / L_k
            torch.testing.assert_close(own[k].grad, expected[k][1])
        torch.testing.assert_close(used, alpha / torch.tensor([loss for _, _, loss in expected], dtype=torch.float64))
        if step == 1:  # from zero state: each task's scaled average has the largest norm, (1 - beta) max ||g||
            scaled = (alpha[:, None] * average).norm(dim=1)
            largest = (1 - beta) * max(g.norm() for g, _, _ in expected)
            torch.testing.assert_close(scaled, torch.stack([largest, largest]))
    restored = create_weighting({"name": "db_mtl", "beta": beta, "beta_sigma": sigma}, TaskSet(TWO)).double()
    restored.load_state_dict(weighting.state_dict())
    torch.testing.assert_close(restored.grad_average, average)


def test_db_mtl_leaves_a_tasks_own_experts_of_a_fused_bank_their_log_gradient():
    torch.manual_seed(0)
    model = models.create("cgc", TWO, task_experts=1, shared_experts=1, expert_hidden=[6]).double()
    tasks = TaskSet(TWO)
    x = torch.randn(24, 5, dtype=torch.float64)
    labels = torch.stack([(x[:, 0] > 0).double(), 5 * x[:, 1]], 1)
    mask = torch.ones(24, 2, dtype=torch.bool)
    losses_fn = lambda: tasks.losses(model(Features(torch.zeros(24, 0, dtype=torch.long), x)).logits, labels, mask)
    params = list(model.parameters())
    plain = torch.autograd.grad(torch.log(losses_fn()).sum(), params, allow_unused=True)
    shared = shared_parameters(model, 2)
    model.zero_grad()
    create_weighting("db_mtl", tasks).double().backward(losses_fn(), shared)
    masks = {id(p): m for p, m in zip(shared.params, shared.masks)}
    assert any(m is not None and (~m).any() for m in masks.values())  # the bank holds task-owned experts
    changed = False
    for p, g in zip(params, plain):
        if g is None:
            continue
        if id(p) not in masks:  # a tower or gate: the task's whole tensor
            own = torch.ones_like(p, dtype=torch.bool)
        else:  # shared, all entries (mask None) or all but some task's experts
            own = torch.zeros_like(p, dtype=torch.bool) if masks[id(p)] is None else ~masks[id(p)]
        torch.testing.assert_close(p.grad[own], g[own])  # task-owned entries: grad sum_k log L_k
        changed |= not torch.allclose(p.grad[~own], g[~own])
    assert changed  # the balancing moved the shared entries


# ---------------------------------------------------------------- FAMO
def reference_famo_logits(loss_sequence, lr=0.025, gamma=1e-3):
    """xi after each step, by torch.optim.Adam on autograd's vector-Jacobian product of softmax."""
    xi = torch.zeros(len(loss_sequence[0]), requires_grad=True)
    optimizer = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)
    out = [xi.detach().clone()]
    for before, after in pairwise(loss_sequence):
        delta = torch.log(torch.tensor(before)) - torch.log(torch.tensor(after))
        xi.grad = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)[0]
        optimizer.step()
        out.append(xi.detach().clone())
    return out


def test_famo_logits_take_adam_steps_on_the_change_in_log_losses():
    sequence = [[1.0, 2.0, 0.5], [0.8, 1.9, 0.45], [0.7, 1.85, 0.3], [0.65, 1.5, 0.29]]
    weighting = create_weighting("famo", TaskSet(THREE))
    for losses, xi in zip(sequence, reference_famo_logits(sequence)):
        used, grad = grad_wrt_losses(weighting, losses)  # xi is updated from the previous step's losses first
        torch.testing.assert_close(weighting.logits, xi)
        ratio = torch.softmax(xi, 0).double() / torch.tensor(losses, dtype=torch.float64)  # z_k / L_k
        expected = ratio / ratio.sum()
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)  # sum_k C z_k grad L_k / L_k
        torch.testing.assert_close(used.double(), expected, rtol=1e-6, atol=1e-7)
        assert used.sum().item() == pytest.approx(1.0)


def test_famo_sgd_is_the_papers_algorithm_1():
    lr, gamma = 0.5, 0.1
    weighting = create_weighting({"name": "famo", "lr": lr, "gamma": gamma, "logit_optimizer": "sgd"},
                                 TaskSet(TWO))
    sequence = [[1.0, 1.0], [0.5, 0.9], [0.4, 0.6]]
    xi = torch.zeros(2)
    for before, after in zip(sequence, sequence[1:] + [None]):
        weighting.backward(leaf(before) * 1.0, [])
        torch.testing.assert_close(weighting.logits, xi)
        if after is not None:
            z = torch.softmax(xi, 0)
            jacobian = torch.diag(z) - torch.outer(z, z)  # dz/dxi
            delta = torch.log(torch.tensor(before)) - torch.log(torch.tensor(after))
            xi = xi - lr * (jacobian.T @ delta + gamma * xi)


def test_famo_raises_the_weight_of_the_task_whose_loss_falls_slower():
    weighting = create_weighting("famo", TaskSet(TWO))
    slow_weight = []
    for t in range(30):
        weighting.backward(leaf([2.0 * 0.9**t, 0.5 * 0.99**t]) * 1.0, [])  # task r falls 10x slower
        slow_weight.append(weighting.task_probabilities()[1].item())
    assert slow_weight[0] == 0.5 and all(b > a for a, b in pairwise(slow_weight))


def test_famo_state_round_trips_through_the_state_dict():
    sequence = [[1.0, 2.0], [0.9, 1.9], [0.7, 1.95], [0.6, 1.7], [0.5, 1.8]]
    original = create_weighting("famo", TaskSet(TWO))
    for losses in sequence[:3]:
        original.backward(leaf(losses) * 1.0, [])
    resumed = create_weighting("famo", TaskSet(TWO))
    resumed.load_state_dict(original.state_dict())
    fresh = create_weighting("famo", TaskSet(TWO))
    for losses in sequence[3:]:
        expected = original.backward(leaf(losses) * 1.0, [])
        torch.testing.assert_close(resumed.backward(leaf(losses) * 1.0, []), expected, rtol=0, atol=0)
        torch.testing.assert_close(resumed.logits, original.logits, rtol=0, atol=0)
        assert not torch.equal(fresh.backward(leaf(losses) * 1.0, []), expected)


# ---------------------------------------------------------------- STCH
def plain_smooth_tchebycheff_weights(losses, prefs, ideal, mu):
    terms = [math.exp(w * (v - z) / mu) for v, w, z in zip(losses, prefs, ideal)]
    return torch.tensor([w * e / sum(terms) for w, e in zip(prefs, terms)], dtype=torch.float64)


def test_stch_implied_weights_are_a_softmax_of_the_weighted_gaps():
    values = [0.5, 0.9, 0.7]
    for mu in (0.3, 1.0, 4.0):
        used, grad = grad_wrt_losses(create_weighting({"name": "stch", "mu": mu}, TaskSet(THREE)), values)
        expected = plain_smooth_tchebycheff_weights(values, [1, 1, 1], [0, 0, 0], mu)
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(used.double(), expected)
    prefs = [3.0, 1.0, 1.0]
    used, grad = grad_wrt_losses(create_weighting({"name": "stch", "mu": 0.5}, TaskSet(weighted_schema(prefs))), values)
    torch.testing.assert_close(grad, plain_smooth_tchebycheff_weights(values, prefs, [0, 0, 0], 0.5))


def test_stch_approaches_the_worst_task_as_mu_goes_to_zero_and_the_mean_as_it_grows():
    values = [0.5, 0.9, 0.7]
    sharp = create_weighting({"name": "stch", "mu": 1e-3}, TaskSet(THREE)).weights(torch.tensor(values))
    torch.testing.assert_close(sharp, torch.tensor([0.0, 1.0, 0.0]))
    preferring_a = create_weighting({"name": "stch", "mu": 1e-3}, TaskSet(weighted_schema([3.0, 1.0, 1.0])))
    # 3 x 0.5 is the worst weighted gap
    torch.testing.assert_close(preferring_a.weights(torch.tensor(values)), torch.tensor([3.0, 0.0, 0.0]))
    flat = create_weighting({"name": "stch", "mu": 1e4}, TaskSet(THREE)).weights(torch.tensor(values))
    torch.testing.assert_close(flat, torch.full((3,), 1 / 3), atol=1e-4, rtol=0)


def test_stch_running_minimum_ideal_point():
    weighting = create_weighting({"name": "stch", "ideal": "running_min", "mu": 0.5}, TaskSet(TWO))
    lowest = [math.inf, math.inf]
    for values in ([1.0, 2.0], [0.5, 2.5], [0.8, 1.5]):
        lowest = [min(a, b) for a, b in zip(lowest, values)]
        used, grad = grad_wrt_losses(weighting, values)
        expected = plain_smooth_tchebycheff_weights(values, [1, 1], lowest, 0.5)
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(used.double(), expected)
        torch.testing.assert_close(weighting.ideal_point, torch.tensor(lowest))

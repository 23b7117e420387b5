"""Gradient methods act on what tasks truly share: in a fused expert bank a task's own
experts (CGC, the last PLE level) are that task's, not shared (PCGrad and GradNorm papers
define their operations on the shared parameters)."""

import torch
from helpers import dense_schema

from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.losses import create_weighting
from mtlrec.models.base import shared_parameters
from mtlrec.tasks import TaskSet

SCHEMA = dense_schema(5, tasks=("a", "b"), types=["binary", "regression"])


def cgc():
    torch.manual_seed(0)
    return models.create("cgc", SCHEMA, task_experts=1, shared_experts=1, expert_hidden=[6, 4], batch_norm=True)


def batch():
    torch.manual_seed(1)
    x = torch.randn(32, 5)
    labels = torch.stack([(x[:, 0] > 0).float(), 10 * (x[:, 0] > 0).float()], 1)  # conflicting at this init
    return torch.zeros(32, 0, dtype=torch.long), x, labels, torch.ones(32, 2, dtype=torch.bool)


def test_own_experts_of_a_level_without_a_shared_gate_are_not_shared():
    model = cgc()
    shared = shared_parameters(model, 2)
    bank = model.backbone.levels[0].experts
    masks = {id(p): m for p, m in zip(shared.params, shared.masks)}
    assert masks[id(bank.weights[0])][:, 0, 0].tolist() == [False, False, True]  # experts: a, b, shared
    assert masks[id(bank.norms[0].weight)].view(3, 6)[:, 0].tolist() == [False, False, True]
    assert masks[id(model.embedding.tables[0].weight)] is None if model.embedding.tables else True
    ple = models.create("ple", SCHEMA, num_levels=2, expert_hidden=[4])
    level_masks = [any(m is not None for p, m in zip(shared_parameters(ple, 2).params, shared_parameters(ple, 2).masks)
                       if any(p is q for q in level.experts.parameters())) for level in ple.backbone.levels]
    assert level_masks == [False, True]  # level 1's task experts also feed the shared gate
    adatt = models.create("adatt", SCHEMA, num_levels=1, expert_hidden=[4])
    assert all(m is None for m in shared_parameters(adatt, 2).masks)  # every gate reads every expert


def plain_pcgrad_gradient(model, losses_fn, owned):
    """PCGrad by hand: per-task gradients of every parameter; projected on the shared entries
    (2 tasks: each onto the other's normal plane if they conflict); task-owned entries plain."""
    params = list(model.parameters())
    grads = []
    for k in range(2):
        g = torch.autograd.grad(losses_fn()[k], params, allow_unused=True)
        grads.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
    flat = [torch.cat([x.reshape(-1) for x in g]) for g in grads]
    keep = torch.cat([(~owned.get(id(p), torch.zeros_like(p, dtype=torch.bool))).reshape(-1) for p in params])
    s0, s1 = flat[0] * keep, flat[1] * keep
    dot = torch.dot(s0, s1)
    p0 = s0 - min(dot, 0) / s1.square().sum() * s1
    p1 = s1 - min(dot, 0) / s0.square().sum() * s0
    total = torch.where(keep, p0 + p1, flat[0] + flat[1])
    return total


def test_pcgrad_projects_shared_entries_only():
    model = cgc().double()
    sparse, x, labels, mask = batch()
    x, labels = x.double(), labels.double()
    tasks = TaskSet(SCHEMA)
    losses_fn = lambda: tasks.losses(model(Features(sparse, x)).logits, labels, mask)
    owned = {}  # what one task owns: whole tensors (towers, gates) and its experts' entries
    for k in range(2):
        for p in model.task_parameters(k):
            owned[id(p)] = torch.ones_like(p, dtype=torch.bool)
        for p, m in model.backbone.task_slices(k):
            owned[id(p)] = owned.get(id(p), torch.zeros_like(m)) | m
    grads = shared_parameters(model, 2).task_gradients(losses_fn())
    assert torch.dot(grads[0], grads[1]) < 0  # the tasks conflict, so PCGrad projects
    expected = plain_pcgrad_gradient(model, losses_fn, owned)
    model.zero_grad()
    create_weighting("pcgrad", tasks).double().backward(losses_fn(), shared_parameters(model, 2))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected)
    # the fix matters here: treating the task experts as shared gives another gradient
    model.zero_grad()
    create_weighting("pcgrad", tasks).double().backward(losses_fn(), shared_parameters(model, 2).params)
    unmasked = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert not torch.allclose(unmasked, expected)


def test_gradnorm_norms_cover_shared_entries_only():
    model = cgc()
    sparse, x, labels, mask = batch()
    losses = TaskSet(SCHEMA).losses(model(Features(sparse, x)).logits, labels, mask)
    shared = shared_parameters(model, 2)
    norms = shared.task_gradients(losses).norm(dim=1)
    keep = shared.flat_mask()
    for k in range(2):
        full = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(
            shared.params, torch.autograd.grad(losses[k], shared.params, retain_graph=True, allow_unused=True))])
        torch.testing.assert_close(norms[k], full[keep].norm())
        assert full.norm() > norms[k] * 1.01  # the task's own expert adds to the unmasked norm

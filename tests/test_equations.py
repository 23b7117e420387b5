"""Each expert model equals a plain, per-expert implementation of its paper's equations.

The reference below loops over experts and gates one by one, in float64, reading the weights
out of the model under test; it shares no computation with the fused implementation.
"""

import pytest
import torch
from helpers import dense_schema, linear_layers, mix, plain_gate, plain_mlp

from mtlrec import models
from mtlrec.data.features import Features

TOL = 1e-6


def plain_ple(backbone, x, task_experts, shared_experts):
    """PLE paper Eq. 2-5, expert order: task 0's, task 1's, ..., shared (the documented layout)."""
    t = len(task_experts)
    x_tasks, x_shared = [x] * t, x
    for level in backbone.levels:
        bank = level.experts
        start = [sum(task_experts[:k]) for k in range(t)]
        first_shared = sum(task_experts)
        e_task = [[plain_mlp(x_tasks[k], bank.expert_layers(start[k] + i)) for i in range(m)]
                  for k, m in enumerate(task_experts)]
        e_shared = [plain_mlp(x_shared, bank.expert_layers(first_shared + i)) for i in range(shared_experts)]
        y_tasks = [mix(plain_gate(x_tasks[k], level.gates[k]), e_task[k] + e_shared) for k in range(t)]
        if len(level.gates) == t + 1:
            every = [f for group in e_task for f in group] + e_shared
            x_shared = mix(plain_gate(x_shared, level.gates[t]), every)
        x_tasks = y_tasks
    return torch.stack(x_tasks, dim=1)


def plain_towers(model, reps):
    return torch.stack([plain_mlp(reps[:, k], linear_layers(model.towers[k]), activate_last=False)[:, 0]
                        for k in range(reps.shape[1])], dim=1)


def build(name, n_tasks, **options):
    torch.manual_seed(0)
    schema = dense_schema(6, tasks=[f"t{k}" for k in range(n_tasks)])
    model = models.create(name, schema, **options).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("gate_hidden", [[], [5]])
@pytest.mark.parametrize(
    "num_levels, task_experts, shared_experts, expert_hidden, n_tasks",
    [
        (1, [1, 3], 2, [7, 4], 2),                 # CGC, unequal counts
        (2, [2, 1], 1, [[7, 5], [3]], 2),          # PLE, 2 levels, sizes per level
        (3, [1, 2, 3], 2, [6], 3),                 # PLE, 3 levels, 3 tasks
        (2, [0, 2], 1, [4], 2),                    # a task without its own experts
    ],
)
def test_ple_and_cgc_equal_the_paper(num_levels, task_experts, shared_experts, expert_hidden, n_tasks, gate_hidden):
    name, extra = ("cgc", {}) if num_levels == 1 else ("ple", {"num_levels": num_levels})
    model, x = build(name, n_tasks, task_experts=task_experts, shared_experts=shared_experts,
                     expert_hidden=expert_hidden, gate_hidden=gate_hidden, tower_hidden=[3], **extra)
    reps = model.backbone(x).task_reps
    expected = plain_ple(model.backbone, x, task_experts, shared_experts)
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(model(Features(x[:, :0].long(), x)).logits, plain_towers(model, expected), atol=TOL, rtol=0)


@pytest.mark.parametrize("gate_hidden", [[], [5]])
def test_mmoe_equals_the_paper(gate_hidden):
    """MMoE (Ma et al. 2018, Eq. 5-6): y_k = sum_i g_k(x)_i f_i(x), g_k = softmax(W_k x)."""
    model, x = build("mmoe", 3, num_experts=5, expert_hidden=[7, 4], gate_hidden=gate_hidden)
    level = model.backbone.level
    experts = [plain_mlp(x, level.experts.expert_layers(i)) for i in range(5)]
    expected = torch.stack([mix(plain_gate(x, level.gates[k]), experts) for k in range(3)], dim=1)
    reps, gates, _, _ = model.backbone(x)
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)
    assert sorted(gates) == ["gate/t0", "gate/t1", "gate/t2"]


def test_omoe_uses_one_gate_for_all_tasks():
    model, x = build("omoe", 2, num_experts=3, expert_hidden=[5])
    bb = model.backbone
    experts = [plain_mlp(x, bb.experts.expert_layers(i)) for i in range(3)]
    expected = mix(plain_gate(x, bb.gate), experts)
    reps = bb(x).task_reps
    torch.testing.assert_close(reps[:, 0], expected, atol=TOL, rtol=0)
    torch.testing.assert_close(reps[:, 1], expected, atol=TOL, rtol=0)


def test_shared_bottom_and_single_task():
    model, x = build("shared_bottom", 2, hidden=[5, 4], tower_hidden=[3])
    h = plain_mlp(x, linear_layers(model.backbone.bottom))
    torch.testing.assert_close(model(Features(x[:, :0].long(), x)).logits, plain_towers(model, torch.stack([h, h], 1)),
                               atol=TOL, rtol=0)
    single, x = build("single_task", 2, hidden=[5])
    nets = single.nets
    assert len(nets) == 2 and not set(map(id, nets[0].parameters())) & set(map(id, nets[1].parameters()))
    out = single(Features(x[:, :0].long(), x)).logits
    for k, net in enumerate(nets):
        torch.testing.assert_close(out[:, k], net(Features(x[:, :0].long(), x)).logits[:, 0])


def test_gates_are_distributions_of_the_right_size():
    model, x = build("ple", 3, num_levels=3, task_experts=[1, 2, 3], shared_experts=2, expert_hidden=[4])
    _, gates, _, _ = model.backbone(x)
    expected = {}
    for level in (1, 2, 3):
        expected |= {f"level{level}/t{k}": m + 2 for k, m in enumerate([1, 2, 3])}
        if level < 3:
            expected[f"level{level}/shared"] = 1 + 2 + 3 + 2
    assert {name: g.shape[1] for name, g in gates.items()} == expected  # no shared gate on the last level
    for g in gates.values():
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(1), torch.ones(9, dtype=torch.float64))
    assert {n: len(e) for n, e in model.backbone.gate_experts.items()} == expected
    assert model.backbone.gate_experts["level2/t1"] == ["level2/t1/0", "level2/t1/1", "level2/shared/0", "level2/shared/1"]


def test_cgc_task_loss_leaves_other_tasks_experts_and_gate_untouched():
    torch.manual_seed(0)
    model = models.create("cgc", dense_schema(6), task_experts=[2, 2], shared_experts=1, expert_hidden=[5, 4])
    x = torch.randn(16, 6)
    model(Features(x[:, :0].long(), x)).logits[:, 0].sum().backward()  # task a's loss alone
    level = model.backbone.levels[0]
    for w in list(level.experts.weights) + list(level.experts.biases):
        assert w.grad[2:4].abs().max() == 0  # task b's experts (indices 2, 3)
        assert w.grad[0:2].abs().max() > 0  # task a's experts do learn
        assert w.grad[4].abs().max() > 0  # so does the shared one
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in level.gates[1].parameters())
    assert any(p.grad.abs().max() > 0 for p in level.gates[0].parameters())

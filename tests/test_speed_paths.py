"""The speed options compute what the plain path computes: fused optimizer, bf16 autocast, torch.compile."""

import pytest
import torch
from helpers import dense_schema

from mtlrec import models
from mtlrec.config import load_config
from mtlrec.data import TensorData
from mtlrec.data.features import Features
from mtlrec.train.trainer import Trainer


def train_once(**train):
    schema = dense_schema(6, tasks=("a", "b"), types=["binary", "regression"])
    torch.manual_seed(0)
    model = models.create("ple", schema, expert_hidden=[16, 8], tower_hidden=[4])
    g = torch.Generator().manual_seed(1)
    n = 512
    x = torch.randn(n, 6, generator=g)
    labels = torch.stack([(x[:, 0] > 0).float(), x[:, 1] + 0.1 * torch.randn(n, generator=g)], 1)
    data = TensorData(torch.zeros(n, 0, dtype=torch.long), x, labels, torch.ones(n, 2, dtype=torch.bool))
    cfg = load_config({"train": {"epochs": 2, "batch_size": 64, "lr": 0.01, "progress": False} | train}).train
    trainer = Trainer(model, schema, cfg)
    trainer.fit(data)
    return model, trainer.evaluate(data)


def test_fused_optimizer_equals_the_loop():
    fused, _ = train_once(fused_optimizer=True)
    plain, _ = train_once(fused_optimizer=False)
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains_like_fp32():
    _, fp32 = train_once(precision="fp32")
    _, bf16 = train_once(precision="bf16")
    assert bf16["auc/a"] == pytest.approx(fp32["auc/a"], abs=0.02)
    assert bf16["mse/b"] == pytest.approx(fp32["mse/b"], rel=0.2)


def test_compiled_model_equals_eager():
    schema = dense_schema(6)
    torch.manual_seed(0)
    model = models.create("mmoe", schema, expert_hidden=[8]).eval()
    x = torch.randn(33, 6)
    ids = torch.zeros(33, 0, dtype=torch.long)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(Features(ids, x)).logits, model(Features(ids, x)).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", [("ple", {"num_levels": 2, "task_experts": [2, 1, 0], "shared_experts": 2}),
                                          ("mmoe", {"num_experts": 3}),
                                          ("adatt", {"task_experts": [1, 2, 1], "shared_experts": 1})])
def test_fused_first_level_gates_equal_the_gates_one_by_one(name, options):
    schema = dense_schema(6, tasks=("a", "b", "c"))
    torch.manual_seed(0)
    model = models.create(name, schema, expert_hidden=[8], tower_hidden=[4], **options)
    levels = [m for m in model.modules() if hasattr(m, "fused_gates")]
    assert levels[0].fused_gates and not any(level.fused_gates for level in levels[1:])
    x, ids = torch.randn(17, 6), torch.zeros(17, 0, dtype=torch.long)
    results = []
    for fused in (True, False):
        levels[0].fused_gates = fused
        model.zero_grad()
        out = model(Features(ids, x))
        out.logits.square().sum().backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-6, rtol=1e-6)
    assert fused.gates.keys() == plain.gates.keys()
    for name in plain.gates:
        torch.testing.assert_close(fused.gates[name], plain.gates[name], atol=1e-6, rtol=1e-6)
    assert len(fused_grads) == len(plain_grads)
    for g, h in zip(fused_grads, plain_grads):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-6)


def test_gates_with_hidden_layers_are_not_fused():
    schema = dense_schema(6)
    model = models.create("mmoe", schema, expert_hidden=[8], gate_hidden=[4])
    assert not model.backbone.level.fused_gates

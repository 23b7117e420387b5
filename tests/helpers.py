"""Small builders and the plain reference computations shared by the tests."""

import torch
from torch import nn

from mtlrec.data.features import Features
from mtlrec.schema import Schema


def linear_layers(module):
    """(weight `[in, out]`, bias) of each nn.Linear in a module, in order."""
    return [(m.weight.T, m.bias) for m in module.modules() if isinstance(m, nn.Linear)]


def plain_mlp(x, layers, activate_last=True):
    """x @ W + b layer by layer, ReLU between (and after the last unless activate_last=False)."""
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1 or activate_last:
            x = torch.relu(x)
    return x


def plain_gate(x, gate):
    """softmax(W_L relu(... relu(W_1 x + b_1)) + b_L), from the gate's Linear layers."""
    return torch.softmax(plain_mlp(x, linear_layers(gate), activate_last=False), dim=1)


def mix(weights, experts):
    """sum_j weights[:, j] * experts[j]: a gate's mixture, one expert at a time."""
    return sum(weights[:, j : j + 1] * f for j, f in enumerate(experts))


def dense_schema(n_dense: int = 6, tasks=("a", "b"), types=None) -> Schema:
    types = types or ["binary"] * len(tasks)
    return Schema(
        dense=[{"name": f"x{i}"} for i in range(n_dense)],
        tasks=[{"name": t, "type": k} for t, k in zip(tasks, types)],
    )


def three_task_cgc():
    """A float64 CGC on 5 dense inputs with three binary tasks that partly conflict, and
    `losses_of()`, a fresh forward pass giving the task losses `[3]` (no dropout: the same
    losses each time). Returns (model, task set, losses_of)."""
    from mtlrec import models
    from mtlrec.tasks import TaskSet

    schema = dense_schema(5, tasks=("a", "b", "c"))
    torch.manual_seed(0)
    model = models.create("cgc", schema, expert_hidden=[8]).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    labels = torch.stack([(x[:, 0] > 0), (x[:, 1] > 0), (x[:, 0] < 0)], 1).double()
    mask = torch.ones(32, 3, dtype=torch.bool)
    tasks = TaskSet(schema)

    def losses_of():
        return tasks.losses(model(Features(torch.zeros(32, 0, dtype=torch.long), x)).logits, labels, mask)

    return model, tasks, losses_of


def assert_shared_update(params, plain, expected, shared):
    """Each parameter's `.grad` equals `plain` on the entries one task owns and `expected` on
    the shared entries (`SharedParameters`), and differs from `plain` somewhere shared (the
    method acted). `plain`, `expected`: gradients per parameter, None where there is none."""
    shared_mask = {id(p): (torch.ones_like(p, dtype=torch.bool) if m is None else m)
                   for p, m in zip(shared.params, shared.masks)}
    changed = False
    for p, g_plain, g_expected in zip(params, plain, expected):
        if g_plain is None:
            assert p.grad is None
            continue
        assert torch.isfinite(p.grad).all()
        is_shared = shared_mask.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        torch.testing.assert_close(p.grad[~is_shared], g_plain[~is_shared])
        torch.testing.assert_close(p.grad[is_shared], g_expected[is_shared])
        changed |= not torch.allclose(p.grad[is_shared], g_plain[is_shared])
    assert changed  # the method did act on the shared entries


def wait_for_checkpoint_inside_epoch(sidecar, epoch: int = 2, seconds: float = 300.0, poll: float = 0.005) -> None:
    """Return once the run's checkpoint sidecar (`NAME.partial/checkpoint.json`) names a step
    inside `epoch` (not its start), or after `seconds`: the moment a crash test kills the run."""
    import json
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            info = json.loads(sidecar.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            info = {}
        if info.get("epoch") == epoch and info.get("step_in_epoch", 0) > 0:
            return
        time.sleep(poll)


def exported_equals_predict(raw: dict, folder, rows: int = 40, torchscript: bool = False):
    """Train the config `raw` into `folder`, export it to ONNX (and TorchScript) and check the
    exported model's predictions on `rows` test rows equal `TrainedModel.predict` (1e-5).
    Returns (the run, the loaded model, the rows, the config)."""
    import numpy as np
    import onnxruntime

    from mtlrec.config import load_config
    from mtlrec.experiment import load_splits, run_experiment
    from mtlrec.export import export_onnx, export_torchscript
    from mtlrec.trained import load

    cfg = load_config(raw)
    result = run_experiment(cfg, folder)
    trained = load(folder)
    table = load_splits(cfg).test.head(rows).reset_index(drop=True)
    expected = trained.predict(table).to_numpy()
    session = onnxruntime.InferenceSession(str(export_onnx(trained, folder / "m.onnx")))
    sparse = {f.name: np.array([str(v) for v in table[f.name]], dtype=object) for f in cfg.schema.sparse}
    dense = table[[f.name for f in cfg.schema.dense]].to_numpy(dtype=np.float32).copy()
    np.testing.assert_allclose(session.run(["predictions"], sparse | {"dense": dense})[0], expected, atol=1e-5, rtol=0)
    if torchscript:
        scorer = torch.jit.load(str(export_torchscript(trained, folder / "m.pt")))
        got = scorer({k: list(v) for k, v in sparse.items()}, torch.from_numpy(dense)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    return result, trained, table, cfg

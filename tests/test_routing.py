"""Routed MMoE / CGC / PLE (DeepSeekMoE top-k routing with always-on experts) against plain
implementations of the papers' equations, the two load balancers, sparse dispatch, export and
the load analysis.

The references loop over experts, gates and rows one by one in float64, reading the weights out
of the model under test; the top-k choice is Python's `sorted`, not torch.topk.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import dense_schema, mix, plain_gate, plain_mlp

from mtlrec import models
from mtlrec.analysis.utilisation import gate_load, gate_utilisation, load_imbalance, utilisation_table
from mtlrec.config import load_config
from mtlrec.data.features import Features
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.export import export_onnx
from mtlrec.nn.routing import Router, Routing
from mtlrec.trained import load

TOL = 1e-6


def build(name, n_tasks=2, rows=9, **options):
    torch.manual_seed(0)
    model = models.create(name, dense_schema(6, tasks=[f"t{k}" for k in range(n_tasks)]), **options).double()
    return model, torch.randn(rows, 6, dtype=torch.float64)


def levels_of(backbone):
    return list(backbone.levels) if hasattr(backbone, "levels") else [backbone.level]


def plain_top_k(s, k, renormalise, bias):
    """DeepSeekMoE Eq. 10 (and V3 Eq. 13 when renormalised; V3 Eq. 16 with a bias): per row, keep
    s_i for the k largest s_i + b_i, 0 for the others."""
    score = (s + bias).detach()
    g = torch.zeros_like(s)
    for b in range(s.shape[0]):
        for j in sorted(range(s.shape[1]), key=lambda j: -float(score[b, j]))[:k]:
            g[b, j] = s[b, j]
        if renormalise:
            g[b] = g[b] / g[b].sum()
    return g


def plain_routed(backbone, x, task_experts, shared_experts, k, renormalise, inputs=None):
    """PLE Eq. 2-5 with every gate routed (DeepSeekMoE Eq. 9-11): task k's gate keeps the top k of
    its own and the shared experts, the shared gate of all experts; always-on experts, read from
    the shared input, are added with weight 1. Expert order: task 0's, ..., shared (documented).
    `inputs`, a list, receives each level's gate inputs (x_1, ..., x_T, x_s)."""
    t = len(task_experts)
    x_tasks, x_shared = [x] * t, x
    for level in levels_of(backbone):
        if inputs is not None:
            inputs.append(x_tasks + [x_shared])
        bank, bias = level.experts, level.router.bias
        start = [sum(task_experts[:j]) for j in range(t)]
        first_shared = sum(task_experts)
        own = [list(range(start[j], start[j] + m)) for j, m in enumerate(task_experts)]
        shared = list(range(first_shared, first_shared + shared_experts))
        out = {e: plain_mlp(x_tasks[j], bank.expert_layers(e)) for j in range(t) for e in own[j]}
        out |= {e: plain_mlp(x_shared, bank.expert_layers(e)) for e in shared}
        always = 0.0
        if level.always_on is not None:
            always = sum(plain_mlp(x_shared, level.always_on.expert_layers(i)) for i in range(level.always_on.num_experts))
        y_tasks = []
        for j in range(t):
            columns = own[j] + shared
            g = plain_top_k(plain_gate(x_tasks[j], level.gates[j]), k, renormalise, bias[j, columns])
            y_tasks.append(always + mix(g, [out[e] for e in columns]))
        if len(level.gates) == t + 1:
            columns = [e for group in own for e in group] + shared
            g = plain_top_k(plain_gate(x_shared, level.gates[t]), k, renormalise, bias[t, columns])
            x_shared = always + mix(g, [out[e] for e in columns])
        x_tasks = y_tasks
    return torch.stack(x_tasks, dim=1)


def randomise_bias(model):
    with torch.no_grad():
        for level in levels_of(model.backbone):
            level.router.bias.copy_(torch.randn_like(level.router.bias) * 0.2)


@pytest.mark.parametrize("gate_hidden", [[], [5]])  # one fused matmul for all gates / a gate MLP each
@pytest.mark.parametrize("renormalise", [False, True])
@pytest.mark.parametrize("always_on", [0, 2])
def test_routed_mmoe_equals_the_paper(gate_hidden, renormalise, always_on):
    model, x = build("mmoe", 3, num_experts=6, expert_hidden=[7, 4], gate_hidden=gate_hidden, top_k=2,
                     renormalise=renormalise, always_on_experts=always_on)
    reps, gates, penalty, _ = model.backbone(x)
    torch.testing.assert_close(reps, plain_routed(model.backbone, x, [0, 0, 0], 6, 2, renormalise), atol=TOL, rtol=0)
    assert penalty is None
    for g in gates.values():  # what `analyze` reads: the kept weights over the routed experts
        assert g.shape == (9, 6) and ((g > 0).sum(1) == 2).all()
        if renormalise:
            torch.testing.assert_close(g.sum(1), torch.ones(9, dtype=torch.float64))
        else:
            assert (g.sum(1) < 1).all()


@pytest.mark.parametrize("balance", ["none", "bias"])
@pytest.mark.parametrize("renormalise", [False, True])
@pytest.mark.parametrize(
    "num_levels, task_experts, shared_experts, expert_hidden, n_tasks, gate_hidden",
    [
        (1, [1, 3], 2, [7, 4], 2, []),          # CGC, per-task experts of unequal counts
        (2, [2, 1], 1, [[7, 5], [3]], 2, [5]),  # PLE, sizes per level, gate MLPs
        (3, [1, 2, 3], 2, [6], 3, []),          # PLE, 3 levels, 3 tasks
    ],
)
def test_routed_cgc_and_ple_equal_the_paper(num_levels, task_experts, shared_experts, expert_hidden, n_tasks,
                                            gate_hidden, renormalise, balance):
    name, extra = ("cgc", {}) if num_levels == 1 else ("ple", {"num_levels": num_levels})
    model, x = build(name, n_tasks, task_experts=task_experts, shared_experts=shared_experts, gate_hidden=gate_hidden,
                     expert_hidden=expert_hidden, top_k=2, renormalise=renormalise, always_on_experts=1,
                     balance=balance, **extra)
    if balance == "bias":
        randomise_bias(model)  # it changes the choice (not the weights): the reference adds it before sorting
    reps = model.backbone(x).task_reps
    expected = plain_routed(model.backbone, x, task_experts, shared_experts, 2, renormalise)
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)


def test_balance_loss_equals_deepseekmoe_eq_12_to_14():
    model, x = build("ple", 2, rows=11, num_levels=2, task_experts=[2, 3], shared_experts=2, expert_hidden=[5],
                     top_k=2, balance="aux_loss", balance_weight=0.3)
    bb = model.backbone.train()
    inputs = []
    plain_routed(bb, x, [2, 3], 2, 2, False, inputs)  # each level's gate inputs
    expected = 0.0
    for level, level_inputs in zip(bb.levels, inputs):  # one term per gate, summed:
        for g, gate in enumerate(level.gates):  # L = alpha_1 sum_i f_i P_i
            s = plain_gate(level_inputs[g], gate)  # [T, N']
            kept = plain_top_k(s, 2, False, torch.zeros(s.shape[1], dtype=s.dtype)) > 0
            t, n = s.shape
            f = n / (2 * t) * kept.sum(0).double()  # f_i = N'/(K'T) sum_t 1(row t keeps i)
            expected = expected + 0.3 * (f * s.mean(0)).sum()  # P_i = (1/T) sum_t s_i,t
    assert len(inputs) == 2 and sum(len(level.gates) for level in bb.levels) == 5  # 3 gates, then 2
    penalty = bb(x).penalty
    torch.testing.assert_close(penalty, expected, atol=TOL, rtol=0)
    penalty.backward()  # the loss moves the gates (through P); experts only through later levels' gate inputs
    assert all(p.grad.abs().max() > 0 for level in bb.levels for p in level.gates.parameters())
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in bb.levels[-1].experts.parameters())
    assert any(p.grad.abs().max() > 0 for p in bb.levels[0].experts.parameters())
    assert bb.eval()(x).penalty is None  # a training term only


def test_bias_chooses_the_experts_but_the_weights_stay_the_softmax():
    model, x = build("mmoe", 2, num_experts=6, expert_hidden=[4], top_k=2, balance="bias")
    level = model.backbone.level
    s = [plain_gate(x, gate) for gate in level.gates]
    unbiased = level(x).gates["gate/t0"]
    with torch.no_grad():
        level.router.bias[0, [3, 5]] = 2.0  # above any softmax difference: gate t0 keeps experts 3 and 5
    gates = level(x).gates
    kept = torch.zeros(9, 6, dtype=torch.bool)
    kept[:, [3, 5]] = True
    torch.testing.assert_close(gates["gate/t0"], torch.where(kept, s[0], 0.0), atol=TOL, rtol=0)  # s_i, not s_i + b_i
    assert not torch.equal(gates["gate/t0"] > 0, unbiased > 0)  # the choice did change
    torch.testing.assert_close(gates["gate/t1"], plain_top_k(s[1], 2, False, torch.zeros(6, dtype=s[1].dtype)),
                               atol=TOL, rtol=0)  # another gate's bias is its own


def skewed_router_model(bias_step):
    """An MMoE whose gates prefer experts 0 and 1 (their logits' bias +3; the weights x4, so that
    the rows' affinities vary)."""
    model, _ = build("mmoe", 2, num_experts=8, expert_hidden=[4], top_k=2, balance="bias", bias_step=bias_step)
    with torch.no_grad():
        for gate in model.backbone.level.gates:
            gate.net[0].weight.mul_(4.0)
            gate.net[0].bias.zero_()
            gate.net[0].bias[:2] = 3.0
    return model.backbone.train()


def test_bias_moves_the_load_toward_balance():
    bb = skewed_router_model(bias_step=0.005)
    router = bb.level.router
    generator = torch.Generator().manual_seed(1)
    imbalances = []
    for _ in range(100):
        bb(torch.randn(256, 6, dtype=torch.float64, generator=generator))
        imbalances.append(router.load.max(1).values / router.load.mean(1))  # per gate, this forward's rows
        before = router.bias.clone()
        router.after_optimizer_step()  # what the trainer calls after each optimizer step
        expected = before + 0.005 * torch.sign(router.load.mean(1, keepdim=True) - router.load)
        torch.testing.assert_close(router.bias, expected, atol=1e-12, rtol=0)
    first, last = imbalances[0], torch.stack(imbalances[-20:]).mean(0)
    assert (first > 2.0).all()  # 8 experts, 2 kept: 4 if every row kept the same two
    assert (last < 0.65 * first).all() and (last < 1.5).all()
    assert (router.bias[:, :2] < 0).all() and (router.bias[:, :2].max() < router.bias[:, 2:].min())
    summary = router.end_epoch()  # over the 100 forwards, for the epoch's log
    assert set(summary) == {"load_imbalance/gate/t0", "load_imbalance/gate/t1"}
    assert 1.0 < summary["load_imbalance/gate/t0"] < float(first[0])
    assert router.epoch_load.sum() == 0


def test_no_bias_update_without_the_bias_balance():
    model, x = build("mmoe", 2, num_experts=4, expert_hidden=[4], top_k=1, balance="aux_loss")
    router = model.backbone.level.router
    model.backbone.train()(x)
    router.after_optimizer_step()
    assert router.bias.abs().max() == 0 and router.load.sum() == 2 * 9  # 2 gates x 9 rows x 1 kept


def _bias_step_on_rank(rank, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    router = Router(torch.ones(1, 4, dtype=torch.bool), Routing(top_k=1, balance="bias", bias_step=0.5), ["g"])
    router.load.copy_(torch.tensor([[6.0, 0.0, 1.0, 1.0]] if rank == 0 else [[0.0, 5.0, 1.0, 2.0]]))
    router.after_optimizer_step()
    torch.save(router.bias, os.path.join(folder, f"bias{rank}.pt"))
    dist.destroy_process_group()


def test_bias_update_reads_the_load_of_every_process(tmp_path):
    mp.start_processes(_bias_step_on_rank, args=(str(tmp_path),), nprocs=2, start_method="fork")  # torch loaded
    biases = [torch.load(tmp_path / f"bias{r}.pt") for r in range(2)]
    # summed load [6, 5, 2, 3], mean 4: b = 0.5 * sign(4 - load); rank 0 alone would give [-, +, +, +]
    torch.testing.assert_close(biases[0], torch.tensor([[-0.5, -0.5, 0.5, 0.5]]))
    torch.testing.assert_close(biases[1], biases[0])


@pytest.mark.parametrize("name, options", [
    ("mmoe", {"num_experts": 8, "expert_hidden": [6, 4]}),
    ("ple", {"num_levels": 2, "task_experts": [2, 3], "shared_experts": 2, "expert_hidden": [[6], [5, 4]]}),
    ("cgc", {"task_experts": 3, "shared_experts": 1, "expert_hidden": [5], "gate_hidden": [4]}),
])
def test_sparse_dispatch_equals_dense(name, options):
    outs = {}
    for dispatch in ("dense", "sparse"):
        model, x = build(name, 2, rows=13, top_k=2, always_on_experts=1, balance="aux_loss", dispatch=dispatch,
                         **options)
        x.requires_grad_(True)
        out = model.backbone.train()(x)
        weight = torch.linspace(-1, 1, out.task_reps.numel(), dtype=torch.float64).view_as(out.task_reps)
        ((out.task_reps * weight).sum() + out.penalty).backward()
        outs[dispatch] = (out, x.grad, {n: p.grad for n, p in model.backbone.named_parameters()})
    (dense, dense_x, dense_grads), (sparse, sparse_x, sparse_grads) = outs["dense"], outs["sparse"]
    torch.testing.assert_close(sparse.task_reps, dense.task_reps, atol=1e-12, rtol=0)
    torch.testing.assert_close(sparse.penalty, dense.penalty, atol=1e-12, rtol=0)
    torch.testing.assert_close(sparse_x, dense_x, atol=1e-12, rtol=0)
    assert dense_grads.keys() == sparse_grads.keys()
    for n, g in dense_grads.items():
        torch.testing.assert_close(sparse_grads[n], g, atol=1e-12, rtol=0, msg=n)


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_gradients_reach_only_the_chosen_experts(dispatch):
    model, x = build("mmoe", 2, rows=1, num_experts=8, expert_hidden=[5, 4], top_k=2, dispatch=dispatch)
    level = model.backbone.level
    out = level(x)
    out.task_reps.sum().backward()
    chosen = set()
    for g in out.gates.values():
        chosen |= set(torch.nonzero(g[0]).flatten().tolist())
    assert 2 <= len(chosen) <= 4  # one row, two gates, two experts each
    for e in range(8):
        reached = any(w.grad[e].abs().max() > 0 for w in list(level.experts.weights) + list(level.experts.biases))
        assert reached == (e in chosen), e


@pytest.mark.parametrize("name, options", [
    ("mmoe", {"num_experts": 5, "expert_hidden": [6]}),  # 5 experts per gate
    ("cgc", {"task_experts": [2, 2], "shared_experts": 1, "expert_hidden": [6], "gate_hidden": [3]}),  # 3 per gate
])
def test_keeping_every_expert_is_the_dense_model_bit_for_bit(name, options):
    dense, x = build(name, **options)
    routed, _ = build(name, **options, top_k=5 if name == "mmoe" else 3)
    assert not any("router" in k or "always_on" in k for k in dense.state_dict())  # defaults: today's model
    assert {k for k in routed.state_dict() if "router" not in k} == set(dense.state_dict())
    f = Features(x[:, :0].long(), x)
    assert torch.equal(routed(f).logits, dense(f).logits)


def test_routing_errors():
    schema = dense_schema(6)
    cases = [
        ("mmoe", {"num_experts": 4, "top_k": 5}, "top_k = 5 exceeds num_experts = 4"),
        ("cgc", {"task_experts": [1, 3], "shared_experts": 1, "top_k": 3},
         "top_k = 3 exceeds the 2 experts a task's gate routes among"),
        ("mmoe", {"balance": "bias"}, "balance = 'bias' needs top_k"),
        ("mmoe", {"balance": "aux_loss"}, "balance = 'aux_loss' needs top_k"),
        ("ple", {"dispatch": "sparse"}, "dispatch = 'sparse' needs top_k"),
        ("mmoe", {"renormalise": True}, "renormalise = True needs top_k"),
        ("mmoe", {"top_k": 2, "balance_weight": 0.1}, "balance_weight is the weight of balance = 'aux_loss'"),
        ("mmoe", {"top_k": 2, "balance": "aux_loss", "bias_step": 0.1}, "bias_step is the step of balance = 'bias'"),
        ("mmoe", {"top_k": 2, "dispatch": "sparse", "batch_norm": True}, "dispatch = 'sparse' cannot run batch_norm"),
        ("mmoe", {"top_k": 0}, "top_k: Input should be greater than 0"),
        ("mmoe", {"top_k": 2, "balance": "loss"}, "balance: Input should be 'none', 'aux_loss' or 'bias'"),
        ("adatt", {"top_k": 2}, r"model 'adatt' has no option\(s\) \['top_k'\]"),
    ]
    for name, options, message in cases:
        with pytest.raises(ValueError, match=message):
            models.create(name, schema, **options)
    with pytest.raises(ValueError, match="top_k = 3 exceeds the 2 experts gate 'g/b' routes among"):
        Router(torch.tensor([[True, True, True], [True, False, True]]), Routing(top_k=3), ["g/a", "g/b"])
    with pytest.raises(ValueError, match="balance must be one of"):
        Routing(top_k=1, balance="loss")


@pytest.fixture(scope="module")
def trained_routed(tmp_path_factory):
    """A routed PLE (sparse dispatch, bias balance, an always-on expert) trained through a config."""
    folder = tmp_path_factory.mktemp("routed")
    raw = {"seed": 2, "data": {"synthetic": {"rows": 600, "dim": 6, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": "ple", "task_experts": 3, "shared_experts": 2, "expert_hidden": [8], "tower_hidden": [4],
                     "top_k": 2, "always_on_experts": 1, "balance": "bias", "bias_step": 0.01, "dispatch": "sparse"},
           "train": {"epochs": 2, "batch_size": 128, "progress": False}}
    cfg = load_config(raw)
    result = run_experiment(cfg, folder)
    return folder, cfg, result, raw


def test_trained_routed_model_reloads_its_bias_and_exports(trained_routed, tmp_path):
    import onnxruntime

    folder, cfg, result, _ = trained_routed
    trained = load(folder)
    for before, after in zip(levels_of(result.trained.model.backbone), levels_of(trained.model.backbone)):
        assert before.router.bias.abs().max() > 0  # the trainer moved it after each step
        torch.testing.assert_close(after.router.bias, before.router.bias, atol=0, rtol=0)  # and it is saved
    table = load_splits(cfg).test.head(40).reset_index(drop=True)
    table["c0"] = table["c0"].astype(str)
    expected = trained.predict(table).to_numpy()
    export_onnx(trained, tmp_path / "m.onnx")  # traced: the level runs densely, the same numbers
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    sparse = {f.name: np.array([str(v) for v in table[f.name]], dtype=object) for f in cfg.schema.sparse}
    dense = table[[f.name for f in cfg.schema.dense]].to_numpy(dtype=np.float32)
    got = session.run(["predictions"], sparse | {"dense": dense})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_analysis_reports_each_routed_gates_load(trained_routed):
    folder, cfg, _, raw = trained_routed
    trained = load(folder)
    table = load_splits(cfg).test
    loads = gate_load(trained, table, batch_size=97)
    with torch.no_grad():
        gates = trained.model.eval()(trained.encoder.transform(table, labels=False).features).gates
    assert set(loads) == set(gates)  # every gate of a routed PLE is routed
    for name, weights in gates.items():
        torch.testing.assert_close(loads[name], (weights > 0).double().mean(0), atol=1e-12, rtol=0)
        assert loads[name].sum().item() == pytest.approx(2.0)  # each row keeps top_k = 2 experts
    imbalances = load_imbalance(loads)
    assert imbalances["level1/y1"] == pytest.approx((loads["level1/y1"].max() / loads["level1/y1"].mean()).item())
    rows = utilisation_table(trained, gate_utilisation(trained, table), loads)
    y1 = rows[rows["gate"] == "level2/y1"]
    assert list(y1["owner"]) == ["own"] * 3 + ["shared"] * 2
    np.testing.assert_allclose(y1["load"].to_numpy(), loads["level2/y1"].numpy())
    dense = raw | {"model": {"name": "mmoe", "expert_hidden": [4], "tower_hidden": [4]},
                   "train": {"epochs": 1, "progress": False}}
    assert gate_load(run_experiment(load_config(dense)).trained, table.head(50)) == {}  # dense gates: none routed


def test_each_epoch_logs_the_routers_load_imbalance_and_analyze_prints_it(tmp_path, tiny_config, capsys):
    from mtlrec.cli import main

    raw = tiny_config | {"model": {"name": "routed_moe", "num_experts": 4, "expert_hidden": [8], "tower_hidden": [4]}}
    raw["train"] = raw["train"] | {"epochs": 2}
    cfg = load_config(raw)
    result = run_experiment(cfg, tmp_path / "m")
    for row in result.history:
        keys = [k for k in row if k.startswith("load_imbalance/")]
        assert sorted(keys) == ["load_imbalance/gate/y1", "load_imbalance/gate/y2"]
        assert all(1.0 <= row[k] <= 4 / 2 for k in keys)  # max/mean load: 1 balanced, E/k all rows on k experts
    load_splits(cfg).test.to_csv(tmp_path / "t.csv", index=False)
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "max load / mean load" in printed and "gate/y1" in printed

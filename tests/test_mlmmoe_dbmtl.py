"""Multi-level MMoE and DBMTL against their definitions: plain implementations written here
(float64, one expert, gate and layer at a time, weights read from the model); the gradient
paths DBMTL's dependencies open; option errors; ONNX export."""

import pytest
import torch
from helpers import dense_schema, exported_equals_predict, mix, plain_gate
from helpers import linear_layers as layers_of
from helpers import plain_mlp as mlp

import mtlrec.models.ml_mmoe  # noqa: F401  (registers ml_mmoe until the zoo imports it)
from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.models.base import shared_parameters
from mtlrec.models.dbmtl import bayes_order  # registers dbmtl

TOL = 1e-6


def build(name, tasks=("a", "b"), **options):
    torch.manual_seed(0)
    model = models.create(name, dense_schema(5, tasks=tasks), **options).double()
    return model, torch.randn(7, 5, dtype=torch.float64)


def logits_of(model, x):
    return model(Features(x[:, :0].long(), x)).logits


def plain_towers(model, reps):
    return torch.stack([mlp(reps[:, k], layers_of(tower), activate_last=False)[:, 0]
                        for k, tower in enumerate(model.towers)], dim=1)


# ------------------------------------------------------------------------------ multi-level MMoE
def plain_ml_mmoe(bb, x, n_tasks):
    """z_i^(1) = x; z_i^(j+1) = sum_m g_i^(j)(x)_m f_m^(j)(z_m^(j)); h_k = sum_m g_k^(L)(x)_m f_m^(L)(z_m^(L)).
    Every gate reads x. Returns h `[B, T, H]` and every gate's weights by name."""
    inputs, gates = None, {}
    for j, level in enumerate(bb.levels):
        count = level.experts.num_experts
        experts = [mlp(x if j == 0 else inputs[i], level.experts.expert_layers(i)) for i in range(count)]
        top = j == len(bb.levels) - 1
        owners = [f"t{k}" for k in range(n_tasks)] if top else [f"expert{i}" for i in range(bb.levels[j + 1].experts.num_experts)]
        weights = [plain_gate(x, gate) for gate in level.gates]
        assert len(weights) == len(owners)
        gates |= {f"level{j + 1}/{o}": w for o, w in zip(owners, weights)}
        inputs = [mix(w, experts) for w in weights]
    return torch.stack(inputs, dim=1), gates


@pytest.mark.parametrize("gate_hidden", [[], [4]])
@pytest.mark.parametrize("levels, num_experts, expert_hidden, n_tasks", [
    (2, [3, 2], [[7, 5], [4]], 2),  # counts and sizes per level
    (3, 2, [6], 3),                 # one count, one size for every level
    (2, [1, 4], [5], 2),            # one expert below four
])
def test_ml_mmoe_equals_its_definition(levels, num_experts, expert_hidden, n_tasks, gate_hidden):
    tasks = tuple(f"t{k}" for k in range(n_tasks))
    model, x = build("ml_mmoe", tasks=tasks, num_levels=levels, num_experts=num_experts,
                     expert_hidden=expert_hidden, gate_hidden=gate_hidden, tower_hidden=[3])
    reps, gates, _, _ = model.backbone(x)
    expected, expected_gates = plain_ml_mmoe(model.backbone, x, n_tasks)
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)
    assert list(gates) == list(expected_gates)
    for name, w in gates.items():
        torch.testing.assert_close(w, expected_gates[name], atol=TOL, rtol=0)
        torch.testing.assert_close(w.sum(1), torch.ones(7, dtype=torch.float64))
        assert len(model.backbone.gate_experts[name]) == w.shape[1]
    torch.testing.assert_close(logits_of(model, x), plain_towers(model, expected), atol=TOL, rtol=0)


def test_ml_mmoe_with_one_level_is_mmoe():
    """One level: y_k = sum_i g_k(x)_i f_i(x) (MMoE, Ma et al. 2018, Eq. 5-6), and the same
    numbers as the `mmoe` model holding the same weights."""
    options = {"num_experts": 4, "expert_hidden": [6, 3], "gate_hidden": [5], "tower_hidden": [3]}
    ml, x = build("ml_mmoe", tasks=("a", "b", "c"), num_levels=1, **options)
    level = ml.backbone.levels[0]
    experts = [mlp(x, level.experts.expert_layers(i)) for i in range(4)]
    expected = torch.stack([mix(plain_gate(x, level.gates[k]), experts) for k in range(3)], dim=1)
    reps, gates, _, _ = ml.backbone(x)
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)

    mmoe, _ = build("mmoe", tasks=("a", "b", "c"), **options)
    mmoe.backbone.level.load_state_dict(level.state_dict())
    mmoe.towers.load_state_dict(ml.towers.state_dict())
    mmoe_reps, mmoe_gates, _, _ = mmoe.backbone(x)
    torch.testing.assert_close(reps, mmoe_reps, atol=TOL, rtol=0)
    for task in "abc":
        torch.testing.assert_close(gates[f"level1/{task}"], mmoe_gates[f"gate/{task}"], atol=TOL, rtol=0)
    torch.testing.assert_close(logits_of(ml, x), logits_of(mmoe, x), atol=TOL, rtol=0)


def test_ml_mmoe_names_its_gates_and_a_task_trains_only_its_own_top_gate():
    model, x = build("ml_mmoe", num_levels=2, num_experts=[3, 2], expert_hidden=[4])
    bb = model.backbone
    assert bb.gate_experts == {
        "level1/expert0": ["level1/shared/0", "level1/shared/1", "level1/shared/2"],
        "level1/expert1": ["level1/shared/0", "level1/shared/1", "level1/shared/2"],
        "level2/a": ["level2/shared/0", "level2/shared/1"],
        "level2/b": ["level2/shared/0", "level2/shared/1"],
    }
    assert bb.task_modules(1) == [bb.levels[1].gates[1]]
    logits_of(model, x)[:, 0].sum().backward()  # task a's loss alone
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in bb.levels[1].gates[1].parameters())  # b's gate
    assert all(p.grad.abs().max() > 0 for p in bb.levels[1].gates[0].parameters())
    assert all(p.grad.abs().max() > 0 for g in bb.levels[0].gates for p in g.parameters())  # shared below
    assert all(p.grad.abs().max() > 0 for p in bb.levels[0].experts.weights)


@pytest.mark.parametrize("options, message", [
    ({"num_levels": 2, "num_experts": [2, 2, 2]}, "num_experts has 3 counts for 2 levels"),
    ({"num_levels": 3, "expert_hidden": [[4], [4]]}, "expert_hidden has 2 lists for 3 levels"),
    ({"expert_hidden": []}, "expert_hidden needs at least one layer"),
    ({"num_experts": 0}, "num_experts"),
])
def test_ml_mmoe_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        models.create("ml_mmoe", dense_schema(5), **options)


# ------------------------------------------------------------------------------------------ DBMTL
def plain_dbmtl(model, x, names, dependencies, experts):
    """b = MLP(x); u_k = b or MMoE_k(b); t_k = MLP_k(u_k); r_k = R_k([t_k; r_parents]);
    logit_k = w_k r_k + c_k, computed by recursion over the parents (not the model's order)."""
    b = mlp(x, layers_of(model.backbone.bottom))
    if experts:
        level = model.backbone.mixture.level
        f = [mlp(b, level.experts.expert_layers(i)) for i in range(experts)]
        u = [mix(plain_gate(b, level.gates[k]), f) for k in range(len(names))]
    else:
        u = [b] * len(names)
    relation = {}

    def r(task):
        if task not in relation:
            k = names.index(task)
            t = mlp(u[k], layers_of(model.towers[k].task_layers))
            inputs = torch.cat([t] + [r(p) for p in dependencies.get(task, [])], dim=1)
            relation[task] = mlp(inputs, layers_of(model.towers[k].relation))
        return relation[task]

    return torch.stack([mlp(r(t), layers_of(model.towers[k].output), activate_last=False)[:, 0]
                        for k, t in enumerate(names)], dim=1)


@pytest.mark.parametrize("names, dependencies, options", [
    (("click", "buy"), {"buy": ["click"]}, {}),
    (("c", "b", "a"), {"c": ["a", "b"], "b": ["a"]}, {"num_experts": 3, "expert_hidden": [5], "gate_hidden": [4]}),
    (("x", "y", "z"), {"x": ["z"]}, {"relation_hidden": [], "tower_hidden": [4, 3]}),  # r_k: the concatenation
])
def test_dbmtl_equals_its_definition(names, dependencies, options):
    model, x = build("dbmtl", tasks=names, hidden=[6], dependencies=dependencies, **{"tower_hidden": [5]} | options)
    expected = plain_dbmtl(model, x, list(names), dependencies, options.get("num_experts", 0))
    out = model(Features(x[:, :0].long(), x))
    torch.testing.assert_close(out.logits, expected, atol=TOL, rtol=0)
    assert sorted(out.gates) == (sorted(f"gate/{t}" for t in names) if "num_experts" in options else [])


def test_dbmtl_task_without_dependencies_is_a_plain_tower_and_a_child_reads_its_parent():
    model, x = build("dbmtl", tasks=("click", "buy"), hidden=[6], tower_hidden=[5], relation_hidden=[4],
                     dependencies={"buy": ["click"]})
    b = mlp(x, layers_of(model.backbone.bottom))
    click, buy = model.towers
    tower = layers_of(click.task_layers) + layers_of(click.relation) + layers_of(click.output)  # one MLP
    logits = logits_of(model, x)
    torch.testing.assert_close(logits[:, 0], mlp(b, tower, activate_last=False)[:, 0], atol=TOL, rtol=0)
    # buy's relation layer reads [t_buy; r_click]: its first weight has 5 + 4 inputs
    assert buy.relation[0].in_features == 5 + 4 and click.relation[0].in_features == 5
    r_click = mlp(mlp(b, layers_of(click.task_layers)), layers_of(click.relation))
    r_buy = mlp(torch.cat([mlp(b, layers_of(buy.task_layers)), r_click], 1), layers_of(buy.relation))
    torch.testing.assert_close(logits[:, 1], mlp(r_buy, layers_of(buy.output), activate_last=False)[:, 0],
                               atol=TOL, rtol=0)
    with torch.no_grad():  # a change in click's relation layer moves buy's prediction too
        click.relation[0].bias.add_(1.0)
    assert not torch.allclose(logits_of(model, x)[:, 1], logits[:, 1])


def test_dbmtl_computes_parents_first_whatever_the_schema_order():
    model, _ = build("dbmtl", tasks=("repeat", "buy", "click"), dependencies={"buy": ["click"], "repeat": ["buy"]})
    assert model.order == [2, 1, 0]
    assert model.parents == [[1], [2], []]
    assert bayes_order(["a", "b", "c"], {"a": ["c"]}) == ["b", "c", "a"]  # config order where allowed


def grads_after(model, x, task):
    model.zero_grad(set_to_none=True)
    logits_of(model, x)[:, task].sum().backward()
    return {id(p): p.grad for p in model.parameters()}


def nonzero(grad):
    return grad is not None and grad.abs().max() > 0


def test_dbmtl_child_loss_reaches_its_parents_tower_and_ownership_follows():
    model, x = build("dbmtl", tasks=("click", "buy", "like"), hidden=[6], tower_hidden=[5], num_experts=2,
                     expert_hidden=[4], dependencies={"buy": ["click"]})
    click, buy, like = model.towers
    gates = model.backbone.mixture.level.gates
    from_click, from_buy, from_like = (grads_after(model, x, k) for k in range(3))
    for module in (click.task_layers, click.relation, gates[0]):  # the parent's layers learn from buy's loss
        assert all(nonzero(from_buy[id(p)]) for p in module.parameters())
    assert not any(nonzero(from_buy[id(p)]) for p in click.output.parameters())  # its output layer does not
    assert not any(nonzero(from_buy[id(p)]) for p in [*like.parameters(), *gates[2].parameters()])
    assert not any(nonzero(from_click[id(p)]) for p in buy.parameters())  # a parent never reads its child
    # task_parameters(k): exactly what no other task's prediction reaches
    grads = [from_click, from_buy, from_like]
    for k in range(3):
        for j in set(range(3)) - {k}:
            assert not any(nonzero(grads[j][id(p)]) for p in model.task_parameters(k))
    assert {id(p) for p in model.task_parameters(0)} == {id(p) for p in click.output.parameters()}
    assert {id(p) for p in model.task_parameters(1)} == {id(p) for p in [*buy.parameters(), *gates[1].parameters()]}
    shared = {id(p) for p in shared_parameters(model, 3).params}
    assert all(id(p) in shared for p in [*click.task_layers.parameters(), *click.relation.parameters()])


@pytest.mark.parametrize("dependencies, message", [
    ({"buy": ["cart"]}, r"dependencies name unknown task\(s\) \['cart'\]"),
    ({"checkout": ["click"]}, r"unknown task\(s\) \['checkout'\]"),
    ({"click": ["buy"], "buy": ["click"]}, "cycle: click depends on buy, buy depends on click"),
    ({"like": ["like"]}, "cycle: like depends on like"),
    ({"buy": ["click"], "like": ["buy"], "click": ["like"]},
     "cycle: buy depends on click, click depends on like, like depends on buy"),
    ({"buy": ["click", "click"]}, "dependencies of 'buy' list a task twice"),
])
def test_dbmtl_dependency_errors_name_the_tasks(dependencies, message):
    with pytest.raises(ValueError, match=message):
        models.create("dbmtl", dense_schema(5, tasks=("click", "buy", "like")), dependencies=dependencies)


def test_dbmtl_cycles_fail_at_config_load_and_mmoe_options_need_experts():
    with pytest.raises(ValueError, match="cycle"):
        models.check_options("dbmtl", {"dependencies": {"a": ["b"], "b": ["a"]}})
    with pytest.raises(ValueError, match="expert_hidden shape the MMoE bottom: set num_experts > 0"):
        models.check_options("dbmtl", {"expert_hidden": [8]})
    models.check_options("dbmtl", {"expert_hidden": [8], "num_experts": 2})


# ------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("model", [
    {"name": "ml_mmoe", "num_levels": 2, "num_experts": [3, 2], "expert_hidden": [[8], [4]], "gate_hidden": [4]},
    {"name": "dbmtl", "hidden": [8], "num_experts": 2, "expert_hidden": [6], "relation_hidden": [4],
     "dependencies": {"y2": ["y1"]}, "batch_norm": True},
])
def test_onnx_export_equals_pytorch(model, tmp_path):
    raw = {"seed": 1, "data": {"synthetic": {"rows": 400, "dim": 5, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"tower_hidden": [4], **model}, "train": {"epochs": 1, "batch_size": 64, "progress": False}}
    exported_equals_predict(raw, tmp_path / "model", rows=30)

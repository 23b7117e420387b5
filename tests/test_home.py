"""HoME (Wang et al. 2024) against a plain implementation of its equations, written here: float64,
one expert and one gate at a time, the wiring taken from the paper (which experts each gate
sees, which input each expert reads), the weights read out of the model by expert label."""

import doctest

import pytest
import torch
from helpers import dense_schema, exported_equals_predict, linear_layers, mix, plain_gate, plain_mlp

from mtlrec import models
from mtlrec.data.features import Features
from mtlrec.models import home
from mtlrec.models.base import shared_parameters
from mtlrec.models.home import LowRankFeatureGates

TOL = 1e-6
TRICKS = {"expert_norm": True, "hierarchy": True, "feature_gate": True, "self_gate": True}


def build(tasks=("a", "b", "c"), rows=9, **options):
    torch.manual_seed(0)
    options = {"expert_hidden": [6, 4]} | options
    model = models.create("home", dense_schema(5, tasks=tasks), **options).double()
    with torch.no_grad():  # every weight away from its start: feature-gates off 1, batch norm off identity
        for name, p in model.named_parameters():
            if name.endswith(".up") or ".norms." in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith(".weight") else 0.0))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return model, torch.randn(rows, 5, dtype=torch.float64)


def no_ids(x):
    return x[:, :0].long()


# -- the plain implementation ---------------------------------------------------------------------


def plain_expert(x, level, label, o, training):
    """Expert normalisation & Swish: Linear -> BN -> Swish per layer (off: Linear -> ReLU); with the
    feature-gate the expert reads x * 2 sigmoid(x D U)."""
    e = level.labels.index(label)
    if o["feature_gate"]:
        x = x * 2 * torch.sigmoid(x @ level.feature_gates.down[e] @ level.feature_gates.up[e])
    for layer, (w, b) in enumerate(level.experts.expert_layers(e)):
        z = x @ w + b
        if o["expert_norm"]:
            norm, h = level.experts.norms[layer], w.shape[1]
            if training:
                mean, var = z.mean(0), z.var(0, unbiased=False)
            else:
                mean, var = norm.running_mean.view(-1, h)[e], norm.running_var.view(-1, h)[e]
            z = norm.weight.view(-1, h)[e] * (z - mean) / torch.sqrt(var + norm.eps) + norm.bias.view(-1, h)[e]
            x = z * torch.sigmoid(z)
        else:
            x = torch.relu(z)
    return x


def plain_self_gate(x, gate):
    logits = plain_mlp(x, linear_layers(gate), activate_last=False)
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def plain_output(level, level_name, owner, x_gate, members, own, o, training):
    """Sum(G(x), {members}) [+ Sum(S(x), {own})]; members / own: (expert label, its input)."""
    gates = dict(zip(level.gate_names, level.gates))
    outs = {label: plain_expert(x, level, label, o, training) for label, x in members}
    y = mix(plain_gate(x_gate, gates[f"{level_name}/{owner}"]), [outs[label] for label, _ in members])
    if o["self_gate"] and own:
        y = y + mix(plain_self_gate(x_gate, gates[f"{level_name}_self/{owner}"]), [outs[label] for label in own])
    return y


def reads_both(o):
    """Whether the task gates read [z_c, z_s] (the default with the hierarchy) rather than z_c."""
    return o["hierarchy"] and o.get("task_gate_input", "group_and_shared") == "group_and_shared"


def plain_home(bb, v, groups, counts, o, training=True):
    """HoME's meta level (z_c, z_s from v) then its task level: h_k = Sum(G_k([z_c, z_s]) or G_k(z_c),
    {F_k(z_c), F_c(z_c), F_s(z_s)}) [+ Sum(S_k(same input), {F_k})]."""
    def labels(level, owner, n):
        return [f"{level}/{owner}/{i}" for i in range(n)]

    names = [f"group{c}" for c in range(len(groups))]
    if o["hierarchy"]:
        meta_shared = labels("meta", "shared", counts["meta_shared_experts"])
        meta_group = {g: labels("meta", g, counts["meta_group_experts"]) for g in names}
        z = {g: plain_output(bb.meta, "meta", g, v, [(lab, v) for lab in meta_group[g] + meta_shared],
                             meta_group[g], o, training) for g in names}
        every = [lab for g in names for lab in meta_group[g]] + meta_shared
        if counts["shared_experts"] or reads_both(o):  # z_s: read by F_s and (by default) by the task gates
            z["shared"] = plain_output(bb.meta, "meta", "shared", v, [(lab, v) for lab in every], meta_shared, o,
                                       training)
    else:
        z = dict.fromkeys([*names, "shared"], v)
    shared = [(lab, z["shared"]) for lab in labels("task", "shared", counts["shared_experts"])]
    reps = []
    for task in bb.task_names:
        g = names[next(c for c, group in enumerate(groups) if task in group)]
        own = labels("task", task, counts["task_experts"])
        members = [(lab, z[g]) for lab in own + labels("task", g, counts["group_experts"])] + shared
        gate_input = torch.cat([z[g], z["shared"]], 1) if reads_both(o) else z[g]
        reps.append(plain_output(bb.tasks, "task", task, gate_input, members, own, o, training))
    return torch.stack(reps, 1)


COUNTS = {"meta_shared_experts": 2, "meta_group_experts": 1, "shared_experts": 1, "group_experts": 2, "task_experts": 1}


@pytest.mark.parametrize("switches", [
    {}, {"task_gate_input": "group"}, {"expert_norm": False}, {"hierarchy": False}, {"feature_gate": False},
    {"self_gate": False}, dict.fromkeys(TRICKS, False),
], ids=["all", "gates-read-z_c", "no-norm", "no-hierarchy", "no-feature-gate", "no-self-gate", "none"])
@pytest.mark.parametrize("groups, counts, gate_hidden", [
    ([["a"], ["b", "c"]], COUNTS, []),
    ([["c", "a"], ["b"]], COUNTS | {"task_experts": 2, "meta_group_experts": 2}, [4]),  # softmax self-gates
    (None, COUNTS | {"group_experts": 0, "meta_shared_experts": 0}, []),  # one group; owners without experts
    ([["a", "b"], ["c"]], COUNTS | {"shared_experts": 0}, []),  # no z_s: nothing on the task level reads it
])
def test_home_equals_the_paper(switches, groups, counts, gate_hidden):
    o = TRICKS | switches
    model, x = build(task_groups=groups, expert_hidden=[6, 4], gate_hidden=gate_hidden, feature_gate_rank=3,
                     **counts, **switches)
    reps, gates, _, _ = model.backbone(x)
    expected = plain_home(model.backbone, x, groups or [["a", "b", "c"]], counts, o)
    torch.testing.assert_close(reps, expected, atol=TOL, rtol=0)
    assert (model.backbone.meta is not None) == o["hierarchy"]
    assert any(name.startswith("task_self/") for name in gates) == o["self_gate"]
    assert ("meta/shared" in gates) == (o["hierarchy"] and (counts["shared_experts"] > 0 or reads_both(o)))
    meta = model.backbone.meta  # a task gate reads z_c, [z_c, z_s] or, without the meta level, v
    width = meta.out_dim * (2 if reads_both(o) else 1) if meta is not None else x.shape[1]
    assert all(g.net[0].in_features == width for g in model.backbone.tasks.gates)


def test_evaluation_uses_the_running_statistics():
    model, x = build(task_groups=[["a", "b"], ["c"]], expert_hidden=[6, 4], **COUNTS)
    model.eval()  # the bank folds batch norm into its weights: the plain BN reads the running statistics
    expected = plain_home(model.backbone, x, [["a", "b"], ["c"]], COUNTS, TRICKS, training=False)
    torch.testing.assert_close(model.backbone(x).task_reps, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(model.backbone(x[:1]).task_reps, expected[:1], atol=TOL, rtol=0)  # row by row


def test_gates_name_their_experts_and_are_distributions():
    model, x = build(task_groups=[["a"], ["b", "c"]], **COUNTS | {"task_experts": 2})
    bb = model.backbone
    _, gates, _, _ = bb(x)
    assert set(gates) == set(bb.gate_experts)
    assert bb.gate_experts["meta/group1"] == ["meta/group1/0", "meta/shared/0", "meta/shared/1"]
    assert bb.gate_experts["meta/shared"] == ["meta/group0/0", "meta/group1/0", "meta/shared/0", "meta/shared/1"]
    assert bb.gate_experts["task/c"] == ["task/c/0", "task/c/1", "task/group1/0", "task/group1/1", "task/shared/0"]
    assert bb.gate_experts["task_self/c"] == ["task/c/0", "task/c/1"]
    assert bb.gate_experts["meta_self/group0"] == ["meta/group0/0"]
    for name, weights in gates.items():
        assert weights.shape == (9, len(bb.gate_experts[name]))
        if weights.shape[1] == 1 and "_self/" in name:  # a self-gate over one expert: a sigmoid
            assert ((weights > 0) & (weights < 1)).all() and weights.std() > 0
        else:
            torch.testing.assert_close(weights.sum(1), torch.ones(9, dtype=torch.float64))


def test_a_task_loss_never_reaches_other_groups_task_level_experts():
    """The hierarchy mask: task b (group 1) reads the task level's shared experts, group 1's and
    its own; the experts of group 0 and of every other task get no gradient from it."""
    model, x = build(task_groups=[["a"], ["b", "c"]], **COUNTS)
    model(Features(no_ids(x), x)).logits[:, 1].sum().backward()
    level = model.backbone.tasks
    tensors = [*level.experts.weights, *level.experts.biases, level.feature_gates.down, level.feature_gates.up]
    for label in level.labels:
        e = level.labels.index(label)
        norms = [n for n in level.experts.norms if isinstance(n, torch.nn.BatchNorm1d)]
        grads = [t.grad[e] for t in tensors] + [p.grad.view(level.num_experts, -1)[e] for n in norms
                                                for p in (n.weight, n.bias)]
        reached = max(g.abs().max() for g in grads) > 0
        assert reached == (label.startswith(("task/b/", "task/group1/", "task/shared/"))), label
    gates = dict(zip(level.gate_names, level.gates))
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in gates["task/a"].parameters())
    # the meta level's shared representation mixes every group's meta experts (z_s), so they all learn
    meta = model.backbone.meta
    assert all(meta.experts.weights[0].grad[meta.labels.index(lab)].abs().max() > 0 for lab in meta.labels)


def test_task_modules_and_slices_are_what_only_that_task_uses():
    model, x = build(task_groups=[["a"], ["b", "c"]], **COUNTS)
    bb = model.backbone
    level = bb.tasks

    def owned(k):  # the experts whose entries task k owns in the bank's first weight
        mask = next(m for p, m in bb.task_slices(k) if p is level.experts.weights[0])
        return [level.labels[e] for e in range(level.num_experts) if mask[e].all()]

    assert owned(0) == ["task/a/0", "task/group0/0", "task/group0/1"]  # group 0 holds a alone
    assert owned(1) == ["task/b/0"] and owned(2) == ["task/c/0"]
    for k in range(3):
        model.zero_grad()
        model(Features(no_ids(x), x)).logits[:, [j for j in range(3) if j != k]].sum().backward()
        assert all(p.grad is None or p.grad.abs().max() == 0 for m in bb.task_modules(k) for p in m.parameters())
        for p, mask in bb.task_slices(k):
            assert p.grad[mask].abs().max() == 0 and p.grad[~mask].abs().max() > 0
        model.zero_grad()
        model(Features(no_ids(x), x)).logits[:, k].sum().backward()
        assert all(p.grad.abs().max() > 0 for m in bb.task_modules(k) for p in m.parameters())
    shared = shared_parameters(model, 3)
    assert not {id(p) for k in range(3) for m in bb.task_modules(k) for p in m.parameters()} & set(map(id, shared.params))


def test_the_feature_gate_scales_within_0_and_2_and_starts_at_1():
    torch.manual_seed(1)
    gates = LowRankFeatureGates(num_experts=3, in_dim=6, rank=2).double()
    x = torch.randn(3, 50, 6, dtype=torch.float64) * 2
    assert torch.equal(gates(x), torch.ones_like(x))  # a fresh gate leaves the input as it is
    with torch.no_grad():
        gates.up.normal_()
    g = gates(x)
    assert ((g > 0) & (g < 2)).all() and g.min() < 0.5 and g.max() > 1.5
    torch.testing.assert_close(g[1], 2 * torch.sigmoid(x[1] @ gates.down[1] @ gates.up[1]))


@pytest.mark.parametrize("options, message", [
    ({"task_groups": [["a", "z"], ["b"]]}, "unknown task"),
    ({"task_groups": [["a", "b"], ["b"]]}, "'b' is in two groups"),
    ({"task_groups": [["a"]]}, r"leaves task\(s\) \['b'\] in no group"),
    ({"task_groups": [["a", "b"], []]}, "task_groups.*group 1 is empty"),
    ({"shared_experts": 0, "group_experts": 0, "task_experts": 0}, "a task has no expert"),
    ({"meta_shared_experts": 0, "meta_group_experts": 0}, "meta level has no expert"),
    ({"feature_gate_rank": 0}, "feature_gate_rank"),
    ({"task_gate_input": "shared"}, "task_gate_input"),
    ({"hierarchy": False, "task_gate_input": "group"}, "task_gate_input .* needs hierarchy: true"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        models.create("home", dense_schema(5), **options)


def test_task_names_that_clash_with_expert_names_are_refused():
    with pytest.raises(ValueError, match=r"\['shared'\] clash"):
        models.create("home", dense_schema(5, tasks=("shared", "b")))


def test_without_the_hierarchy_there_is_no_meta_level_to_fill():
    model = models.create("home", dense_schema(5), meta_shared_experts=0, meta_group_experts=0, hierarchy=False)
    assert model.backbone.meta is None and not any(name.startswith("meta") for name in model.backbone.gate_experts)


def test_doc_example_runs():
    result = doctest.testmod(home, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_onnx_and_torchscript_exports_equal_pytorch(tmp_path):
    raw = {"seed": 2, "data": {"synthetic": {"rows": 400, "dim": 5, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": "home", "task_groups": [["y1"], ["y2"]], "expert_hidden": [8], "tower_hidden": [4],
                     "task_experts": 2, "feature_gate_rank": 2},
           "train": {"epochs": 1, "progress": False}}
    exported_equals_predict(raw, tmp_path / "model", torchscript=True)

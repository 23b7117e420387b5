"""The representation-gradient shortcut (`on: representation`): gradient methods take the task
gradients on the backbone's shared representation Z, each checked against a plain computation
with the model's weights: a direction method backpropagates its direction through Z (paths
around Z keep the plain sum), a weighting method weights the whole shared update (MGDA-UB)."""

import pytest
import torch

from mtlrec import models
from mtlrec.config import TrainConfig
from mtlrec.data import TensorData
from mtlrec.data.features import Features
from mtlrec.losses import create_weighting
from mtlrec.models.base import shared_parameters
from mtlrec.schema import Schema
from mtlrec.tasks import TaskSet
from mtlrec.train.trainer import Trainer

SCHEMA = Schema(sparse=[{"name": "c", "vocab_size": 10, "embedding_dim": 3}],
                dense=[{"name": f"x{i}"} for i in range(4)], tasks=[{"name": "a"}, {"name": "b"}])
TASKS = TaskSet(SCHEMA)


def batch(rows=24, opposite=False, seed=1):
    """Features, labels `[B, 2]` and mask; `opposite`: task b's label is 1 - task a's."""
    g = torch.Generator().manual_seed(seed)
    ids, dense = torch.randint(0, 10, (rows, 1), generator=g), torch.randn(rows, 4, generator=g, dtype=torch.float64)
    a = (dense[:, 0] + 0.3 * ids[:, 0] > 1).double()
    b = 1 - a if opposite else (dense[:, 1] > 0).double()
    return Features(ids, dense), torch.stack([a, b], 1), torch.ones(rows, 2, dtype=torch.bool)


def tiny(name, **options):
    torch.manual_seed(0)
    model = models.create(name, SCHEMA, tower_hidden=[4], **options).double()
    model.request_representation()  # expert levels form Z only when asked (the trainer asks)
    return model


def owned_parameters(model):
    return [p for k in range(2) for p in model.task_parameters(k)]


def grads(params):
    return [p.grad for p in params]


# ---- (a) a direction method on a shared bottom: every shared parameter is upstream of Z

def test_pcgrad_on_the_representation_of_a_shared_bottom_equals_the_projection_by_hand():
    model = tiny("shared_bottom", hidden=[6])
    model.towers[1].load_state_dict(model.towers[0].state_dict())  # one tower twice: opposite labels conflict
    features, labels, mask = batch(opposite=True)
    out = model(features)
    z = out.representation
    assert z.shape == (24, 6)
    losses = TASKS.losses(out.logits, labels, mask)
    g1, g2 = (torch.autograd.grad(losses[k], z, retain_graph=True)[0].reshape(-1) for k in range(2))
    dot = g1 @ g2
    assert dot < 0  # the tasks conflict on Z, so the projection acts
    # PCGrad: g1 - (g1.g2 / |g2|^2) g2 + g2 - (g1.g2 / |g1|^2) g1, a combination of g1 and g2 on Z;
    # all shared parameters are upstream of Z, so they get the same combination of the task gradients
    first, second = 1 - dot / (g1 @ g1), 1 - dot / (g2 @ g2)
    shared = shared_parameters(model, 2)
    towers = [p for t in model.towers for p in t.parameters()]
    expected_shared = torch.autograd.grad(first * losses[0] + second * losses[1], shared.params, retain_graph=True)
    expected_towers = torch.autograd.grad(losses.sum(), towers, retain_graph=True)
    weighting = create_weighting({"name": "pcgrad", "on": "representation"}, TASKS).double()
    weights = weighting.backward(losses, shared, representation=z)
    assert weights.tolist() == [1.0, 1.0]  # no per-task weight describes a projection: the config weights
    assert model.embedding.tables[0].weight in set(shared.params)  # the embedding, too, is shared
    for p, expected in zip([*shared.params, *towers], [*expected_shared, *expected_towers]):
        torch.testing.assert_close(p.grad, expected)


# ---- (b) a weighting method: the coefficients found on Z weight the whole shared update

def test_mgda_on_the_representation_of_an_mmoe_weights_the_whole_loss_by_the_min_norm_point():
    model = tiny("mmoe", num_experts=3, expert_hidden=[5])
    features, labels, mask = batch()
    out = model(features)
    z = out.representation
    assert z.shape == (24, 3, 5)  # the experts' outputs, which every gate mixes
    losses = TASKS.losses(out.logits, labels, mask)
    g1, g2 = (torch.autograd.grad(losses[k], z, retain_graph=True)[0].reshape(-1) for k in range(2))
    a = (g2 - g1) @ g2 / (g1 - g2).square().sum()  # the point of the segment [g1, g2] nearest 0
    assert 0.05 < a < 0.95 and abs(a - 0.5) > 0.01  # an interior point unlike the plain mean
    expected_weights = 2 * torch.stack([a, 1 - a])
    shared, owned = shared_parameters(model, 2), owned_parameters(model)
    expected_shared = torch.autograd.grad((expected_weights * losses).sum(), shared.params, retain_graph=True)
    expected_owned = torch.autograd.grad(losses.sum(), owned, retain_graph=True)  # towers and gates: plain
    results = []
    for spec in ({"name": "mgda", "on": "representation"}, {"name": "mgda", "upper_bound": True}):
        for p in model.parameters():
            p.grad = None
        out = model(features)  # the same values, a fresh graph
        weights = create_weighting(spec, TASKS).double().backward(TASKS.losses(out.logits, labels, mask), shared,
                                                                  representation=out.representation)
        torch.testing.assert_close(weights, expected_weights)
        for p, expected in zip([*shared.params, *owned], [*expected_shared, *expected_owned]):
            torch.testing.assert_close(p.grad, expected)
        results.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(x, y) for x, y in zip(*results))  # upper_bound is the same thing, one code path
    with pytest.raises(ValueError, match="upper_bound .MGDA-UB. is on: representation; it contradicts on: parameters"):
        create_weighting({"name": "mgda", "upper_bound": True, "on": "parameters"}, TASKS)


# ---- (c) a direction method on an MMoE: Z's path gets the direction, the gates' path the plain sum

def test_pcgrad_on_an_mmoe_gives_the_embedding_the_direction_through_z_and_the_plain_gate_path():
    model = tiny("mmoe", num_experts=3, expert_hidden=[5])
    level = model.backbone.level
    level.gates[1].load_state_dict(level.gates[0].state_dict())  # one gate and one tower twice, opposite
    model.towers[1].load_state_dict(model.towers[0].state_dict())  # labels: the tasks conflict on Z
    features, labels, mask = batch(opposite=True)

    def losses_reading(x_experts, x_gates):
        """The MMoE by hand: experts read x_experts, gates x_gates (either may be cut off by detach)."""
        experts = level.experts(x_experts)  # [B, E, H]
        mixtures = [torch.bmm(level.gates[k](x_gates).unsqueeze(1), experts).squeeze(1) for k in range(2)]
        return TASKS.losses(torch.cat([model.towers[k](m) for k, m in enumerate(mixtures)], 1), labels, mask)

    out = model(features)
    z, losses = out.representation, TASKS.losses(out.logits, labels, mask)
    x = model.embedding(features)
    torch.testing.assert_close(losses_reading(x, x), losses)
    g1, g2 = (torch.autograd.grad(losses[k], z, retain_graph=True)[0].reshape(-1) for k in range(2))
    dot = g1 @ g2
    assert dot < 0
    first, second = 1 - dot / (g1 @ g1), 1 - dot / (g2 @ g2)  # PCGrad's direction on Z, as in (a)
    table, experts = [model.embedding.tables[0].weight], list(level.experts.parameters())
    through_z = losses_reading(x, x.detach())  # the embedding reaches the losses through the experts only
    around_z = losses_reading(x.detach(), x)  # ... through the gates only
    direction = torch.autograd.grad(first * through_z[0] + second * through_z[1], table + experts, retain_graph=True)
    gate_path = torch.autograd.grad(around_z.sum(), table, retain_graph=True)[0]
    expected_table, expected_experts = direction[0] + gate_path, direction[1:]
    owned = owned_parameters(model)
    expected_owned = torch.autograd.grad(losses.sum(), owned, retain_graph=True)
    weighting = create_weighting({"name": "pcgrad", "on": "representation"}, TASKS).double()
    weighting.backward(losses, shared_parameters(model, 2), representation=z)
    torch.testing.assert_close(table[0].grad, expected_table)
    for p, expected in zip([*experts, *owned], [*expected_experts, *expected_owned]):
        torch.testing.assert_close(p.grad, expected)
    # the gate path matters here: giving it the direction's coefficients would be another update
    other = torch.autograd.grad(first * around_z[0] + second * around_z[1], table)[0]
    assert not torch.allclose(gate_path, other)


def test_a_cgc_direction_on_z_leaves_the_task_experts_their_plain_gradient():
    model = tiny("cgc", task_experts=1, shared_experts=2, expert_hidden=[5])
    features, labels, mask = batch()
    out = model(features)
    assert out.representation.shape == (24, 2, 5)  # the shared experts only
    losses = TASKS.losses(out.logits, labels, mask)
    shared = shared_parameters(model, 2)
    params = list(model.parameters())
    plain = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    create_weighting({"name": "graddrop", "on": "representation"}, TASKS).double().backward(
        losses, shared, representation=out.representation)
    shared_entries = {id(p): torch.ones_like(p, dtype=torch.bool) if m is None else m
                      for p, m in zip(shared.params, shared.masks)}
    bank = [id(p) for p in params].index(id(model.backbone.levels[0].experts.weights[0]))  # a's, b's, 2 shared
    assert shared_entries[id(params[bank])][:, 0, 0].tolist() == [False, False, True, True]
    for p, g in zip(params, plain):  # towers, gates and the task experts: the plain gradient
        own = ~shared_entries.get(id(p), torch.zeros_like(p, dtype=torch.bool))
        torch.testing.assert_close(p.grad[own], g[own])
    moved = shared_entries[id(params[bank])]
    assert not torch.allclose(params[bank].grad[moved], plain[bank][moved])  # GradDrop acted on the shared experts


# ---- methods with their own path: GradNorm's norms, Nash-MTL reusing its weights

def test_gradnorm_on_the_representation_balances_the_norms_of_the_gradients_on_z():
    model = tiny("shared_bottom", hidden=[6])
    features, labels, mask = batch()
    out = model(features)
    losses = TASKS.losses(out.logits, labels, mask)
    norms = torch.stack([torch.autograd.grad(losses[k], out.representation, retain_graph=True)[0].norm()
                         for k in range(2)])
    weighting = create_weighting({"name": "gradnorm", "on": "representation"}, TASKS).double()
    weighting.backward(losses, shared_parameters(model, 2), representation=out.representation)
    # first step: L(0) = L, so r_k = 1 and the target is the mean of w_k G_k with w = 1
    torch.testing.assert_close(weighting.task_weights.grad, torch.sign(norms - norms.mean()) * norms)


def test_a_task_without_labelled_rows_in_the_batch_has_no_gradient_on_z_and_is_left_out():
    model = tiny("cgc", task_experts=1, shared_experts=2, expert_hidden=[5])
    features, labels, mask = batch()
    mask[:, 1] = False  # task b's space holds none of these rows
    out = model(features)
    losses = TASKS.losses(out.logits, labels, mask)
    shared = shared_parameters(model, 2)
    expected = torch.autograd.grad(losses[0], shared.params, retain_graph=True, allow_unused=True)
    weights = create_weighting({"name": "mgda", "on": "representation"}, TASKS).double().backward(
        losses, shared, representation=out.representation)
    assert weights.tolist() == [1.0, 0.0]  # alpha = (1, 0) over the one task with a gradient, T = 1
    for p, g in zip(shared.params, expected):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g)


# ---- (e) errors

def trainer(model_name, weighting, **train):
    torch.manual_seed(0)
    model = models.create(model_name, SCHEMA, **({"expert_hidden": [4]} if model_name != "cross_stitch" else {}))
    return Trainer(model, SCHEMA, TrainConfig(batch_size=8, progress=False, weighting=weighting, **train))


def test_a_model_without_a_representation_is_refused_when_the_trainer_is_built():
    spec = {"name": "pcgrad", "on": "representation"}
    with pytest.raises(ValueError, match=r"train.weighting 'pcgrad' with on: representation needs a model that names "
                                         r"its shared representation Z, and MultiTaskModel \(backbone CrossStitch\)"):
        trainer("cross_stitch", spec)
    sparse = models.create("mmoe", SCHEMA, expert_hidden=[4], top_k=1, dispatch="sparse")
    with pytest.raises(ValueError, match=r"\(backbone MMoE\) names none .*dispatch: sparse"):
        Trainer(sparse, SCHEMA, TrainConfig(progress=False, weighting=spec))
    with pytest.raises(ValueError, match="cannot run with train.compile"):
        trainer("mmoe", spec, compile=True)
    trainer("mmoe", {"name": "pcgrad"}, compile=True)  # on: parameters: no such limit
    trainer("cross_stitch", {"name": "pcgrad"})
    features, labels, mask = batch()
    model = tiny("shared_bottom", hidden=[6])
    losses = TASKS.losses(model(features).logits, labels, mask)
    with pytest.raises(ValueError, match="weighting CAGrad with on: representation needs the model's shared "
                                         "representation Z, and none was given"):
        create_weighting({"name": "cagrad", "on": "representation"}, TASKS).backward(losses, shared_parameters(model, 2))


def test_options_that_cannot_run_on_the_representation_are_refused_by_name():
    with pytest.raises(ValueError, match=r"weighting 'db_mtl' option on: representation needs beta: 0, not 0.9"):
        create_weighting({"name": "db_mtl", "on": "representation"}, TASKS)
    weighting = create_weighting({"name": "db_mtl", "on": "representation", "beta": 0.0}, TASKS).double()
    model = tiny("mmoe", num_experts=3, expert_hidden=[5])
    features, labels, mask = batch()
    out = model(features)
    weighting.backward(TASKS.losses(out.logits, labels, mask), shared_parameters(model, 2),
                       representation=out.representation)
    assert weighting.grad_average.numel() == 0  # beta 0: nothing averaged, nothing in checkpoints
    with pytest.raises(ValueError, match=r"option beta_sigma \(0.5\) has no effect with beta: 0"):
        create_weighting({"name": "db_mtl", "beta": 0.0, "beta_sigma": 0.5}, TASKS)
    with pytest.raises(ValueError, match=r"weighting 'imtl' option on: representation has no effect with mode 'loss'"):
        create_weighting({"name": "imtl", "mode": "loss", "on": "representation"}, TASKS)
    with pytest.raises(ValueError, match=r"weighting 'pcgrad' option on: Input should be 'parameters' or "
                                         r"'representation'"):
        create_weighting({"name": "pcgrad", "on": "z"}, TASKS)
    for name in ("nash_mtl", "fairgrad"):  # coefficients ~ 1 / ||g||: on Z they would grow with the batch size
        with pytest.raises(ValueError, match=rf"weighting '{name}' cannot take on: representation: its coefficients "
                                             r"scale as 1 / \|\|g\|\|"):
            create_weighting({"name": name, "on": "representation"}, TASKS)
    assert create_weighting({"name": "mgda", "upper_bound": "false"}, TASKS).options.on == "parameters"
    with pytest.raises(ValueError, match=r"weighting 'uncertainty' has no option\(s\) \['on'\]"):
        create_weighting({"name": "uncertainty", "on": "representation"}, TASKS)


# ---- (f) every gradient method trains on the representation of CGC and PLE, and resumes exactly

GRADIENT_METHODS = ["gradnorm", "pcgrad", "mgda", "cagrad", "imtl", "gradvac", "graddrop", "aligned_mtl",
                    "metabalance", "pe_ltr", {"name": "db_mtl", "beta": 0.0}]  # nash_mtl, fairgrad: refused
THREE = Schema(sparse=[{"name": "c", "vocab_size": 10, "embedding_dim": 3}], dense=[{"name": f"x{i}"} for i in range(4)],
               tasks=[{"name": "a"}, {"name": "b"}, {"name": "r", "type": "regression"}])


def three_task_data(rows=256):
    g = torch.Generator().manual_seed(5)
    ids, dense = torch.randint(0, 10, (rows, 1), generator=g), torch.randn(rows, 4, generator=g)
    labels = torch.stack([(dense[:, 0] > 0).float(), (dense[:, 0] + dense[:, 1] < 0).float(),
                          dense[:, 2] + 0.1 * ids[:, 0]], 1)
    mask = torch.ones(rows, 3, dtype=torch.bool)
    mask[::4, 1] = False  # task b's space: some batches hold few of its rows
    return TensorData(ids, dense, labels, mask)


def test_the_trainer_passes_z_and_every_gradient_method_trains_on_it(one_thread):
    from mtlrec.losses import WEIGHTINGS

    names = [m if isinstance(m, str) else m["name"] for m in GRADIENT_METHODS]
    refused = {"nash_mtl", "fairgrad"}
    assert set(names) == {n for n, cls in WEIGHTINGS.items() if cls.needs_task_gradients} - refused  # all the others
    data = three_task_data()
    for model_name in ("cgc", "ple"):
        for method in GRADIENT_METHODS:
            spec = ({"name": method} if isinstance(method, str) else dict(method)) | {"on": "representation"}
            torch.manual_seed(0)
            model = models.create(model_name, THREE, expert_hidden=[8], tower_hidden=[4])
            config = TrainConfig(epochs=1, batch_size=32, lr=0.02, progress=False, weighting=spec,
                                 early_stopping={"patience": None})
            trained = Trainer(model, THREE, config)
            before = trained.evaluate(data)["loss"]
            history = trained.fit(data)
            weights = [history[-1][f"weight/{t}"] for t in THREE.task_names]
            assert all(torch.isfinite(torch.tensor(weights))), (model_name, spec, weights)
            assert trained.evaluate(data)["loss"] < before, (model_name, spec)


def test_a_run_on_the_representation_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(
        tmp_path, one_thread):
    data = three_task_data(160)  # 5 steps an epoch; checkpoints every 3 steps: the one of step 6 is mid-epoch 2
    config = TrainConfig(epochs=2, batch_size=32, lr=0.02, progress=False, checkpoint_every=3,
                         weighting={"name": "gradvac", "on": "representation", "beta": 0.3},
                         early_stopping={"patience": None})

    def run(folder=None, stop_after=None, resume=False):
        torch.manual_seed(0)
        model = models.create("ple", THREE, expert_hidden=[8], tower_hidden=[4])
        run = Trainer(model, THREE, config, checkpoint_dir=folder)
        if stop_after is not None:
            step = run._step

            def interrupted(batch):
                if run.global_step == stop_after:
                    raise KeyboardInterrupt
                return step(batch)

            run._step = interrupted
        run.fit(data, resume=resume)
        return model, run

    whole, whole_run = run()
    assert whole_run.weighting.targets.abs().sum() > 0  # GradVac's state moved, so the checkpoint carries some
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=8)
    resumed, resumed_run = run(tmp_path, resume=True)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert torch.equal(whole_run.weighting.targets, resumed_run.weighting.targets)


def test_a_method_on_the_representation_trains_with_fused_tables(one_thread):
    pytest.importorskip("torchrec", reason="TorchRec is not installed (make install adds it)")
    from mtlrec.config import load_config
    from mtlrec.experiment import encode_splits
    from mtlrec.trained import TrainedModel

    cfg = load_config({"seed": 2, "data": {"synthetic": {"rows": 600, "dim": 6, "sparse_features": 2,
                                                         "task_types": ["binary", "regression"]}},
                       "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
                       "train": {"epochs": 2, "batch_size": 100, "lr": 0.01, "progress": False,
                                 "embedding_tables": "fused", "embedding_optimizer": "sgd", "embedding_lr": 0.5,
                                 "weighting": {"name": "pcgrad", "on": "representation"},
                                 "early_stopping": {"patience": None}}})
    encoded = encode_splits(cfg)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(TrainedModel.build(cfg, encoded.encoder).model, encoded.encoder.schema, cfg.train, seed=cfg.seed)
    before = trainer.model.embedding.table_weights()["c0"].detach().clone()
    history = trainer.fit(encoded.train, encoded.valid)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert not torch.equal(before, trainer.plain_model.embedding.tables[0].weight[:len(before)])  # tables moved


# ---- every method that weights the losses: the coefficients it finds on Z weight the whole shared update

WEIGHTING_ON_Z = ["mgda", "cagrad", "imtl", "gradvac", "aligned_mtl", "metabalance", "pe_ltr",
                  {"name": "db_mtl", "beta": 0.0}]


@pytest.mark.parametrize("method", WEIGHTING_ON_Z, ids=lambda m: m if isinstance(m, str) else m["name"])
def test_a_weighting_method_on_z_applies_the_coefficients_of_its_own_combine_to_the_whole_shared_update(method):
    spec = ({"name": method} if isinstance(method, str) else dict(method)) | {"on": "representation"}
    model = tiny("mmoe", num_experts=3, expert_hidden=[5])
    features, labels, mask = batch(opposite=True)
    out = model(features)
    losses = TASKS.losses(out.logits, labels, mask)
    reference = create_weighting(spec, TASKS).double()  # a fresh copy: its combine on G_Z, built here by hand
    on_z = torch.stack([torch.autograd.grad(loss, out.representation, retain_graph=True)[0].reshape(-1)
                        for loss in reference.task_losses(losses)])  # G_Z [T, N]
    coefficients = reference.combine(on_z, losses, None).weights
    assert coefficients is not None and torch.isfinite(coefficients).all()
    shared, owned = shared_parameters(model, 2), owned_parameters(model)
    expected_shared = torch.autograd.grad((coefficients.detach() * losses).sum(), shared.params, retain_graph=True)
    plain = (reference.weights(losses).detach() * losses).sum()  # the plain sum (DB-MTL's weights: c_k / L_k)
    expected_owned = torch.autograd.grad(plain, owned, retain_graph=True)  # towers and gates: plain
    for p in model.parameters():
        p.grad = None
    out = model(features)
    weights = create_weighting(spec, TASKS).double().backward(TASKS.losses(out.logits, labels, mask), shared,
                                                              representation=out.representation)
    torch.testing.assert_close(weights, coefficients)
    for p, expected in zip([*shared.params, *owned], [*expected_shared, *expected_owned]):
        torch.testing.assert_close(p.grad, expected)


def test_expert_levels_form_z_only_when_asked_and_forming_it_changes_no_gradient():
    features, labels, mask = batch()
    results = []
    for asked in (False, True):
        torch.manual_seed(0)
        model = models.create("ple", SCHEMA, num_levels=2, task_experts=1, shared_experts=2, expert_hidden=[5],
                              tower_hidden=[4]).double()
        if asked:
            model.request_representation()
        out = model(features)
        assert (out.representation is not None) == asked
        TASKS.losses(out.logits, labels, mask).sum().backward()
        results.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            assert model(features).representation is None  # prediction never forms it
    assert all(torch.equal(a, b) for a, b in zip(*results))

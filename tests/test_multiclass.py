"""The multiclass task kind through every path: the loss, predictions, metrics and baseline
against plain computations written here; label and option checks; every model of the zoo
(towers of C logits); training, `predict`, export, serving and the fused ranking score."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import mtlrec
from mtlrec import models
from mtlrec.config import RankConfig
from mtlrec.data import DataError, Encoder
from mtlrec.data.features import Features
from mtlrec.export import export_onnx, export_torchscript
from mtlrec.rank import fused_score, rank_table
from mtlrec.schema import Schema
from mtlrec.serve import create_app
from mtlrec.tasks import TaskSet, higher_is_better
from mtlrec.train.evaluation import constant_baseline, prediction_table
from mtlrec.train.metrics import auc, log_loss
from mtlrec.trained import load

CLICK = {"name": "click"}
WATCH = {"name": "watch", "type": "regression"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


def rating(classes=3, **options):
    return {"name": "rating", "type": "multiclass", "options": {"classes": classes, **options}}


def schema_of(*tasks, sparse=()):
    return Schema(sparse=list(sparse), dense=[{"name": f"x{i}"} for i in range(4)], tasks=list(tasks))


def plain_softmax(z):
    """exp(z_c) / sum_j exp(z_j), row by row, float64."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- the kind against its definition ---------------------------------------------------------


def test_loss_is_the_cross_entropy_of_the_softmax_beside_other_kinds():
    tasks = TaskSet(schema_of(CLICK, rating(4), WATCH))
    assert (tasks.num_logits, tasks.slices[1], tasks.output_names) == (
        6, slice(1, 5), ["click", "rating:0", "rating:1", "rating:2", "rating:3", "watch"])
    rng = np.random.default_rng(0)
    n = 50
    z = rng.normal(size=(n, 6)) * 3
    y = np.stack([rng.integers(0, 2, n), rng.integers(0, 4, n), rng.normal(size=n)], 1)
    mask = rng.random((n, 3)) > 0.3
    w = rng.uniform(0, 2, (n, 3))
    got = tasks.losses(torch.tensor(z), torch.tensor(y), torch.tensor(mask))
    got_weighted = tasks.losses(torch.tensor(z), torch.tensor(y), torch.tensor(mask), torch.tensor(w))
    p = 1 / (1 + np.exp(-z[:, 0]))
    per_row = np.stack([-(y[:, 0] * np.log(p) + (1 - y[:, 0]) * np.log(1 - p)),
                        -np.log(plain_softmax(z[:, 1:5])[np.arange(n), y[:, 1].astype(int)]),
                        (z[:, 5] - y[:, 2]) ** 2], 1)
    expected = (per_row * mask).sum(0) / mask.sum(0)
    expected_weighted = (per_row * mask * w).sum(0) / (mask * w).sum(0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(got_weighted.numpy(), expected_weighted, rtol=1e-12)
    # a row outside the space adds nothing, whatever its label holds
    y_outside = y.copy()
    y_outside[~mask[:, 1], 1] = 3
    torch.testing.assert_close(tasks.losses(torch.tensor(z), torch.tensor(y_outside), torch.tensor(mask)), got)


def test_predictions_are_the_softmax_and_sum_to_one():
    tasks = TaskSet(schema_of(rating(3), CLICK, rating(5) | {"name": "stars"}))
    z = np.random.default_rng(1).normal(size=(20, 9)) * 4
    got = tasks.predict(torch.tensor(z)).numpy()
    np.testing.assert_allclose(got[:, 0:3], plain_softmax(z[:, 0:3]), rtol=1e-12)
    np.testing.assert_allclose(got[:, 3], 1 / (1 + np.exp(-z[:, 3])), rtol=1e-12)
    np.testing.assert_allclose(got[:, 4:9], plain_softmax(z[:, 4:9]), rtol=1e-12)
    np.testing.assert_allclose(got[:, 0:3].sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(got[:, 4:9].sum(1), 1.0, rtol=1e-12)
    assert tasks.present == [tasks.kinds[1]]  # the one-column kinds; each multiclass task is scored on its slice


def test_a_multiclass_task_alone():
    tasks = TaskSet(schema_of(rating(3)))
    z = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    labels, mask = torch.tensor([[2.0], [1.0]]), torch.tensor([[True], [False]])
    assert tasks.present == [] and tasks.narrow == []
    torch.testing.assert_close(tasks.predict(z), torch.tensor(plain_softmax(z.numpy())))
    torch.testing.assert_close(tasks.losses(z, labels, mask), torch.tensor([-math.log(plain_softmax(z.numpy())[0, 2])],
                                                                           dtype=torch.float64))
    torch.testing.assert_close(tasks.baseline_logits(labels, mask), torch.log(torch.tensor([1e-6, 1e-6, 1.0])))


def test_metrics_equal_plain_computations():
    tasks = TaskSet(schema_of(rating(4), CLICK))
    rng = np.random.default_rng(2)
    n = 60
    probs = plain_softmax(rng.normal(size=(n, 4)))
    labels = np.stack([rng.choice([0, 1, 3], n).astype(float), rng.integers(0, 2, n)], 1)  # class 2 absent
    mask = np.ones((n, 2), dtype=bool)
    mask[:7, 0] = False
    predictions = np.concatenate([probs, rng.random((n, 1))], 1)
    got = tasks.metrics(predictions, labels, mask)
    y, p = labels[7:, 0].astype(int), probs[7:]
    assert got["accuracy/rating"] == pytest.approx(np.mean([p[i].argmax() == y[i] for i in range(len(y))]))
    # the mean of the one-vs-rest AUCs of the classes present (class 2 has no row: left out)
    assert got["macro_auc/rating"] == pytest.approx(np.mean([auc(y == c, p[:, c]) for c in (0, 1, 3)]))
    assert got["logloss/rating"] == pytest.approx(-np.mean([math.log(p[i, y[i]]) for i in range(len(y))]))
    weights = np.tile(rng.uniform(0.1, 3, (n, 1)), (1, 2))
    weighted = tasks.metrics(predictions, labels, mask, weights)
    w = weights[7:, 0]
    assert weighted["accuracy/rating"] == pytest.approx(np.sum(w * (p.argmax(1) == y)) / w.sum())
    assert weighted["macro_auc/rating"] == pytest.approx(np.mean([auc(y == c, p[:, c], w) for c in (0, 1, 3)]))
    # two classes: macro AUC is the AUC of P(class 1), the log loss the binary log loss
    two = TaskSet(schema_of(rating(2)))
    q = rng.random(n)
    binary = rng.integers(0, 2, n).astype(float)
    scored = two.metrics(np.stack([1 - q, q], 1), binary[:, None], np.ones((n, 1), dtype=bool))
    assert scored["macro_auc/rating"] == pytest.approx(auc(binary, q))
    assert scored["logloss/rating"] == pytest.approx(log_loss(binary, q))


def test_names_directions_baseline_and_uncertainty_constant():
    tasks = TaskSet(schema_of(CLICK, rating(3)))
    assert tasks.primary_metrics == ["auc/click", "macro_auc/rating"]
    assert [higher_is_better(f"{m}/rating") for m in ("macro_auc", "accuracy", "logloss")] == [True, True, False]
    assert tasks.uncertainty_scales.tolist() == [1.0, 1.0]
    labels = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0], [0.0, 2.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, True], [True, True], [True, False], [True, True]])
    baseline = tasks.baseline_logits(labels, mask)
    assert baseline.shape == (4,)
    # the log class frequencies over the task's rows (row 3 is outside its space): 1/4, 1/4, 2/4
    torch.testing.assert_close(baseline[1:], torch.log(torch.tensor([0.25, 0.25, 0.5])))
    torch.testing.assert_close(tasks.predict(baseline[None])[0], torch.tensor([0.4, 0.25, 0.25, 0.5]))
    empty = tasks.baseline_logits(labels, torch.zeros_like(mask))  # no labelled row: uniform
    torch.testing.assert_close(tasks.predict(empty[None])[0, 1:], torch.full((3,), 1 / 3))


def test_other_tasks_are_bit_identical_beside_a_multiclass_task():
    """A binary + regression model gives the same bits (logits, predictions, losses, gradients)
    whether a multiclass task follows it or not: the towers are built in task order from one
    seed, and the one-column tasks are scored as before."""
    def run(*tasks):
        schema = schema_of(*tasks, sparse=[{"name": "u", "vocab_size": 5, "embedding_dim": 3}])
        torch.manual_seed(0)
        model = models.create("shared_bottom", schema, hidden=[8], tower_hidden=[4])
        set_ = TaskSet(schema)
        features = Features(torch.tensor([[1], [4], [0], [2]]), torch.linspace(-2, 2, 16).view(4, 4))
        logits = model(features).logits
        labels = torch.tensor([[1.0, 0.5, 2.0], [0.0, -1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 0.0, 1.0]])[:, : len(tasks)]
        losses = set_.losses(logits, labels, torch.ones_like(labels, dtype=torch.bool))
        losses[:2].sum().backward()
        return logits.detach(), set_.predict(logits.detach()), losses.detach(), model.embedding.parameters()

    alone, beside = run(CLICK, WATCH), run(CLICK, WATCH, rating(3))
    assert beside[0].shape == (4, 5)
    for mine, reference in zip(beside[:3], alone[:3]):
        assert torch.equal(mine[..., :2], reference)
    for mine, reference in zip(beside[3], alone[3]):
        assert torch.equal(mine.grad, reference.grad)


# -- labels and options ----------------------------------------------------------------------


def test_bad_labels_are_refused_naming_the_column_task_and_row():
    schema = schema_of({"name": "rating", "label": "stars", "type": "multiclass", "options": {"classes": 3}})
    good = pd.DataFrame({**{f"x{i}": [0.0, 1.0, 2.0, 3.0] for i in range(4)}, "stars": [0.0, 2.0, np.nan, 1.0]})
    data = Encoder(schema).fit(good).transform(good)  # floats holding whole numbers; a missing label is no row
    assert data.labels[:, 0].tolist() == [0.0, 2.0, 0.0, 1.0] and data.mask[:, 0].tolist() == [True, True, False, True]
    for value in (1.5, -1.0, 3.0, np.inf):
        bad = good.assign(stars=[0.0, 2.0, value, 1.0])
        with pytest.raises(DataError, match=rf"label column 'stars' \(task 'rating'\) must be a class index, a whole "
                                            rf"number in 0..2: row 2 holds {value:g}"):
            Encoder(schema).fit(good).transform(bad)
    with pytest.raises(DataError, match="column 'stars' must be numeric: row 1 holds 'high'"):
        Encoder(schema).fit(good).transform(good.assign(stars=["0", "high", "1", "2"]))
    mapped = schema_of({"name": "rating", "label": "stars", "type": "multiclass", "options": {"classes": 3},
                        "values": {"low": 0, "mid": 1, "high": 2}})
    text = good.assign(stars=["low", "high", None, "mid"])
    assert Encoder(mapped).fit(text).transform(text).labels[:, 0].tolist() == [0.0, 2.0, 0.0, 1.0]


@pytest.mark.parametrize("options, message", [
    ({}, "task 'rating' option classes: Field required"),
    ({"classes": 1}, "classes: Input should be greater than or equal to 2"),
    ({"classes": 3, "names": ["a", "b"]}, "names gives 2 names for 3 classes"),
    ({"classes": 3, "names": ["a", "b", "a"]}, r"names must be distinct, .* got \['a'\]"),
    ({"classes": 2, "names": ["label", "b"]}, r"not \['label', 'in_space'\]"),
    ({"classes": 3, "rank_class": 3}, r"rank_class 3 is not a class index 0..2"),
    ({"classes": 3, "rank_class": "top"}, "rank_class 'top' is not a class name"),
    ({"classes": 3, "class_values": [1.0, 2.0]}, "class_values needs 3 finite values"),
    ({"classes": 2, "class_values": [1.0, 2.0], "rank_class": 1}, "give one of them"),
    ({"classes": 2, "bins": 3}, r"has no option\(s\) \['bins'\]"),
])
def test_bad_options_name_the_task_and_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        schema_of({"name": "rating", "type": "multiclass", "options": options})


def test_nested_events_and_binary_only_models_refuse_a_multiclass_task():
    with pytest.raises(ValueError, match="task 'five' within 'rating': both must predict a probability"):
        schema_of(rating(3), {"name": "five", "within": "rating"})
    with pytest.raises(ValueError, match="task 'rating' within 'click': both must predict a probability"):
        schema_of(CLICK, rating(3) | {"within": "click"})
    schema = schema_of(CLICK, rating(3))
    with pytest.raises(ValueError, match="esmm needs exactly two binary tasks"):
        models.create("esmm", schema)
    with pytest.raises(ValueError, match="aitm needs two or more binary tasks"):
        models.create("aitm", schema)


# -- every model -----------------------------------------------------------------------------


def learnable(rows=512, seed=0):
    """x `[rows, 4]`, a user id, and labels: click from x0, a class 0..3 from x1 and x2
    (learnable), watch from x3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=g)
    users = torch.randint(0, 6, (rows, 1), generator=g)
    score = x[:, 1] + 0.5 * x[:, 2]
    labels = torch.stack([(x[:, 0] > 0).float(), torch.bucketize(score, torch.tensor([-0.8, 0.0, 0.8])).float(),
                          2 * x[:, 3]], 1)
    return Features(users, x), labels


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_trains_a_multiclass_task(name):
    schema = schema_of(CLICK, rating(4), WATCH, sparse=[{"name": "u", "vocab_size": 6, "embedding_dim": 4}])
    if name in ("esmm", "aitm"):  # defined for binary tasks only
        with pytest.raises(ValueError, match="binary tasks"):
            models.create(name, schema)
        return
    small = {k: [8] for k, v in models.model_options(name).items() if k.endswith("hidden") and v}
    if name == "dbmtl":
        del small["expert_hidden"]  # it shapes an MMoE, off by default
    if name == "pepnet":
        small["prior_features"] = ["u"]  # PPNet scales every tower layer, the C logits' too
    torch.manual_seed(0)
    model = models.create(name, schema, **small)
    tasks = TaskSet(schema)
    features, labels = learnable(128)
    mask = torch.ones_like(labels, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)

    def rating_loss():
        model.eval()
        with torch.no_grad():
            return float(tasks.losses(model(features).logits, labels, mask)[1])

    before = rating_loss()
    model.train()
    for _ in range(25):
        optimizer.zero_grad()
        out = model(features)
        loss = tasks.losses(out.logits, labels, mask).sum()
        (loss if out.penalty is None else loss + out.penalty).backward()
        optimizer.step()
    assert out.logits.shape == (128, 6)
    assert rating_loss() < 0.8 * before  # log 4 = 1.39 at the start


# -- training, predict, export, serve, rank --------------------------------------------------


def table_of(rows=2500, seed=0):
    features, labels = learnable(rows, seed)
    x = features.dense.numpy()
    return pd.DataFrame({**{f"x{i}": x[:, i] for i in range(4)}, "u": features.ids[:, 0].numpy().astype(str),
                         "click": labels[:, 0].numpy(), "stars": labels[:, 1].numpy(), "watch": labels[:, 2].numpy()})


CONFIG = {
    "seed": 1,
    "features": {"dense": [f"x{i}" for i in range(4)], "sparse": ["u"]},
    "tasks": ["click", {"name": "rating", "label": "stars", "type": "multiclass",
                        "options": {"classes": 4, "names": ["bad", "fair", "good", "great"],
                                    "class_values": [1.0, 2.0, 3.0, 5.0]}},
              {"name": "watch", "type": "regression"}],
    "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
    "train": {"epochs": 4, "batch_size": 128, "lr": 0.01, "progress": False,
              "early_stopping": {"metric": "macro_auc/rating"}},
    "rank": {"weights": {"click": 1.0, "rating": 0.5}},
}
RATING_COLUMNS = ["rating:bad", "rating:fair", "rating:good", "rating:great"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multiclass") / "model"
    model = mtlrec.fit(CONFIG, train=table_of(), folder=folder)
    return model, folder, table_of(77, seed=5)


def test_training_beats_the_constant_baseline_and_predict_gives_a_column_per_class(trained):
    model, folder, other = trained
    metrics = model.evaluate(other)
    encoder = model.encoder
    baseline = constant_baseline(TaskSet(encoder.schema), encoder.transform(table_of()), encoder.transform(other))
    assert baseline["macro_auc/rating"] == 0.5  # one constant: every pair ties
    assert metrics["macro_auc/rating"] > 0.85
    assert metrics["accuracy/rating"] > baseline["accuracy/rating"] + 0.2
    assert metrics["logloss/rating"] < 0.7 * baseline["logloss/rating"]
    predicted = model.predict(other)
    assert predicted.columns.tolist() == ["click", *RATING_COLUMNS, "watch"]
    np.testing.assert_allclose(predicted[RATING_COLUMNS].sum(axis=1), 1.0, rtol=1e-6)
    assert (predicted[RATING_COLUMNS].to_numpy().argmax(1) == other["stars"]).mean() == pytest.approx(
        metrics["accuracy/rating"])
    pd.testing.assert_frame_equal(load(folder).predict(other), predicted)
    data = encoder.transform(other)
    rows = prediction_table(model.tasks, model.outputs(data)[0], data)
    assert rows.columns.tolist() == ["click", "click:label", "click:in_space", *RATING_COLUMNS, "rating:label",
                                     "rating:in_space", "watch", "watch:label", "watch:in_space"]
    np.testing.assert_allclose(rows[RATING_COLUMNS].to_numpy(), predicted[RATING_COLUMNS].to_numpy())
    written = pd.read_parquet(folder / "test_predictions.parquet")
    assert set(RATING_COLUMNS + ["rating:label", "rating:in_space"]) <= set(written.columns)


def test_onnx_and_torchscript_give_every_class_column(trained, tmp_path):
    import onnxruntime

    model, _, other = trained
    expected = model.predict(other).to_numpy()
    sparse = {"u": np.array(other["u"].tolist(), dtype=object)}
    dense = other[[f"x{i}" for i in range(4)]].to_numpy(dtype=np.float32)
    session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx")))
    got = session.run(["predictions"], sparse | {"dense": dense})[0]
    assert got.shape == (77, 6)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    scripted = torch.jit.load(str(export_torchscript(model, tmp_path / "m.pt")))
    got = scripted({"u": other["u"].tolist()}, torch.from_numpy(dense)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_serve_answers_the_class_probabilities_as_an_array(trained, backend):
    model, folder, other = trained
    client = TestClient(create_app(folder, backend=backend))
    assert client.get("/health").json()["classes"] == {"rating": ["bad", "fair", "good", "great"]}
    rows = [{"u": r.u, **{f"x{i}": getattr(r, f"x{i}") for i in range(4)}} for r in other.head(12).itertuples()]
    answer = client.post("/predict", json={"rows": rows})
    assert answer.status_code == 200
    got = answer.json()["predictions"]
    assert list(got[0]) == ["click", "rating", "watch", "score"]
    expected = model.predict(pd.DataFrame(rows))
    np.testing.assert_allclose([r["rating"] for r in got], expected[RATING_COLUMNS].to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose([[r["click"], r["watch"]] for r in got], expected[["click", "watch"]].to_numpy(),
                               atol=1e-5, rtol=0)
    # the score reads the rating's expected class value, 1 P(bad) + 2 P(fair) + 3 P(good) + 5 P(great)
    by_hand = expected["click"] * (expected[RATING_COLUMNS].to_numpy() @ [1.0, 2.0, 3.0, 5.0]) ** 0.5
    np.testing.assert_allclose([r["score"] for r in got], by_hand, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([r["score"] for r in got], fused_score(expected, pd.DataFrame(rows),
                                                                      model.config.rank, model.schema),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options, read", [
    ({}, lambda p: p @ [0.0, 1.0, 2.0]),  # the expected class index
    ({"class_values": [1.0, 3.0, 10.0]}, lambda p: p @ [1.0, 3.0, 10.0]),
    ({"rank_class": 2}, lambda p: p[:, 2]),
    ({"names": ["no", "maybe", "yes"], "rank_class": "maybe"}, lambda p: p[:, 1]),
])
def test_the_fused_score_reads_the_chosen_class_or_the_expected_value(options, read):
    schema = schema_of(CLICK, rating(3, **options))
    names = TaskSet(schema).output_names
    probs = plain_softmax(np.random.default_rng(3).normal(size=(6, 3)))
    predictions = pd.DataFrame(np.column_stack([np.linspace(0.1, 0.9, 6), probs]), columns=names)
    config = RankConfig(weights={"click": 1.0, "rating": 2.0})
    expected = predictions["click"] * np.maximum(read(probs), 1e-12) ** 2.0
    np.testing.assert_allclose(fused_score(predictions, pd.DataFrame(index=range(6)), config, schema), expected,
                               rtol=1e-12)
    kind = schema.tasks[1].kind
    labels = np.array([0.0, 2.0, np.nan, 1.0])
    relevance = kind.rank_label(labels)  # the label read as the prediction is: [y = class], or v_y
    assert np.isnan(relevance[2])
    np.testing.assert_allclose(relevance[[0, 1, 3]], read(np.eye(3)[[0, 2, 1]]))


def test_rank_table_writes_every_class_and_an_ndcg_on_the_expected_rating(trained):
    model, _, other = trained
    table = other.assign(user=np.arange(len(other)) % 7)
    top, metrics, notes = rank_table(model, table, "user", 3)
    assert {f"p_{c}" for c in RATING_COLUMNS} <= set(top.columns) and (top["rank"] <= 3).all()
    assert set(metrics) == {"gauc/click", "ndcg@3"} and notes == []
    assert 0.5 < metrics["ndcg@3"] <= 1.0
    with pytest.raises(DataError, match=r"label column 'stars' \(task 'rating'\) must be a class index"):
        rank_table(model, table.assign(stars=table["stars"] + 0.5), "user", 3)

"""The house: task kinds, model registry and typed options, the batch-source protocol.

A task kind and a model can each be added as one class registered beside itself; these
tests add one of each from here (and take it away again) and run it through a config.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import dense_schema
from pydantic import Field

from mtlrec import models, tasks
from mtlrec.config import ConfigError, load_config
from mtlrec.data import DataError, Encoder, TensorData
from mtlrec.data.features import Features
from mtlrec.data.streaming import ParquetStream
from mtlrec.experiment import run_experiment
from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import ModelOptions
from mtlrec.models.registry import _REGISTRY, register_model
from mtlrec.schema import Schema
from mtlrec.tasks import KINDS, Metric, TaskKind, TaskSet, register_kind
from mtlrec.train.evaluation import constant_baseline


# ------------------------------------------------------------------ task kinds
def test_mixed_kinds_score_each_column_by_its_own_kind():
    torch.manual_seed(0)
    schema = dense_schema(tasks=("click", "watch", "shares"), types=["binary", "regression", "count"])
    logits = torch.randn(40, 3, requires_grad=True)
    labels = torch.stack([torch.randint(0, 2, (40,)).float(), torch.randn(40), torch.poisson(torch.full((40,), 2.0))], 1)
    mask = torch.rand(40, 3) > 0.3
    got = TaskSet(schema).losses(logits, labels, mask)
    k0, k1, k2 = mask.T
    expected = torch.stack([
        F.binary_cross_entropy_with_logits(logits[k0, 0], labels[k0, 0]),
        F.mse_loss(logits[k1, 1], labels[k1, 1]),
        F.poisson_nll_loss(logits[k2, 2], labels[k2, 2], log_input=True, full=False),  # exp(z) - y z
    ])
    torch.testing.assert_close(got, expected)
    predictions = TaskSet(schema).predict(logits.detach())
    torch.testing.assert_close(predictions, torch.stack(
        [torch.sigmoid(logits[:, 0]), logits[:, 1], torch.exp(logits[:, 2])], 1).detach())


def test_a_kind_never_sees_another_kinds_logits():
    """A huge regression logit would overflow the count kind's exp; its gradient stays finite."""
    schema = dense_schema(tasks=("watch", "shares"), types=["regression", "count"])
    logits = torch.tensor([[500.0, 0.5]], requires_grad=True)
    losses = TaskSet(schema).losses(logits, torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0] == pytest.approx(2 * 499.0)


def test_count_metrics_and_baseline_against_their_formulas():
    schema = dense_schema(tasks=("shares",), types=["count"])
    y = np.array([0.0, 1, 3, 2])
    p = np.array([0.5, 1.5, 2.0, 2.0])
    m = TaskSet(schema).metrics(p[:, None], y[:, None], np.ones((4, 1), dtype=bool))
    terms = [2 * ((yi * math.log(yi / pi) if yi > 0 else 0.0) - (yi - pi)) for yi, pi in zip(y, p)]
    assert m["poisson_deviance/shares"] == pytest.approx(sum(terms) / 4)
    assert m["mae/shares"] == pytest.approx(np.abs(p - y).mean())
    assert TaskSet(schema).primary_metrics == ["poisson_deviance/shares"]
    assert not tasks.higher_is_better("poisson_deviance/shares")
    labels, mask = torch.tensor([[1.0], [2.0], [9.0]]), torch.tensor([[True], [True], [False]])
    assert TaskSet(schema).predict(TaskSet(schema).baseline_logits(labels, mask)).item() == pytest.approx(1.5)


def count_table(rows=4000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 4))
    rate = np.exp(0.8 * x[:, 0] - 0.5 * x[:, 1])
    return pd.DataFrame({**{f"x{i}": x[:, i] for i in range(4)}, "shares": rng.poisson(rate).astype(float),
                         "click": (x[:, 2] + rng.standard_normal(rows) > 0).astype(float)})


def test_a_count_task_trains_through_a_config_and_beats_a_constant(tmp_path):
    count_table().to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config({
        "data": {"source": "files", "train": str(tmp_path / "train.csv")},
        "features": {"dense": [{"name": f"x{i}"} for i in range(4)]},
        "tasks": [{"name": "click"}, {"name": "shares", "type": "count"}],
        "model": {"name": "mmoe", "expert_hidden": [16], "tower_hidden": [8]},
        "train": {"epochs": 6, "batch_size": 128, "lr": 0.01, "progress": False,
                  "early_stopping": {"metric": "poisson_deviance/shares"}},
    })
    result = run_experiment(cfg, tmp_path / "model")
    splits_encoder = result.trained.encoder
    test = result.test_metrics
    table = count_table(seed=1)
    const = constant_baseline(TaskSet(splits_encoder.schema), splits_encoder.transform(count_table()),
                              splits_encoder.transform(table))
    assert test["poisson_deviance/shares"] < 0.8 * const["poisson_deviance/shares"]
    predicted = result.trained.predict(table)["shares"]
    assert (predicted > 0).all()
    bad = table.assign(shares=-1.0)
    with pytest.raises(DataError, match="label column 'shares' must be finite and >= 0: row 0 holds -1"):
        result.trained.evaluate(bad)


@pytest.fixture
def hinge_kind():
    """A kind defined outside mtlrec, as a user would: one class, registered."""

    @register_kind
    class Hinge(TaskKind):
        name = "hinge"
        metrics = (Metric("accuracy", lambda y, p: float(np.mean((p > 0) == (y > 0))), True),)
        label_rule = "-1 or 1"

        def loss(self, logits, labels):
            return torch.relu(1 - labels * logits)

        def invalid_labels(self, values):
            return (values != -1) & (values != 1)

    yield Hinge
    del KINDS["hinge"]


def test_a_new_kind_is_one_registered_class(hinge_kind, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 3))
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "side": np.where(x[:, 0] > 0, 1.0, -1.0),
                  "y": (x[:, 1] > 0).astype(float)}).to_csv(tmp_path / "t.csv", index=False)
    cfg = load_config({
        "data": {"source": "files", "train": str(tmp_path / "t.csv")},
        "features": {"dense": [{"name": c} for c in "abc"]},
        "tasks": [{"name": "y"}, {"name": "side", "type": "hinge"}],
        "model": {"name": "shared_bottom", "hidden": [16], "tower_hidden": [8]},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.01, "progress": False,
                  "early_stopping": {"metric": "accuracy/side"}},
    })
    result = run_experiment(cfg)
    assert result.test_metrics["accuracy/side"] > 0.9
    with pytest.raises(ConfigError, match=r"unknown task type 'hinge2'; allowed: \['binary', 'regression', 'count', 'focal', 'tweedie', 'lognormal', 'multiclass', 'hinge'\]"):
        load_config({"tasks": [{"name": "y", "type": "hinge2"}], "features": {"dense": [{"name": "a"}]},
                     "data": {"source": "files", "train": "t.csv"}})


# ------------------------------------------------------- registry and options
class ScaledOptions(ModelOptions):
    scale: float = Field(2.0, gt=0)


@pytest.fixture
def linear_model():
    """A model defined outside mtlrec: one backbone class with its options, registered."""

    @register_model("scaled_linear", ScaledOptions, "x W, scaled: a test model")
    class ScaledLinear(Backbone):
        def __init__(self, in_dim, task_names, options):
            super().__init__()
            self.num_tasks, self.scale = len(task_names), options.scale
            self.linear = torch.nn.Linear(in_dim, 4)
            self.out_dim = 4

        def forward(self, x):
            return BackboneOutput((self.scale * self.linear(x)).unsqueeze(1).expand(-1, self.num_tasks, -1), {})

    yield ScaledLinear
    del _REGISTRY["scaled_linear"]


def test_a_new_model_is_one_registered_class(linear_model, tiny_config):
    raw = tiny_config | {"model": {"name": "scaled_linear", "scale": 0.5, "tower_hidden": [8]}}
    result = run_experiment(load_config(raw))
    assert result.trained.model.backbone.scale == 0.5
    assert result.history[-1]["valid/loss"] < result.history[0]["valid/loss"]
    assert models.model_options("scaled_linear")["scale"] == 2.0
    with pytest.raises(ConfigError, match=r"model 'scaled_linear' option scale: Input should be greater than 0"):
        load_config(tiny_config | {"model": {"name": "scaled_linear", "scale": -1}})


@pytest.mark.parametrize("options, message", [
    ({"num_levels": 2}, "model 'cgc' fixes num_levels = 1"),
    ({"task_experts": 2.5}, "model 'cgc' option task_experts"),
    ({"dropout": 1.0}, "model 'cgc' option dropout: Input should be less than 1"),
    ({"expert_hidden": [0]}, "model 'cgc' option expert_hidden"),
    ({"activation": "swish"}, "model 'cgc' option activation: Input should be 'relu', 'gelu', 'silu', 'tanh', 'sigmoid' or 'prelu'"),
])
def test_bad_model_options_are_config_errors_naming_the_option(tiny_config, options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config | {"model": {"name": "cgc", **options}})


def test_cgc_is_ple_with_one_level():
    schema = dense_schema(5)
    torch.manual_seed(0)
    cgc = models.create("cgc", schema, expert_hidden=[8], task_experts=[1, 2])
    torch.manual_seed(0)
    ple = models.create("ple", schema, expert_hidden=[8], task_experts=[1, 2], num_levels=1)
    x = torch.randn(6, 5)
    torch.testing.assert_close(cgc(Features(torch.zeros(6, 0, dtype=torch.long), x)).logits,
                               ple(Features(torch.zeros(6, 0, dtype=torch.long), x)).logits, atol=0, rtol=0)
    assert "num_levels" not in models.model_options("cgc")


# --------------------------------------------------------- batch-source protocol
def rows(n):
    return TensorData(torch.arange(n)[:, None], torch.arange(n, dtype=torch.float32)[:, None],
                      torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool))


def test_shards_of_a_shuffled_epoch_make_up_one_process_batches():
    data = rows(103)
    one = [b.sparse[:, 0].tolist() for b in data.shard(0, 1).batches(20, torch.Generator().manual_seed(5))]
    parts = [[b.sparse[:, 0].tolist() for b in data.shard(r, 2).batches(10, torch.Generator().manual_seed(5))]
             for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == one
    assert data.shard(1, 2).num_batches(10) == len(one) == 6


def test_shards_in_order_are_contiguous_blocks():
    data = rows(11)
    blocks = [torch.cat([b.sparse[:, 0] for b in data.shard(r, 3).batches(2)]).tolist() for r in range(3)]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_a_stream_shard_reads_every_nth_file(tmp_path):
    for i in range(5):
        pd.DataFrame({"x": [float(i)] * (i + 1), "y": [1.0] * (i + 1)}).to_parquet(tmp_path / f"p{i}.parquet")
    schema = Schema(dense=[{"name": "x"}], tasks=[{"name": "y"}])
    stream = ParquetStream(tmp_path, Encoder(schema).fit(pd.DataFrame({"x": [0.0, 1.0], "y": [1.0, 0.0]})))
    shard = stream.shard(1, 2)
    assert [f.name for f in shard.files] == ["p1.parquet", "p3.parquet"] and len(shard) == 2 + 4
    assert len(stream) == 15  # the stream itself is unchanged
    with pytest.raises(DataError, match="too few .parquet files for 6 processes"):
        stream.shard(5, 6)

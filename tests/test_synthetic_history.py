"""Synthetic behaviour history (mtlrec.data.synthetic, steps 5-6): shapes, determinism, the
overlap driving one task, and a short training run with target attention."""

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import ConfigError, load_config
from mtlrec.data import SyntheticConfig, make_synthetic, synthetic_schema
from mtlrec.experiment import run_experiment
from mtlrec.nn.pooling import AttentionPooling


def config(rows=2000, task_types=("binary", "binary"), **history):
    return SyntheticConfig(rows=rows, dim=6, task_types=list(task_types), history=history)


def overlap(table: pd.DataFrame, clusters: int) -> np.ndarray:
    """Share of each row's history in its item's cluster (item i in cluster i mod C), from the columns."""
    lengths = table["history"].map(len).to_numpy()
    elements = np.concatenate(table["history"].to_numpy())
    same = elements % clusters == np.repeat(table["item"].to_numpy() % clusters, lengths)
    return np.bincount(np.repeat(np.arange(len(table)), lengths), weights=same, minlength=len(table)) / lengths


def test_history_has_the_declared_lengths_and_ids():
    table = make_synthetic(config(items=60, clusters=6, min_length=3, max_length=7), seed=0)
    lengths = table["history"].map(len)
    assert lengths.min() == 3 and lengths.max() == 7 and set(lengths) == set(range(3, 8))
    elements = np.concatenate(table["history"].to_numpy())
    assert elements.dtype == np.int64 and table["item"].dtype == np.int64
    assert elements.min() >= 0 and elements.max() < 60 and table["item"].between(0, 59).all()
    assert len(np.unique(elements)) == 60 and table["item"].nunique() > 50  # every cluster's items are drawn
    assert list(table.columns)[-4:] == ["item", "history", "y1", "y2"]


def test_history_is_deterministic_per_seed():
    cfg = config(items=40, clusters=4)
    a, b, c = make_synthetic(cfg, seed=1), make_synthetic(cfg, seed=1), make_synthetic(cfg, seed=2)
    for name in ("item", "y1"):
        assert a[name].equals(b[name]) and not a[name].equals(c[name])
    assert all(np.array_equal(x, y) for x, y in zip(a["history"], b["history"]))
    assert not all(np.array_equal(x, y) for x, y in zip(a["history"], c["history"]))


def test_history_changes_only_the_driven_task_by_strength_times_overlap():
    """Regression labels show the added term exactly; every other column matches history off."""
    base = SyntheticConfig(rows=3000, dim=6, task_types=["regression", "regression", "regression"])
    with_history = SyntheticConfig(**base.model_dump(exclude={"history"}),
                                   history={"items": 50, "clusters": 5, "task": 2, "strength": 3.0})
    off, on = make_synthetic(base, seed=4), make_synthetic(with_history, seed=4)
    pd.testing.assert_frame_equal(on.drop(columns=["item", "history", "y2"]), off.drop(columns=["y2"]))
    added = on["y2"] - off["y2"]
    np.testing.assert_allclose(added, 3.0 * overlap(on, clusters=5), atol=1e-5)
    assert added.std() > 0.3  # the overlap varies between rows


def test_history_driven_task_label_rate_follows_the_overlap():
    table = make_synthetic(config(rows=20_000), seed=0)
    share = overlap(table, clusters=20)
    high, low = share >= 0.5, share == 0
    assert high.sum() > 500 and low.sum() > 500
    assert table["y1"][high].mean() - table["y1"][low].mean() > 0.3  # y1 is driven by the overlap
    assert abs(table["y2"][high].mean() - table["y2"][low].mean()) < 0.05  # y2 is not


@pytest.mark.parametrize("pooling", ["none", "mean", "attention"])
def test_schema_declares_item_and_history_on_one_table(pooling):
    schema = synthetic_schema(config(pooling=pooling, max_length=12, embedding_dim=4))
    features = {f.name: f for f in schema.sparse}
    assert not features["item"].multi_valued and features["item"].table == "item"
    if pooling == "none":
        assert "history" not in features
        return
    history = features["history"]
    assert history.multi_valued and history.table == "item" and history.max_length == 12
    assert history.pooling == pooling and history.embedding_dim == 4
    assert (history.attention is not None) == (pooling == "attention")
    if history.attention is not None:
        assert history.attention.target == "item"


@pytest.mark.parametrize("history, problem", [
    ({"task": 3}, "history.task 3: there are 2 tasks"),
    ({"min_length": 5, "max_length": 4}, "min_length cannot exceed"),
    ({"items": 5, "clusters": 6}, "clusters cannot exceed"),
])
def test_bad_history_settings_are_config_errors(history, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config({"data": {"synthetic": {"dim": 4, "history": history}}})


def test_attention_pooling_config_trains_and_reads_the_history():
    raw = {"seed": 1,
           "data": {"synthetic": {"rows": 4000, "dim": 4, "sin_terms": 0, "task_types": ["binary", "binary"],
                                  "history": {"items": 20, "clusters": 4, "max_length": 8, "strength": 8.0,
                                              "pooling": "attention", "embedding_dim": 4}}},
           "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
           "train": {"epochs": 6, "batch_size": 64, "lr": 0.03, "threads": 1, "progress": False,
                     "early_stopping": {"patience": None}}}  # 6 epochs: past the plateau of the small init
    result = run_experiment(load_config(raw))
    assert any(isinstance(m, AttentionPooling) for m in result.trained.model.modules())
    assert 0.0 <= result.test_metrics["auc/y1"] <= 1.0 and 0.0 <= result.test_metrics["auc/y2"] <= 1.0
    # the same rows with all-matching vs no matching history: y1's prediction must follow the overlap
    table = make_synthetic(load_config(raw).data.synthetic, seed=1).iloc[:500].drop(columns=["y1", "y2"])
    items = table["item"].to_numpy()
    matching, other = table.copy(), table.copy()
    matching["history"] = list(np.stack([items, items + 4, items + 8], axis=1) % 20)  # same cluster (mod 4)
    other["history"] = list(np.stack([items + 1, items + 5, items + 9], axis=1) % 20)  # the next cluster
    gap = result.trained.predict(matching)["y1"] - result.trained.predict(other)["y1"]
    assert gap.mean() > 0.2

"""GAUC and NDCG@k among the validation and test metrics (rank.group_by), and early stopping on them."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import mtlrec
from mtlrec.config import ConfigError, load_config
from mtlrec.data import DataError


def tables(seed=0, users=60, per_user=12):
    rng = np.random.default_rng(seed)
    n = users * per_user
    t = pd.DataFrame({"user": np.repeat([f"u{i}" for i in range(users)], per_user),
                      "age": rng.normal(size=n), "item": rng.choice([f"i{k}" for k in range(15)], n)})
    t["click"] = ((t.age + (t.item < "i5") + rng.normal(scale=0.7, size=n)) > 0.6).astype(int)
    t["watch"] = t.age + rng.normal(size=n)
    t["like"] = np.where(t.click == 1, (rng.random(n) < 0.5).astype(float), np.nan)  # only on clicks
    order = rng.permutation(users)
    part = lambda ids: t[t.user.isin([f"u{i}" for i in ids])].reset_index(drop=True)  # noqa: E731
    return part(order[:40]), part(order[40:50]), part(order[50:])


def config(**rank):
    return {"features": {"dense": ["age"], "sparse": ["item"]},
            "tasks": ["click", {"name": "like", "label": "like"}, {"name": "watch", "type": "regression"}],
            "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
            "rank": {"group_by": "user", "ndcg_k": 5, "weights": {"click": 1.0, "like": 0.5}} | rank,
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.02, "progress": False}}


def plain_gauc(y, p, groups):
    total = weight = 0.0
    for g in pd.unique(groups):
        rows = groups == g
        if 0 < y[rows].sum() < rows.sum():
            total += rows.sum() * roc_auc_score(y[rows], p[rows])
            weight += rows.sum()
    return total / weight


def plain_ndcg(relevance, score, groups, k):
    values = []
    for g in pd.unique(groups):
        rows = np.flatnonzero(groups == g)
        rel = relevance[rows]
        order = rows[np.argsort(-score[rows], kind="stable")][:k]
        gains = lambda r: sum((2 ** x - 1) / math.log2(i + 2) for i, x in enumerate(r))  # noqa: E731
        ideal = gains(sorted(rel, reverse=True)[:k])
        if ideal > 0:
            values.append(gains(relevance[order]) / ideal)
    return float(np.mean(values))


def test_validation_and_test_metrics_hold_gauc_and_ndcg_equal_to_plain_computations():
    train, valid, test = tables()
    model = mtlrec.fit(config(), train=train, valid=valid, test=test)
    assert {"valid/gauc/click", "valid/gauc/like", "valid/ndcg@5"} <= set(model.history[-1])
    assert "gauc/watch" not in model.test_metrics  # a regression task has no AUC
    p = model.predict(test)
    groups = test.user.to_numpy()
    assert model.test_metrics["gauc/click"] == pytest.approx(plain_gauc(test.click.to_numpy(), p.click.to_numpy(),
                                                                        groups), abs=1e-6)
    liked = test.like.notna().to_numpy()  # like's sample space: the clicked rows
    assert model.test_metrics["gauc/like"] == pytest.approx(
        plain_gauc(test.like.to_numpy()[liked], p.like.to_numpy()[liked], groups[liked]), abs=1e-6)
    score = np.log(p.click.to_numpy()) + 0.5 * np.log(p.like.to_numpy())  # prod_k p_k^w_k, in log space
    relevance = test.click.to_numpy() + 0.5 * np.nan_to_num(test.like.to_numpy())
    assert model.test_metrics["ndcg@5"] == pytest.approx(plain_ndcg(relevance, score, groups, 5), abs=1e-6)
    assert model.evaluate(test)["gauc/click"] == pytest.approx(model.test_metrics["gauc/click"], abs=1e-6)


def test_early_stopping_watches_gauc_and_keeps_its_best_epoch():
    train, valid, test = tables(1)
    model = mtlrec.fit(config() | {"train": config()["train"] | {
        "epochs": 6, "lr": 0.05, "early_stopping": {"metric": "gauc/click", "patience": 10}}},
        train=train, valid=valid, test=test)
    history = [row["valid/gauc/click"] for row in model.history]
    best = int(np.argmax(history))
    assert model.evaluate(valid)["gauc/click"] == pytest.approx(history[best], abs=1e-6)
    single = mtlrec.fit(config() | {"model": {"name": "single_task", "hidden": [8], "tower_hidden": [4]},
                                    "train": config()["train"] | {"early_stopping": {"metric": "ndcg@5"}}},
                        train=train, valid=valid, test=test)
    assert "ndcg@5" in single.test_metrics


def test_ranking_metrics_need_their_column_and_say_so():
    train, valid, test = tables()
    with pytest.raises(ConfigError, match="gauc/click"):
        load_config(config() | {"rank": {}, "train": {"early_stopping": {"metric": "gauc/click"}}})
    with pytest.raises(DataError, match=r"missing column\(s\) \['user'\]"):
        mtlrec.fit(config(), train=train, valid=valid.drop(columns="user"), test=test)
    valid.loc[3, "user"] = None
    with pytest.raises(DataError, match="rank.group_by column 'user' is empty at row 3"):
        mtlrec.fit(config(), train=train, valid=valid, test=test)
    with pytest.raises(ConfigError, match="data.streaming"):
        load_config(config() | {"data": {"source": "files", "streaming": True, "train": "a.parquet",
                                         "valid": "b.parquet"}})

"""The fused ranking score and per-group offline metrics."""

import math

import numpy as np
import pandas as pd
import pytest

from mtlrec.cli import main
from mtlrec.config import ConfigError, RankConfig, load_config
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.rank import fused_score, gauc, item_factor, ndcg_at_k
from helpers import dense_schema

SCHEMA = dense_schema(tasks=("click", "like", "time"), types=["binary", "binary", "regression"])


def test_fused_score_is_the_weighted_product():
    preds = pd.DataFrame({"click": [0.5, 0.1], "like": [0.2, 0.9], "time": [30.0, 0.0]})
    table = pd.DataFrame({"length": [60.0, 10.0]})
    cfg = RankConfig(weights={"click": 1.0, "like": 0.5, "time": 0.2},
                     item={"column": "length", "transform": "log1p", "power": 0.5})
    expected = [0.5 * 0.2**0.5 * 30**0.2 * math.log1p(60) ** 0.5, 0.1 * 0.9**0.5 * 1e-12**0.2 * math.log1p(10) ** 0.5]
    np.testing.assert_allclose(fused_score(preds, table, cfg, SCHEMA), expected, rtol=1e-9)
    only_click = fused_score(preds, table, RankConfig(weights={"click": 1.0}), SCHEMA)
    np.testing.assert_allclose(only_click, [0.5, 0.1])
    np.testing.assert_allclose(fused_score(preds, table, RankConfig(), SCHEMA), [0.5 * 0.2 * 30, 0.1 * 0.9 * 1e-12])
    np.testing.assert_allclose(item_factor(np.array([4.0, -1.0]), "sqrt", 2.0), [4.0, 1e-24])


def test_gauc_weights_groups_by_size_and_skips_one_class_groups():
    labels = np.array([1, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.5, 0.2, 0.3])
    groups = np.array(["a", "a", "b", "b", "b", "c", "c"])
    # a: AUC 1 (2 rows); b: positive 0.7 vs negatives 0.8, 0.5 -> 0.5 (3 rows); c: one class, skipped
    assert gauc(labels, scores, groups) == pytest.approx((2 * 1.0 + 3 * 0.5) / 5)
    assert math.isnan(gauc(np.ones(3), np.ones(3), np.array([1, 1, 2])))


def test_ndcg_at_k_by_hand():
    rel = np.array([3.0, 0.0, 1.0, 0.0, 2.0])
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3])
    groups = np.array([1, 1, 1, 2, 2])
    # group 1 ranked: 0.9 (rel 0), 0.5 (rel 1), 0.1 (rel 3); ideal: 3, 1, 0
    dcg = (2**0 - 1) / math.log2(2) + (2**1 - 1) / math.log2(3)
    idcg = (2**3 - 1) / math.log2(2) + (2**1 - 1) / math.log2(3)
    # group 2: 0.3 (rel 2) first, 0.2 (rel 0): perfect
    assert ndcg_at_k(rel, scores, groups, 2) == pytest.approx((dcg / idcg + 1.0) / 2)


def trained_with_users(raw, tmp_path):
    """Train two binary tasks of `raw` into tmp_path/m; its test split with a `user` column
    (20 users) written to tmp_path/t.csv and returned."""
    raw["data"]["synthetic"]["task_types"] = ["binary", "binary"]
    cfg = load_config(raw)
    run_experiment(cfg, tmp_path / "m")
    test = load_splits(cfg).test
    test["user"] = np.arange(len(test)) % 20
    test.to_csv(tmp_path / "t.csv", index=False)
    return test


def test_rank_command(tmp_path, tiny_config, capsys):
    raw = tiny_config | {"rank": {"weights": {"y1": 1.0, "y2": 0.0}, "relevance": {"y1": 1.0}}}
    trained_with_users(raw, tmp_path)
    out = tmp_path / "ranked.csv"
    assert main(["rank", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--group-by", "user", "--top-k", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ranked = pd.read_csv(out)
    assert len(ranked) == 60 and ranked.groupby("user")["rank"].apply(list).map(lambda r: r == [1, 2, 3]).all()
    first = ranked.groupby("user")["score"].apply(lambda s: (s.diff().dropna() <= 0).all())
    assert first.all()
    np.testing.assert_allclose(ranked["score"], ranked["p_y1"], rtol=1e-6)  # weights: y1 only
    assert "gauc/y1" in printed and "ndcg@3" in printed
    with pytest.raises(ConfigError, match=r"rank.weights names unknown task\(s\) \['nope'\]"):
        load_config(raw | {"rank": {"weights": {"nope": 1.0}}})
    assert main(["rank", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--group-by", "nobody"]) == 2


def test_rank_computes_labels_as_training_does_and_says_what_it_cannot_compute(tmp_path, tiny_config, capsys):
    raw = tiny_config | {"tasks": [{"name": "y1"}, {"name": "liked", "expression": "y2 == 1"}]}
    test = trained_with_users(raw, tmp_path)
    assert main(["rank", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--group-by", "user", "--top-k", "3"]) == 0
    printed = capsys.readouterr()
    from mtlrec.trained import load

    predicted = load(tmp_path / "m").predict(test)
    expected = gauc(test["y2"].to_numpy(), predicted["liked"].to_numpy(), test["user"].to_numpy())
    line = next(row for row in printed.out.splitlines() if "gauc/liked" in row)
    assert float(line.split()[-1]) == pytest.approx(expected, abs=1e-6)  # the expression's label, not skipped
    assert "ndcg@3" in printed.out and "note" not in printed.err
    # without y2 the expression cannot be evaluated: no GAUC for liked, no NDCG (its relevance names it), and notes
    test.drop(columns=["y2"]).to_csv(tmp_path / "u.csv", index=False)
    assert main(["rank", str(tmp_path / "m"), str(tmp_path / "u.csv"), "--group-by", "user", "--top-k", "3"]) == 0
    printed = capsys.readouterr()
    assert "gauc/y1" in printed.out and "gauc/liked" not in printed.out and "ndcg@3" not in printed.out
    assert "no labels for task(s) ['liked']" in printed.err and "ndcg@3 not computed" in printed.err
    # fusion weights overridden on the command line: the score is then p_y1 alone
    out = tmp_path / "ranked.csv"
    assert main(["rank", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--group-by", "user", "--top-k", "3",
                 "--set", "rank.weights={y1: 1.0}", "--out", str(out)]) == 0
    ranked = pd.read_csv(out)
    np.testing.assert_allclose(ranked["score"], ranked["p_y1"], rtol=1e-6)
    assert main(["rank", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--group-by", "user",
                 "--set", "train.lr=0.1"]) == 2
    assert "rank.* keys only" in capsys.readouterr().err

"""Public data formats, derived tasks, hashing and bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import load_config
from mtlrec.data import DataError, Encoder, read_table
from mtlrec.data.formats import CENSUS_COLUMNS, read_census
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.schema import Schema

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CENSUS = SHARED / "census-income-kdd" / "census-income.test.gz"
SAMPLES = SHARED / "samples" / "torch-rechub"
needs_census = pytest.mark.skipif(not CENSUS.exists(), reason="census file not beside the checkout")
needs_samples = pytest.mark.skipif(not SAMPLES.exists(), reason="samples not beside the checkout")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@needs_census
def test_census_file_tasks_and_split():
    table = read_census(CENSUS)
    assert table.shape == (99_762, 42)
    cfg = load_config(CONFIGS / "census.yaml", [f"data.train={CENSUS}"])
    data = Encoder(cfg.schema).fit(table).transform(table)  # labels from the tasks' expressions
    assert data.labels[:, 0].sum().item() == 6_186  # 50000+. (census-income.names: 6.20 %)
    assert data.labels[:, 1].sum().item() == 43_143  # Never married
    inputs = {f.name for f in cfg.schema.sparse + cfg.schema.dense}
    assert not inputs & {"education", "marital_stat", "instance_weight", "income"}
    assert len(cfg.schema.dense) == 7 and len(inputs) == 38  # 40 attributes less education, marital status
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (49_882, 24_940, 24_940)
    again = load_splits(cfg)
    pd.testing.assert_frame_equal(splits.test, again.test)


def census_like(path, rows, seed):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        fields = [str(rng.integers(0, 90))] + ["x"] * 40 + [rng.choice(["- 50000.", "50000+."])]
        fields[7] = rng.choice(["Never married", "Divorced"])
        for i in (5, 16, 17, 18, 30, 39):  # the other continuous columns
            fields[i] = str(rng.integers(0, 5))
        lines.append(", ".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_census_papers_protocol_splits_the_test_file_in_halves(tmp_path):
    train, test = census_like(tmp_path / "census-income.data", 300, 0), census_like(tmp_path / "census-income.test", 101, 1)
    cfg = load_config(CONFIGS / "census.yaml", [f"data.train={train}", f"data.test={test}", "data.valid_from_test=true"])
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (300, 50, 51)
    everything = list(CENSUS_COLUMNS)
    both = pd.concat([splits.valid, splits.test]).sort_values(everything).reset_index(drop=True)
    pd.testing.assert_frame_equal(both, read_census(test).sort_values(everything).reset_index(drop=True))
    with pytest.raises(DataError, match="is this a census file"):
        (tmp_path / "bad.csv").write_text("1, 2, 3\n")
        read_census(tmp_path / "bad.csv")


@needs_samples
@pytest.mark.parametrize("fmt, stem, tasks", [("ali_ccp", "ali_ccp", ["click", "purchase"]),
                                              ("aliexpress", "aliexpress", ["click", "conversion"])])
def test_ali_formats_train_on_the_samples(tmp_path, fmt, stem, tasks):
    raw = {"data": {"source": "files", "format": fmt, "train": str(SAMPLES / f"{stem}_train_sample.csv"),
                    "test": str(SAMPLES / f"{stem}_test_sample.csv")},
           "model": {"name": "esmm", "hidden": [8], "tower_hidden": [4]},
           "train": {"epochs": 1, "batch_size": 16, "progress": False}}
    cfg = load_config(raw)
    assert cfg.schema.task_names == tasks
    columns = set(read_table(SAMPLES / f"{stem}_train_sample.csv").columns)
    assert {f.name for f in cfg.schema.sparse + cfg.schema.dense} <= columns
    result = run_experiment(cfg, tmp_path / fmt)
    assert np.isfinite(result.test_metrics[f"logloss/{tasks[0]}"])


def test_task_labels_from_expression_and_value_map():
    schema = Schema(dense=[{"name": "x"}], tasks=[
        {"name": "rich", "expression": "income == '50000+.'"},
        {"name": "married", "label": "status", "values": {"yes": 1, "no": 0}},
        {"name": "adult", "type": "regression", "expression": "age >= 18"}])
    t = pd.DataFrame({"x": [1.0, 2, 3], "income": ["- 50000.", "50000+.", "- 50000."],
                      "status": ["yes", None, "no"], "age": [10, 30, 18]})
    data = Encoder(schema).fit(t).transform(t)
    assert data.labels.tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 1]]
    assert data.mask[:, 1].tolist() == [True, False, True]  # missing raw value: no label
    with pytest.raises(DataError, match=r"row 2 holds 'maybe', which task 'married''s values do not map"):
        Encoder(schema).fit(t).transform(t.assign(status=["yes", "no", "maybe"]))
    with pytest.raises(ValueError, match="either expression or label"):
        Schema(dense=[{"name": "x"}], tasks=[{"name": "a", "label": "b", "expression": "x > 1"}])


def test_hashed_ids_are_stable_and_in_range():
    schema = Schema(sparse=[{"name": "user", "hash_buckets": 50}], tasks=[{"name": "y"}])
    t = pd.DataFrame({"user": [f"u{i}" for i in range(1000)] + [None], "y": [0, 1] * 500 + [1]})
    enc = Encoder(schema).fit(t.iloc[:10])
    ids = enc.transform(t).sparse[:, 0]
    assert enc.schema.sparse[0].vocab_size == 51 and enc.vocabularies["user"] == []
    assert ids[-1] == 0 and ids[:-1].min() >= 1 and ids.max() <= 50
    assert len(set(ids[:-1].tolist())) > 40  # spread over the buckets
    assert ids.tolist() == Encoder(schema).fit(t).transform(t).sparse[:, 0].tolist()  # no fitted state needed
    assert ids[5] == Encoder(schema).fit(t).transform(t.iloc[[5]]).sparse[0, 0]


def test_empty_files_are_named(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("x,y\n")
    schema = Schema(dense=[{"name": "x"}], tasks=[{"name": "y"}])
    with pytest.raises(DataError, match="empty table"):
        Encoder(schema).fit(read_table(tmp_path / "header.csv"))
    with pytest.raises(DataError, match="unknown table format '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        read_table(tmp_path / "a.txt")
    with pytest.raises(DataError, match="no such data file"):
        read_table(tmp_path / "missing.parquet")


def test_wrong_column_type_in_parquet_is_named(tmp_path):
    schema = Schema(dense=[{"name": "x"}], tasks=[{"name": "y"}])
    good = pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]})
    enc = Encoder(schema).fit(good)
    pd.DataFrame({"x": ["1.5", "abc"], "y": [0, 1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"column 'x' must be numeric: row 1 holds 'abc'"):
        enc.transform(read_table(tmp_path / "bad.parquet"))
    assert CENSUS_COLUMNS[-1] == "income"


def test_dense_values_beyond_float32_are_named():
    schema = Schema(dense=[{"name": "x"}], tasks=[{"name": "y"}])
    enc = Encoder(schema).fit(pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}))
    with pytest.raises(DataError, match=r"column 'x': row 1 holds .*out of float32 range"):
        enc.transform(pd.DataFrame({"x": [1.0, 1e300], "y": [0, 1]}))

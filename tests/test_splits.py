"""Splits by time, per user leave-last-out and by group, each against a plain computation; the
split and the test rows saved with their source row ids."""

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import load_config
from mtlrec.data.errors import DataError
from mtlrec.data.splits import group_split, leave_last_out, random_split, time_split
from mtlrec.experiment import load_splits, run_experiment


def table(n=200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": rng.integers(0, 30, n), "t": rng.permutation(n) * 10.0, "x": rng.normal(size=n)})


def test_time_split_puts_the_latest_rows_in_test_and_the_ones_before_in_valid():
    frame = table()
    train, valid, test = time_split(frame, "t", valid_fraction=0.1, test_fraction=0.2)
    assert (len(train), len(valid), len(test)) == (140, 20, 40)
    t = frame["t"].to_numpy()
    assert t[train].max() < t[valid].min() and t[valid].max() < t[test].min()  # no future row in training
    assert sorted([*train, *valid, *test]) == list(range(200))
    dates = frame.assign(t=pd.to_datetime("2026-01-01") + pd.to_timedelta(frame["t"], unit="s"))
    dates["t"] = dates["t"].astype(str)  # dates as text are read as dates
    for got, expected in zip(time_split(dates, "t", 0.1, 0.2), (train, valid, test)):
        assert np.array_equal(got, expected)


def test_leave_last_out_takes_each_users_last_row_for_test_and_the_one_before_for_valid():
    frame = table()
    train, valid, test = leave_last_out(frame, group="user", time="t")
    for user, rows in frame.groupby("user"):
        ordered = rows.sort_values("t").index.to_numpy()
        if len(ordered) >= 3:
            assert ordered[-1] in test and ordered[-2] in valid and set(ordered[:-2]) <= set(train)
        else:
            assert set(ordered) <= set(train)
    assert sorted([*train, *valid, *test]) == list(range(200))


def test_group_split_keeps_every_group_in_one_split():
    frame = table()
    parts = group_split(frame, "user", valid_fraction=0.2, test_fraction=0.2, seed=3)
    users = [set(frame["user"].to_numpy()[rows]) for rows in parts]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert [len(u) for u in users] == [18, 6, 6]  # of 30 users
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))
    assert not np.array_equal(parts[2], group_split(frame, "user", 0.2, 0.2, seed=4)[2])


def test_random_split_is_the_seeded_shuffle():
    order = np.random.default_rng(5).permutation(100)
    train, valid, test = random_split(100, 0.1, 0.2, seed=5)
    assert np.array_equal(test, order[:20]) and np.array_equal(valid, order[20:30])
    assert np.array_equal(train, np.sort(order[30:]))


def test_bad_split_columns_and_options_are_named():
    frame = table()
    frame.loc[7, "t"] = np.nan
    with pytest.raises(DataError, match="column 't' is empty in row 7"):
        time_split(frame, "t", 0.1, 0.1)
    with pytest.raises(DataError, match="no column 'day'"):
        time_split(frame, "day", 0.1, 0.1)
    with pytest.raises(DataError, match="holds 'soon' in row 2"):
        time_split(frame.assign(t=frame["t"].fillna(1).astype(str).where(frame.index != 2, "soon")), "t", 0.1, 0.1)
    with pytest.raises(Exception, match="split 'leave_last_out' needs data.split_group and data.split_time"):
        load_config({"data": {"split": "leave_last_out"}})
    with pytest.raises(Exception, match="cuts valid and test from data.train"):
        load_config({"data": {"source": "files", "train": "a.csv", "test": "b.csv", "split": "time",
                              "split_time": "t"}})


def test_runs_save_the_split_and_the_test_rows_ids(tmp_path, tiny_config):
    frame = table(600)
    frame["c"] = frame["user"].astype(str)
    frame["y1"] = (frame["x"] > 0).astype(int)
    frame["y2"] = frame["x"] * 2
    frame.to_csv(tmp_path / "data.csv", index=False)
    raw = {"data": {"source": "files", "train": str(tmp_path / "data.csv"), "split": "time", "split_time": "t",
                    "valid_fraction": 0.2, "test_fraction": 0.2},
           "features": {"sparse": [{"name": "c"}], "dense": [{"name": "x"}]},
           "tasks": [{"name": "y1"}, {"name": "y2", "type": "regression"}],
           "model": {"name": "mmoe", "expert_hidden": [8], "tower_hidden": [4]},
           "train": {"epochs": 1, "progress": False}}
    cfg = load_config(raw)
    run_experiment(cfg, tmp_path / "run")
    split = pd.read_parquet(tmp_path / "run" / "split.parquet")
    assert split["split"].value_counts().to_dict() == {"train": 360, "valid": 120, "test": 120}
    assert sorted(split["row_id"]) == list(range(600)) and set(split["source"]) == {"train"}
    rows = pd.read_parquet(tmp_path / "run" / "test_predictions.parquet")
    test = frame.iloc[rows["row_id"]]
    assert test["t"].min() > frame.iloc[split.loc[split["split"] == "train", "row_id"]]["t"].max()
    np.testing.assert_allclose(rows["y2:label"], test["y2"], rtol=1e-6)  # the row ids point at the rows predicted
    assert np.array_equal(load_splits(cfg).ids["test"]["row_id"], rows["row_id"])

"""Cutting validation and test splits from one table, the ways ranking teams evaluate.

Each function returns the row positions (into the table) of train, valid and test, each in
table order (`random_split`: valid and test in the shuffled order):

- `random_split`: a seeded shuffle; the first test_fraction of it is test, the next
  valid_fraction valid (rows of one user may land in every split).
- `time_split`: by a time column: the latest test_fraction of the rows are test, the
  valid_fraction before them valid, the rest train (no future row trains the model; ties in
  time keep table order).
- `leave_last_out`: per user (a group column), ordered by time: the last row is test, the one
  before it valid, the rest train; users with fewer than 3 rows stay in train.
- `group_split`: whole groups (users, requests) to one split each, by a seeded shuffle of
  the groups: the first test_fraction of the groups test, the next valid_fraction valid; no
  group appears in two splits.

Example:
    >>> import pandas as pd
    >>> table = pd.DataFrame({"user": [1, 1, 1, 2, 2, 2, 2], "t": [5, 1, 3, 9, 7, 8, 6]})
    >>> [rows.tolist() for rows in leave_last_out(table, group="user", time="t")]
    [[1, 4, 6], [2, 5], [0, 3]]
    >>> [rows.tolist() for rows in time_split(table, "t", valid_fraction=0.15, test_fraction=0.3)]
    [[0, 1, 2, 6], [4], [3, 5]]
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtlrec.data.errors import DataError

Positions = tuple[np.ndarray, np.ndarray, np.ndarray]  # train, valid, test rows of the table


def random_split(n: int, valid_fraction: float, test_fraction: float, seed: int) -> Positions:
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_valid = int(round(n * test_fraction)), int(round(n * valid_fraction))
    return np.sort(order[n_test + n_valid :]), order[n_test : n_test + n_valid], order[:n_test]


def time_split(table: pd.DataFrame, time: str, valid_fraction: float, test_fraction: float) -> Positions:
    order = np.argsort(_times(table, time), kind="stable")  # oldest first; ties in table order
    n = len(order)
    n_test, n_valid = int(round(n * test_fraction)), int(round(n * valid_fraction))
    train, valid, test = order[: n - n_test - n_valid], order[n - n_test - n_valid : n - n_test], order[n - n_test :]
    return np.sort(train), np.sort(valid), np.sort(test)


def leave_last_out(table: pd.DataFrame, group: str, time: str) -> Positions:
    users = _column(table, group)
    frame = pd.DataFrame({"user": pd.factorize(users)[0], "time": _times(table, time), "row": np.arange(len(table))})
    frame = frame.sort_values(["user", "time", "row"], kind="stable")
    from_last = frame.groupby("user").cumcount(ascending=False).to_numpy()  # 0: the user's last row
    count = frame.groupby("user")["row"].transform("size").to_numpy()
    rows = frame["row"].to_numpy()
    enough = count >= 3
    test = rows[enough & (from_last == 0)]
    valid = rows[enough & (from_last == 1)]
    train = rows[~enough | (from_last >= 2)]
    return np.sort(train), np.sort(valid), np.sort(test)


def group_split(table: pd.DataFrame, group: str, valid_fraction: float, test_fraction: float, seed: int) -> Positions:
    codes, uniques = pd.factorize(_column(table, group))
    order = np.random.default_rng(seed).permutation(len(uniques))
    n_test, n_valid = int(round(len(uniques) * test_fraction)), int(round(len(uniques) * valid_fraction))
    where = np.zeros(len(uniques), dtype=np.int8)  # 0 train, 1 valid, 2 test
    where[order[:n_test]] = 2
    where[order[n_test : n_test + n_valid]] = 1
    split = where[codes]
    return tuple(np.flatnonzero(split == k) for k in (0, 1, 2))  # type: ignore[return-value]


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    if name not in table.columns:
        raise DataError(f"data.split: no column {name!r} in the table")
    column = table[name]
    if column.isna().any():
        row = column.index[column.isna().to_numpy()][0]
        raise DataError(f"data.split: column {name!r} is empty in row {row!r}; every row needs a value to be split by")
    return column


def _times(table: pd.DataFrame, name: str) -> np.ndarray:
    """The time column as sortable values: numbers, or datetimes (as text too)."""
    column = _column(table, name)
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_datetime64_any_dtype(column):
        return column.to_numpy()
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().all():  # numbers written as text
        return numbers.to_numpy()
    dates = pd.to_datetime(column, errors="coerce", format="mixed")
    if dates.notna().all():
        return dates.to_numpy()
    neither = (numbers.isna() & dates.isna()).to_numpy()
    row = column.index[neither if neither.any() else dates.isna().to_numpy()][0]
    raise DataError(f"data.split_time: column {name!r} holds {column[row]!r} in row {row!r}, neither a number "
                    "nor a date (all numbers or all dates)")


__all__ = ["group_split", "leave_last_out", "random_split", "time_split"]

"""Raw table columns -> model tensors, fitted on the training split and saved with the model.

Sparse: each category seen at least `min_freq` times in training gets an id 1..n; id 0 is the
out-of-vocabulary id, taken by unseen categories and missing cells. Features sharing an
embedding table share one vocabulary, counted over all their columns; a list column's
elements count one each (`mtlrec.data.lists` says how lists are read). A category is a string:
int 3, "3", Int64 3 and float 3.0 (an integer column with blanks) are all "3"; a float that
is no whole number, or too large for its dtype to hold an id exactly (2**53 for float64), is
an error naming the row.
Dense: standardised with the training mean and std (computed stably: per chunk in two
passes, chunks merged by Chan et al.'s formula); a missing cell becomes the training mean
(0 after scaling).
Errors name the row by the table's index; for a chunk that names its file
(`table.attrs["file"]`, as ParquetStream's chunks do) the message starts with the file.
Sample weights: finite and >= 0; a missing weight is an error naming the row.
Labels: valid as the task's kind says (binary 0/1, regression finite, multiclass a whole number
0..C-1, ...; an error names the column, the task where its name differs, and the row); a
missing label (NaN / empty), or a row outside the task's `space` condition, leaves the row
out of that task (label mask False). Labels outside the space are not read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtlrec.data.errors import DataError, row_label
from mtlrec.data.features import Jagged
from mtlrec.data.lists import check_separator, split_lists
from mtlrec.data.tensors import TensorData
from mtlrec.expression import ExpressionError, evaluate, parse
from mtlrec.schema import Schema, SparseFeature


class Encoder:
    def __init__(self, schema: Schema, vocabularies: dict[str, list[str]] | None = None,
                 scalers: dict[str, tuple[float, float]] | None = None):
        self.raw_schema = schema
        self.vocabularies = vocabularies or {}
        self.scalers = scalers or {}
        self._indexes: dict = {}  # feature -> vocabulary index, built once

    @property
    def fitted(self) -> bool:
        return len(self.vocabularies) == len(self.raw_schema.tables) and len(self.scalers) == len(
            self.raw_schema.dense
        )

    def fit(self, table: pd.DataFrame) -> Encoder:
        """Learn vocabularies and scalers from the training table."""
        return self.fit_chunks([table])

    def fit_chunks(self, tables) -> Encoder:
        """Learn vocabularies and scalers in one pass over chunks of the training rows. Rows
        in errors count over all chunks: a chunk numbered from 0 after others is renumbered
        (not one that names its file: its rows are the file's)."""
        s = self.raw_schema
        self._indexes = {}
        counted = [f for f in s.sparse if not f.hash_buckets]
        counts = {f.table: pd.Series(dtype="int64") for f in counted}
        moments = {f.name: _Moments(f.name) for f in s.dense}
        rows = 0
        for table in tables:
            table = _numbered_from(table, rows)
            with _naming_file(table):
                _require_columns(table, self._feature_columns())
                for f in counted:
                    if f.multi_valued:
                        check_separator(table[f.name], f)
                    column = split_lists(table, f).elements if f.multi_valued else table[f.name]
                    if _plain_integers(column):  # count the integers, name them as strings after
                        found = column.value_counts()
                        found.index = found.index.astype(str)
                    else:
                        found = _categories(column, f.name).value_counts()
                    counts[f.table] = counts[f.table].add(found, fill_value=0)
                for f in s.dense:
                    moments[f.name].add(_numeric(table[f.name], f.name), table)
            rows += len(table)
        if rows == 0:
            raise DataError("cannot fit the encoder on an empty table")
        for name, members in s.tables.items():
            f = members[0]
            kept = counts[name][counts[name] >= f.min_freq].index if name in counts else []
            self.vocabularies[name] = sorted(str(v) for v in kept)
        for f in s.dense:
            mean, std = moments[f.name].mean_and_std()
            self.scalers[f.name] = (mean, std if std > 1e-12 else 1.0)
        return self

    def _feature_columns(self) -> list[str]:
        """The columns the features read: their own and their element-weight columns."""
        s = self.raw_schema
        return [f.name for f in s.sparse + s.dense] + [f.weights for f in s.lists if f.weights]

    def columns(self, labels: bool = True) -> list[str]:
        """The columns `transform` reads: the features and, with labels, the label columns and
        the columns the tasks' expressions and spaces name."""
        s = self.raw_schema
        names = self._feature_columns()
        if labels:
            names += [c for c in dict.fromkeys(s.weight_column(t) for t in s.tasks) if c and c not in names]
            for t in s.tasks:
                conditions = [c for c in (t.expression, t.space) if c]
                read = [t.column] if t.column else []
                read += sorted(set().union(*(parse(c).columns for c in conditions)))
                names += [c for c in read if c not in names]
        return names

    def task_labels(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        """Each task's label per row as training computes it (a column, a `values` map or an
        `expression`; NaN where missing or outside the task's space), for the tasks whose inputs
        are all in `table`; tasks with an input missing are left out. A label the task's kind
        refuses is a DataError, as in `transform`."""
        out: dict[str, np.ndarray] = {}
        with _naming_file(table):
            for task in self.raw_schema.tasks:
                conditions = [c for c in (task.expression, task.space) if c]
                read = ([task.column] if task.column else []) + sorted(set().union(*(parse(c).columns for c in conditions)))
                if not all(c in table.columns for c in read):
                    continue
                values = _label_values(table, task)
                if task.space:
                    values = np.where(_condition(table, task.space, task.name, "space"), values, np.nan)
                _check_labels(values, ~np.isnan(values), task, table.index)
                out[task.name] = values
        return out

    @property
    def schema(self) -> Schema:
        """The schema with each sparse feature's vocab_size (vocabulary + the OOV id)."""
        sparse = [
            f.model_copy(update={"vocab_size": (f.hash_buckets or len(self.vocabularies[f.table])) + 1})
            for f in self.raw_schema.sparse
        ]
        return self.raw_schema.model_copy(update={"sparse": sparse})

    def transform(self, table: pd.DataFrame, labels: bool = True, group_by: str | None = None) -> TensorData:
        """Encode a table. With `labels=False` label columns are not read (prediction). With
        `group_by`, each row's ranking list is that column's value, coded within the table
        (`TensorData.groups`, for GAUC and NDCG); an empty cell there is an error."""
        if not self.fitted:
            raise RuntimeError("Encoder.transform before fit")
        with _naming_file(table):
            data = self._transform(table, labels)
            if group_by is not None:
                data.groups = torch.from_numpy(_group_codes(table, group_by))
            return data

    def _transform(self, table: pd.DataFrame, labels: bool) -> TensorData:
        if len(table) == 0:
            raise DataError("the table has no rows")
        s = self.raw_schema
        needed = self._feature_columns() + ([t.column for t in s.tasks if t.column] if labels else [])
        _require_columns(table, needed)
        n = len(table)
        sparse = np.zeros((n, len(s.singles)), dtype=np.int64)
        for j, f in enumerate(s.singles):
            sparse[:, j] = self._ids(table[f.name], f)
        lists = [self._jagged(table, f) for f in s.lists]
        dense = self._dense(table)
        label_values = np.zeros((n, len(s.tasks)), dtype=np.float32)
        mask = np.zeros((n, len(s.tasks)), dtype=bool)
        sample_weights = None
        if labels:
            for k, task in enumerate(s.tasks):
                values = _label_values(table, task)
                present = ~np.isnan(values)
                if task.space:
                    present &= _condition(table, task.space, task.name, "space")
                _check_labels(values, present, task, table.index)
                label_values[:, k] = np.where(present, values, 0.0)
                mask[:, k] = present
            if s.weighted:
                sample_weights = torch.from_numpy(self._sample_weights(table))
        return TensorData(
            torch.from_numpy(sparse), torch.from_numpy(dense),
            torch.from_numpy(label_values), torch.from_numpy(mask), tuple(lists), sample_weights,
        )

    def _jagged(self, table: pd.DataFrame, f: SparseFeature) -> Jagged:
        """A list column's ids, offsets and element weights (its split elements go on return)."""
        split = split_lists(table, f)
        weights = None if split.weights is None else torch.from_numpy(split.weights)
        return Jagged(torch.from_numpy(self._ids(split.elements, f)), torch.from_numpy(split.offsets), weights)

    def _ids(self, column: pd.Series, f: SparseFeature) -> np.ndarray:
        """A column's (or a list column's elements') ids `[N]` int64: vocabulary id 1..n
        (0: unseen or missing) or hash bucket + 1."""
        integers = self._integer_index(f.table) if not f.hash_buckets and _plain_integers(column) else None
        if integers is not None:
            return _ids_from_positions(integers.get_indexer(column.to_numpy()))
        values = _categories(column, f.name)
        if f.hash_buckets:
            hashed = pd.util.hash_array(values.fillna("").to_numpy(dtype=object)) % np.uint64(f.hash_buckets)
            return np.where(values.isna().to_numpy(), 0, hashed.astype(np.int64) + 1)
        return _ids_from_positions(self._index(f.table).get_indexer(values))

    def _sample_weights(self, table: pd.DataFrame) -> np.ndarray:
        """`[N, T]` float32: each task's weight column, 1 for a task without one."""
        s = self.raw_schema
        out = np.ones((len(table), len(s.tasks)), dtype=np.float32)
        for k, task in enumerate(s.tasks):
            name = s.weight_column(task)
            if name is None:
                continue
            _require_columns(table, [name])
            values = _numeric(table[name], name)
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any():
                row = bad.nonzero()[0][0]
                raise DataError(f"sample weight column {name!r} must hold a finite number >= 0 in every row: "
                                f"row {table.index[row]!r} holds {values[row].item()!r}")
            out[:, k] = values
        return out

    def _dense(self, table: pd.DataFrame) -> np.ndarray:
        """Scaled dense values `[N, D]` float32, missing -> 0: (x - mean) / std in float64, one
        column at a time, each written into the float32 output as it is done (the working
        memory is a few float64 columns, not an `[N, D]` float64 copy of the table)."""
        names = [f.name for f in self.raw_schema.dense]
        out = np.empty((len(table), len(names)), dtype=np.float32)
        for j, name in enumerate(names):
            column = table[name]
            values = column.to_numpy(dtype=np.float64) if _plain_numbers(column) else _numeric(column, name)
            mean, std = self.scalers[name]
            scaled = np.subtract(values, mean)  # a new array: `values` may be the table's own
            scaled /= std
            too_large = np.abs(scaled) > np.finfo(np.float32).max  # inf too
            if too_large.any():
                row = too_large.nonzero()[0][0]
                value = column.iloc[row]
                value = value.item() if isinstance(value, np.generic) else value  # 1e+300, not np.float64(1e+300)
                raise DataError(f"column {name!r}: row {table.index[row]!r} holds {value!r}, "
                                "out of float32 range after scaling")
            out[:, j] = np.nan_to_num(scaled, nan=0.0, copy=False)
        return out

    def _index(self, name: str) -> pd.Index:
        """The vocabulary of a feature as a hashed index, built once."""
        if name not in self._indexes:
            self._indexes[name] = pd.Index(self.vocabularies[name], dtype="string")
        return self._indexes[name]

    def _integer_index(self, name: str) -> pd.Index | None:
        """The vocabulary as integers when every entry is an integer's canonical string
        (a vocabulary fitted on an integer column), else None. Integer columns then skip the
        conversion to strings: the same ids, much faster."""
        key = ("int", name)
        if key not in self._indexes:
            try:
                ints = np.array([int(v) for v in self.vocabularies[name]], dtype=np.int64)
                exact = all(str(i) == v for i, v in zip(ints.tolist(), self.vocabularies[name]))
            except (ValueError, OverflowError):
                exact = False
            self._indexes[key] = pd.Index(ints) if exact else None
        return self._indexes[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.raw_schema.model_dump(),
            "vocabularies": self.vocabularies,
            "scalers": {k: list(v) for k, v in self.scalers.items()},
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Encoder:
        return cls(
            Schema.model_validate(state["schema"]),
            state["vocabularies"],
            {k: (float(v[0]), float(v[1])) for k, v in state["scalers"].items()},
        )


def _ids_from_positions(positions: np.ndarray) -> np.ndarray:
    """Vocabulary positions `[N]` (-1: unseen or missing), a fresh array, as ids (0: unseen or
    missing), in place: no second `[N]` array."""
    positions += 1
    return positions


def _require_columns(table: pd.DataFrame, names: list[str]) -> None:
    missing = [c for c in names if c not in table.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; the table has {list(table.columns)}")


def _plain_integers(column: pd.Series) -> bool:
    """A numpy integer column (no missing values possible), not bool."""
    return pd.api.types.is_integer_dtype(column.dtype) and not pd.api.types.is_extension_array_dtype(column.dtype)


def _plain_numbers(column: pd.Series) -> bool:
    """A numpy numeric column (float with NaN for missing, integer or bool)."""
    return pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_extension_array_dtype(column.dtype)


@contextmanager
def _naming_file(table: pd.DataFrame) -> Iterator[None]:
    """Start the message of a DataError raised on a chunk with the file it came from."""
    file = table.attrs.get("file")
    try:
        yield
    except DataError as err:
        if file is None:
            raise
        raise DataError(f"{file}: {err}") from None


def _numbered_from(table: pd.DataFrame, start: int) -> pd.DataFrame:
    """A chunk numbered 0.. that follows `start` rows of other chunks, renumbered start.. (no
    copy of the data); chunks numbered otherwise, or naming their file, stay as they are."""
    index = table.index
    if start and "file" not in table.attrs and isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return table.set_axis(pd.RangeIndex(start, start + len(table)), axis=0)
    return table


class _Moments:
    """Count, mean and sum of squared deviations (M2) of a dense column's finite values,
    chunk by chunk: each chunk in two passes (its mean, then its squared deviations), merged
    with Chan, Golub & LeVeque's parallel formula. Sums of squares would lose every digit of
    a spread that is small next to the mean (timestamps: 1.7e12 +- 1000)."""

    def __init__(self, name: str):
        self.name = name
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.largest: tuple[float, str | None, Any, float] | None = None  # |x|, file, row, x
        self.overflowed = False

    def add(self, values: np.ndarray, table: pd.DataFrame) -> None:
        finite = np.isfinite(values)
        present = values if finite.all() else values[finite]
        if present.size == 0:
            return
        magnitudes = np.abs(present)
        i = int(magnitudes.argmax())
        if self.largest is None or magnitudes[i] > self.largest[0]:
            row = finite.nonzero()[0][i] if present is not values else i
            self.largest = (float(magnitudes[i]), table.attrs.get("file"), table.index[row], float(present[i]))
        with np.errstate(over="ignore", invalid="ignore"):
            n, mean = present.size, float(present.mean())
            m2 = float(np.square(present - mean).sum())
            if self.n == 0:
                self.n, self.mean, self.m2 = n, mean, m2
            else:
                total = self.n + n
                delta = mean - self.mean
                self.mean += delta * (n / total)
                self.m2 += m2 + delta * delta * (self.n * n / total)
                self.n = total
        self.overflowed |= not (np.isfinite(self.mean) and np.isfinite(self.m2))

    def mean_and_std(self) -> tuple[float, float]:
        if self.n == 0:
            raise DataError(f"dense column {self.name!r} has no values in the training split")
        if self.overflowed:  # the value farthest from 0 is the one that cannot be squared
            _, file, row, value = self.largest
            raise DataError(f"{file + ': ' if file else ''}column {self.name!r}: row {row!r} holds {value!r}, "
                            "too large to standardise (its squared deviation from the mean overflows float64)")
        return float(self.mean), float(np.sqrt(self.m2 / self.n))


_MAY_HOLD_FLOATS = ("floating", "mixed-integer-float", "mixed-integer", "mixed")


def _categories(column: pd.Series, name: str) -> pd.Series:
    """Category values as strings (missing stays missing): int 3, "3", Int64 3 and a whole
    float 3.0 are one category "3"; other floats are errors (`_check_whole_floats`)."""
    if pd.api.types.is_float_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        _check_whole_floats(values, column.index, name, getattr(column.dtype, "numpy_dtype", column.dtype))
        return column.astype("Int64").astype("string")
    if column.dtype == object and pd.api.types.infer_dtype(column, skipna=True) in _MAY_HOLD_FLOATS:
        column = _whole_floats_as_ints(column, name)
    return column.astype("string")


def _whole_floats_as_ints(column: pd.Series, name: str) -> pd.Series:
    """An object column with its (whole) float values as Python ints: 3.0 -> 3, as "3" after."""
    values = column.to_numpy(dtype=object)
    floats = np.fromiter((isinstance(v, float) and not math.isnan(v) for v in values), dtype=bool, count=len(values))
    if not floats.any():
        return column
    as_floats = values[floats].astype(np.float64)
    _check_whole_floats(as_floats, column.index[floats], name, np.dtype(np.float64))
    values = values.copy()
    values[floats] = [int(v) for v in as_floats]
    return pd.Series(values, index=column.index, dtype=object)


def _check_whole_floats(values: np.ndarray, index: pd.Index, name: str, dtype: np.dtype) -> None:
    """Floats in a sparse column must be ids: whole numbers that `dtype` holds exactly (below
    2**53 for float64, 2**24 for float32); beyond that an id may have been rounded."""
    bits = np.finfo(dtype).nmant + 1
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        not_whole = present & ~(np.mod(values, 1) == 0)  # inf included
        too_large = present & (np.abs(values) >= 2.0**bits)
    if not_whole.any():
        row = not_whole.nonzero()[0][0]
        raise DataError(f"sparse column {name!r}: row {row_label(index[row])!r} holds {values[row].item()!r}, not a whole number: "
                        "numbers in a sparse column must be integer ids (give the column as text to use such "
                        "values as categories)")
    if too_large.any():
        row = too_large.nonzero()[0][0]
        raise DataError(f"sparse column {name!r}: row {row_label(index[row])!r} holds {values[row].item()!r}, a {dtype} at or "
                        f"beyond 2**{bits}, which cannot hold an id exactly (larger integers are rounded); read the "
                        f"column as text or integers, e.g. pd.read_csv(..., dtype={{{name!r}: 'string'}})")


def _numeric(column: pd.Series, name: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64)
    if column.dtype == object:
        lists = column.map(lambda v: isinstance(v, (list, tuple, np.ndarray)))
        if lists.any():
            row = lists.to_numpy().nonzero()[0][0]
            raise DataError(f"column {name!r} must be numeric: row {column.index[row]!r} holds a list; a dense "
                            "feature takes one number per row (a list of categories is a sparse feature "
                            "with multi_valued: true)")
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna() & column.notna()
    if bad.any():
        row = bad.to_numpy().nonzero()[0][0]
        raise DataError(
            f"column {name!r} must be numeric: row {column.index[row]!r} holds {column.iloc[row]!r}"
        )
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _label_values(table: pd.DataFrame, task) -> np.ndarray:
    """Task labels as float64 (NaN = missing): from `expression`, or the label column through `values`."""
    if task.expression:
        return _condition(table, task.expression, task.name, "expression").astype(np.float64)
    column = table[task.column]
    if task.values is not None:
        raw = column.astype("string")
        known = raw.isin(list(task.values)) | raw.isna()
        if not known.all():
            row = (~known).to_numpy().nonzero()[0][0]
            raise DataError(f"label column {task.column!r}: row {column.index[row]!r} holds {column.iloc[row]!r}, "
                            f"which task {task.name!r}'s values do not map (they map {sorted(task.values)})")
        return raw.map(task.values).astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return _numeric(column, task.column)


def _condition(table: pd.DataFrame, expression: str, task: str, what: str) -> np.ndarray:
    """Rows where a task's condition holds (`mtlrec.expression`: a closed grammar, no code)."""
    try:
        values = evaluate(parse(expression), table)
    except ExpressionError as err:
        raise DataError(f"task {task!r}: cannot evaluate {what} {expression!r}: {err}") from None
    if values.dtype != bool:
        raise DataError(f"task {task!r}: {what} {expression!r} must give True/False per row")
    return values


def _check_labels(values: np.ndarray, present: np.ndarray, task, index: pd.Index) -> None:
    kind = task.kind
    bad = present & kind.invalid_labels(values)
    if bad.any():
        row = bad.nonzero()[0][0]
        column = task.column or task.name
        of_task = "" if column == task.name else f" (task {task.name!r})"
        raise DataError(f"label column {column!r}{of_task} must be {kind.label_rule}: row {index[row]!r} "
                        f"holds {values[row]:g}")


def _group_codes(table: pd.DataFrame, column: str) -> np.ndarray:
    """`[N]` int64: the rows' values of `column` as codes 0, 1, ... in order of appearance."""
    _require_columns(table, [column])
    codes, _ = pd.factorize(table[column])
    if (codes < 0).any():
        row = table.index[int(np.flatnonzero(codes < 0)[0])]
        raise DataError(f"rank.group_by column {column!r} is empty at row {row!r}: every row needs a ranking list")
    return codes.astype(np.int64)

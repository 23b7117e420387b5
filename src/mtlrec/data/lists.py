"""Multi-valued columns -> their elements, laid end to end, with where each row's list starts.

A list cell may be (all rows of a column alike):
- a list, tuple or numpy array (a DataFrame built in Python, a Parquet list column);
- text split at the feature's `separator` (CSV): "drama|comedy"; empty elements ("a||b",
  a trailing "|") are dropped;
- a number (a CSV column whose rows each hold one element is read as numbers): a list of one.
A missing cell (empty, null, NaN) is an empty list; a missing element inside a list is
dropped. Lists keep their order; with `max_length` only the last `max_length` elements of a
longer list are kept (lists ordered oldest first keep the most recent).
Errors name the feature, the column and the row (by the table's index): a plain value in a
column of lists, a list inside a list, an element that is no category, an element weight
that is no finite number, a weight list of another length than its list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pandas as pd

from mtlrec.data.errors import DataError, row_label
from mtlrec.schema import SparseFeature

LIST_TYPES = (list, tuple, np.ndarray)
OTHER_SEPARATORS = (",", ";", "|", "\t", " ", ":")


@dataclass
class SplitColumn:
    """A list column split into elements: `elements` `[V]` (indexed by the row each came
    from, as the table labels it), `offsets` `[N + 1]` int64, `weights` `[V]` float32 or None."""

    elements: pd.Series
    offsets: np.ndarray
    weights: np.ndarray | None


def split_lists(table: pd.DataFrame, feature: SparseFeature) -> SplitColumn:
    """The lists of `feature`'s column (and its element weights) in `table`."""
    column = table[feature.name]
    where = f"sparse feature {feature.name!r} (a list column)"
    elements, rows = _flatten(column, feature.separator, where)
    weights = None
    if feature.weight_separator:
        elements, weights = _inline_weights(elements, rows, feature.weight_separator, column.index, where)
    elif feature.weights:
        weights = _weight_column(table[feature.weights], feature, rows, column.index)
    if elements.dtype == object:
        keep = np.fromiter((not _missing(v) for v in elements), dtype=bool, count=len(elements))
    else:
        keep = np.ones(len(elements), dtype=bool)
    if not keep.all():
        elements, rows = elements[keep], rows[keep]
        weights = None if weights is None else weights[keep]
    n = len(column)
    lengths = np.bincount(rows, minlength=n)
    if feature.max_length is not None and len(rows) and lengths.max() > feature.max_length:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        from_end = lengths[rows] - 1 - (np.arange(len(rows)) - starts[rows])
        kept = from_end < feature.max_length
        elements, rows = elements[kept], rows[kept]
        weights = None if weights is None else weights[kept]
        lengths = np.minimum(lengths, feature.max_length)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    series = pd.Series(elements, index=column.index[rows], dtype=elements.dtype)
    if len(elements) and series.dtype == object and pd.api.types.infer_dtype(series, skipna=False) == "integer":
        try:
            series = series.astype(np.int64)  # the encoder's fast path for integer ids
        except OverflowError:
            pass
    return SplitColumn(series, offsets, weights)


def check_separator(column: pd.Series, feature: SparseFeature) -> None:
    """At fit: a text list column in which no row holds the separator, but most hold another
    common one, was almost surely given the wrong separator."""
    if column.dtype != object and not pd.api.types.is_string_dtype(column.dtype):
        return
    present = column.dropna()
    if present.empty or not isinstance(present.iloc[0], str):
        return  # lists (or numbers), not text: nothing was split at a separator
    text = column[column.map(lambda v: isinstance(v, str))].astype(str)
    if text.empty:
        return
    bracketed = text.str.startswith("[") & text.str.endswith("]")
    if bracketed.mean() > 0.5:
        raise DataError(f"sparse feature {feature.name!r} (a list column): its cells look like printed Python lists "
                        f"({text[bracketed].iloc[0]!r}); write each list as its elements joined by "
                        f"{feature.separator!r} (mtlrec.data.write_table does), or use Parquet")
    if text.str.contains(feature.separator, regex=False).any():
        return
    for other in OTHER_SEPARATORS:
        if other != feature.separator and text.str.contains(other, regex=False).mean() > 0.5:
            raise DataError(f"sparse feature {feature.name!r} (a list column): no row holds its separator "
                            f"{feature.separator!r} but most hold {other!r}; set separator: {other!r} "
                            "if that is what splits the lists")


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value == "")


def _flatten(column: pd.Series, separator: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(elements `[V]` object, row position of each `[V]` int64), lists in row order."""
    n = len(column)
    if pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
        present = column.notna().to_numpy()
        return column.to_numpy(dtype=object)[present], np.flatnonzero(present)
    cells = column.to_numpy(dtype=object)
    is_list = np.fromiter((isinstance(v, LIST_TYPES) for v in cells), dtype=bool, count=n)
    is_text = np.fromiter((isinstance(v, str) for v in cells), dtype=bool, count=n)
    is_missing = np.fromiter((not is_list[i] and _missing(v) for i, v in enumerate(cells)), dtype=bool, count=n)
    is_text &= ~is_missing
    if is_list.any() and is_text.any():
        row = np.flatnonzero(is_text)[0]
        raise DataError(f"{where}: row {row_label(column.index[row])!r} holds the text {cells[row]!r} among lists; "
                        "give every row a list, or every row text split at the separator")
    plain = ~(is_list | is_text | is_missing)
    if plain.any() and is_list.any():
        row = np.flatnonzero(plain)[0]
        raise DataError(f"{where}: row {row_label(column.index[row])!r} holds {cells[row]!r}, not a list")
    if is_text.any():
        lists = [v.split(separator) if t else () for v, t in zip(cells, is_text)]
    elif is_list.any():
        lists = [v if t else () for v, t in zip(cells, is_list)]
        if all(type(v) is np.ndarray and v.dtype.kind in "iu" and v.ndim == 1 for v in cells[is_list]):
            # integer arrays (a Parquet list column): no element can be missing or nested
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=n)
            return np.concatenate([v for v in cells[is_list]]).astype(np.int64), np.repeat(np.arange(n), lengths)
    else:  # plain values (an object column of numbers): each a list of one
        lists = [() if m else (v,) for v, m in zip(cells, is_missing)]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=n)
    elements = np.empty(int(lengths.sum()), dtype=object)
    elements[:] = list(chain.from_iterable(lists))
    rows = np.repeat(np.arange(n), lengths)
    nested = np.fromiter((isinstance(v, (*LIST_TYPES, dict, set)) for v in elements), dtype=bool, count=len(elements))
    if nested.any():
        i = np.flatnonzero(nested)[0]
        raise DataError(f"{where}: row {row_label(column.index[rows[i]])!r} holds a nested {type(elements[i]).__name__} "
                        f"{_short(elements[i])}; a list's elements must be categories (text or integer ids)")
    return elements, rows


def _inline_weights(elements: np.ndarray, rows: np.ndarray, separator: str, index: pd.Index,
                    where: str) -> tuple[np.ndarray, np.ndarray]:
    """'drama:0.7' -> ('drama', 0.7) for every element."""
    names = np.empty(len(elements), dtype=object)
    weights = np.empty(len(elements), dtype=np.float32)
    for i, element in enumerate(elements):
        text = element if isinstance(element, str) else str(element)
        name, found, weight = text.rpartition(separator)
        value = _weight(weight) if found else None
        if value is None:
            raise DataError(f"{where}: row {row_label(index[rows[i]])!r}: element {text!r} has no weight after "
                            f"{separator!r} (a finite number, e.g. 'drama{separator}0.7')")
        names[i], weights[i] = name, value
    return names, weights


def _weight_column(column: pd.Series, feature: SparseFeature, rows: np.ndarray, index: pd.Index) -> np.ndarray:
    where = f"element weights {feature.weights!r} of sparse feature {feature.name!r}"
    values, weight_rows = _flatten(column, feature.separator, where)
    mine, theirs = np.bincount(rows, minlength=len(index)), np.bincount(weight_rows, minlength=len(index))
    if not np.array_equal(mine, theirs):
        row = np.flatnonzero(mine != theirs)[0]
        raise DataError(f"{where}: row {row_label(index[row])!r} holds {theirs[row]} weights for {mine[row]} elements")
    weights = np.array([_weight(v) for v in values], dtype=object)
    bad = np.fromiter((w is None for w in weights), dtype=bool, count=len(weights))
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise DataError(f"{where}: row {index[weight_rows[i]]!r} holds {values[i]!r}, not a finite number")
    return weights.astype(np.float32)


def _weight(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _short(value) -> str:
    text = repr(value if not isinstance(value, np.ndarray) else value.tolist())
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["SplitColumn", "check_separator", "split_lists"]

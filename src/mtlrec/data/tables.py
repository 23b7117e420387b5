"""Reading and writing CSV / Parquet tables.

Integer ids are read exactly. pandas reads an integer column with an empty cell (CSV) or
with nulls (Parquet) as float64, which rounds integers beyond 2**53: 1,000 distinct 64-bit
ids can collapse into a few dozen. A float64 column holding such magnitudes is therefore
read again with nullable dtypes and, where it holds integers, replaced by an exact Int64 /
UInt64 column. Every other column keeps the dtype pandas gives it (a float64 column of
small integers is exact, and the encoder names 3.0 "3"), so numbers, vocabularies and saved
models read as before. A file that cannot be parsed raises a DataError naming it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from mtlrec.data.errors import DataError

SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
EXACT_INTEGERS = 2**53  # float64 holds every integer of magnitude below this, and not all above
_NULLABLE_64 = {pa.int64(): pd.Int64Dtype(), pa.uint64(): pd.UInt64Dtype()}


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a .csv, .csv.gz or .parquet file; a clear error for a missing, unreadable or
    unknown file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".gz" and path.suffixes[-2:-1] == [".csv"]:
        suffix = ".csv"  # pandas decompresses by the name
    if suffix == ".csv":
        with unreadable(path, "CSV"):
            try:
                table = pd.read_csv(path)
            except pd.errors.EmptyDataError:
                raise DataError(f"{path} is empty") from None
            return _exact_integers(table, lambda columns: _reread_csv(path, table, columns), mixed=True)
    if suffix in (".parquet", ".pq"):
        with unreadable(path, "Parquet"):
            table = pd.read_parquet(path)
            return _exact_integers(table, lambda columns: _reread_parquet(path, table, columns), mixed=False)
    raise DataError(f"{path}: unknown table format {suffix!r}; use one of {SUFFIXES}")


def write_table(table: pd.DataFrame, path: str | Path, separator: str = "|") -> None:
    """Write a .csv or .parquet file. In CSV a list cell is written as its elements joined by
    `separator` (the default of a multi-valued feature), not as Python's "[1, 2]"; Parquet
    keeps lists as list columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        _lists_as_text(table, separator).to_csv(path, index=False)
    elif path.suffix.lower() in (".parquet", ".pq"):
        table.to_parquet(path, index=False)
    else:
        raise DataError(f"{path}: unknown table format {path.suffix!r}; use one of {SUFFIXES}")


def _lists_as_text(table: pd.DataFrame, separator: str) -> pd.DataFrame:
    listed = [c for c in table.columns if table[c].dtype == object
              and table[c].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any()]
    if not listed:
        return table
    join = lambda v: separator.join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else v  # noqa: E731
    return table.assign(**{c: table[c].map(join) for c in listed})


_PARSER_ERRORS = (pd.errors.ParserError, UnicodeDecodeError, EOFError, zlib.error, OSError, pa.ArrowException)


@contextmanager
def unreadable(path: str | Path, kind: str) -> Iterator[None]:
    """Turn a parser's failure on a damaged file (truncated, bad quoting, not UTF-8, corrupt
    pages) into a one-line DataError naming the file. For Parquet also what pandas raises on
    damaged pandas metadata in the footer (a JSON text: KeyError, TypeError, ValueError)."""
    caught = _PARSER_ERRORS if kind != "Parquet" else (*_PARSER_ERRORS, KeyError, TypeError, ValueError)
    try:
        yield
    except DataError:
        raise
    except caught as err:
        reason = first_line(err) if isinstance(err, _PARSER_ERRORS) else f"{type(err).__name__}: {first_line(err)}"
        raise DataError(f"{path}: cannot read it as {kind}: {reason}") from None


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def arrow_to_pandas(data: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """`data.to_pandas()`, with int64 / uint64 columns that have nulls and values beyond 2**53
    as exact nullable integers instead of rounded floats."""
    table = data.to_pandas()
    for i, field in enumerate(data.schema):
        column = data.column(i)
        if (field.type in _NULLABLE_64 and column.null_count and field.name in table.columns
                and _beyond_exact_floats(table[field.name])):
            table[field.name] = column.to_pandas(types_mapper=_NULLABLE_64.get).array
    return table


def _exact_integers(table: pd.DataFrame, reread: Callable[[list[int]], pd.DataFrame | None],
                    mixed: bool) -> pd.DataFrame:
    """Replace the columns whose integers pandas may have rounded by exact ones: float64
    columns holding magnitudes of 2**53 or more and, with `mixed`, object columns mixing
    numbers and text (pandas' chunked type guessing on large CSV files). `reread(positions)`
    reads those columns again with nullable dtypes (None where it cannot)."""
    suspects = [i for i in range(table.shape[1]) if _may_be_rounded(table.iloc[:, i], mixed)]
    exact = reread(suspects) if suspects else None
    if exact is None or list(exact.columns) != list(table.columns[suspects]) or len(exact) != len(table):
        return table
    for position, name in zip(suspects, exact.columns):
        column = exact[name]
        if pd.api.types.is_integer_dtype(column.dtype):
            table.isetitem(position, column.array)
        elif table.dtypes.iloc[position] == object and pd.api.types.is_string_dtype(column.dtype):
            table.isetitem(position, column.astype("str").array)  # the text as written
    return table


def _may_be_rounded(column: pd.Series, mixed: bool) -> bool:
    if column.dtype == np.float64:
        return _beyond_exact_floats(column)
    if mixed and column.dtype == object:  # numbers among text: some may be floats from a chunk of ints with blanks
        return pd.api.types.infer_dtype(column, skipna=True) in ("mixed", "mixed-integer", "mixed-integer-float")
    return False


def _beyond_exact_floats(column: pd.Series) -> bool:
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    return bool(np.any(np.isfinite(values) & (np.abs(values) >= EXACT_INTEGERS)))


def _reread_csv(path: Path, table: pd.DataFrame, positions: list[int]) -> pd.DataFrame | None:
    if not isinstance(table.index, pd.RangeIndex):
        return None  # pandas took the first field as the index: positions do not match the file's
    text = [table.columns[i] for i in positions if table.dtypes.iloc[i] == object]
    return pd.read_csv(path, usecols=positions, dtype={name: "string" for name in text},
                       dtype_backend="numpy_nullable")


def _reread_parquet(path: Path, table: pd.DataFrame, positions: list[int]) -> pd.DataFrame | None:
    return pd.read_parquet(path, columns=[str(table.columns[i]) for i in positions], dtype_backend="numpy_nullable")

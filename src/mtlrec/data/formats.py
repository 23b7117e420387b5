"""Public data sets' file formats: how to read them and which features and tasks they hold.

`data.format` in a config picks one; with it, `features` and `tasks` may be left out and
come from here. Labels are derived by the tasks' `expression`s, so the setups are plain config.

- census: UCI Census-Income (KDD), the MMoE and PLE papers' public benchmark. Tasks as in
  both papers: income > 50K and marital status "Never married"; education and marital status
  are not inputs; the 7 continuous columns are dense, the other nominal ones sparse; the
  instance weight is not a feature (census-income.names says so).
- ali_ccp: Ali-CCP as preprocessed by torch-rechub (click, purchase, 23 id columns, 8 dense).
- aliexpress: the AliExpress search data set as preprocessed by torch-rechub
  (click, conversion, categorical_1..16, numerical_1..63).
- movielens: GroupLens' MovieLens 1M folder (ratings.dat, movies.dat, users.dat), one row per
  rating with the user's profile, the movie's genres (a list) and year, and the user's earlier
  movies (`history`, `liked_history`, lists sharing the movie table); tasks like (rating >= 4)
  and rating (regression). `FOLDER/train`, `/valid`, `/test` read a split by time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from mtlrec.data.errors import DataError
from mtlrec.data.tables import read_table, unreadable
from mtlrec.schema import Attention, DenseFeature, SparseFeature, Task

CENSUS_COLUMNS = [
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
]
CENSUS_DENSE = ["age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
                "num_persons_worked_for_employer", "weeks_worked_in_year"]
CENSUS_NOT_INPUTS = {"education", "marital_stat", "instance_weight", "income"}


def read_census(path: str | Path) -> pd.DataFrame:
    """A census-income.data / .test file (optionally .gz): no header, ', '-separated, '?' missing."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such data file: {path}")
    with unreadable(path, "CSV"):  # the nominal columns (the sparse ones) as text: codes stay exact
        try:
            table = pd.read_csv(path, header=None, names=CENSUS_COLUMNS, sep=",", skipinitialspace=True,
                                na_values=["?"], dtype={c: "string" for c in CENSUS_COLUMNS if c not in CENSUS_DENSE})
        except pd.errors.EmptyDataError:
            table = pd.DataFrame()
    if len(table) == 0:
        raise DataError(f"{path} is empty")
    if table["income"].isna().any():
        row = int(table["income"].isna().to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: row {row} has {table.iloc[row].notna().sum()} of 42 fields; is this a census file?")
    return table


def census_schema() -> tuple[list[SparseFeature], list[DenseFeature], list[Task]]:
    sparse = [SparseFeature(name=c) for c in CENSUS_COLUMNS if c not in CENSUS_DENSE and c not in CENSUS_NOT_INPUTS]
    dense = [DenseFeature(name=c) for c in CENSUS_DENSE]
    tasks = [Task(name="income", expression="income == '50000+.'"),
             Task(name="never_married", expression="marital_stat == 'Never married'")]
    return sparse, dense, tasks


ALI_CCP_SPARSE = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210",
                  "216", "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14"]
ALI_CCP_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]


def ali_ccp_schema() -> tuple[list[SparseFeature], list[DenseFeature], list[Task]]:
    return ([SparseFeature(name=c) for c in ALI_CCP_SPARSE], [DenseFeature(name=c) for c in ALI_CCP_DENSE],
            [Task(name="click"), Task(name="purchase")])


def aliexpress_schema() -> tuple[list[SparseFeature], list[DenseFeature], list[Task]]:
    return ([SparseFeature(name=f"categorical_{i}") for i in range(1, 17)],
            [DenseFeature(name=f"numerical_{i}") for i in range(1, 64)],
            [Task(name="click"), Task(name="conversion")])


MOVIELENS_FILES = {  # the columns of ml-1m's files, as its README names them
    "ratings.dat": {"user_id": int, "movie_id": int, "rating": int, "timestamp": int},
    "users.dat": {"user_id": int, "gender": str, "age": int, "occupation": int, "zip_code": str},
    "movies.dat": {"movie_id": int, "title": str, "genres": str},
}
MOVIELENS_HISTORY = 20  # movies kept in `history` and `liked_history` (the most recent)
MOVIELENS_LIKE = 4  # like: rating >= 4
MOVIELENS_PARTS = {"train": 0.8, "valid": 0.1, "test": 0.1}  # the split by time, oldest ratings first


def read_movielens(path: str | Path) -> pd.DataFrame:
    """A MovieLens 1M folder as one table (`movielens_table`); the folder followed by `/train`,
    `/valid` or `/test` (no such folders exist) gives that part of its split by time."""
    path = Path(path)
    folder, part = (path.parent, path.name) if path.name in MOVIELENS_PARTS and not path.is_dir() else (path, None)
    if not folder.is_dir():
        raise DataError(f"no MovieLens folder at {folder}: give the ml-1m folder (holding ratings.dat, movies.dat "
                        "and users.dat), or it followed by /train, /valid or /test")
    table = movielens_table(folder)
    if part is None:
        return table
    rows = table[movielens_parts(table["timestamp"]) == list(MOVIELENS_PARTS).index(part)]
    if rows.empty:
        raise DataError(f"{path}: no rating falls in this part of the split by time")
    return rows.reset_index(drop=True)


def movielens_parts(timestamps: pd.Series) -> np.ndarray:
    """Each rating's part of the split by time (0 train, 1 valid, 2 test, as MOVIELENS_PARTS
    orders them): a part starts at the timestamp found its share of the way through the sorted
    ratings, so the ratings of one second stay in one part and every part is later than the one
    before."""
    stamps = timestamps.to_numpy()
    ordered = np.sort(stamps)
    shares = np.cumsum(list(MOVIELENS_PARTS.values()))[:-1]
    return np.searchsorted(ordered[(shares * len(ordered)).astype(int)], stamps, side="right")


def movielens_table(folder: str | Path, history: int = MOVIELENS_HISTORY) -> pd.DataFrame:
    """One row per line of ratings.dat, in file order: user_id, movie_id, rating, timestamp;
    the user's gender, age (ml-1m's age group), occupation (a code) and zip_prefix (the zip
    code's first 3 characters); the movie's genres ('|'-separated text) and year (from the
    title, NaN without one); `history`, the user's last `history` movies rated before this
    rating, oldest first, and `liked_history`, likewise of those rated >= 4 (an int64 array per
    cell, as pandas reads a Parquet list column). Before means at an earlier second: ratings of one second are not each other's
    history; ratings of one earlier second keep the file's order in it."""
    folder = Path(folder)
    files = {name: _read_dat(folder / name, columns) for name, columns in MOVIELENS_FILES.items()}
    ratings, users, movies = files.values()
    for name, key in (("users.dat", "user_id"), ("movies.dat", "movie_id")):
        other = files[name]
        twice = other[key].duplicated()
        if twice.any():
            raise DataError(f"{folder / name}: line {other.index[twice][0]}: {key} {other[key][twice].iloc[0]} "
                            "appears a second time")
        unknown = ~ratings[key].isin(other[key])
        if unknown.any():
            raise DataError(f"{folder / 'ratings.dat'}: line {ratings.index[unknown][0]}: {key} "
                            f"{ratings[key][unknown].iloc[0]} is not in {folder / name}")
    users["zip_prefix"] = users["zip_code"].str[:3]
    movies["year"] = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).astype(float)
    table = (ratings.merge(users.drop(columns="zip_code"), on="user_id", how="left")
             .merge(movies.drop(columns="title"), on="movie_id", how="left"))
    table["history"], table["liked_history"] = _movie_histories(table, history)
    return table


def _read_dat(path: Path, columns: dict[str, type]) -> pd.DataFrame:
    """One of ml-1m's files: latin-1 text, fields separated by '::', `columns` (name -> int or
    str) in this order. The table's index is the line number; empty lines are skipped."""
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    text = path.read_text(encoding="latin-1")  # every byte is a latin-1 character: no decoding error
    lines = pd.Series(text.split("\n"))
    present = lines.str.len().to_numpy() > 0
    if not present.any():
        raise DataError(f"{path} is empty")
    fields = lines.str.count("::").to_numpy() + 1
    wrong = present & (fields != len(columns))
    if wrong.any():
        line = int(np.flatnonzero(wrong)[0])
        raise DataError(f"{path}: line {line + 1} has {fields[line]} fields, not {len(columns)} "
                        f"({'::'.join(columns)})")
    with unreadable(path, "a '::'-separated MovieLens file"):  # '\x1f' (unit separator): pandas' fast parser
        table = pd.read_csv(io.StringIO(text.replace("::", "\x1f")), sep="\x1f", header=None, names=list(columns),
                            dtype={c: str for c, kind in columns.items() if kind is str}, keep_default_na=False,
                            quoting=csv.QUOTE_NONE)
    table.index = pd.Index(np.flatnonzero(present) + 1, name="line")
    for name, kind in columns.items():
        if kind is int and not pd.api.types.is_integer_dtype(table[name].dtype):
            numbers = pd.to_numeric(table[name], errors="coerce")
            bad = numbers.isna() | (numbers % 1 != 0)
            if bad.any():
                raise DataError(f"{path}: line {table.index[bad][0]}: {name} is {table[name][bad].iloc[0]!r}, "
                                "not an integer")
            table[name] = numbers.astype(np.int64)
    return table


def _movie_histories(table: pd.DataFrame, length: int) -> tuple[pd.Series, pd.Series]:
    """`history` and `liked_history` of `movielens_table`."""
    order = np.lexsort((np.arange(len(table)), table["timestamp"], table["user_id"]))  # user, time, file line
    user, stamp, movie = (table[c].to_numpy()[order] for c in ("user_id", "timestamp", "movie_id"))
    liked = table["rating"].to_numpy()[order] >= MOVIELENS_LIKE
    first = _run_starts(user)  # where the user's ratings start
    end = _run_starts(user, stamp)  # where this second's ratings start: the history ends before
    likes_before = np.concatenate([[0], np.cumsum(liked)])  # liked ratings before each position
    rows = np.empty_like(order)
    rows[order] = np.arange(len(order))  # each row's position in `order`
    return (_windows(movie, first[rows], end[rows], length),
            _windows(movie[liked], likes_before[first][rows], likes_before[end][rows], length))


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """At each position of sorted `keys`, the position where its run of equal keys starts."""
    starts = np.ones(len(keys[0]), dtype=bool)
    starts[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in keys])
    return np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))


def _windows(values: np.ndarray, start: np.ndarray, stop: np.ndarray, length: int) -> pd.Series:
    """A list column whose row i holds values[max(start_i, stop_i - length):stop_i] (an array)."""
    start = np.maximum(start, stop - length)
    sizes = stop - start
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
    lists = pa.LargeListArray.from_arrays(offsets, values[np.repeat(start, sizes) + within])
    return pd.Series(lists.to_numpy(zero_copy_only=False), dtype=object)  # arrays cut in C++, no loop here


def movielens_schema() -> tuple[list[SparseFeature], list[DenseFeature], list[Task]]:
    movie = {"embedding": "movie", "embedding_dim": 16}
    listed = {"multi_valued": True, "max_length": MOVIELENS_HISTORY}
    sparse = [SparseFeature(name=c) for c in ("gender", "age", "occupation", "zip_prefix")] + [
        SparseFeature(name="movie_id", **movie),
        SparseFeature(name="genres", multi_valued=True, separator="|", pooling="mean"),
        SparseFeature(name="history", **movie, **listed, pooling="attention", attention=Attention(target="movie_id")),
        SparseFeature(name="liked_history", **movie, **listed, pooling="mean"),
    ]
    tasks = [Task(name="like", expression=f"rating >= {MOVIELENS_LIKE}"), Task(name="rating", type="regression")]
    return sparse, [DenseFeature(name="year")], tasks


@dataclass(frozen=True)
class Format:
    read: Callable[[str | Path], pd.DataFrame]
    schema: Callable[[], tuple[list[SparseFeature], list[DenseFeature], list[Task]]] | None


DATA_FORMATS = {
    "table": Format(read_table, None),
    "census": Format(read_census, census_schema),
    "ali_ccp": Format(read_table, ali_ccp_schema),
    "aliexpress": Format(read_table, aliexpress_schema),
    "movielens": Format(read_movielens, movielens_schema),
}

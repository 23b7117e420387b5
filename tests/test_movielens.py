"""The MovieLens 1M format on a tiny folder in ml-1m's own file format."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import load_config
from mtlrec.data import DataError, read_table, write_table
from mtlrec.data.formats import (
    MOVIELENS_HISTORY,
    MOVIELENS_PARTS,
    movielens_schema,
    movielens_table,
    read_movielens,
)
from mtlrec.data.lists import split_lists
from mtlrec.experiment import run_experiment
from mtlrec.schema import Schema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::02138-1234", "4::F::45::7::55117"]
MOVIES = ["1::Toy Story (1995)::Animation|Children's|Comedy",
          "2::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",  # ':' in a title
          '3::"Great Performances" Cats (1998)::Musical',  # quotes
          "4::Misérables, Les (1995)::Drama|Musical",  # latin-1
          "5::A title without a year::Drama"]
RATINGS_PER_USER = {1: 30, 2: 23, 3: 9, 4: 14}  # user 1 rates every movie; two users more than 20


def write_folder(folder: Path, seed: int = 0) -> Path:
    """ml-1m's three files: 30 movies; each user rates distinct movies at whole minutes drawn
    from 40 (so many ratings share a second); lines shuffled, users mixed."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    movies = MOVIES + [f"{m}::Movie {m} ({1930 + m})::{'|'.join(rng.choice(genres, rng.integers(1, 4), replace=False))}"
                       for m in range(len(MOVIES) + 1, 31)]
    ratings = [f"{user}::{movie}::{rng.integers(1, 6)}::{978_300_000 + 60 * rng.integers(0, 40)}"
               for user, count in RATINGS_PER_USER.items() for movie in rng.permutation(30)[:count] + 1]
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("users.dat", USERS), ("movies.dat", movies), ("ratings.dat", rng.permutation(ratings))):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    return folder


def fields(folder: Path, name: str) -> list[list[str]]:
    return [line.split("::") for line in (folder / name).read_text(encoding="latin-1").splitlines()]


def plain_histories(ratings: list[list[str]], length: int, liked_only: bool) -> list[list[int]]:
    """Row by row: the user's ratings at an earlier second (by time, then file line), last `length` movies."""
    out = []
    for user, _, _, stamp in ratings:
        earlier = [(int(t), j, int(m)) for j, (u, m, r, t) in enumerate(ratings)
                   if u == user and int(t) < int(stamp) and (int(r) >= 4 or not liked_only)]
        out.append([m for _, _, m in sorted(earlier)][-length:])
    return out


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "ml-1m")


@pytest.mark.parametrize("length", [3, MOVIELENS_HISTORY])
def test_histories_are_the_users_earlier_ratings(folder, length):
    ratings = fields(folder, "ratings.dat")
    table = movielens_table(folder, history=length)
    assert table[["user_id", "movie_id", "rating", "timestamp"]].to_numpy().tolist() == \
        [[int(v) for v in row] for row in ratings]  # one row per line, in file order
    seconds = table.groupby(["user_id", "timestamp"]).size()
    assert seconds.max() > 1  # the data holds ratings of one user in one second
    for column, liked_only in (("history", False), ("liked_history", True)):
        got = [list(cell) for cell in table[column]]
        assert got == plain_histories(ratings, length, liked_only)
    cut = [c for c in ("history", "liked_history") if max(map(len, table[c])) == length]
    assert cut == ["history", "liked_history"][: 2 if length == 3 else 1]  # lists cut to the most recent
    pd.testing.assert_frame_equal(read_movielens(folder), movielens_table(folder))


def test_user_and_movie_columns(folder):
    table = read_movielens(folder)
    users = {int(u[0]): u for u in fields(folder, "users.dat")}
    movies = {int(m[0]): m for m in fields(folder, "movies.dat")}
    expected_users = [[u[1], int(u[2]), int(u[3]), u[4][:3]] for u in (users[i] for i in table["user_id"])]
    assert table[["gender", "age", "occupation", "zip_prefix"]].to_numpy().tolist() == expected_users
    assert "021" in set(table["zip_prefix"])  # a leading zero kept
    genres = next(f for f in movielens_schema()[0] if f.name == "genres")
    lists = split_lists(table, genres)
    got = [list(lists.elements.iloc[a:b]) for a, b in zip(lists.offsets[:-1], lists.offsets[1:])]
    assert got == [movies[m][2].split("|") for m in table["movie_id"]]
    titles = [movies[m][1] for m in table["movie_id"]]
    years = [int(t[-5:-1]) if t.endswith(")") else math.nan for t in titles]
    np.testing.assert_array_equal(table["year"].to_numpy(), years)
    assert set(line.split("::")[1] for line in MOVIES) <= set(titles)  # the odd titles' years were read


def test_split_by_time_keeps_each_second_in_one_part(folder):
    whole = read_movielens(folder)
    parts = [read_movielens(folder / name) for name in MOVIELENS_PARTS]
    key = ["user_id", "movie_id"]
    pd.testing.assert_frame_equal(pd.concat(parts).sort_values(key).reset_index(drop=True),
                                  whole.sort_values(key).reset_index(drop=True))  # histories included
    seconds = [part["timestamp"] for part in parts]
    assert seconds[0].max() < seconds[1].min() and seconds[1].max() < seconds[2].min()
    stamps, before = np.sort(whole["timestamp"]), 0
    for share, part in zip(np.cumsum(list(MOVIELENS_PARTS.values()))[:-1], parts):
        before += len(part)  # the next part starts with the second holding the rating at its share
        assert stamps[before] == stamps[int(share * len(whole))] and (before == 0 or stamps[before - 1] < stamps[before])


def test_config_trains_one_epoch(folder, tmp_path):
    paths = [f"data.{name}={folder / name}" for name in MOVIELENS_PARTS]
    cfg = load_config(CONFIGS / "movielens.yaml", [*paths, "train.epochs=1", "train.batch_size=16",
                                                     "train.progress=false"])
    sparse, dense, tasks = movielens_schema()
    assert cfg.schema == Schema(sparse=sparse, dense=dense, tasks=tasks)  # the config writes out the format's own
    result = run_experiment(cfg, tmp_path / "run")
    assert len(result.history) == 1
    assert np.isfinite(result.test_metrics["mse/rating"]) and np.isfinite(result.test_metrics["logloss/like"])
    encoder, test = result.trained.encoder, read_movielens(folder / "test")
    data, schema = encoder.transform(test), encoder.schema
    id_of = {int(movie): i + 1 for i, movie in enumerate(encoder.vocabularies["movie"])}  # 0: unseen
    movie_ids = data.sparse[:, [f.name for f in schema.singles].index("movie_id")]
    assert movie_ids.tolist() == [id_of.get(m, 0) for m in test["movie_id"]]
    history = data.lists[[f.name for f in schema.lists].index("history")]  # the same ids: one table
    assert history.values.tolist() == [id_of.get(m, 0) for cell in test["history"] for m in cell]
    assert history.values.gt(0).any() and movie_ids.gt(0).any()
    write_table(test, tmp_path / "test.parquet")  # saved for `mtlrec predict` / `evaluate`: the same scores
    pd.testing.assert_frame_equal(result.trained.predict(read_table(tmp_path / "test.parquet")),
                                  result.trained.predict(test))


def append(line):
    return lambda path: path.write_text(path.read_text(encoding="latin-1") + line + "\n", encoding="latin-1")


@pytest.mark.parametrize("name, damage, message", [
    ("ratings.dat", Path.unlink, "no such data file: {path}"),
    ("movies.dat", lambda path: path.write_text("\n"), "{path} is empty"),
    ("ratings.dat", append("1::2::3"), "{path}: line {last} has 3 fields, not 4"),
    ("ratings.dat", append("1::2::five::978300000"), "{path}: line {last}: rating is 'five', not an integer"),
    ("users.dat", append(USERS[0]), "{path}: line {last}: user_id 1 appears a second time"),
    ("ratings.dat", append("1::31::5::978300000"), "{path}: line {last}: movie_id 31 is not in"),
])
def test_bad_files_are_data_errors_naming_the_file(folder, name, damage, message):
    path = folder / name
    damage(path)
    last = len(path.read_text(encoding="latin-1").splitlines()) if path.exists() else 0
    with pytest.raises(DataError) as caught:
        read_movielens(folder / "train")
    assert str(caught.value).startswith(message.format(path=path, last=last))


@pytest.mark.parametrize("given, named", [("ratings.dat", "ratings.dat"), ("validation", "validation"),
                                          ("elsewhere/train", "elsewhere")])
def test_a_path_that_is_no_folder_or_part(folder, given, named):
    with pytest.raises(DataError) as caught:
        read_movielens(folder / given)
    assert str(caught.value).startswith(f"no MovieLens folder at {folder / named}:")

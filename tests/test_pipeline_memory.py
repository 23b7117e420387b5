"""The encoder's output against its definition for every feature kind; the memory encoding takes
(the encoded tensors plus a few columns of working memory, not copies of the whole table); and
`mtlrec.fit` letting go of the tables it was handed once they are encoded."""

import math
import sys
import tracemalloc
import weakref

import numpy as np
import pandas as pd
import pytest
import torch

import mtlrec
from mtlrec.data import Encoder
from mtlrec.schema import Schema
from mtlrec.train.callbacks import TrainingCallback


def every_kind_schema() -> Schema:
    """Single ids (text with a rare category, integers sharing a table with a list, whole floats,
    hashed), lists (integer arrays, text with inline weights, text with a weight column), dense
    columns (float with NaN, int, bool, object), labels (binary with gaps, regression, a
    multiclass, a `values` map, an expression, a sample space) and a sample weight."""
    return Schema(
        sparse=[{"name": "user", "min_freq": 2}, {"name": "item", "embedding": "items"}, {"name": "bucket"},
                {"name": "device", "hash_buckets": 7},
                {"name": "seen", "embedding": "items", "multi_valued": True, "max_length": 3},
                {"name": "tags", "multi_valued": True, "weight_separator": ":"},
                {"name": "genres", "multi_valued": True, "weights": "genre_weights", "pooling": "sum"}],
        dense=[{"name": "age"}, {"name": "visits"}, {"name": "vip"}, {"name": "score"}],
        tasks=[{"name": "click"}, {"name": "watch", "type": "regression"},
               {"name": "buy", "space": "click == 1"}, {"name": "stars", "type": "multiclass", "options": {"classes": 3}},
               {"name": "liked", "values": {"yes": 1, "no": 0}}, {"name": "fan", "expression": "visits > 3"}],
        sample_weight="w",
    )


def every_kind_table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    missing = lambda p: rng.random(rows) < p  # noqa: E731
    users = np.array([f"u{i}" for i in rng.integers(0, 40, rows)], dtype=object)
    users[missing(0.05)] = None
    bucket = rng.integers(0, 9, rows).astype(np.float64)
    bucket[missing(0.1)] = np.nan
    lengths = rng.integers(0, 6, rows)
    seen = np.empty(rows, dtype=object)
    seen[:] = [rng.integers(0, 60, n) for n in lengths]
    words = np.array(["drama", "comedy", "news", "sport", "kids"])
    tags = [None if m else "|".join(f"{w}:{rng.integers(1, 9) / 4}" for w in rng.choice(words, n))
            for m, n in zip(missing(0.1), rng.integers(1, 4, rows))]
    genre_lists = [list(rng.choice(words, n)) for n in rng.integers(0, 3, rows)]
    age = rng.normal(40, 12, rows)
    age[missing(0.1)] = np.nan
    score = np.array([None if m else float(v) for m, v in zip(missing(0.1), rng.normal(size=rows))], dtype=object)
    click = rng.integers(0, 2, rows).astype(np.float64)
    click[missing(0.05)] = np.nan
    return pd.DataFrame({
        "user": users, "item": rng.integers(0, 60, rows), "bucket": bucket,
        "device": rng.choice(["ios", "android", "web", "tv"], rows), "seen": seen, "tags": tags,
        "genres": ["|".join(g) for g in genre_lists],
        "genre_weights": [[float(rng.integers(1, 5)) for _ in g] for g in genre_lists],
        "age": age, "visits": rng.integers(0, 8, rows), "vip": rng.random(rows) < 0.2, "score": score,
        "click": click, "watch": rng.normal(size=rows), "buy": rng.integers(0, 2, rows),
        "stars": rng.integers(0, 3, rows), "liked": rng.choice(["yes", "no"], rows),
        "w": rng.integers(1, 4, rows).astype(np.float64), "group": rng.integers(0, 30, rows),
    })


def plain_ids(values, vocabulary: list[str]) -> list[int]:
    """Vocabulary id 1..n of each value named as a string (3, 3.0 and "3" alike), 0 if missing or unseen."""
    ids = {v: i + 1 for i, v in enumerate(vocabulary)}
    named = lambda v: str(int(v)) if isinstance(v, (int, float, np.integer, np.floating)) else str(v)  # noqa: E731
    return [0 if v is None or (isinstance(v, float) and math.isnan(v)) else ids.get(named(v), 0) for v in values]


def plain_lists(cells, vocabulary: list[str], longest: int | None = None) -> tuple[list[int], list[int], list[float]]:
    """(values, offsets, weights) of list cells given as [(element, weight), ...] per row (None: no list)."""
    values, offsets, weights = [], [0], []
    for cell in cells:
        kept = (cell or [])[-longest:] if longest else (cell or [])
        values += plain_ids([e for e, _ in kept], vocabulary)
        weights += [w for _, w in kept]
        offsets.append(len(values))
    return values, offsets, weights


def scaled(values, mean: float, std: float) -> list[float]:
    """(x - mean) / std in float64, then float32; a missing value 0."""
    present = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v))  # noqa: E731
    return [float(np.float32((float(v) - mean) / std)) if present(v) else 0.0 for v in values]


def test_encoding_equals_the_definition_for_every_feature_kind():
    train, table = every_kind_table(400, seed=0), every_kind_table(300, seed=1)
    encoder = Encoder(every_kind_schema()).fit(train)
    data = encoder.transform(table, group_by="group")
    vocab = encoder.vocabularies
    # single ids: text, integers, whole floats (NaN missing), hashed text
    expected = [plain_ids(table.user, vocab["user"]), plain_ids(table.item, vocab["items"]),
                plain_ids(table.bucket, vocab["bucket"]),
                (pd.util.hash_array(table.device.to_numpy(dtype=object)) % np.uint64(7)).astype(np.int64) + 1]
    assert data.sparse.dtype == torch.int64
    assert torch.equal(data.sparse, torch.tensor(np.stack(expected, 1)))
    # lists: integer arrays (the last 3 kept), text with inline weights, text with a weight column
    parsed_tags = [[(w.split(":")[0], float(w.split(":")[1])) for w in t.split("|")] if isinstance(t, str) else None
                   for t in table.tags]
    lists = [plain_lists([[(e, 1.0) for e in cell] for cell in table.seen], vocab["items"], longest=3),
             plain_lists(parsed_tags, vocab["tags"]),
             plain_lists([list(zip(g.split("|") if g else [], w)) for g, w in zip(table.genres, table.genre_weights)],
                         vocab["genres"])]
    for k, (values, offsets, weights) in enumerate(lists):
        got = data.lists[k]
        assert torch.equal(got.values, torch.tensor(values, dtype=torch.int64)), k
        assert torch.equal(got.offsets, torch.tensor(offsets, dtype=torch.int64)), k
        assert (got.weights is None) == (k == 0)
        if k:
            assert torch.equal(got.weights, torch.tensor(weights, dtype=torch.float32)), k
    # dense: the training mean and std (population), exactly as float64 arithmetic gives them
    for j, name in enumerate(["age", "visits", "vip", "score"]):
        known = np.array([float(v) for v in train[name] if v is not None and not np.isnan(float(v))])
        mean, std = encoder.scalers[name]
        assert mean == pytest.approx(known.mean(), rel=1e-12) and std == pytest.approx(known.std(), rel=1e-12)
        assert data.dense[:, j].tolist() == scaled(table[name].tolist(), mean, std), name
    # labels and masks: gaps, a sample space, a multiclass, a values map, an expression
    click = table.click.to_numpy()
    columns = [(np.nan_to_num(click), ~np.isnan(click)), (table.watch.to_numpy(), np.ones(300, bool)),
               (table.buy.to_numpy(), click == 1), (table.stars.to_numpy(), np.ones(300, bool)),
               ((table.liked == "yes").to_numpy(), np.ones(300, bool)), (table.visits.to_numpy() > 3, np.ones(300, bool))]
    labels = np.stack([np.where(present, values, 0.0) for values, present in columns], 1)
    assert torch.equal(data.labels, torch.tensor(labels, dtype=torch.float32))
    assert torch.equal(data.mask, torch.tensor(np.stack([present for _, present in columns], 1)))
    assert torch.equal(data.weights, torch.tensor(np.repeat(table.w.to_numpy()[:, None], 6, 1), dtype=torch.float32))
    in_order_of_appearance = list(dict.fromkeys(table.group))
    assert data.groups.tolist() == [in_order_of_appearance.index(g) for g in table.group]


def workload_table(rows: int, sparse: int = 26, dense: int = 13, seed: int = 0) -> tuple[Schema, pd.DataFrame]:
    """The shape of benchmarks/peers.py's data: integer ids (vocabularies 10..1000), float32
    dense columns, two float32 binary labels."""
    rng = np.random.default_rng(seed)
    columns = {f"s{i}": rng.integers(0, rng.integers(10, 1001), rows) for i in range(sparse)}
    values = rng.normal(size=(rows, dense)).astype(np.float32)
    columns |= {f"d{i}": values[:, i] for i in range(dense)}
    columns |= {t: (rng.random(rows) < 0.3).astype(np.float32) for t in ("t0", "t1")}
    schema = Schema(sparse=[{"name": f"s{i}"} for i in range(sparse)], dense=[{"name": f"d{i}"} for i in range(dense)],
                    tasks=[{"name": "t0"}, {"name": "t1"}])
    return schema, pd.DataFrame(columns, copy=False)


def encoded_bytes(data) -> int:
    return sum(t.numel() * t.element_size() for t in (data.sparse, data.dense, data.labels, data.mask))


def test_encoding_holds_the_output_and_a_few_columns_not_a_copy_of_the_table():
    rows = 40_000
    schema, table = workload_table(rows)
    encoder = Encoder(schema).fit(table)
    encoder.transform(table.head(10))  # the vocabularies' lookup indexes, built once
    tracemalloc.start()
    try:
        data = encoder.transform(table)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    column = 8 * rows  # one float64 or int64 column
    # the output, plus working memory of a few float64 / int64 columns at a time: an [N, D]
    # float64 copy of the dense columns (13 columns) or more would not fit
    assert peak <= encoded_bytes(data) + 8 * column


@pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 the caller's frame holds a call's arguments "
                                                     "until it returns")
def test_fit_lets_go_of_the_tables_it_was_handed_before_training(one_thread):
    handed = []

    def hand(table: pd.DataFrame) -> pd.DataFrame:
        handed.append(weakref.ref(table))
        return table

    class Watch(TrainingCallback):
        def on_train_begin(self, trainer):
            self.alive = [ref() is not None for ref in handed]

    config = {"features": {"sparse": ["s0", "s1"], "dense": ["d0", "d1"]}, "tasks": ["t0", "t1"],
              "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
              "train": {"epochs": 1, "batch_size": 128, "progress": False}}
    watch = Watch()
    model = mtlrec.fit(config, train=hand(workload_table(600, 2, 2, seed=0)[1]),
                       valid=hand(workload_table(200, 2, 2, seed=1)[1]), test=hand(workload_table(200, 2, 2, seed=2)[1]),
                       callbacks=[watch])
    assert watch.alive == [False, False, False]  # encoded: training reads the tensors alone
    assert len(model.history) == 1
    kept = workload_table(600, 2, 2, seed=0)[1]  # a table the caller keeps is the caller's: left as it was
    before = kept.copy()
    mtlrec.fit(config, train=kept)
    pd.testing.assert_frame_equal(kept, before)

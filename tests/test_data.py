import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.data import DataError, Encoder, SyntheticConfig, TensorData, make_synthetic, synthetic_schema
from mtlrec.schema import Schema


def test_synthetic_is_deterministic_per_seed():
    cfg = SyntheticConfig(rows=200, dim=10, task_types=["binary", "regression"], sparse_features=3)
    a, b, c = make_synthetic(cfg, seed=1), make_synthetic(cfg, seed=1), make_synthetic(cfg, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert list(a.columns) == ["c0", "c1", "c2", *[f"x{i}" for i in range(3, 10)], "y1", "y2"]
    assert set(a["y1"].unique()) == {0.0, 1.0} and a["y1"].mean() == 0.5  # split at the median
    assert a["c0"].between(0, 9).all()
    schema = synthetic_schema(cfg)
    assert [t.type for t in schema.tasks] == ["binary", "regression"] and len(schema.sparse) == 3


@pytest.mark.parametrize("p", [-0.5, 0.0, 0.3, 0.9])
def test_synthetic_label_correlation_is_p_without_the_sine_terms(p):
    """With m = 0 and no noise, y_k = w_k.x and corr(y_1, y_2) = cos(w_1, w_2) = p."""
    cfg = SyntheticConfig(rows=100_000, dim=20, correlation=p, sin_terms=0, noise=0.0, scale=2.0)
    table = make_synthetic(cfg, seed=0)
    assert abs(np.corrcoef(table["y1"], table["y2"])[0, 1] - p) < 0.01
    assert abs(table["y1"].std() - 2.0) < 0.02  # ||w_k|| = c


def test_synthetic_sine_terms_make_labels_nonlinear():
    cfg = SyntheticConfig(rows=20_000, dim=5, sin_terms=10, noise=0.0)
    table = make_synthetic(cfg, seed=0)
    x = table[[f"x{i}" for i in range(5)]].to_numpy()
    residual = table["y1"] - x @ np.linalg.lstsq(x, table["y1"], rcond=None)[0]
    assert residual.std() > 0.3  # a linear fit leaves the sine part


def schema():
    return Schema(
        sparse=[{"name": "city", "min_freq": 2}],
        dense=[{"name": "age"}],
        tasks=[{"name": "click"}, {"name": "time", "type": "regression"}],
    )


def table(**changes):
    base = {"city": ["a", "a", "b", "c", "c", "c"], "age": [10.0, 20.0, np.nan, 40.0, 50.0, 60.0],
            "click": [0, 1, 1, 0, np.nan, 1], "time": [1.0, 2.0, 3.0, np.nan, 5.0, 6.0]}
    return pd.DataFrame(base | changes)


def test_encoder_vocabulary_oov_scaling_and_masks():
    enc = Encoder(schema()).fit(table())
    assert enc.vocabularies["city"] == ["a", "c"]  # "b" seen once < min_freq 2
    assert enc.schema.sparse[0].vocab_size == 3
    data = enc.transform(pd.DataFrame({"city": ["c", "b", "zzz", None], "age": [36.0, np.nan, 60.0, 10.0],
                                       "click": [1, 0, np.nan, 1], "time": [0.5, 1.0, 2.0, np.nan]}))
    assert data.sparse[:, 0].tolist() == [2, 0, 0, 0]  # rare, unseen and missing -> 0
    mean, std = 36.0, np.std([10, 20, 40, 50, 60])
    torch.testing.assert_close(data.dense[:, 0], torch.tensor([0.0, 0.0, (60 - mean) / std, (10 - mean) / std], dtype=torch.float32))
    assert data.mask.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    assert data.labels[2, 0] == 0 and data.labels[3, 1] == 0


def test_encoder_round_trips_through_a_dict():
    enc = Encoder(schema()).fit(table())
    again = Encoder.from_dict(enc.to_dict())
    a, b = enc.transform(table()), again.transform(table())
    for name in ("sparse", "dense", "labels", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_integer_and_float_categories_are_one_vocabulary():
    s = Schema(sparse=[{"name": "k"}], tasks=[{"name": "y"}])
    enc = Encoder(s).fit(pd.DataFrame({"k": [3, 4, 3], "y": [0, 1, 0]}))
    data = enc.transform(pd.DataFrame({"k": [3.0, np.nan, 4.0], "y": [1, 1, 0]}))
    assert data.sparse[:, 0].tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"click": [0, 1, 2, 0, 1, 1]}, r"label column 'click' must be 0 or 1: row 2 holds 2"),
        ({"time": [1.0, np.inf, 3, 4, 5, 6]}, r"label column 'time' must be finite: row 1"),
        ({"age": [1, 2, "old", 4, 5, 6]}, r"column 'age' must be numeric: row 2 holds 'old'"),
    ],
)
def test_encoder_names_the_bad_column_and_row(change, message):
    enc = Encoder(schema()).fit(table())
    with pytest.raises(DataError, match=message):
        enc.transform(table(**change))


def test_encoder_missing_column_and_empty_table():
    enc = Encoder(schema()).fit(table())
    with pytest.raises(DataError, match=r"missing column\(s\) \['age'\]"):
        enc.transform(table().drop(columns="age"))
    with pytest.raises(DataError, match="no rows"):
        enc.transform(table().iloc[:0])
    enc.transform(table().drop(columns=["click", "time"]), labels=False)  # prediction needs no labels


def test_batches_cover_every_row_once_and_shuffle_per_seed():
    n = 10
    data = TensorData(torch.arange(n)[:, None], torch.zeros(n, 1), torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool))
    order = lambda g: torch.cat([b.sparse[:, 0] for b in data.batches(3, g)]).tolist()
    assert sorted(order(torch.Generator().manual_seed(0))) == list(range(n))
    assert order(torch.Generator().manual_seed(0)) == order(torch.Generator().manual_seed(0))
    assert order(None) == list(range(n))
    assert [len(b) for b in data.batches(3)] == [3, 3, 3, 1]


def test_sample_space_condition_masks_rows_outside_it():
    s = Schema(dense=[{"name": "x"}], tasks=[{"name": "click"}, {"name": "buy", "space": "click == 1"}])
    t = pd.DataFrame({"x": [1.0, 2, 3, 4, 5], "click": [1, 0, 1, 0, np.nan], "buy": [1, 7, 0, np.nan, 1]})
    data = Encoder(s).fit(t).transform(t)  # the 7 lies outside buy's space: not read, no error
    assert data.mask[:, 1].tolist() == [True, False, True, False, False]
    assert data.mask[:, 0].tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("space, message", [("clik == 1", "cannot evaluate space 'clik == 1'"),
                                            ("click + 1", r"space .click \+ 1. must give True/False per row")])
def test_bad_sample_space_is_named(space, message):
    s = Schema(dense=[{"name": "x"}], tasks=[{"name": "click"}, {"name": "buy", "space": space}])
    t = pd.DataFrame({"x": [1.0, 2], "click": [1, 0], "buy": [1, 0]})
    with pytest.raises(DataError, match=f"task 'buy': {message}"):
        Encoder(s).fit(t).transform(t)


def test_integer_columns_take_the_fast_path_to_the_same_ids():
    s = Schema(sparse=[{"name": "k", "min_freq": 2}], tasks=[{"name": "y"}])
    rng = np.random.default_rng(0)
    ints = rng.integers(-5, 300, 2000)
    train = pd.DataFrame({"k": ints, "y": 0})
    as_text = pd.DataFrame({"k": ints.astype(str), "y": 0})
    a, b = Encoder(s).fit(train), Encoder(s).fit(as_text)
    assert a.vocabularies == b.vocabularies
    probe = rng.integers(-10, 400, 500)
    fast = a.transform(pd.DataFrame({"k": probe, "y": 0})).sparse[:, 0]
    slow = a.transform(pd.DataFrame({"k": probe.astype(str), "y": 0})).sparse[:, 0]
    assert a._integer_index("k") is not None and torch.equal(fast, slow)
    odd = Encoder(s, vocabularies={"k": ["007", "7"]}, scalers={})
    assert odd._integer_index("k") is None  # "007" is no integer's canonical string
    assert odd.transform(pd.DataFrame({"k": [7], "y": [0]})).sparse[0, 0] == 2


def test_numeric_dense_columns_scale_as_one_matrix_like_column_by_column():
    s = Schema(dense=[{"name": "f"}, {"name": "i"}, {"name": "b"}], tasks=[{"name": "y"}])
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"f": rng.normal(3, 2, 50), "i": rng.integers(0, 9, 50), "b": rng.random(50) < 0.3, "y": 0})
    t.loc[[4, 7], "f"] = np.nan
    enc = Encoder(s).fit(t)
    together = enc.transform(t).dense  # every column numeric: one matrix
    as_objects = t.astype({"f": object, "i": object, "b": object})  # column by column
    torch.testing.assert_close(together, enc.transform(as_objects).dense, atol=0, rtol=0)
    raw = t[["f", "i", "b"]].astype(float)
    expected = torch.tensor(((raw - raw.mean()) / raw.std(ddof=0)).fillna(0).to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(together, expected, atol=1e-6, rtol=0)
    with pytest.raises(DataError, match=r"column 'i': row 3 holds 1e\+300, out of float32 range"):
        enc.transform(t.astype({"i": float}).assign(i=lambda d: d["i"].where(d.index != 3, 1e300)))

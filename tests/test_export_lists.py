"""Models with list features exported (ONNX, TorchScript) and served equal `predict`: empty and
null lists, unseen and missing elements, lists longer than max_length, every pooling, shared
tables and element weights; the service refuses malformed lists with 422."""

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from mtlrec.config import load_config
from mtlrec.data.encoder import Encoder
from mtlrec.export import export_onnx, export_torchscript, jagged_from_codes
from mtlrec.serve import Scorer, create_app
from mtlrec.trained import TrainedModel, load

WORDS = [f"w{i}" for i in range(12)]
GENRES = ["drama", "comedy", "news", "sport", "kids"]
LISTS = {  # name -> (pooling and its options), every list a different case
    "tags": {"pooling": "sum", "max_length": 4},
    "keywords": {"pooling": "sum", "embedding": "tags", "weights": "keyword_weights"},  # tags' table
    "genres": {"pooling": "mean", "weight_separator": ":"},
    "brands": {"pooling": "mean"},
    "cats": {"pooling": "max", "max_length": 3},
    "clicked": {"pooling": "attention", "embedding": "item", "max_length": 4,  # item's table
                "attention": {"target": "item", "hidden": [6]}},
}


def random_table(rng, n):
    def some(values, most):
        return [list(rng.choice(values, rng.integers(0, most + 1))) for _ in range(n)]

    keywords = some(WORDS, 4)
    return pd.DataFrame({
        "user": [f"u{i}" for i in rng.integers(0, 15, n)],
        "item": rng.integers(0, 25, n),
        "tags": some(WORDS, 6),
        "keywords": keywords,
        "keyword_weights": [list(np.round(rng.uniform(0.1, 2.0, len(k)), 3)) for k in keywords],
        "genres": ["|".join(f"{g}:{w:.2f}" for g, w in zip(row, rng.uniform(0.1, 2, len(row))))
                   for row in some(GENRES, 3)],
        "brands": some(["acme", "bolt", "core", "dyna"], 3),
        "cats": [[int(c) for c in row] for row in some(np.arange(10), 6)],
        "clicked": [[int(c) for c in row] for row in some(np.arange(25), 7)],
        "age": rng.normal(40, 12, n),
        "x": rng.normal(size=n),
        "click": rng.integers(0, 2, n),
        "time": rng.normal(size=n),
    })


@pytest.fixture(scope="module")
def listed():
    """An untrained PLE on two single, six list and two dense features, its weights drawn large
    enough that every list moves the predictions; the rows to score, every awkward case included."""
    rng = np.random.default_rng(0)
    sparse = [{"name": "user", "embedding_dim": 4}, {"name": "item", "embedding_dim": 4}]
    sparse += [{"name": name, "embedding_dim": 4, "multi_valued": True} | options for name, options in LISTS.items()]
    cfg = load_config({"features": {"sparse": sparse, "dense": [{"name": "age"}, {"name": "x"}]},
                       "tasks": [{"name": "click"}, {"name": "time", "type": "regression"}],
                       "model": {"name": "ple", "expert_hidden": [8], "tower_hidden": [4]}})
    encoder = Encoder(cfg.schema).fit(random_table(rng, 300))
    torch.manual_seed(0)
    trained = TrainedModel.build(cfg, encoder)
    with torch.no_grad():
        for parameter in trained.model.parameters():
            parameter.normal_(0.0, 0.5)
    table = random_table(rng, 30)
    awkward = {
        "tags": [[], None, ["w1", "unseen"], WORDS[:9], [None, "w2", "", "w3"]],
        "keywords": [[], None, ["w4", "unseen", "w5"], [None, "w6"], WORDS[:7]],
        "keyword_weights": [[], None, [0.5, 1.5, 2.0], [3.0, 0.25], [0.5] * 7],
        "genres": ["", None, "drama:0.5|unseen:2.0", "news:0.0|kids:0.0", "sport:1.5"],
        "brands": [None, [], ["unseen"], ["acme", "acme", "bolt"], ["dyna"]],
        "cats": [[], [1, 2, 3, 4, 5, 6, 7, 8], None, [99], [3, 3]],
        "clicked": [None, list(range(12)), [], [500, 501], [7]],
        "item": [3, 4, 99, 5, 6],  # row 2: an unseen target
    }
    for column, values in awkward.items():
        table[column] = pd.Series(values + table[column].tolist()[len(values):], dtype=object)
    return trained, table


def elements(cell, feature) -> list:
    """A list cell as the exported model takes it: its elements as text ("" missing)."""
    if cell is None or cell == "":
        return []
    parts = cell.split(feature.separator) if isinstance(cell, str) else cell
    return ["" if e is None else str(e) for e in parts]


def inputs_of(trained, table):
    """(single values, lists, weights) by feature: text, one list of text per row, weights per row."""
    singles = {f.name: ["" if v is None else str(v) for v in table[f.name]] for f in trained.schema.singles}
    lists, weights = {}, {}
    for f in trained.schema.lists:
        rows = [elements(cell, f) for cell in table[f.name]]
        if f.weight_separator:  # "drama:0.7" -> "drama", 0.7
            split = [[e.rpartition(f.weight_separator) for e in row] for row in rows]
            rows = [[name for name, _, _ in row] for row in split]
            weights[f.name] = [[float(w) for _, _, w in row] for row in split]
        elif f.weights:
            weights[f.name] = [[float(w) for w in (cell or [])] for cell in table[f.weights]]
        lists[f.name] = rows
    return singles, lists, weights


def onnx_feed(trained, table) -> dict[str, np.ndarray]:
    singles, lists, weights = inputs_of(trained, table)
    feed = {name: np.array(values, dtype=object) for name, values in singles.items()}
    for name, rows in lists.items():
        feed[name] = np.array([e for row in rows for e in row], dtype=object)
        feed[f"{name}.lengths"] = np.array([len(row) for row in rows], dtype=np.int64)
        if name in weights:
            feed[f"{name}.weights"] = np.array([w for row in weights[name] for w in row], dtype=np.float32)
    return feed | {"dense": table[["age", "x"]].to_numpy(dtype=np.float32)}


def test_lists_move_the_predictions(listed):
    """The comparisons below can fail: every list feature changes the predictions."""
    trained, table = listed
    expected = trained.predict(table).to_numpy()
    for name in LISTS:
        emptied = table.assign(**{name: [[]] * len(table)})
        if name == "keywords":
            emptied["keyword_weights"] = [[]] * len(table)
        assert np.abs(trained.predict(emptied).to_numpy() - expected).max() > 1e-3, name


def test_jagged_from_codes_drops_missing_and_keeps_the_last_elements():
    codes = torch.tensor([5, -1, 6, 7, 8, -1, 9, 1, 2])
    lengths = torch.tensor([4, 0, 2, 3])  # [5, -, 6, 7], [], [8, -], [9, 1, 2]
    weights = torch.arange(9, dtype=torch.float32)
    lists = jagged_from_codes(codes, lengths, weights, max_length=2)
    assert lists.values.tolist() == [6, 7, 8, 1, 2]
    assert lists.offsets.tolist() == [0, 2, 2, 3, 5]
    assert lists.weights.tolist() == [2.0, 3.0, 4.0, 7.0, 8.0]
    whole = jagged_from_codes(codes, lengths, None, max_length=None)
    assert whole.values.tolist() == [5, 6, 7, 8, 9, 1, 2] and whole.offsets.tolist() == [0, 3, 3, 4, 7]
    assert whole.weights is None


def test_onnx_with_lists_equals_predict(listed, tmp_path):
    import onnxruntime

    trained, table = listed
    export_onnx(trained, tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert [i.name for i in session.get_inputs()] == [
        "user", "item", "tags", "tags.lengths", "keywords", "keywords.lengths", "keywords.weights", "genres",
        "genres.lengths", "genres.weights", "brands", "brands.lengths", "cats", "cats.lengths", "clicked",
        "clicked.lengths", "dense"]
    for rows in (table, table.head(1), table.iloc[[1, 2]], table.iloc[5:]):  # other sizes than the traced ones
        got = session.run(["predictions"], onnx_feed(trained, rows))[0]
        np.testing.assert_allclose(got, trained.predict(rows).to_numpy(), atol=1e-5, rtol=0)


def test_torchscript_with_lists_equals_predict(listed, tmp_path):
    trained, table = listed
    scorer = torch.jit.load(str(export_torchscript(trained, tmp_path / "m.pt")))
    singles, lists, weights = inputs_of(trained, table)
    got = scorer(singles, torch.from_numpy(table[["age", "x"]].to_numpy(dtype=np.float32)), lists, weights)
    np.testing.assert_allclose(got.numpy(), trained.predict(table).to_numpy(), atol=1e-5, rtol=0)
    with pytest.raises(torch.jit.Error, match="every list feature needs its rows' lists"):
        scorer(singles, torch.zeros(len(table), 2))


def json_rows(trained, table) -> list[dict]:
    """The table's rows as a client sends them: list cells as arrays (text split at the
    separator), elements as they are (null elements kept), NaN as null."""
    s = trained.schema
    rows = []
    for record in table.to_dict(orient="records"):
        row = {f.name: None if pd.isna(record[f.name]) else record[f.name] for f in s.singles + s.dense}
        for f in s.lists:
            cell = record[f.name]
            if isinstance(cell, str):  # text, split as the encoder splits it
                cell = cell.split(f.separator) if cell else []
            row[f.name] = cell
            if f.weights:
                row[f.weights] = record[f.weights]
        rows.append(json.loads(json.dumps(row, default=int)))  # numpy integers as JSON numbers
    rows[5]["cats"] = ["3", 3, 4.0, None]  # "3" and 3 are one category, 4.0 is 4
    rows[6]["user"] = 7  # an integer category
    return rows


@pytest.fixture(scope="module")
def served(listed, tmp_path_factory):
    """The listed model saved with its ONNX export, and the rows as JSON."""
    trained, table = listed
    folder = trained.save(tmp_path_factory.mktemp("listed") / "model")
    export_onnx(trained, folder / "model.onnx")
    return folder, json_rows(trained, table)


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(served[0], backend="torch"))


def post(client, rows):
    return client.post("/predict", content=json.dumps({"rows": rows}), headers={"content-type": "application/json"})


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_service_with_lists_equals_predict(served, backend, caplog):
    folder, rows = served
    with caplog.at_level("WARNING", logger="mtlrec.serve"):
        client = TestClient(create_app(folder, backend=backend))
    assert not caplog.records  # the folder's model.onnx serves as it is
    health = client.get("/health").json()
    assert health["backend"] == {"onnx": "onnxruntime", "torch": "torch"}[backend]
    assert health["features"]["lists"] == list(LISTS)
    answer = post(client, rows)
    assert answer.status_code == 200, answer.text
    got = pd.DataFrame(answer.json()["predictions"])
    expected = load(folder).predict(pd.DataFrame(rows))
    np.testing.assert_allclose(got[["click", "time"]].to_numpy(), expected.to_numpy(), atol=1e-5, rtol=0)
    one = post(client, rows[3:4]).json()["predictions"][0]  # a request of one row
    np.testing.assert_allclose([one["click"], one["time"]], expected.iloc[3].to_numpy(), atol=1e-5, rtol=0)


def test_hashed_list_feature_is_served_by_torch(served):
    folder, rows = served
    hashed = load(folder)
    brands = [f.name for f in hashed.schema.sparse].index("brands")
    hashed.encoder.raw_schema.sparse[brands].hash_buckets = 4  # ids 1..4 fit the trained table of 5 rows
    scorer = Scorer(hashed)
    assert scorer.backend == "torch"
    got = pd.DataFrame(json.loads(scorer.answer(json.dumps({"rows": rows}).encode()))["predictions"])
    expected = hashed.predict(pd.DataFrame(rows)).to_numpy()
    np.testing.assert_allclose(got[["click", "time"]].to_numpy(), expected, atol=1e-5, rtol=0)
    assert np.abs(expected - load(folder).predict(pd.DataFrame(rows)).to_numpy()).max() > 1e-4  # hashing acted


@pytest.mark.parametrize("row, feature, value, message", [
    (1, "tags", "w1|w2", "row 1: list feature 'tags' must be an array of strings or integers (null: an empty list), "
                         "not string"),
    (0, "tags", 5, "row 0: list feature 'tags' must be an array"),
    (2, "tags", [["w1"]], "row 2: list feature 'tags' holds array; its elements must be strings or integers"),
    (0, "clicked", [{"id": 1}], "row 0: list feature 'clicked' holds object"),
    (2, "brands", ["acme", "x\udfff"], "row 2: list feature 'brands' holds text that is not valid Unicode"),
    (3, "cats", [1, 2.5], "row 3: list feature 'cats' holds 2.5"),
    (0, "cats", [True], "row 0: list feature 'cats' holds boolean"),
    (0, "cats", [1e300], "row 0: list feature 'cats' holds 1e+300"),  # whole, but beyond exact float ids
    (4, "genres", ["drama"], "row 4: list feature 'genres' holds 'drama'; its elements must be strings with their "
                             "weight after ':'"),
    (0, "genres", ["drama:x"], "row 0: list feature 'genres' holds 'drama:x'"),
    (0, "genres", [3], "row 0: list feature 'genres' holds integer"),
    (1, "keyword_weights", [1.0], "row 1: 'keyword_weights', the element weights of list feature 'keywords', must "
                                  "be an array of 2 finite numbers, one per element; not 1"),
    (1, "keyword_weights", ["a", 1], "row 1: 'keyword_weights', the element weights of list feature 'keywords', "
                                     "must be an array of 2 finite numbers, one per element; not string"),
    (1, "keyword_weights", [True, 1], "one per element; not boolean"),
    (1, "keyword_weights", [1e300, 1], "one per element; not 1e+300"),  # beyond float32
])
def test_malformed_lists_get_422_naming_row_and_feature(served, client, row, feature, value, message):
    rows = json.loads(json.dumps(served[1][:5]))
    rows[1]["keywords"], rows[1]["keyword_weights"] = ["w1", "w2"], [1.0, 2.0]
    assert post(client, rows).status_code == 200
    rows[row][feature] = value
    answer = post(client, rows)
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text


FUZZ = [None, "", "w1", "acme", "\ud800", 3, -1, 2**70, 10**400, 1.5, 3.0, 1e300, float("nan"), True, [], [1], ["w1"],
        {"a": 1}, "drama:0.5", "x:nan", "a" * 300]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_fuzzed_lists_never_crash_the_service(served, backend):
    folder, rows = served
    client = TestClient(create_app(folder, backend=backend), raise_server_exceptions=False)
    rng = random.Random(0)
    statuses = set()
    for _ in range(120):
        body = json.loads(json.dumps(rows[:3]))
        row = rng.choice(body)
        name = rng.choice([*LISTS, "keyword_weights"])
        value = rng.choice(FUZZ)
        if isinstance(row[name], list) and row[name] and rng.random() < 0.7:
            row[name][rng.randrange(len(row[name]))] = value  # one element
        else:
            row[name] = value
        answer = client.post("/predict", content=json.dumps({"rows": body}), headers={"content-type": "application/json"})
        assert answer.status_code in (200, 422), (body, answer.text)
        statuses.add(answer.status_code)
    assert statuses == {200, 422}

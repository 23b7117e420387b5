"""The scoring service under bad input and load: missing item values, huge numbers, lone
surrogates, streamed bodies over the limit, too many requests in flight, timeouts; its
answers (ONNX Runtime and torch) equal `predict` and `rank.fused_score`; `mtlrec rank` on
empty cells."""

import asyncio
import json
import math
import os
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import mtlrec.serve as serve
from mtlrec.cli import main
from mtlrec.config import load_config
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.export import export_onnx
from mtlrec.rank import EPS, fused_score, item_factor, rank_table
from mtlrec.serve import Scorer, create_app
from mtlrec.trained import TrainedModel, load

ITEM = {"column": "length", "transform": "log1p", "power": 0.5}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """A model ranked by y1 * y2^0.5 * log1p(length)^0.5, `length` not a feature; its test rows."""
    folder = tmp_path_factory.mktemp("ranked") / "model"
    raw = {"seed": 4, "data": {"synthetic": {"rows": 2000, "dim": 6, "sparse_features": 2,
                                             "task_types": ["binary", "binary"]}},
           "model": {"name": "ple", "expert_hidden": [8], "tower_hidden": [4]},
           "train": {"epochs": 1, "progress": False},
           "rank": {"weights": {"y1": 1.0, "y2": 0.5}, "item": ITEM}}
    cfg = load_config(raw)
    run_experiment(cfg, folder)
    table = load_splits(cfg).test.head(40).reset_index(drop=True)
    table["length"] = np.arange(len(table), dtype=float) * 7.5
    return folder, cfg, table


def rows_of(cfg, table, n=8, extra=()):
    names = [f.name for f in cfg.schema.sparse + cfg.schema.dense] + list(extra)
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in table[names].head(n).to_dict(orient="records")]


def with_rank(folder, target, rank):
    """A model folder like `folder` (the same weights) whose config ranks by `rank`."""
    trained = load(folder)
    trained.config = load_config(trained.config.to_dict() | {"rank": rank})
    return trained.save(target)


def post(client, body):
    return client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})


# -- item 1: values that used to give 500 --------------------------------------------------------


def test_item_factor_of_a_missing_value_is_one():
    np.testing.assert_allclose(item_factor(np.array([np.nan, 3.0]), "log1p", 0.5), [1.0, math.log1p(3.0) ** 0.5])
    np.testing.assert_allclose(item_factor(np.array([np.nan]), "identity", 2.0), [1.0])


def test_null_item_value_leaves_the_factor_out(ranked):
    folder, cfg, table = ranked
    client = TestClient(create_app(folder))
    rows = rows_of(cfg, table, 6, extra=["length"])
    rows[2]["length"] = None
    answer = post(client, {"rows": rows})
    assert answer.status_code == 200, answer.text
    got = pd.DataFrame(answer.json()["predictions"])
    assert np.isfinite(got["score"]).all()
    y1, y2 = got["y1"].to_numpy(), got["y2"].to_numpy()
    lengths = np.array([np.nan if r["length"] is None else r["length"] for r in rows])
    by_hand = y1 * y2**0.5 * np.where(np.isnan(lengths), 1.0, np.maximum(np.log1p(lengths), EPS) ** 0.5)
    np.testing.assert_allclose(got["score"], by_hand, rtol=1e-9)
    np.testing.assert_allclose(got["score"][2], y1[2] * y2[2] ** 0.5, rtol=1e-9)  # f(item) = 1
    table, trained = pd.DataFrame(rows), load(folder)
    expected = trained.predict(table)
    np.testing.assert_allclose(got["score"], fused_score(expected, table, trained.config.rank, trained.schema), rtol=1e-5)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[1].pop("length"), "row 1: missing feature(s) ['length'] ('length' is the rank.item column"),
    (lambda r: r[0].update(length="long"), "row 0: 'length' (the rank.item column) must be a finite number or null, "
                                            "not 'long'"),
    (lambda r: r[3].update(length=True), "row 3: 'length' (the rank.item column) must be a finite number"),
    (lambda r: r[2].update(length=10**400), "row 2: 'length' (the rank.item column) must be a finite number"),
    (lambda r: r[2].update(length=float("nan")), "row 2: 'length' (the rank.item column) must be a finite number"),
    (lambda r: r[1].update(x2=10**400), "row 1: dense feature 'x2' must be a finite number or null, "
                                        "not an integer of 401 digits"),
    (lambda r: r[4].update(x3=-(10**400)), "row 4: dense feature 'x3' must be a finite number or null"),
    (lambda r: r[0].update(x2=float("inf")), "row 0: dense feature 'x2' must be a finite number or null, not inf"),
    (lambda r: r[1].update(x2=1e300), "row 1: dense feature 'x2' holds 1e+300, out of float32 range after scaling"),
    (lambda r: r[2].update(c1="\ud800"), "row 2: sparse feature 'c1' is not valid Unicode text"),
    (lambda r: r[5].update(c0="ok \udfff"), "row 5: sparse feature 'c0' is not valid Unicode text"),
    (lambda r: r[1].update(c0={"a": 1}), "row 1: sparse feature 'c0' must be a string or an integer (null: missing), "
                                         "not object"),
    (lambda r: r[0].update(x5=[1.0]), "row 0: dense feature 'x5' must be a finite number or null, not array"),
    (lambda r: r.__setitem__(3, [1, 2]), "row 3 must be an object of feature values, not array"),
])
def test_bad_values_get_422_naming_row_and_feature(ranked, mutate, message):
    folder, cfg, table = ranked
    client = TestClient(create_app(folder), raise_server_exceptions=False)
    rows = rows_of(cfg, table, 6, extra=["length"])
    mutate(rows)
    answer = post(client, {"rows": rows})  # json.dumps writes NaN and \ud800 escapes as Python reads them
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"]


def test_item_that_is_a_dense_feature(ranked, tmp_path):
    folder, cfg, table = ranked
    folder = with_rank(folder, tmp_path / "m", {"weights": {"y1": 1.0}, "item": {"column": "x3", "power": 1.0}})
    client = TestClient(create_app(folder))
    rows = rows_of(cfg, table, 5)
    rows[1]["x3"] = None  # missing: the training mean for the model, f(item) = 1 for the score
    got = pd.DataFrame(post(client, {"rows": rows}).json()["predictions"])
    x3 = np.array([np.nan if r["x3"] is None else r["x3"] for r in rows])
    np.testing.assert_allclose(got["score"], got["y1"] * np.where(np.isnan(x3), 1.0, np.maximum(x3, EPS)), rtol=1e-9)


def test_rank_table_empty_item_cell_and_empty_group(ranked, tmp_path, capsys):
    folder, cfg, table = ranked
    trained = load(folder)
    table = table.assign(user=np.arange(len(table)) % 4)
    table.loc[5, "length"] = np.nan
    top, _, _ = rank_table(trained, table, "user", top_k=10)
    predictions = trained.predict(table)
    row = top.loc[5]
    y1, y2 = float(predictions.loc[5, "y1"]), float(predictions.loc[5, "y2"])
    assert row["score"] == pytest.approx(y1 * y2**0.5, rel=1e-9)  # f(item) = 1
    np.testing.assert_allclose(top.sort_index()["score"], fused_score(predictions, table, trained.config.rank,
                                                                      trained.schema), rtol=1e-12)

    table.loc[[7, 9], "user"] = np.nan
    with pytest.raises(ValueError, match=r"--group-by column 'user' is empty in 2 row\(s\), the first row 7"):
        rank_table(trained, table, "user", top_k=3)
    table.to_csv(tmp_path / "t.csv", index=False)
    assert main(["rank", str(folder), str(tmp_path / "t.csv"), "--group-by", "user"]) == 2
    assert "--group-by column 'user' is empty in 2 row(s), the first row 7" in capsys.readouterr().err

    table["user"] = 1
    table["length"] = table["length"].astype(object)
    table.loc[3, "length"] = "long"
    with pytest.raises(ValueError, match=r"rank.item.column 'length' must be numeric: row 3 holds 'long'"):
        rank_table(trained, table, "user", top_k=3)


# -- item 2: bodies, concurrency, timeouts ----------------------------------------------------------


async def drive(app, chunks, headers=(), stall=False):
    """One POST /predict through the ASGI app; `chunks` are the body's messages (a client that
    stops sending after them with `stall`). Returns (status, body, bytes the app pulled)."""
    pulled = 0
    chunks = iter(chunks)
    following = next(chunks, None)
    sent = []

    async def receive():
        nonlocal pulled, following
        if following is None:
            if stall:
                await asyncio.Event().wait()
            return {"type": "http.disconnect"}
        chunk, following = following, next(chunks, None)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": following is not None or stall}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body, pulled


def nine_megabytes(chunk=65_536):
    for _ in range(9_000_000 // chunk + 1):
        yield b" " * chunk


def test_chunked_body_over_the_limit_stops_being_read(ranked):
    folder, cfg, table = ranked
    app = create_app(folder)  # max_bytes: 8,000,000
    status, body, pulled = asyncio.run(drive(app, nine_megabytes()))
    assert status == 413 and b"request body over 8000000 bytes" in body
    assert 8_000_000 < pulled <= 8_000_000 + 65_536  # stopped at the first chunk past the limit
    assert app.in_flight.count == 0

    status, body, pulled = asyncio.run(drive(app, nine_megabytes(), headers=[(b"content-length", b"9000000")]))
    assert status == 413 and pulled == 0  # refused on the declared length, nothing read
    good = json.dumps({"rows": rows_of(cfg, table, 2, extra=["length"])}).encode()
    status, body, _ = asyncio.run(drive(app, [good[:50], good[50:]]))  # a streamed body under the limit
    assert status == 200 and len(json.loads(body)["predictions"]) == 2

    client = TestClient(app)  # chunked transfer encoding, no Content-Length, through HTTP
    assert client.post("/predict", content=nine_megabytes(), headers={"content-type": "application/json"}
                       ).status_code == 413


def blocking_scorer(app):
    """Make the app's scoring wait for the returned event (at most 10 s)."""
    gate = threading.Event()
    answer = app.scorer.answer

    def slow_answer(body):
        gate.wait(10)
        return answer(body)

    app.scorer.answer = slow_answer
    return gate


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_requests_over_max_in_flight_get_503(ranked):
    folder, cfg, table = ranked
    app = create_app(folder, max_in_flight=2)
    gate = blocking_scorer(app)
    body = json.dumps({"rows": rows_of(cfg, table, 3, extra=["length"])}).encode()

    async def scenario():
        held = [asyncio.create_task(drive(app, [body])) for _ in range(2)]
        for _ in range(1000):
            if app.in_flight.count == 2:
                break
            await asyncio.sleep(0.01)
        refused = await drive(app, [body])
        gate.set()
        return refused, [await task for task in held]

    (status, detail, pulled), held = asyncio.run(scenario())
    assert status == 503 and pulled == 0
    assert "busy: 2 requests in flight, the most this worker takes (max_in_flight)" in json.loads(detail)["detail"]
    assert [s for s, _, _ in held] == [200, 200]
    assert asyncio.run(drive(app, [body]))[0] == 200  # places given back


def test_timeout_answers_504(ranked):
    folder, cfg, table = ranked
    app = create_app(folder, timeout_s=0.2)
    body = json.dumps({"rows": rows_of(cfg, table, 3, extra=["length"])}).encode()

    status, detail, _ = asyncio.run(drive(app, [body[:20]], stall=True))  # a client that stops sending
    assert status == 504 and "not answered within 0.2 s (timeout_s)" in json.loads(detail)["detail"]
    assert app.in_flight.count == 0

    gate = blocking_scorer(app)  # scoring that takes too long: answered 504, keeps its place until it ends
    status, detail, _ = asyncio.run(drive(app, [body]))
    assert status == 504 and app.in_flight.count == 1
    gate.set()
    assert wait_for(lambda: app.in_flight.count == 0)


def test_service_options_are_checked(ranked):
    with pytest.raises(ValueError, match="must be positive"):
        create_app(ranked[0], max_in_flight=0)
    with pytest.raises(ValueError, match="backend must be"):
        create_app(ranked[0], backend="tensorflow")


# -- item 3: the fast path equals predict ---------------------------------------------------------


def awkward_rows(cfg, table):
    """Rows with an unseen category, a category as a string, missing sparse and dense values."""
    rows = rows_of(cfg, table, 12, extra=["length"])
    rows[0]["c0"] = 999_999  # unseen
    rows[1]["c1"] = str(rows[1]["c1"])  # "3" is the category 3
    rows[2]["c0"] = None
    rows[3]["x2"] = None
    rows[4]["c1"] = "never seen"
    rows[5]["c0"] = 10**40  # an integer beyond int64: unseen
    rows[6]["length"] = None
    return rows


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_answers_equal_predict_and_fused_score(ranked, backend):
    folder, cfg, table = ranked
    app = create_app(folder, backend=backend)
    client = TestClient(app)
    assert client.get("/health").json()["backend"] == {"onnx": "onnxruntime", "torch": "torch"}[backend]
    rows = awkward_rows(cfg, table)
    answer = post(client, {"rows": rows})
    assert answer.status_code == 200, answer.text
    got = pd.DataFrame(answer.json()["predictions"])
    assert list(got.columns) == ["y1", "y2", "score"]
    trained = load(folder)
    frame = pd.DataFrame(rows)
    expected = trained.predict(frame)
    np.testing.assert_allclose(got[["y1", "y2"]].to_numpy(), expected.to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["score"], fused_score(expected, frame, trained.config.rank, trained.schema),
                               rtol=1e-4)


def test_values_that_are_not_finite_are_sent_as_null(ranked):
    folder, cfg, table = ranked
    app = create_app(folder)
    app.scorer.outputs = lambda ids, dense: np.tile(np.array([[np.inf, 0.25]], dtype=np.float32), (len(ids), 1))
    answer = post(TestClient(app), {"rows": rows_of(cfg, table, 2, extra=["length"])})
    assert answer.status_code == 200
    assert answer.json()["predictions"][0] == {"y1": None, "y2": 0.25, "score": None}


def test_regression_model_and_its_folder_onnx(tmp_path, caplog):
    """A binary + regression model (batch norm folded on export): a valid model.onnx in the
    folder is used; a stale or broken one is replaced by a fresh export, with a warning."""
    raw = {"seed": 2, "data": {"synthetic": {"rows": 1200, "dim": 5, "sparse_features": 2,
                                             "task_types": ["binary", "regression"]}},
           "model": {"name": "ple", "task_experts": [1, 2], "expert_hidden": [8], "tower_hidden": [4],
                     "batch_norm": True},
           "train": {"epochs": 1, "progress": False}}
    cfg = load_config(raw)
    folder = tmp_path / "m"
    run_experiment(cfg, folder)
    trained = load(folder)
    rows = rows_of(cfg, load_splits(cfg).test, 9)
    rows[0]["c1"], rows[1]["x3"] = 12345, None
    expected = trained.predict(pd.DataFrame(rows)).to_numpy()

    export_onnx(trained, folder / "model.onnx")
    with caplog.at_level("WARNING", logger="mtlrec.serve"):
        app = create_app(folder)
    assert app.scorer.backend == "onnxruntime" and not caplog.records

    stale = load(folder)
    with torch.no_grad():
        for parameter in stale.model.parameters():
            parameter.add_(0.05)
    export_onnx(stale, folder / "model.onnx")
    with caplog.at_level("WARNING", logger="mtlrec.serve"):
        app = create_app(folder)
    assert "its predictions differ from the weights'" in caplog.text and app.scorer.backend == "onnxruntime"
    got = pd.DataFrame(post(TestClient(app), {"rows": rows}).json()["predictions"])
    np.testing.assert_allclose(got[["y1", "y2"]].to_numpy(), expected, atol=1e-5, rtol=0)

    (folder / "model.onnx").write_bytes(b"not onnx")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtlrec.serve"):
        app = create_app(folder, backend="onnx")
    assert "model.onnx in the model folder: cannot be read" in caplog.text
    got = pd.DataFrame(post(TestClient(app), {"rows": rows}).json()["predictions"])
    np.testing.assert_allclose(got[["y1", "y2"]].to_numpy(), expected, atol=1e-5, rtol=0)


def test_hashed_features_and_extra_outputs_are_scored_with_torch(ranked):
    folder, cfg, table = ranked
    rows = awkward_rows(cfg, table)
    frame = pd.DataFrame(rows)

    hashed = load(folder)
    hashed.encoder.raw_schema.sparse[0].hash_buckets = 7  # ids 1..7 fit the trained embedding table
    scorer = Scorer(hashed, folder)
    assert scorer.backend == "torch"
    with pytest.raises(ValueError, match="cannot serve from ONNX Runtime: hashed features"):
        Scorer(hashed, folder, backend="onnx")
    got = pd.DataFrame(json.loads(scorer.answer(json.dumps({"rows": rows}).encode()))["predictions"])
    np.testing.assert_allclose(got[["y1", "y2"]].to_numpy(), hashed.predict(frame).to_numpy(), atol=1e-6)

    trained = load(folder)
    esmm = TrainedModel.build(load_config(trained.config.to_dict() | {"model": {"name": "esmm"}}), trained.encoder)
    scorer = Scorer(esmm)
    assert scorer.backend == "torch"
    got = pd.DataFrame(json.loads(scorer.answer(json.dumps({"rows": rows}).encode()))["predictions"])
    expected = esmm.predict(frame)
    assert list(got.columns) == ["y1", "y2", "cvr", "score"] and list(expected.columns) == ["y1", "y2", "cvr"]
    np.testing.assert_allclose(got[["y1", "y2", "cvr"]].to_numpy(), expected.to_numpy(), atol=1e-6)


def test_workers_read_the_model_and_options_from_the_environment(ranked, monkeypatch):
    folder, cfg, table = ranked
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **settings: calls.append((app, settings)))
    monkeypatch.setenv(serve.ENV_MODEL, "")  # restored (unset) after the test
    monkeypatch.setenv(serve.ENV_OPTIONS, "")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # app_from_env sets it for a worker process
    serve.run_service(folder, port=8123, workers=3, max_rows=4, timeout_s=2.5)
    app, settings = calls[0]
    assert app == "mtlrec.serve:app_from_env" and settings["factory"] is True and settings["workers"] == 3
    assert settings["http"] == "mtlrec.serve:NoDelayHttp" and settings["host"] == "127.0.0.1"
    assert json.loads(os.environ[serve.ENV_OPTIONS]) == {"max_rows": 4, "timeout_s": 2.5}

    client = TestClient(serve.app_from_env())
    assert client.get("/health").status_code == 200
    answer = post(client, {"rows": rows_of(cfg, table, 5, extra=["length"])})
    assert answer.status_code == 413 and "5 rows; at most 4 per request" in answer.json()["detail"]

    serve.run_service(folder, workers=1)
    assert not isinstance(calls[1][0], str) and "workers" not in calls[1][1]
    monkeypatch.delenv(serve.ENV_MODEL)
    with pytest.raises(RuntimeError, match="MTLREC_SERVE_MODEL is not set"):
        serve.app_from_env()


def test_connections_get_tcp_nodelay():
    """The listening socket of uvicorn's workers has proto 0, so asyncio leaves Nagle on for
    its connections; NoDelayHttp turns it off for each one."""
    import uvicorn
    from uvicorn.server import ServerState

    async def nothing(scope, receive, send):
        pass

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # proto 0, as uvicorn binds it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            accepted, address = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0

                class Transport:
                    def get_extra_info(self, name, default=None):
                        return {"socket": accepted, "peername": address, "sockname": listener.getsockname()
                                }.get(name, default)

                    def is_closing(self):
                        return False

                loop = asyncio.new_event_loop()
                try:
                    protocol = serve.NoDelayHttp(config=uvicorn.Config(nothing, log_level="warning"),
                                                 server_state=ServerState(), app_state={}, _loop=loop)
                    protocol.connection_made(Transport())
                finally:
                    loop.close()
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

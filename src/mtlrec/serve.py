"""An HTTP JSON scoring service for a trained model (FastAPI; run by `mtlrec serve`).

    GET  /health   -> {"status": "ok", "model": ..., "tasks": [...], "classes": {...}, "features": {...},
                       "backend": ...}
    POST /predict  {"rows": [{"user": "u1", "age": 31.0, ...}, ...]}
                   -> {"predictions": [{"click": 0.12, "watch_time": 31.5, "score": 0.04}, ...]}

Rows. Each row gives every feature of the model and no other key; when the config's
`rank.item.column` is not a feature, every row gives it too (a row without it gets 422:
send null when it is unknown). Sparse features: a string or an integer (3 and "3" are one
category), null for missing. List (multi-valued) features: an array of such elements, null
or [] for an empty list; a null or "" element is missing and dropped, a whole float (3.0)
is the integer, and a list longer than the feature's `max_length` keeps its last elements,
as `TrainedModel.predict` reads a list cell. With inline element weights
(`weight_separator`) every element is a string "name<separator>weight"; with a weights
column (`weights`) the row gives that column too: an array of finite numbers, one per
element (null for an empty list). Dense features: a finite number, null for missing (the
training mean). The item value: a finite number or null; null gives f(item) = 1, i.e. the
item factor is left out of that row's score.

Answer. One value per task, as `TrainedModel.predict` gives for the same rows (extra
outputs such as ESMM's `cvr` follow), and `score`, the fused ranking score of
`mtlrec.rank`; a value that is not finite is sent as null. A multiclass task's value is the
array of its C class probabilities in class order, `"rating": [0.1, 0.2, 0.4, 0.2, 0.1]`
(`predict`'s columns `rating:0` .. `rating:4`); /health's `classes` names each multiclass
task's classes in that order.

Errors. Bad input gets 422 whose `detail` names the row and the feature. A body over
`max_bytes` gets 413 as soon as the bytes read pass the limit, with or without
Content-Length (the rest is not read); more than `max_rows` rows get 413. A worker holds
up to `max_in_flight` requests (they take turns on its scoring thread) and answers the next
one 503 at once (Retry-After: 1). A request not answered within `timeout_s` (reading its
body, waiting its turn, scoring) gets 504; scoring it started finishes in the background
and keeps its place in flight until then.

Speed. Rows are checked and encoded column by column with the model encoder's rules
(vocabulary dicts, the same hashing and scaling; no pandas) and scored by an ONNX Runtime
session of the exported model (`mtlrec.export.export_onnx`: the folder's `model.onnx` when
it gives the weights' predictions, else one exported at startup), or by the torch model
where ONNX cannot serve (hashed features, extra outputs, onnxruntime not installed).
`run_service(..., workers=N)` starts N processes, each building its app with `app_from_env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
import pydantic_core
import torch
from fastapi import FastAPI

try:  # the HTTP protocol uvicorn picks by itself: httptools when installed, else h11
    import httptools  # noqa: F401
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpProtocol
except ImportError:
    from uvicorn.protocols.http.h11_impl import H11Protocol as _HttpProtocol

from mtlrec.export import (
    MISSING,
    encoded_features,
    encoded_part,
    list_input_names,
    weighted,
)
from mtlrec.rank import fused_score_array
from mtlrec.schema import Schema
from mtlrec.trained import TrainedModel, load

ENV_MODEL = "MTLREC_SERVE_MODEL"  # model folder of the worker processes of run_service
ENV_OPTIONS = "MTLREC_SERVE_OPTIONS"  # create_app options of those workers, as JSON
ONNX_FILE = "model.onnx"
SCORING_THREADS = 1  # per worker process: more threads only contend for the GIL
FLOAT32_MAX = float(np.finfo(np.float32).max)
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
              type(None): "null"}
SPARSE_TYPES = frozenset({str, int, type(None)})
EXACT_FLOATS = 2.0**53  # whole floats below this are ids exactly, as the encoder reads them
NUMBER_TYPES = frozenset({int, float, type(None)})

log = logging.getLogger(__name__)


class NoDelayHttp(_HttpProtocol):
    """uvicorn's HTTP protocol with TCP_NODELAY on every connection. uvicorn's worker
    processes listen on a socket that asyncio does not take for TCP (its `proto` is 0), so
    Nagle's algorithm stays on and each keep-alive answer waits ~40 ms for the client's
    delayed ACK (uvicorn issue #3149)."""

    def connection_made(self, transport, *args):
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport, *args)


class RequestError(Exception):
    """A request the service refuses: its HTTP status and the `detail` text."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _json_type(value: Any) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def _tuple_getter(names: list[str]):
    """row -> tuple of the named values (itemgetter gives a bare value for one name)."""
    if len(names) == 1:
        name = names[0]
        return lambda row: (row[name],)
    return itemgetter(*names) if names else (lambda row: ())


def _vocabulary_ids(vocabulary: list[str]) -> dict:
    """Category -> id (1..n; 0 is out of vocabulary). An integer finds the id of its decimal
    string, as the encoder reads 3 and "3" as one category."""
    ids: dict = {value: i + 1 for i, value in enumerate(vocabulary)}
    for value, i in list(ids.items()):
        try:
            number = int(value)
        except ValueError:
            continue
        if str(number) == value:
            ids[number] = i
    return ids


class Scorer:
    """One model's request body -> answer body: checks, encoding, the model, the fused score."""

    def __init__(self, trained: TrainedModel, model_dir: str | Path | None = None, backend: str = "auto",
                 max_rows: int = 10_000):
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be 'auto', 'onnx' or 'torch', not {backend!r}")
        self.schema = schema = trained.schema  # a property that copies: read once
        self.trained = trained
        self.max_rows = max_rows
        self.rank = trained.config.rank
        self.sparse = [f.name for f in schema.singles]
        self.lists = schema.lists
        self.dense = [f.name for f in schema.dense]
        self.item = self.rank.item.column if self.rank.item else None
        read = self.sparse + [f.name for f in self.lists] + self.dense + [f.weights for f in self.lists if f.weights]
        self.item_is_extra = self.item is not None and self.item not in read
        self.keys = frozenset(read + ([self.item] if self.item_is_extra else []))
        tables = {name: _vocabulary_ids(trained.encoder.vocabularies[name])
                  for name, members in schema.tables.items() if not members[0].hash_buckets}
        self.vocabularies = [tables.get(f.table) for f in schema.singles]
        self.hash_buckets = [f.hash_buckets for f in schema.singles]
        self.list_vocabularies = [None if f.hash_buckets else tables[f.table] | {None: MISSING} for f in self.lists]
        self.list_inputs = [name for f in self.lists for name in list_input_names(f)]
        self.mean = np.array([trained.encoder.scalers[n][0] for n in self.dense], dtype=np.float64)
        self.std = np.array([trained.encoder.scalers[n][1] for n in self.dense], dtype=np.float64)
        self._sparse_of = _tuple_getter(self.sparse)
        self._dense_of = _tuple_getter(self.dense)
        self.tasks = schema.task_names
        self.task_set = trained.tasks
        self.classes = {name: kind.class_names for name, kind in zip(self.tasks, trained.tasks.kinds)
                        if kind.width > 1}  # a multiclass task's class names, as its columns TASK:CLASS name them
        trained.model.cpu().eval()
        probe = _probe_inputs(schema)
        extras = list(torch_outputs(trained, schema, *probe)[1])
        self.names = self.tasks + [f"{n}_extra" if n in self.tasks else n for n in extras] + ["score"]
        # an answer row's values by name, from the row of outputs and score: a multiclass task's
        # columns as one array (None: every task has one column, the row is the values)
        width, tasks = self.task_set.num_logits, self.task_set
        self.picks = None if width == len(self.tasks) else (
            [s if w > 1 else s.start for s, w in zip(tasks.slices, tasks.widths)]
            + list(range(width, width + len(extras) + 1)))
        self.session = None
        if backend != "torch":
            why = ("hashed features cannot be exported" if any(f.hash_buckets for f in schema.sparse)
                   else f"the model has extra outputs {extras}" if extras else None)
            if why is None:
                try:
                    self.session = _onnx_session(trained, schema, model_dir, probe)
                except (ImportError, ValueError, RuntimeError) as err:
                    why = str(err)
            if why is not None and backend == "onnx":
                raise ValueError(f"cannot serve from ONNX Runtime: {why}")
            if why is not None:
                log.warning("mtlrec serve: scoring with torch, not ONNX Runtime: %s", why)
        self.backend = "onnxruntime" if self.session is not None else "torch"

    # -- the request --------------------------------------------------------------------------

    def answer(self, body: bytes) -> bytes:
        """The JSON answer to a request body; RequestError for a body the service refuses."""
        rows = self.rows(body)
        ids, dense, raw_dense, lists = self.encode(rows)
        item = self.item_values(rows, raw_dense) if self.item else None
        outputs = self.outputs(ids, dense, *lists)
        predictions = outputs[:, : self.task_set.num_logits].astype(np.float64)
        score = fused_score_array(self.task_set.rank_values(predictions), self.tasks, item, self.rank, self.schema)
        table = np.column_stack([outputs.astype(np.float64), score])
        values = table.tolist()
        if not np.isfinite(table).all():  # JSON has no NaN or infinity
            values = [[x if math.isfinite(x) else None for x in row] for row in values]
        if self.picks is not None:
            values = [[row[pick] for pick in self.picks] for row in values]
        names = self.names
        return pydantic_core.to_json({"predictions": [dict(zip(names, row)) for row in values]})

    def rows(self, body: bytes) -> list[dict]:
        """The body's rows, each with exactly the keys the model reads."""
        try:
            payload = pydantic_core.from_json(body, allow_inf_nan=False)
        except ValueError:  # not JSON, or JSON with NaN or a lone surrogate: the standard parser says where
            payload = _parse_json_slowly(body)
        if type(payload) is not dict or "rows" not in payload:
            raise RequestError(422, 'body must be a JSON object {"rows": [row, ...]}')
        rows = payload["rows"]
        if type(rows) is not list or not rows:
            raise RequestError(422, '"rows" must be a non-empty array of row objects')
        if len(rows) > self.max_rows:
            raise RequestError(413, f"{len(rows)} rows; at most {self.max_rows} per request")
        keys = self.keys
        for i, row in enumerate(rows):
            if type(row) is not dict or row.keys() != keys:
                self._refuse_row(i, row)
        return rows

    def _refuse_row(self, i: int, row: Any) -> None:
        if type(row) is not dict:
            raise RequestError(422, f"row {i} must be an object of feature values, not {_json_type(row)}")
        unknown, missing = sorted(row.keys() - self.keys), sorted(self.keys - row.keys())
        if unknown:
            raise RequestError(422, f"row {i}: unknown feature(s) {unknown}; the model reads {sorted(self.keys)}")
        note = (f" ({self.item!r} is the rank.item column the score reads: null when unknown)"
                if self.item_is_extra and self.item in missing else "")
        raise RequestError(422, f"row {i}: missing feature(s) {missing}{note}")

    def encode(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """Rows -> ids `[N, S]` int64, scaled dense `[N, D]` float32 (missing: 0), the raw
        dense values `[N, D]` float64 (missing: NaN), as the model's encoder gives them, and the
        list features' inputs (`list_input_names`: codes, lengths, weights), flat."""
        n = len(rows)
        ids = np.zeros((n, len(self.sparse)), dtype=np.int64)
        if self.sparse:
            for j, column in enumerate(zip(*map(self._sparse_of, rows))):
                ids[:, j] = self._ids(j, column)
        lists = [array for k in range(len(self.lists)) for array in self._list_inputs(k, rows)]
        dense_rows = list(map(self._dense_of, rows))
        if not set(map(type, chain.from_iterable(dense_rows))) <= NUMBER_TYPES:
            self._refuse_dense(dense_rows, lambda v: type(v) not in NUMBER_TYPES)
        try:
            raw = np.array(dense_rows, dtype=np.float64).reshape(n, len(self.dense))
        except OverflowError:  # an integer beyond float range
            self._refuse_dense(dense_rows, lambda v: type(v) is int and not _fits_float(v))
            raise
        finite = np.isfinite(raw)
        if not finite.all():  # null is NaN here: refuse NaN and infinity that came as numbers
            self._refuse_dense(dense_rows, lambda v: type(v) is float and not math.isfinite(v))
        scaled = (raw - self.mean) / self.std
        too_large = np.abs(scaled) > FLOAT32_MAX
        if too_large.any():
            i, j = np.argwhere(too_large)[0]
            raise RequestError(422, f"row {i}: dense feature {self.dense[j]!r} holds {dense_rows[i][j]!r}, "
                                    "out of float32 range after scaling")
        if not finite.all():
            scaled[~finite] = 0.0  # missing: the training mean
        return ids, scaled.astype(np.float32), raw, lists

    def _ids(self, j: int, column: tuple) -> np.ndarray:
        """One sparse feature's ids: vocabulary id (0: unseen or missing) or hash bucket + 1."""
        types = set(map(type, column))
        name = self.sparse[j]
        if not types <= SPARSE_TYPES:
            i, value = next((i, v) for i, v in enumerate(column) if type(v) not in SPARSE_TYPES)
            raise RequestError(422, f"row {i}: sparse feature {name!r} must be a string or an integer "
                                    f"(null: missing), not {_json_type(value)}")
        if str in types:
            texts = [v for v in column if type(v) is str]
            try:
                "".join(texts).encode("utf-8")
            except UnicodeEncodeError:
                i = next(i for i, v in enumerate(column) if type(v) is str and not _is_unicode(v))
                raise RequestError(422, f"row {i}: sparse feature {name!r} is not valid Unicode text "
                                        "(a lone surrogate)") from None
        vocabulary = self.vocabularies[j]
        if vocabulary is not None:
            return np.fromiter(map(vocabulary.get, column, repeat(0)), dtype=np.int64, count=len(column))
        return _hashed(column, self.hash_buckets[j], missing=0)

    def _list_inputs(self, k: int, rows: list[dict]) -> list[np.ndarray]:
        """List feature k's codes `[V]` int64 (vocabulary id or hash bucket + 1; `MISSING` for a
        missing element), lengths `[N]` int64 and, with element weights, weights `[V]` float32.
        The model drops the missing elements and keeps the last `max_length`."""
        f = self.lists[k]
        elements: list = []
        weights: list[float] = []
        lengths = np.zeros(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            cell = row[f.name]
            if cell is None:
                cell = []
            elif type(cell) is not list:
                raise RequestError(422, f"row {i}: list feature {f.name!r} must be an array of strings or integers "
                                        f"(null: an empty list), not {_json_type(cell)}")
            lengths[i] = len(cell)
            if f.weight_separator:
                for value in cell:
                    name, weight = _weighted_element(i, f.name, f.weight_separator, value)
                    elements.append(name)
                    weights.append(weight)
            else:
                elements += cell if set(map(type, cell)) <= SPARSE_TYPES else [_element(i, f.name, v) for v in cell]
                if f.weights:
                    weights += _weights(i, f.name, f.weights, row[f.weights], len(cell))
        if not _is_unicode("".join(v for v in elements if type(v) is str)):
            e = next(e for e, v in enumerate(elements) if type(v) is str and not _is_unicode(v))
            i = int(np.searchsorted(np.cumsum(lengths), e, side="right"))
            raise RequestError(422, f"row {i}: list feature {f.name!r} holds text that is not valid Unicode "
                                    "(a lone surrogate)")
        elements = [None if v == "" else v for v in elements]
        vocabulary = self.list_vocabularies[k]
        if vocabulary is not None:
            codes = np.fromiter(map(vocabulary.get, elements, repeat(0)), dtype=np.int64, count=len(elements))
        else:
            codes = _hashed(elements, f.hash_buckets, missing=MISSING)
        return [codes, lengths] + ([np.array(weights, dtype=np.float32)] if weighted(f) else [])

    def _refuse_dense(self, dense_rows: list[tuple], bad) -> None:
        """RequestError for the first dense value `bad(value)` holds for, if any."""
        for i, values in enumerate(dense_rows):
            for name, value in zip(self.dense, values):
                if bad(value):
                    shown = (f"an integer of {len(str(abs(value)))} digits" if type(value) is int
                             else repr(value) if type(value) is float else _json_type(value))
                    raise RequestError(422, f"row {i}: dense feature {name!r} must be a finite number or null, "
                                            f"not {shown}")

    def item_values(self, rows: list[dict], raw_dense: np.ndarray) -> np.ndarray:
        """The rank.item value of each row as float64, NaN where missing (f(item) = 1)."""
        if self.item in self.dense:
            return raw_dense[:, self.dense.index(self.item)]
        values = np.full(len(rows), np.nan)
        allowed = SPARSE_TYPES if self.item in self.sparse else NUMBER_TYPES  # a sparse item may be "95"
        for i, row in enumerate(rows):
            value = row[self.item]
            if value is not None:
                values[i] = _finite_number(value) if type(value) in allowed else math.nan
                if math.isnan(values[i]):
                    shown = repr(value) if type(value) in (str, float) else _json_type(value)
                    raise RequestError(422, f"row {i}: {self.item!r} (the rank.item column) must be a finite "
                                            f"number or null, not {shown}")
        return values

    # -- the model ------------------------------------------------------------------------------

    def outputs(self, ids: np.ndarray, dense: np.ndarray, *lists: np.ndarray) -> np.ndarray:
        """`[N, L + E]` predictions: the tasks' (`TaskSet.predict`'s), then the extra outputs'.
        lists: `encode`'s."""
        if self.session is not None:
            return self.session.run(None, _feed(self.session, ids, dense, dict(zip(self.list_inputs, lists))))[0]
        predictions, extras = torch_outputs(self.trained, self.schema, ids, dense, *lists)
        return np.column_stack([predictions, *extras.values()]) if extras else predictions


def torch_outputs(trained: TrainedModel, schema: Schema, ids: np.ndarray, dense: np.ndarray, *lists: np.ndarray):
    """Encoded rows (lists: `Scorer.encode`'s) -> (task predictions `[N, L]`, calibrated as
    `TrainedModel.predict`'s, extra outputs as probabilities by name)."""
    with torch.inference_mode():
        features = encoded_features(schema, torch.from_numpy(ids), torch.from_numpy(dense),
                                    [torch.from_numpy(a) for a in lists])
        with trained.autocast():  # the precision it was trained in
            out = trained.model(features)
        predictions = trained.tasks.predict(trained.calibration(out.logits.float())).numpy()
        return predictions, {n: torch.sigmoid(v.float()).numpy() for n, v in out.extra_logits.items()}


def _hashed(values, buckets: int, missing: int) -> np.ndarray:
    """1 + the encoder's hash of each value mod `buckets`; `missing` for None."""
    texts = np.array(["" if v is None else str(v) for v in values], dtype=object)
    hashed = pd.util.hash_array(texts) % np.uint64(buckets)
    return np.where(np.array([v is None for v in values], dtype=bool), missing, hashed.astype(np.int64) + 1)


def _element(i: int, name: str, value: Any) -> str | int | None:
    """A list element as the vocabulary reads it: a string, an integer (a whole float is its
    integer, as in the encoder) or None (missing); RequestError for any other value."""
    if type(value) in SPARSE_TYPES:
        return value
    if type(value) is float and value.is_integer() and abs(value) < EXACT_FLOATS:
        return int(value)
    shown = repr(value) if type(value) is float else _json_type(value)
    raise RequestError(422, f"row {i}: list feature {name!r} holds {shown}; its elements must be strings or "
                            "integers (null: missing)")


def _weighted_element(i: int, name: str, separator: str, value: Any) -> tuple[str, float]:
    """'drama:0.7' -> ('drama', 0.7), as the encoder splits an element with its weight inline."""
    category, found, weight = value.rpartition(separator) if type(value) is str else ("", "", "")
    number = _finite_number(weight) if found else math.nan
    if not abs(number) <= FLOAT32_MAX:
        shown = repr(value) if type(value) is str else _json_type(value)
        raise RequestError(422, f"row {i}: list feature {name!r} holds {shown}; its elements must be strings "
                                f"with their weight after {separator!r} (e.g. 'drama{separator}0.7')")
    return category, number


def _weights(i: int, name: str, column: str, cell: Any, count: int) -> list[float]:
    """The element weights of one row's list of `count` elements: numbers float32 holds (null: none)."""
    values = [] if cell is None else cell
    if type(values) is not list:
        problem = f"not {_json_type(cell)}"
    elif len(values) != count:
        problem = f"not {len(values)}"
    else:
        bad = [w for w in values if type(w) not in (int, float) or not abs(_finite_number(w)) <= FLOAT32_MAX]
        if not bad:
            return values
        problem = f"not {bad[0]!r}" if type(bad[0]) is float else f"not {_json_type(bad[0])}"
    raise RequestError(422, f"row {i}: {column!r}, the element weights of list feature {name!r}, must be an "
                            f"array of {count} finite numbers, one per element; {problem}")


def _parse_json_slowly(body: bytes) -> Any:
    """json.loads, for bodies the fast parser refuses: NaN and lone surrogates parse here and
    are refused later with their row and feature; what is not JSON gets its position."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(422, "body is not valid JSON: nested too deep") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise RequestError(422, f"body is not valid JSON: {err}") from None


def _finite_number(value: str | int | float) -> float:
    """float(value) when that is finite, else NaN."""
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _probe_inputs(schema: Schema, rows: int = 64) -> tuple[np.ndarray, ...]:
    """Seeded encoded inputs over the whole vocabularies, to compare two scorers: ids, dense and
    the lists' inputs (`Scorer.encode`'s), lists of up to twice max_length with missing elements."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, f.vocab_size, rows) for f in schema.singles], axis=1) if schema.singles \
        else np.zeros((rows, 0), dtype=np.int64)
    dense = rng.normal(size=(rows, len(schema.dense))).astype(np.float32)
    lists = []
    for f in schema.lists:
        lengths = rng.integers(0, 2 * (f.max_length or 4) + 1, rows)
        lists += [rng.integers(MISSING, f.vocab_size, lengths.sum()), lengths]
        lists += [rng.uniform(0, 2, lengths.sum()).astype(np.float32)] if weighted(f) else []
    return ids.astype(np.int64), dense, *lists


def _feed(session, ids: np.ndarray, dense: np.ndarray, lists: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The core session's inputs by name (lists: by `list_input_names`)."""
    arrays = {"ids": ids, "dense_scaled": dense} | lists
    return {i.name: arrays[i.name] for i in session.get_inputs()}


def _onnx_session(trained: TrainedModel, schema: Schema, model_dir: str | Path | None, probe: tuple[np.ndarray, ...]):
    """An ONNX Runtime session of the exported model's scoring core (encoded inputs ->
    predictions): from the folder's model.onnx when it gives the weights' predictions on a
    probe, else from a fresh export. ValueError when neither does."""
    import onnx
    import onnxruntime

    from mtlrec.export import export_onnx

    expected = torch_outputs(trained, schema, *probe)[0]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # parallel over requests and workers
    saved = Path(model_dir) / ONNX_FILE if model_dir is not None else None
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        for path in [saved] if saved is not None and saved.exists() else []:
            session, problem = _core_session(onnx, onnxruntime, options, path, schema, probe, expected)
            if session is not None:
                return session
            problems.append(f"{ONNX_FILE} in the model folder: {problem}")
        fresh = export_onnx(trained, Path(scratch) / ONNX_FILE)
        session, problem = _core_session(onnx, onnxruntime, options, fresh, schema, probe, expected)
        if session is not None:
            if problems:
                log.warning("mtlrec serve: %s; serving a fresh export", problems[0])
            return session
    raise ValueError("; ".join(problems + [f"fresh export: {problem}"]))


def _core_session(onnx, onnxruntime, options, path: Path, schema: Schema, probe, expected: np.ndarray):
    """(session, None) for the exported graph's part from encoded inputs to predictions
    (`mtlrec.export.encoded_part`), or (None, why)."""
    list_inputs = [name for f in schema.lists for name in list_input_names(f)]
    try:
        core = encoded_part(onnx.load(str(path)), schema)
        session = onnxruntime.InferenceSession(core.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        got = session.run(None, _feed(session, probe[0], probe[1], dict(zip(list_inputs, probe[2:]))))[0]
    except Exception as err:  # noqa: BLE001 - any failure means: not this file
        return None, f"cannot be read as an mtlrec export ({type(err).__name__}: {err})"
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return None, "its predictions differ from the weights' (a stale export?)"
    return session, None


class InFlight:
    """Requests holding a place in one worker, at most `limit`. Places are given back from
    scoring threads too, hence the lock."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def leave(self, *_: Any) -> None:
        with self._lock:
            self.count -= 1


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


async def read_body(scope: dict, receive, max_bytes: int) -> bytes:
    """The request body, read message by message; 413 as soon as it passes max_bytes."""
    declared = next((value for key, value in scope["headers"] if key == b"content-length"), None)
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        shown = declared[:30].decode("latin-1")
        raise RequestError(413, f"request body over {max_bytes} bytes (Content-Length {shown})")
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body over {max_bytes} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_answer(send, status: int, body: bytes, headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _detail(text: str) -> bytes:
    return json.dumps({"detail": text}).encode()  # ASCII: any text, lone surrogates too


class ScoringService:
    """The ASGI app: POST /predict answered here, without a framework's per-request work
    (it is most of a small request's time); everything else (/health, /docs, errors) by FastAPI."""

    def __init__(self, api: FastAPI, scorer: Scorer, max_bytes: int, max_in_flight: int, timeout_s: float):
        self.api, self.scorer = api, scorer
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.in_flight = InFlight(max_in_flight)
        self.pool = ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="mtlrec-score")

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            await self.api(scope, receive, send)
        elif scope["method"] != "POST":
            await send_answer(send, 405, _detail("POST /predict {\"rows\": [...]}"), ((b"allow", b"POST"),))
        else:
            await self.predict(scope, receive, send)

    async def predict(self, scope: dict, receive, send) -> None:
        if not self.in_flight.enter():
            detail = (f"busy: {self.in_flight.limit} requests in flight, the most this worker takes "
                      "(max_in_flight); retry later")
            await send_answer(send, 503, _detail(detail), ((b"retry-after", b"1"),))
            return
        work = None
        try:
            with anyio.fail_after(self.timeout_s):
                body = await read_body(scope, receive, self.max_bytes)
                work = self.pool.submit(self.scorer.answer, body)
                work.add_done_callback(self.in_flight.leave)  # when scoring ends, answered in time or not
                status, answer = 200, await asyncio.wrap_future(work)
        except RequestError as err:
            status, answer = err.status, _detail(err.detail)
        except TimeoutError:
            status, answer = 504, _detail(f"not answered within {self.timeout_s:g} s (timeout_s)")
        except ClientGone:
            return
        finally:
            if work is None:
                self.in_flight.leave()
        await send_answer(send, status, answer)


def create_app(model_dir: str | Path, max_rows: int = 10_000, max_bytes: int = 8_000_000, max_in_flight: int = 64,
               timeout_s: float = 10.0, backend: str = "auto") -> ScoringService:
    """The service of one model folder, an ASGI app. backend: "auto" (ONNX Runtime where it can
    serve the model, else torch), "onnx" or "torch"."""
    if min(max_rows, max_bytes, max_in_flight) < 1 or not timeout_s > 0:
        raise ValueError("max_rows, max_bytes, max_in_flight and timeout_s must be positive")
    trained = load(model_dir)
    scorer = Scorer(trained, model_dir, backend, max_rows)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.pool.shutdown(wait=False, cancel_futures=True)

    api = FastAPI(title=f"mtlrec: {trained.config.name}", lifespan=lifespan)

    @api.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": trained.config.model.name, "tasks": trained.schema.task_names,
                "classes": scorer.classes,
                "features": {"sparse": scorer.sparse, "lists": [f.name for f in scorer.lists], "dense": scorer.dense},
                "backend": scorer.backend}

    service = ScoringService(api, scorer, max_bytes, max_in_flight, timeout_s)
    return service


def app_from_env() -> FastAPI:
    """The app of one worker process of `run_service`: the folder and the options from the environment."""
    folder = os.environ.get(ENV_MODEL)
    if not folder:
        raise RuntimeError(f"{ENV_MODEL} is not set: start workers with mtlrec.serve.run_service")
    torch.set_num_threads(1)  # see run_service
    return create_app(folder, **json.loads(os.environ.get(ENV_OPTIONS) or "{}"))


def run_service(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                **options: Any) -> None:
    """Serve until stopped: in this process, or in `workers` processes (options: create_app's).
    Each serving process runs torch on one thread: requests and workers use the cores (on two
    busy cores, two torch threads took ~28 ms per 32-row request against ~2 ms for one)."""
    import uvicorn

    settings = {"host": host, "port": port, "log_level": "warning", "access_log": False,
                "http": f"{__name__}:NoDelayHttp"}
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if workers == 1:
        torch.set_num_threads(1)
        uvicorn.run(create_app(model_dir, **options), **settings)
        return
    load(model_dir)  # a bad folder fails here, once, not in every worker
    os.environ[ENV_MODEL] = str(Path(model_dir).resolve())
    os.environ[ENV_OPTIONS] = json.dumps(options)
    uvicorn.run("mtlrec.serve:app_from_env", factory=True, workers=workers, **settings)

"""One experiment end to end: data -> encoder -> model -> training -> test metrics -> model folder."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtlrec.calibration import calibrate
from mtlrec.config import Experiment
from mtlrec.data import DataError, Encoder, make_synthetic
from mtlrec.data.formats import DATA_FORMATS
from mtlrec.data.source import BatchSource
from mtlrec.data.streaming import ParquetStream
from mtlrec.folders import FolderExists, holds_files, partial_folder, publish
from mtlrec.trained import HISTORY, METRICS, TrainedModel
from mtlrec.train.callbacks import TrainingCallback
from mtlrec.train.checkpoint import has_checkpoint, remove_checkpoint
from mtlrec.train.distributed import barrier, world
from mtlrec.train.evaluation import evaluate_logits, prediction_table
from mtlrec.train.tracking import start_tracking
from mtlrec.train.trainer import Trainer


@dataclass
class Splits:
    """The three tables, and for each the rows it came from: `ids[split]` has `row_id` (the row's
    position in its source, 0-based) and `source` ("train", "valid" or "test": the data file,
    or "synthetic")."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame | None
    ids: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run leaves. Under torchrun with sharded tables, `trained` holds the trained tables
    on rank 0 only (the other processes' tables are meta tensors: shape, no data)."""

    trained: TrainedModel
    history: list[dict[str, float]]
    test_metrics: dict[str, float]
    folder: Path | None
    seconds: float
    parameters: int
    hit_epoch_cap: bool = False  # all train.epochs ran and the last was the best: it may still have been improving


@dataclass(frozen=True)
class Frames:
    """The tables of a run with `data.source: dataframes` (what `fit` was given); valid and
    test may be None, and are then cut from train as from a file."""

    train: pd.DataFrame
    valid: pd.DataFrame | None = None
    test: pd.DataFrame | None = None


def load_splits(config: Experiment, frames: Frames | None = None) -> Splits:
    """The train / valid / test tables: synthetic, read from files, or the DataFrames given
    (`frames`, with `data.source: dataframes`); a split missing as a file or table
    is cut from the training table (`data.split`: a seeded shuffle by default, or by time, per
    user leave-last-out, by group; `mtlrec.data.splits`), or the validation split from half
    the test file (valid_from_test)."""
    data = config.data
    if (data.source == "dataframes") != (frames is not None):
        raise ValueError("DataFrames are read with data.source 'dataframes' only (mtlrec.fit sets it): "
                         f"data.source is {data.source!r}" + ("" if frames is not None else ", and no tables were given"))
    if data.source == "synthetic":
        table, name = make_synthetic(data.synthetic, seed=config.seed), "synthetic"
        valid = test = None
    elif frames is not None:
        table, valid, test, name = frames.train, frames.valid, frames.test, "train"
    else:
        read = DATA_FORMATS[data.format].read
        table, name = read(data.train), "train"
        valid = read(data.valid) if data.valid else None
        test = read(data.test) if data.test else None
    ids = {"valid": _ids(range(len(valid)), "valid") if valid is not None else None,
           "test": _ids(range(len(test)), "test") if test is not None else None}
    if data.valid_from_test:  # the MMoE / PLE papers' census protocol: test split 1:1
        halves = np.random.default_rng(config.seed).permutation(len(test))
        cut = len(test) // 2
        first, second = np.sort(halves[:cut]), np.sort(halves[cut:])
        valid, test = test.iloc[first], test.iloc[second]
        ids["valid"], ids["test"] = _ids(first, "test"), _ids(second, "test")
    train_rows, valid_rows, test_rows = _cut(table, data, config.seed, cut_valid=valid is None, cut_test=test is None)
    if test is None and len(test_rows):
        test, ids["test"] = table.iloc[test_rows], _ids(test_rows, name)
    if valid is None:
        valid, ids["valid"] = table.iloc[valid_rows], _ids(valid_rows, name)
    ids["train"] = _ids(train_rows, name)
    return Splits(_rows(table, train_rows), valid.reset_index(drop=True),
                  None if test is None else test.reset_index(drop=True),
                  {k: v for k, v in ids.items() if v is not None})


def _rows(table: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """`table`'s rows at positions `rows`, numbered from 0; when they are all its rows in order
    (nothing was cut from it), the table itself, renumbered without copying its data."""
    if len(rows) == len(table) and np.array_equal(rows, np.arange(len(table))):
        return table.reset_index(drop=True)
    return table.iloc[rows].reset_index(drop=True)


def _cut(table: pd.DataFrame, data, seed: int, cut_valid: bool, cut_test: bool
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, valid, test positions of `table` by `data.split` (a split given as a file: none cut)."""
    from mtlrec.data import splits

    valid_fraction = data.valid_fraction if cut_valid else 0.0
    test_fraction = data.test_fraction if cut_test else 0.0
    if data.split == "time":
        return splits.time_split(table, data.split_time, valid_fraction, test_fraction)
    if data.split == "leave_last_out":
        return splits.leave_last_out(table, data.split_group, data.split_time)
    if data.split == "group":
        return splits.group_split(table, data.split_group, valid_fraction, test_fraction, seed)
    return splits.random_split(len(table), valid_fraction, test_fraction, seed)


def _ids(rows, source: str) -> pd.DataFrame:
    return pd.DataFrame({"row_id": np.asarray(rows, dtype=np.int64), "source": source})


def run_experiment(config: Experiment, folder: str | Path | None = None, encoded: Encoded | None = None,
                   resume: bool = False, overwrite: bool = False,
                   callbacks: Sequence[TrainingCallback] = ()) -> RunResult:
    """Train `config`'s model; save it (with its epoch log and test metrics) to `folder` if given.

    The run works in `FOLDER.partial/` (the epoch log, and checkpoints with
    `train.checkpoint_every`) and renames it to `folder` once the model is saved whole
    (`mtlrec.folders`); an existing `folder` is replaced only with `overwrite`, and only then.
    `resume=True` continues the unfinished run in `FOLDER.partial/` if the config still
    matches it. `callbacks` hear of every step and epoch (`mtlrec.train.callbacks`; tracking,
    search). Under torch.distributed only rank 0 writes. Sets torch's CPU threads to
    `train.threads` when given. Tasks with `calibration` are calibrated after training on the
    validation split (`mtlrec.calibration`): the test metrics are the calibrated model's, plus
    the uncalibrated ones of those tasks as `uncalibrated/METRIC/TASK`."""
    start = time.perf_counter()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    rank = world()[0]
    work = None
    if folder is not None:
        folder = Path(folder)
        work = partial_folder(folder)
        if rank == 0:
            prepare_work_folder(folder, work, resume, overwrite)
        barrier()
    tracking = start_tracking(config, folder, work, resume)  # train.tracking (packages, folder): before training
    encoded = encoded or encode_splits(config)
    encoder, train, valid, test = encoded.encoder, encoded.train, encoded.valid, encoded.test
    torch.manual_seed(config.seed)
    trained = TrainedModel.build(config, encoder)
    trainer = Trainer(trained.model, encoder.schema, config.train, seed=config.seed,
                      log_path=work / HISTORY if work else None, checkpoint_dir=work,
                      run_config=config.to_dict(), callbacks=[*callbacks, *tracking.callbacks],
                      ranking=config.rank)
    with tracking.ending_failed():  # a failure anywhere below marks the MLflow run FAILED
        history = trained.history = trainer.fit(train, valid, resume=resume)
        trained.calibration = calibrate(encoder.schema, trainer, valid)  # the identity without calibrated tasks
        test_metrics, test_rows = {}, None
        if test is not None:
            raw_logits, targets = trainer.predict_split(test)
            logits = trained.calibration(raw_logits)  # raw_logits itself without calibrated tasks
            test_metrics = trained.test_metrics = evaluate_logits(trained.tasks, logits, targets, config.rank)
            test_metrics |= trained.calibration.uncalibrated_metrics(trained.tasks, raw_logits, targets)  # in place
            test_rows = prediction_table(trained.tasks, logits, targets)
            if "test" in encoded.ids:  # which rows these are: score your own baselines on the same rows
                test_rows = pd.concat([encoded.ids["test"].reset_index(drop=True), test_rows], axis=1)
        if trainer.holds_model:  # sharded tables: only rank 0 gathered the trained tables
            trained.model.cpu()
        seconds = time.perf_counter() - start
        parameters = sum(p.numel() for p in trained.model.parameters())
        if folder is not None and rank == 0:
            trained.write_files(work)
            if test_rows is not None:
                test_rows.to_parquet(work / "test_predictions.parquet", index=False)
            if encoded.ids:  # the split: every row's source and split
                pd.concat([ids.assign(split=name) for name, ids in encoded.ids.items()],
                          ignore_index=True).to_parquet(work / "split.parquet", index=False)
            summary = {"test": test_metrics, "seconds": seconds, "parameters": parameters, "epochs": len(history),
                       "hit_epoch_cap": trainer.hit_epoch_cap}
            (work / METRICS).write_text(json.dumps(summary, indent=2))
            remove_checkpoint(work)  # the run is finished: nothing left to resume
            publish(work, folder, overwrite=True)  # checked before training: replacing was allowed
        tracking.finish(folder)  # MLflow: the model folder as an artifact
    return RunResult(trained, history, test_metrics, folder, seconds, parameters, trainer.hit_epoch_cap)


def prepare_work_folder(folder: Path, work: Path, resume: bool, overwrite: bool) -> None:
    """Check, before any training, that this run may write `folder`, and make its work folder."""
    if resume:
        if not has_checkpoint(work):
            raise FileNotFoundError(f"no checkpoint to resume from: {work} holds no unfinished run "
                                    f"(train.checkpoint_every writes one)")
        return
    if holds_files(work) and not overwrite:
        if has_checkpoint(work):
            raise FolderExists(f"{work} holds an unfinished run; pass --resume to continue it, or --overwrite "
                               "to start over")
        raise FolderExists(f"{work} holds an unfinished run without a checkpoint (its epoch log only); pass "
                           "--overwrite to start over")
    if holds_files(folder) and not overwrite:
        raise FolderExists(f"{folder} already exists; pass --overwrite to replace it (once the new model is "
                           "saved whole), or --out elsewhere")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)


@dataclass(frozen=True)
class Encoded:
    """A fitted encoder and the splits it encoded: in-memory tensors or Parquet streams, and
    each in-memory split's source rows (`Splits.ids`; empty when streaming)."""

    encoder: Encoder
    train: BatchSource
    valid: BatchSource
    test: BatchSource | None
    ids: dict[str, pd.DataFrame] = field(default_factory=dict)


def encode_splits(config: Experiment, frames: Frames | None = None) -> Encoded:
    """The config's splits (or `frames`' tables), encoded: in-memory tensors, or Parquet streams with
    `data.streaming` (the encoder then fitted in one pass over the training files). Models
    that share the data (a bench) can share this: training does not change it."""
    data = config.data
    if data.streaming:  # every rank fits the same encoder; the trainer shards the streams
        encoder = Encoder(config.schema)
        whole = ParquetStream(data.train, chunk_rows=data.chunk_rows)
        encoder.fit_chunks(whole.tables(columns=encoder.columns(labels=False)))
        train = ParquetStream(data.train, encoder, data.chunk_rows, data.shuffle_buffer)
        valid, test = (ParquetStream(p, encoder, data.chunk_rows) if p else None for p in (data.valid, data.test))
        return Encoded(encoder, train, valid, test)
    splits = load_splits(config, frames)
    group_by = config.rank.group_by  # ranking lists for GAUC / NDCG in the metrics
    with naming_the_split("train", config):
        encoder = Encoder(config.schema).fit(splits.train)
        train = encoder.transform(splits.train)  # ranking lists are read in valid and test only
    with naming_the_split("valid", config):
        valid = encoder.transform(splits.valid, group_by=group_by)
    with naming_the_split("test", config):
        test = encoder.transform(splits.test, group_by=group_by) if splits.test is not None else None
    return Encoded(encoder, train, valid, test, splits.ids)


@contextmanager
def naming_the_split(split: str, config: Experiment) -> Iterator[None]:
    """Prefix a DataError with the split and where its rows come from."""
    try:
        yield
    except DataError as err:
        data = config.data
        given = {"train": data.train, "valid": data.valid, "test": data.test}[split]
        shuffled_train = split == "train" and not (data.valid and data.test)  # splits were cut from it
        halved_test = split in ("valid", "test") and data.valid_from_test
        if data.source == "synthetic":
            source = "synthetic data"
        elif data.source == "dataframes":
            source = "from the DataFrames given to fit; rows counted within the split"
        elif given and not shuffled_train and not halved_test:
            source = str(given)
        elif given:
            source = f"part of {given}, the rest cut into other splits; rows counted within the split"
        else:
            source = f"cut from {data.test if halved_test else data.train}; rows counted within the split"
        raise DataError(f"{split} split ({source}): {err}") from None


def fit(config: str | Path | dict | Experiment, train=None, valid=None, test=None, *,
        overrides: Sequence[str] = (), folder: str | Path | None = None, overwrite: bool = False,
        resume: bool = False, callbacks: Sequence[TrainingCallback] = ()) -> TrainedModel:
    """Train the config's model and return it, trained: `predict`, `evaluate`, `save`, and its
    epoch log (`history`) and test metrics (`test_metrics`).

    `config`: a YAML path, a dict, or an `Experiment`; `overrides` as `mtlrec train --set`.
    With `train` (a pandas DataFrame, or a table with `to_pandas()` such as a pyarrow Table)
    the data are these tables (`data.source: dataframes`, set for you): a missing `valid` or
    `test` is cut from `train` by `data.split`, as from a file. Without tables the config's own
    data (synthetic or files) is read. Nothing is written unless `folder` is given (then as
    `mtlrec train --out`: whole or not at all, replaced only with `overwrite`; `resume`
    continues an interrupted run there). `mtlrec train` and `mtlrec bench` run the same
    training (`run_experiment`).

    Example:
        >>> import mtlrec, numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> table = pd.DataFrame({"age": rng.normal(size=400), "item": rng.choice(["a", "b", "c"], 400)})
        >>> table["click"] = (table.age + (table.item == "a") > 0.5).astype(int)
        >>> table["watch"] = table.age * 2 + rng.normal(size=400)
        >>> config = {"features": {"dense": ["age"], "sparse": ["item"]},
        ...           "tasks": ["click", {"name": "watch", "type": "regression"}],
        ...           "model": {"name": "mmoe", "num_experts": 2}, "train": {"epochs": 2, "progress": False}}
        >>> model = mtlrec.fit(config, train=table)
        >>> model.predict(table.head(2)).columns.tolist(), len(model.history), sorted(model.test_metrics)[:2]
        (['click', 'watch'], 2, ['auc/click', 'ece/click'])
    """
    frames = None
    if train is not None:
        frames = Frames(*(_pandas(table, name) for table, name in ((train, "train"), (valid, "valid"), (test, "test"))))
    elif valid is not None or test is not None:
        raise ValueError("fit: valid / test tables were given without a train table")
    experiment = _with_source(config, overrides, frames is not None)
    encoded = encode_splits(experiment, frames)
    del train, valid, test, frames  # training reads the encoded tensors: the tables go, unless the caller keeps them
    return run_experiment(experiment, folder, encoded=encoded, resume=resume, overwrite=overwrite,
                          callbacks=callbacks).trained


def _pandas(table, name: str) -> pd.DataFrame | None:
    if table is None or isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "to_pandas"):
        return table.to_pandas()
    raise TypeError(f"fit: {name} must be a pandas DataFrame (or a table with to_pandas()), not {type(table).__name__}")


def _with_source(config: str | Path | dict | Experiment, overrides: Sequence[str], tables: bool) -> Experiment:
    """The experiment to run: read and overridden; with tables, its data source 'dataframes'."""
    from mtlrec.config import apply_overrides, read_raw_config, validate_config

    if isinstance(config, Experiment):  # the source it was given, if any (not the default)
        raw = config.to_dict()
        given = config.data.source if "source" in config.data.model_fields_set else None
    else:
        raw = read_raw_config(config)
        given = (raw.get("data") or {}).get("source")
    raw = apply_overrides(raw, list(overrides))
    if any(o.partition("=")[0].strip() == "data.source" for o in overrides):
        given = raw["data"]["source"]
    if tables and given not in (None, "dataframes"):
        raise ValueError(f"fit was given tables but the config reads data.source {given!r}: give the data once "
                         "(remove data.source, or set it to 'dataframes')")
    if tables:
        raw["data"] = {**(raw.get("data") or {}), "source": "dataframes"}
    experiment = validate_config(raw)
    if not tables and experiment.data.source == "dataframes":
        raise ValueError("data.source 'dataframes' needs the tables: fit(config, train=..., valid=..., test=...)")
    return experiment

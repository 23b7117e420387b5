"""A trained model with everything it needs: the experiment config, the fitted encoder and
the weights, and the post-hoc calibration of the tasks that ask for it (`mtlrec.calibration`).
Saved as a folder (`model.safetensors`, `config.yaml`, `encoder.json`, `calibration.json` when
a task is calibrated, and `manifest.json` with their checksums) that `mtlrec.load(folder)`
reads with nothing else.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from mtlrec import models
from mtlrec.calibration import Calibration, refuse_ordered_outputs
from mtlrec.config import Experiment, validate_config
from mtlrec.data.encoder import Encoder
from mtlrec.data.features import Features
from mtlrec.folders import DamagedFolder, partial_folder, publish, verify_manifest
from mtlrec.data.tensors import TensorData
from mtlrec.tasks import TaskSet
from mtlrec.train.evaluation import evaluate_logits
from mtlrec.train.graphs import GraphedCall, matmul_precision
from mtlrec.train.precision import resolve_precision

WEIGHTS, CONFIG, ENCODER = "model.safetensors", "config.yaml", "encoder.json"
CALIBRATION = "calibration.json"  # the calibrated tasks' maps (numbers only), when the config has any
HISTORY, METRICS = "epochs.jsonl", "metrics.json"  # what a run adds: its epoch log and test metrics


class TrainedModel:
    """A model with its config and fitted encoder: predict and evaluate raw tables, save a folder."""

    def __init__(self, config: Experiment, encoder: Encoder, model: nn.Module):
        self.config = config
        self.encoder = encoder
        self.model = model
        self.tasks = TaskSet(encoder.schema)
        self.calibration = Calibration(encoder.schema)  # fitted after training (run_experiment) or read (load)
        self.history: list[dict[str, float]] = []  # one row per epoch trained (epochs.jsonl); empty if unknown
        self.test_metrics: dict[str, float] = {}  # on the test split, when the run had one

    @property
    def schema(self):
        return self.encoder.schema

    @classmethod
    def build(cls, config: Experiment, encoder: Encoder) -> TrainedModel:
        """A fresh (untrained) model for a config and a fitted encoder."""
        refuse_ordered_outputs(config.model.name, encoder.schema)
        return cls(config, encoder, models.create(config.model.name, encoder.schema, **config.model.options))

    @torch.no_grad()
    def outputs(self, data: TensorData, batch_size: int = 8192) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits `[N, L]` of encoded rows (`TaskSet.slices`), calibrated where a task asks for
        it (`self.calibration`), and the model's extra logits (name -> `[N]`, e.g. ESMM's `cvr`)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        autocast = self.autocast()  # resolved once: the precision the model trained in
        names: list[str] = []  # the extra logits' names, in the order `forward` gives them

        def forward(features: Features) -> tuple[torch.Tensor, ...]:
            with autocast:
                out = self.model(features)
            names[:] = sorted(out.extra_logits)
            return out.logits.float(), *(out.extra_logits[name].float() for name in names)

        # on CUDA with train.cuda_graph: every full batch a replay of one recorded forward
        graphed = device.type == "cuda" and self.config.train.cuda_graph != "off" and not data.lists
        recorded = GraphedCall(lambda ids, dense: forward(Features(ids, dense)), warmup=1)
        with matmul_precision(self.config.train.tf32) if device.type == "cuda" else nullcontext():
            parts = [recorded(b.sparse, b.dense) if graphed else forward(b.features)
                     for b in data.to(device).batches(batch_size)]  # the rows moved once, the results kept there
        logits = torch.cat([p[0] for p in parts]).cpu()
        extras = {name: torch.cat([p[i + 1] for p in parts]).cpu() for i, name in enumerate(names)}
        return self.calibration(logits), extras

    def autocast(self):
        """The precision the model was trained in (`train.precision`, `auto` resolved for the
        model's device): a bf16 autocast context, or one that changes nothing (fp32)."""
        device = next(self.model.parameters()).device
        bf16 = resolve_precision(self.config.train.precision, device) == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)  # graph-safe

    def predict(self, table: pd.DataFrame, batch_size: int = 8192) -> pd.DataFrame:
        """One column per task: probability (binary) or value (regression); a multiclass task
        gives one column per class, `TASK:CLASS` (its probability; CLASS the class index, or
        its name from the task's `names`), in class order. Rows as in `table`. Extra outputs
        follow as probabilities (ESMM: `cvr`)."""
        logits, extras = self.outputs(self.encoder.transform(table, labels=False), batch_size)
        columns = dict(zip(self.tasks.output_names, self.tasks.predict(logits).T.numpy()))
        columns |= {(f"{n}_extra" if n in columns else n): torch.sigmoid(v).numpy() for n, v in extras.items()}
        return pd.DataFrame(columns, index=table.index)

    def evaluate(self, table: pd.DataFrame) -> dict[str, float]:
        """Loss and per-task metrics on a labelled table; with `rank.group_by` in the config and
        its column in the table, GAUC and NDCG@k too."""
        group_by = self.config.rank.group_by
        data = self.encoder.transform(table, group_by=group_by if group_by in table.columns else None)
        return evaluate_logits(self.tasks, self.outputs(data)[0], data, self.config.rank)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the model folder whole or not at all (`mtlrec.folders`); an existing folder
        is replaced only with `overwrite`."""
        folder = Path(folder)
        work = partial_folder(folder)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self.write_files(work)
        publish(work, folder, overwrite)
        return folder

    def write_files(self, folder: Path) -> None:
        """The weights, config, encoder and calibration into `folder` (no manifest: `publish` writes it)."""
        save_model(self.model, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        (folder / ENCODER).write_text(json.dumps(self.encoder.to_dict()))
        if self.calibration.methods:
            (folder / CALIBRATION).write_text(self.calibration.to_json())


def load(folder: str | Path, device: str = "cpu") -> TrainedModel:
    """Read a model folder written by `TrainedModel.save` (or `mtlrec train`), after checking
    every file against its checksum. Nothing in the folder is run as code."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, CONFIG, ENCODER) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a model folder: missing {missing}")
    verify_manifest(folder)
    try:
        config = validate_config(yaml.safe_load((folder / CONFIG).read_text()))
        encoder = Encoder.from_dict(json.loads((folder / ENCODER).read_text()))
    except (yaml.YAMLError, ValueError, KeyError, TypeError) as err:
        raise DamagedFolder(f"{folder}: cannot read the config or encoder: {err}") from None
    trained = TrainedModel.build(config, encoder)
    try:
        load_model(trained.model, str(folder / WEIGHTS), device=device)
    except Exception as err:  # safetensors raises several kinds for a damaged or mismatched file
        hint = ""
        if config.model.name == "home" and "task_gate_input" not in config.model.options:
            hint = ("; a HoME folder saved before task_gate_input existed had its task gates read z_c alone: set "
                    "model.task_gate_input: group in its config.yaml (and refresh manifest.json's checksum)")
        raise DamagedFolder(f"{folder / WEIGHTS} does not fit the model in {CONFIG}: {err}{hint}") from None
    trained.model.to(device)
    if trained.calibration.methods or (folder / CALIBRATION).exists():
        try:
            trained.calibration = Calibration.from_json(encoder.schema, (folder / CALIBRATION).read_text())
        except (OSError, ValueError) as err:
            raise DamagedFolder(f"{folder / CALIBRATION} does not hold the calibration the config asks for: "
                                f"{err}") from None
    if (folder / HISTORY).is_file():  # a folder written by a run (TrainedModel.save writes the model only)
        trained.history = [json.loads(line) for line in (folder / HISTORY).read_text().splitlines() if line]
    if (folder / METRICS).is_file():
        trained.test_metrics = json.loads((folder / METRICS).read_text()).get("test", {})
    return trained

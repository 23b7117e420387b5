"""Training checkpoints: everything a killed run needs to continue exactly where it was.

A checkpoint holds the model, optimizers and weighting, the RNG states, the data position
(epoch, step within it, and the shuffle generator's state at the epoch's start), the
history and the early-stopping state. It is written to a temporary file and renamed over the
old one, so a crash mid-write leaves the previous checkpoint whole.

A checkpoint holds tensors, numbers, strings, lists and dicts only, and is read with
`torch.load(weights_only=True)`: a crafted checkpoint.pt cannot run code when resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT, SIDECAR = "checkpoint.pt", "checkpoint.json"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    info = {"step": state["global_step"], "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"]}
    tmp_info = folder / (SIDECAR + ".tmp")
    tmp_info.write_text(json.dumps(info))
    os.replace(tmp_info, folder / SIDECAR)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # a truncated file, another format, or objects that need unpickling code
        raise ValueError(f"{path} is not a readable mtlrec checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


def has_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT).is_file()


def remove_checkpoint(folder: Path) -> None:
    for name in (CHECKPOINT, SIDECAR):
        (folder / name).unlink(missing_ok=True)
    for tables in folder.glob("tables-*"):  # TorchRec tables' state (mtlrec.train.sharding.save_tables)
        shutil.rmtree(tables, ignore_errors=True)


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run whose config changed in a field that changes its trajectory
    (anything but the fields in RESUMABLE_CHANGES), listing the differing fields."""
    before, now = flatten_fields(saved), flatten_fields(current)
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        lines = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {path}: the config differs from the checkpoint's in {lines} "
                         "(start over with --overwrite, or restore those values)")


# config fields that may change between a checkpoint and its resume: they do not change the
# trajectory already trained (more epochs, output, display, device, checkpoint cadence, tracking;
# a cosine schedule refuses a change of train.epochs itself, see mtlrec.train.schedules)
RESUMABLE_CHANGES = ("name", "output_dir", "models", "rank", "train.epochs", "train.progress",
                     "train.checkpoint_every", "train.device", "train.threads", "train.early_stopping.patience",
                     "train.tracking", "train.mlflow_uri")


def flatten_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> `{"train.lr": value}` (lists kept whole): how two configs are compared
    field by field (a resume, a continued search)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten_fields(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: tree}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""List features and sample weights through every path: files, in-memory and streaming
training, the saved model, predict, and two data-parallel processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtlrec import models
from mtlrec.cli import main
from mtlrec.config import load_config
from mtlrec.data import TensorData, write_table
from mtlrec.data.features import Jagged
from mtlrec.experiment import run_experiment
from mtlrec.schema import DenseFeature, Schema, SparseFeature, Task
from mtlrec.train.trainer import Trainer
from mtlrec.trained import load


def impressions(rows: int, seed: int) -> pd.DataFrame:
    """Items in 2 clusters; `seen` = earlier items, `click` likelier when they share the item's cluster."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 12, rows)
    lengths = rng.integers(0, 9, rows)
    seen = [rng.integers(0, 12, n) for n in lengths]
    overlap = np.array([np.mean(s % 2 == i % 2) if len(s) else 0.0 for s, i in zip(seen, item)])
    click = rng.random(rows) < 1 / (1 + np.exp(-8 * (overlap - 0.5)))
    return pd.DataFrame({
        "user": rng.integers(0, 30, rows).astype(str), "item": item,
        "seen": [s.tolist() for s in seen], "recent": [s[-3:].tolist() for s in seen],
        "tags": ["|".join(f"t{t}" for t in rng.integers(0, 6, rng.integers(0, 3))) for _ in range(rows)],
        "price": rng.normal(size=rows),
        "click": click.astype(int), "like": (rng.random(rows) < 0.3).astype(int),
        "w": rng.choice([0.5, 1.0, 2.0], rows),
    })


FEATURES = {
    "sparse": [{"name": "user"}, {"name": "item", "embedding": "items"},
               {"name": "seen", "embedding": "items", "multi_valued": True, "max_length": 6},
               {"name": "recent", "embedding": "items", "multi_valued": True, "max_length": 3,
                "pooling": "attention", "attention": {"target": "item", "hidden": [8]}},
               {"name": "tags", "multi_valued": True, "pooling": "mean"}],
    "dense": [{"name": "price"}],
    "sample_weight": "w",
}


def files_config(tmp_path, suffix=".parquet", **data) -> dict:
    paths = {}
    for split, seed, rows in (("train", 0, 3000), ("valid", 1, 400), ("test", 2, 400)):
        paths[split] = str(tmp_path / f"{split}{suffix}")
        write_table(impressions(rows, seed), paths[split])
    return {"name": "lists", "seed": 0, "data": {"source": "files", **paths, **data},
            "features": FEATURES, "tasks": [{"name": "click"}, {"name": "like"}],
            "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
            "train": {"epochs": 4, "batch_size": 64, "lr": 0.02, "progress": False},
            "output_dir": str(tmp_path / "runs")}


def test_lists_train_save_load_and_predict_from_csv(tmp_path):
    raw = files_config(tmp_path, suffix=".csv")
    result = run_experiment(load_config(raw))
    assert result.test_metrics["auc/click"] > 0.7  # the history carries the click signal
    folder = tmp_path / "model"
    result.trained.save(folder)
    loaded = load(folder)
    table = pd.read_csv(raw["data"]["test"])
    torch.testing.assert_close(torch.tensor(loaded.predict(table).to_numpy()),
                               torch.tensor(result.trained.predict(table).to_numpy()))
    assert main(["predict", str(folder), raw["data"]["test"], "--out", str(tmp_path / "p.csv")]) == 0
    written = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(written["click"], loaded.predict(table)["click"], rtol=1e-5)


def test_streaming_parquet_with_lists_trains_like_the_file_in_memory(tmp_path):
    streamed = run_experiment(load_config(files_config(tmp_path, streaming=True, chunk_rows=300,
                                                       shuffle_buffer=500)))
    in_memory = run_experiment(load_config(files_config(tmp_path)))
    for metrics in (streamed.test_metrics, in_memory.test_metrics):
        assert metrics["auc/click"] > 0.65
    assert streamed.trained.encoder.vocabularies == in_memory.trained.encoder.vocabularies


def test_weights_of_zero_and_one_train_as_the_rows_of_weight_one_alone():
    """Each epoch one batch of every row: weights 0 / 1 equal dropping the rows of weight 0."""
    schema = Schema(sparse=[SparseFeature(name="tag", vocab_size=9, multi_valued=True)],
                    dense=[DenseFeature(name=f"x{i}") for i in range(4)], tasks=[Task(name="c"), Task(name="r", type="regression")],
                    sample_weight="w")
    n = 300
    g = torch.Generator().manual_seed(0)
    tags = Jagged.from_lists([torch.randint(0, 9, (int(k),), generator=g).tolist()
                              for k in torch.randint(0, 4, (n,), generator=g)])
    labels = torch.stack([torch.randint(0, 2, (n,), generator=g).float(), torch.randn(n, generator=g)], 1)
    weights = (torch.arange(n) % 3 != 0).float()[:, None].expand(n, 2).contiguous()
    data = TensorData(torch.zeros(n, 0, dtype=torch.long), torch.randn(n, 4, generator=g), labels,
                      torch.ones(n, 2, dtype=torch.bool), (tags,), weights)
    kept = data.take(weights[:, 0].nonzero().flatten())
    kept.weights = None
    cfg = load_config({"train": {"batch_size": 512, "epochs": 3, "progress": False, "lr": 0.01}}).train
    trained = []
    for rows in (data, kept):
        torch.manual_seed(0)
        model = models.create("mmoe", schema, expert_hidden=[8])
        Trainer(model, schema, cfg).fit(rows)
        trained.append(model.state_dict())
    for name in trained[0]:
        torch.testing.assert_close(trained[0][name], trained[1][name], atol=1e-5, rtol=1e-4)


def test_two_processes_with_lists_train_like_one(tmp_path):
    raw = files_config(tmp_path)
    raw["data"]["train"] = raw["data"]["train"]
    table = pd.read_parquet(raw["data"]["train"]).iloc[:1280]  # 10 full global batches of 128
    write_table(table, raw["data"]["train"])
    raw["train"] |= {"batch_size": 128}
    cfg = tmp_path / "lists.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = lambda *cmd, out: subprocess.run([sys.executable, *cmd, "-m", "mtlrec.cli", "train", str(cfg), "--out",
                                           str(tmp_path / out)], capture_output=True, text=True, timeout=300,
                                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    one = run(out="one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", out="two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]
    assert m2["auc/click"] == pytest.approx(m1["auc/click"], abs=1e-4)


def test_a_run_with_lists_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from test_reliability import resumed_equals_whole

    raw = files_config(tmp_path)
    raw["train"] |= {"epochs": 3, "checkpoint_every": 10}
    resumed_equals_whole(raw, tmp_path, monkeypatch)


def test_rank_and_analyze_read_lists(tmp_path):
    raw = files_config(tmp_path)
    raw["model"] = {"name": "mmoe", "num_experts": 3, "expert_hidden": [8]}
    raw["train"]["epochs"] = 1
    run_experiment(load_config(raw), tmp_path / "m")
    test = raw["data"]["test"]
    assert main(["rank", str(tmp_path / "m"), test, "--group-by", "user", "--out", str(tmp_path / "top.csv")]) == 0
    top = pd.read_csv(tmp_path / "top.csv")
    assert len(top) > 0 and top.groupby("user").size().max() <= 10
    assert main(["analyze", str(tmp_path / "m"), test, "--out", str(tmp_path / "a")]) == 0
    usage = pd.read_csv(tmp_path / "a" / "utilisation.csv")
    assert sorted(usage["gate"].unique()) == ["gate/click", "gate/like"]
    np.testing.assert_allclose(usage.groupby("gate")["weight"].sum(), 1.0, rtol=1e-5)  # mean gate weights

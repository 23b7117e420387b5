"""mtlrec against DeepCTR-Torch and torch-rechub on one workload, each through its own trainer.

Workload: 26 sparse features (vocabularies 10..1000, embedding size 8), 13 dense, 2 binary
tasks, 200,000 training rows (+ 50,000 test rows); PLE with 2 levels, 2 shared + 2 task
experts per level, experts (256, 128) with batch norm, towers (64,), linear softmax gates;
MMoE with 4 such experts; batch 1024, Adam 1e-3, 1 epoch, 2 threads.

Every (library, model) trains in a fresh process, rounds interleaved (mtlrec, deepctr,
rechub, mtlrec, ...), and the median of the rounds is reported: training rows/s through the
library's trainer (building its data loader included), predict rows/s, peak memory of the
process, test AUC of both tasks, and achieved GFLOP/s (the model's FLOPs per row, counted by
torch's FlopCounterMode, times rows/s) as a share of a plain fp32 matmul on the same machine.

    pip install -e '.[bench]'     # deepctr-torch, torch-rechub (bench only), after torch==2.13.0
    python benchmarks/peers.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

SPARSE, DENSE, DIM, BATCH = 26, 13, 8, 1024
PLE = {"levels": 2, "shared": 2, "specific": 2, "experts": [256, 128], "tower": [64]}
MMOE = {"experts_n": 4, "experts": [256, 128], "tower": [64]}


def make_data(rows: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    vocab = [int(v) for v in np.random.default_rng(0).integers(10, 1001, SPARSE)]
    x = {f"s{i}": rng.integers(0, v, rows) for i, v in enumerate(vocab)}
    dense = rng.normal(size=(rows, DENSE)).astype(np.float32)
    x |= {f"d{i}": dense[:, i] for i in range(DENSE)}
    effect = np.random.default_rng(1).normal(size=(SPARSE, 1000))  # per-category effects, fixed
    logit1 = sum(effect[i][x[f"s{i}"]] for i in range(4)) * 0.5 + dense[:, 0] - 0.5
    logit2 = sum(effect[i][x[f"s{i}"]] for i in range(2, 6)) * 0.5 + dense[:, 1] - 1.0
    y = np.stack([rng.random(rows) < 1 / (1 + np.exp(-logit1)), rng.random(rows) < 1 / (1 + np.exp(-logit2))], 1)
    return x, y.astype(np.float32), vocab


def auc(y: np.ndarray, p: np.ndarray) -> float:
    from mtlrec.train.metrics import auc as whole_split_auc

    return whole_split_auc(y, p)


def flops_per_row(model: torch.nn.Module, batch) -> tuple[float, float]:
    """(training FLOPs per row: forward + backward, predict FLOPs per row)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        out = batch()
        out.sum().backward()
    train = counter.get_total_flops()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        batch()
    return train / BATCH, counter.get_total_flops() / BATCH


# ---------------------------------------------------------------- the three libraries
def run_mtlrec(model_name, x, y, xt, yt, vocab, precision="fp32"):
    import pandas as pd

    from mtlrec import models
    from mtlrec.config import TrainConfig
    from mtlrec.data import Encoder
    from mtlrec.schema import Schema
    from mtlrec.train.trainer import Trainer

    schema = Schema(sparse=[{"name": f"s{i}", "embedding_dim": DIM} for i in range(SPARSE)],
                    dense=[{"name": f"d{i}"} for i in range(DENSE)], tasks=[{"name": "t0"}, {"name": "t1"}])
    options = ({"num_levels": PLE["levels"], "task_experts": PLE["specific"], "shared_experts": PLE["shared"]}
               if model_name == "ple" else {"num_experts": MMOE["experts_n"]})
    # the same arrays the peers get, as table columns without a copy
    train_table = pd.DataFrame(x | {"t0": y[:, 0], "t1": y[:, 1]}, copy=False)
    test_table = pd.DataFrame(xt | {"t0": yt[:, 0], "t1": yt[:, 1]}, copy=False)
    start = time.perf_counter()
    encoder = Encoder(schema).fit(train_table)
    train = encoder.transform(train_table)
    torch.manual_seed(0)
    model = models.create(model_name, encoder.schema, expert_hidden=PLE["experts"], tower_hidden=PLE["tower"],
                          batch_norm=True, **options)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-3, progress=False, precision=precision,
                         fused_optimizer=True)
    trainer = Trainer(model, encoder.schema, config)
    trainer.fit(train)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    logits, _ = trainer.predict_split(encoder.transform(test_table))
    predict_seconds = time.perf_counter() - start
    probs = torch.sigmoid(logits).numpy()
    b = train.rows(0, BATCH)
    flops = flops_per_row(model, lambda: model(b.features).logits)
    return train_seconds, predict_seconds, probs, flops


def run_deepctr(model_name, x, y, xt, yt, vocab):
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models.multitask import MMOE as DMMOE, PLE as DPLE

    columns = [SparseFeat(f"s{i}", v, embedding_dim=DIM) for i, v in enumerate(vocab)]
    columns += [DenseFeat(f"d{i}", 1) for i in range(DENSE)]
    start = time.perf_counter()
    if model_name == "ple":
        model = DPLE(columns, shared_expert_num=PLE["shared"], specific_expert_num=PLE["specific"],
                     num_levels=PLE["levels"], expert_dnn_hidden_units=PLE["experts"], gate_dnn_hidden_units=(),
                     tower_dnn_hidden_units=PLE["tower"], dnn_use_bn=True, task_names=("t0", "t1"))
    else:
        model = DMMOE(columns, num_experts=MMOE["experts_n"], expert_dnn_hidden_units=MMOE["experts"],
                      gate_dnn_hidden_units=(), tower_dnn_hidden_units=MMOE["tower"], dnn_use_bn=True,
                      task_names=("t0", "t1"))
    model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    probs = model.predict(xt, batch_size=BATCH)
    predict_seconds = time.perf_counter() - start
    names = list(x)
    one = {k: v[:BATCH] for k, v in x.items()}
    tensor = torch.from_numpy(np.stack([one[k].astype(np.float32) for k in names], 1))
    flops = flops_per_row(model, lambda: model(tensor))
    return train_seconds, predict_seconds, np.asarray(probs), flops


def run_rechub(model_name, x, y, xt, yt, vocab):
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE as RMMOE, PLE as RPLE
    from torch_rechub.trainers import MTLTrainer
    from torch.utils.data import DataLoader
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    features = [SparseFeature(f"s{i}", v, embed_dim=DIM) for i, v in enumerate(vocab)]
    features += [DenseFeature(f"d{i}") for i in range(DENSE)]
    start = time.perf_counter()
    xd = {k: v.astype(np.float32) if k.startswith("d") else v for k, v in x.items()}
    xtd = {k: v.astype(np.float32) if k.startswith("d") else v for k, v in xt.items()}
    loader, _, _ = DataGenerator(xd, y).generate_dataloader(x_val=xtd, y_val=yt, x_test=xtd, y_test=yt,
                                                            batch_size=BATCH)
    types = ["classification", "classification"]
    towers = [{"dims": PLE["tower"]}, {"dims": PLE["tower"]}]
    if model_name == "ple":
        model = RPLE(features, types, n_level=PLE["levels"], n_expert_specific=PLE["specific"],
                     n_expert_shared=PLE["shared"], expert_params={"dims": PLE["experts"]}, tower_params_list=towers)
    else:
        model = RMMOE(features, types, n_expert=MMOE["experts_n"], expert_params={"dims": MMOE["experts"]},
                      tower_params_list=towers)
    trainer = MTLTrainer(model, task_types=types, optimizer_params={"lr": 1e-3, "weight_decay": 0}, n_epoch=1,
                         earlystop_patience=10, device="cpu", model_path="/tmp")
    trainer.train_one_epoch(loader)  # its own epoch loop (fit() would add a validation pass)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_loader = DataLoader(PredictDataset(xtd), batch_size=BATCH, shuffle=False)
    probs = np.asarray(trainer.predict(model, test_loader))
    predict_seconds = time.perf_counter() - start
    batch = next(iter(loader))[0]
    flops = flops_per_row(model, lambda: model(batch))
    return train_seconds, predict_seconds, probs, flops


RUNNERS = {"mtlrec": run_mtlrec, "mtlrec-bf16": lambda *a: run_mtlrec(*a, precision="bf16"),
           "deepctr-torch": run_deepctr, "torch-rechub": run_rechub}


def child(library: str, model_name: str, rows: int, threads: int) -> None:
    torch.set_num_threads(threads)
    x, y, vocab = make_data(rows, seed=0)
    xt, yt, _ = make_data(rows // 4, seed=1)
    train_s, predict_s, probs, (train_flops, predict_flops) = RUNNERS[library](model_name, x, y, xt, yt, vocab)
    print(json.dumps({
        "train_rows_s": rows / train_s, "predict_rows_s": len(yt) / predict_s,
        "auc0": auc(yt[:, 0], probs[:, 0]), "auc1": auc(yt[:, 1], probs[:, 1]),
        "train_gflops": train_flops * rows / train_s / 1e9, "predict_gflops": predict_flops * len(yt) / predict_s / 1e9,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def matmul_ceiling(threads: int, n: int = 2048, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="ple,mmoe")
    parser.add_argument("--libraries", default=",".join(RUNNERS), help="mtlrec-bf16: bf16 autocast (opt-in)")
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rows, args.threads)
        return
    ceiling = matmul_ceiling(args.threads)
    print(f"fp32 matmul ceiling ({args.threads} threads): {ceiling:.1f} GFLOP/s; {args.rows:,} training rows, "
          f"median of {args.rounds} rounds", flush=True)
    libraries = args.libraries.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for model_name in args.models.split(","):
        for r in range(args.rounds):
            for library in libraries:
                out = subprocess.run([sys.executable, __file__, "--child", library, model_name, "--rows", str(args.rows),
                                      "--threads", str(args.threads)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{library} {model_name} failed:\n{out.stderr[-3000:]}")
                results.setdefault((model_name, library), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"\n{model_name}:")
        print(f"{'library':>14} {'train rows/s':>13} {'predict rows/s':>15} {'peak MB':>8} {'AUC t0':>7} {'AUC t1':>7}"
              f" {'train GFLOP/s':>14} {'% ceiling':>10}")
        medians = {}
        for library in libraries:
            med = {k: statistics.median(r[k] for r in results[(model_name, library)]) for k in results[(model_name, library)][0]}
            medians[library] = med
            print(f"{library:>14} {med['train_rows_s']:>13,.0f} {med['predict_rows_s']:>15,.0f} {med['peak_mb']:>8.0f}"
                  f" {med['auc0']:>7.4f} {med['auc1']:>7.4f} {med['train_gflops']:>14.1f} {100 * med['train_gflops'] / ceiling:>9.0f}%",
                  flush=True)
        print_bound(medians, ceiling)


def print_bound(medians: dict[str, dict], ceiling: float) -> None:
    """The most any library could reach in fp32: the model's FLOPs per row run at the matmul
    ceiling, with no time for anything else; and that bound over the faster peer."""
    peers = [m for name, m in medians.items() if not name.startswith("mtlrec")]
    mine = medians.get("mtlrec")
    if not peers or mine is None:
        return
    for kind in ("train", "predict"):
        flops_per_row = mine[f"{kind}_gflops"] * 1e9 / mine[f"{kind}_rows_s"]
        bound = ceiling * 1e9 / flops_per_row
        best = max(m[f"{kind}_rows_s"] for m in peers)
        print(f"{'':>14} {kind}: {flops_per_row / 1e6:.2f} MFLOP/row; at the fp32 ceiling at most {bound:,.0f} rows/s "
              f"= {bound / best:.2f}x the faster peer (mtlrec fp32: {mine[f'{kind}_rows_s'] / best:.2f}x)")


if __name__ == "__main__":
    main()

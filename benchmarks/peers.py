"""mtlrec against DeepCTR-Torch and torch-rechub on one workload, each through its own trainer.

Workload: 26 sparse features (vocabularies 10..1000, embedding size 8), 13 dense, 2 binary
tasks, 200,000 training rows (+ 50,000 test rows); PLE with 2 levels, 2 shared + 2 task
experts per level, experts (256, 128) with batch norm, towers (64,), linear softmax gates;
MMoE with 4 such experts; batch 1024 for training and prediction, Adam 1e-3, no
regularisation (DeepCTR-Torch's default L2 on embeddings set to 0), each library's other
defaults (mtlrec's: no fused optimizer), 1 epoch, 2 threads.

Every (library, model) trains in a fresh process, rounds interleaved (mtlrec, deepctr,
rechub, mtlrec, ...), and the median of the rounds is reported: training rows/s through the
library's trainer (building its data loader included), predict rows/s, peak memory of the
process (ru_maxrss; each round's is printed below the table, and mtlrec's against the lowest
peer's), test AUC of both tasks, and achieved GFLOP/s (the model's FLOPs per row, counted by
torch's FlopCounterMode, times rows/s) as a share of a plain fp32 matmul on the same machine.

`--workload sequence` adds behaviour histories: s0 becomes the item (1,000 ids, 20 categories
of 50), and 3 histories h0, h1, h2 of 1..50 item ids per row (length uniform), sharing s0's
embedding table. h0 leans to the row's interest category (60 % of its items), h1 to a second
one (50 %), h2 is noise; the item comes from the first interest 40 % of the time, the second
20 %. t0's logit adds 3 x the share of h0's items in the item's category, t1's 2 x that share
for h1, so pooling the histories against the item matters to AUC. Models:
  ple, mmoe          histories mean-pooled, all three libraries (peers get them padded to 50
                     with 0, post-padding, prepared outside the timed region; mtlrec gets a
                     table whose cells are integer arrays and encodes them inside it);
  ple-din, mmoe-din  h0 pooled by DIN target attention against s0 (hidden (36,), PReLU, no
                     softmax), h1 and h2 mean: mtlrec alone, as neither peer's MMoE/PLE has
                     target attention (their sequence features pool by sum/mean/max only);
  din                single-task DIN on t0 alone, each library's own: DeepCTR-Torch's and
                     torch-rechub's DIN models, mtlrec's shared_bottom with one task and the
                     same attention; MLP (256, 128) with batch norm; not the multi-task models.

    pip install -e '.[bench]'     # deepctr-torch, torch-rechub (bench only), after torch==2.13.0
    python benchmarks/peers.py --rounds 3
    python benchmarks/peers.py --workload sequence --rows 100000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

SPARSE, DENSE, DIM, BATCH = 26, 13, 8, 1024
PLE = {"levels": 2, "shared": 2, "specific": 2, "experts": [256, 128], "tower": [64]}
MMOE = {"experts_n": 4, "experts": [256, 128], "tower": [64]}
# the sequence workload
ITEMS, CATEGORIES, HISTORIES, MAXLEN = 1000, 20, 3, 50
FOCUS = (0.6, 0.5, 0.0)  # share of each history's items drawn from its interest category
ATTENTION = [36]  # DIN's activation unit: one hidden layer of 36, PReLU
DIN_MLP = [256, 128]
MODELS = {"default": ("ple", "mmoe"), "sequence": ("ple", "mmoe", "ple-din", "mmoe-din", "din")}
PEERS_LACK = {"ple-din": "target attention inside PLE", "mmoe-din": "target attention inside MMoE"}


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


def make_sequence_data(rows: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    """The default workload's features with s0 the item (ids 1..ITEMS; 0 is the peers' padding)
    and HISTORIES lists h0.. of item ids, each as (values [V] int64, offsets [rows + 1] int64)."""
    rng = np.random.default_rng(seed)
    per_category = ITEMS // CATEGORIES
    vocab = [int(v) for v in np.random.default_rng(0).integers(10, 1001, SPARSE)]
    vocab[0] = ITEMS + 1
    x = {f"s{i}": rng.integers(0, v, rows) for i, v in enumerate(vocab) if i}
    interests = rng.integers(0, CATEGORIES, (2, rows))
    source = rng.random(rows)
    category = np.where(source < 0.4, interests[0], np.where(source < 0.6, interests[1],
                                                                 rng.integers(0, CATEGORIES, rows)))
    item = category * per_category + rng.integers(0, per_category, rows) + 1
    x = {"s0": item} | x
    dense = rng.normal(size=(rows, DENSE)).astype(np.float32)
    x |= {f"d{i}": dense[:, i] for i in range(DENSE)}
    match = []
    for h in range(HISTORIES):
        lengths = rng.integers(1, MAXLEN + 1, rows)
        row = np.repeat(np.arange(rows), lengths)
        interest = interests[min(h, 1)][row]
        focused = rng.random(len(row)) < FOCUS[h]
        values = np.where(focused, interest * per_category + rng.integers(0, per_category, len(row)),
                          rng.integers(0, ITEMS, len(row))) + 1
        x[f"h{h}"] = (values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        same = (values - 1) // per_category == category[row]
        match.append(np.bincount(row, weights=same, minlength=rows) / lengths)
    effect = np.random.default_rng(1).normal(size=(SPARSE, 1000))  # per-category effects, fixed
    base = effect[0][item - 1] * 0.5
    logit1 = base + sum(effect[i][x[f"s{i}"]] for i in range(1, 4)) * 0.5 + dense[:, 0] + 3 * match[0] - 1.0
    logit2 = base + sum(effect[i][x[f"s{i}"]] for i in range(2, 6)) * 0.5 + dense[:, 1] + 2 * match[1] - 1.0
    y = np.stack([rng.random(rows) < 1 / (1 + np.exp(-logit1)), rng.random(rows) < 1 / (1 + np.exp(-logit2))], 1)
    return x, y.astype(np.float32), vocab


def histories(x: dict) -> list[str]:
    return [k for k in x if k.startswith("h")]


def padded(lists: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`[rows, MAXLEN]` int64: each row's ids first, 0 after (what both peers take)."""
    values, offsets = lists
    lengths = np.diff(offsets)
    out = np.zeros((len(lengths), MAXLEN), dtype=np.int64)
    out[np.arange(MAXLEN) < lengths[:, None]] = values
    return out


def cells(lists: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """An object column whose cells are each row's ids (int64 arrays), as a Parquet list column reads."""
    values, offsets = lists
    out = np.empty(len(offsets) - 1, dtype=object)
    for i, part in enumerate(np.split(values, offsets[1:-1])):
        out[i] = part
    return out


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
def run_mtlrec(model_name, x, y, xt, yt, vocab, precision="fp32", mark=None):
    """mtlrec's run; `mark(stage)`, if given, is called after each stage (benchmarks/pipeline_memory.py
    reads the process's memory there)."""
    import pandas as pd

    from mtlrec import models
    from mtlrec.config import TrainConfig
    from mtlrec.data import Encoder
    from mtlrec.schema import Schema
    from mtlrec.train.callbacks import TrainingCallback
    from mtlrec.train.trainer import Trainer

    mark = mark or (lambda stage: None)

    class FirstStep(TrainingCallback):
        def on_step_end(self, step, losses, weights):
            if step == 1:
                mark("first step")

    lists = histories(x)
    attends = model_name == "din" or model_name.endswith("-din")
    sparse = [{"name": f"s{i}", "embedding_dim": DIM} | ({"embedding": "item"} if lists and i == 0 else {})
              for i in range(SPARSE)]
    for k, name in enumerate(lists):
        pooling = {"pooling": "attention", "attention": {"target": "s0", "hidden": ATTENTION}} if attends and k == 0 else {}
        sparse.append({"name": name, "embedding_dim": DIM, "embedding": "item", "multi_valued": True,
                       "max_length": MAXLEN} | pooling)
    task_names = ["t0"] if model_name == "din" else ["t0", "t1"]
    schema = Schema(sparse=sparse, dense=[{"name": f"d{i}"} for i in range(DENSE)],
                    tasks=[{"name": t} for t in task_names])
    if model_name == "din":  # one MLP and one logit: DIN's network
        options = {"hidden": DIN_MLP, "tower_hidden": []}
    else:
        options = {"expert_hidden": PLE["experts"], "tower_hidden": PLE["tower"]} | (
            {"num_levels": PLE["levels"], "task_experts": PLE["specific"], "shared_experts": PLE["shared"]}
            if model_name.startswith("ple") else {"num_experts": MMOE["experts_n"]})
    # the same arrays the peers get, as table columns without a copy; a history column's cells
    # are each row's ids (integer arrays, as a Parquet list column reads), made before the clock
    x = {k: cells(v) if k in lists else v for k, v in x.items()}
    xt = {k: cells(v) if k in lists else v for k, v in xt.items()}
    train_table = pd.DataFrame(x | {t: y[:, j] for j, t in enumerate(task_names)}, copy=False)
    test_table = pd.DataFrame(xt | {t: yt[:, j] for j, t in enumerate(task_names)}, copy=False)
    mark("tables built")
    start = time.perf_counter()
    encoder = Encoder(schema).fit(train_table)
    mark("encoder fitted")
    train = encoder.transform(train_table)
    mark("train encoded")
    torch.manual_seed(0)
    model = models.create("shared_bottom" if model_name == "din" else model_name.removesuffix("-din"),
                          encoder.schema, batch_norm=True, **options)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-3, progress=False, precision=precision)  # defaults
    trainer = Trainer(model, encoder.schema, config, callbacks=[FirstStep()])
    mark("model built")
    trainer.fit(train)
    train_seconds = time.perf_counter() - start
    mark("trained")
    start = time.perf_counter()
    model.eval()
    test = encoder.transform(test_table, labels=False)
    mark("test encoded")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = torch.cat([model(b.features).logits.float()  # batches of BATCH rows, as the peers predict
                            for b in test.batches(BATCH)])
    predict_seconds = time.perf_counter() - start
    mark("predicted")
    probs = torch.sigmoid(logits).numpy()
    b = train.rows(0, BATCH)
    flops = flops_per_row(model, lambda: model(b.features).logits)
    mark("FLOPs counted")
    return train_seconds, predict_seconds, probs, flops


def run_deepctr(model_name, x, y, xt, yt, vocab):
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models.din import DIN
    from deepctr_torch.models.multitask import MMOE as DMMOE
    from deepctr_torch.models.multitask import PLE as DPLE

    lists = histories(x)
    columns = [SparseFeat(f"s{i}", v, embedding_dim=DIM, embedding_name="item" if lists and i == 0 else None)
               for i, v in enumerate(vocab)]
    renamed = {}
    for k, name in enumerate(lists):
        if model_name == "din" and k == 0:  # its DIN attends over the list named hist_<target>, with a length column
            renamed[name] = "hist_s0"
            columns.append(VarLenSparseFeat(SparseFeat("hist_s0", vocab[0], embedding_dim=DIM, embedding_name="item"),
                                            maxlen=MAXLEN, combiner="mean", length_name="hist_length"))
        else:
            columns.append(VarLenSparseFeat(SparseFeat(name, vocab[0], embedding_dim=DIM, embedding_name="item"),
                                            maxlen=MAXLEN, combiner="mean"))
    columns += [DenseFeat(f"d{i}", 1) for i in range(DENSE)]

    def inputs(data):  # the padded ids it requires, made before the clock
        out = {renamed.get(k, k): padded(v) if k in lists else v for k, v in data.items()}
        if renamed:
            out["hist_length"] = np.diff(data[lists[0]][1])
        return out

    x, xt = inputs(x), inputs(xt)
    start = time.perf_counter()
    if model_name == "ple":
        model = DPLE(columns, shared_expert_num=PLE["shared"], specific_expert_num=PLE["specific"],
                     num_levels=PLE["levels"], expert_dnn_hidden_units=PLE["experts"], gate_dnn_hidden_units=(),
                     tower_dnn_hidden_units=PLE["tower"], dnn_use_bn=True, task_names=("t0", "t1"),
                     l2_reg_embedding=0.0, l2_reg_linear=0.0)  # its defaults 1e-5: regularised, the others not
    elif model_name == "mmoe":
        model = DMMOE(columns, num_experts=MMOE["experts_n"], expert_dnn_hidden_units=MMOE["experts"],
                      gate_dnn_hidden_units=(), tower_dnn_hidden_units=MMOE["tower"], dnn_use_bn=True,
                      task_names=("t0", "t1"), l2_reg_embedding=0.0, l2_reg_linear=0.0)
    else:
        model = DIN(columns, history_feature_list=["s0"], dnn_use_bn=True, dnn_hidden_units=DIN_MLP,
                    att_hidden_size=ATTENTION, att_activation="prelu", l2_reg_embedding=0.0)
    labels = y[:, :1] if model_name == "din" else y
    model.compile("adam", loss="binary_crossentropy" if model_name == "din" else ["binary_crossentropy"] * 2)
    model.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    probs = model.predict(xt, batch_size=BATCH)
    predict_seconds = time.perf_counter() - start
    one = {k: v[:BATCH] for k, v in x.items()}
    tensor = torch.from_numpy(np.concatenate([one[k].reshape(BATCH, -1).astype(np.float32)
                                              for k in model.feature_index], 1))
    flops = flops_per_row(model, lambda: model(tensor))
    return train_seconds, predict_seconds, np.asarray(probs), flops


def run_rechub(model_name, x, y, xt, yt, vocab):
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE as RMMOE
    from torch_rechub.models.multi_task import PLE as RPLE
    from torch_rechub.models.ranking import DIN as RDIN
    from torch_rechub.trainers import CTRTrainer, MTLTrainer
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    lists = histories(x)
    # its padding id must be named (padding_idx) or its mean counts the padding as items
    pad = {"padding_idx": 0} if lists else {}
    sparse = [SparseFeature(f"s{i}", v, embed_dim=DIM, **(pad if i == 0 else {})) for i, v in enumerate(vocab)]
    sequences = [SequenceFeature(name, vocab[0], embed_dim=DIM, pooling="mean", shared_with="s0", padding_idx=0)
                 for name in lists]
    dense = [DenseFeature(f"d{i}") for i in range(DENSE)]
    x = {k: padded(v) if k in lists else v for k, v in x.items()}  # the padded ids it requires, before the clock
    xt = {k: padded(v) if k in lists else v for k, v in xt.items()}
    start = time.perf_counter()
    xd = {k: v.astype(np.float32) if k.startswith("d") else v for k, v in x.items()}
    xtd = {k: v.astype(np.float32) if k.startswith("d") else v for k, v in xt.items()}
    out_dir = tempfile.gettempdir()
    if model_name == "din":
        # its DIN reads no dense features: its embedding layer drops them and its MLP's input
        # size would count them, so they are left out (a limitation of its DIN, not of ours)
        xd = {k: v for k, v in xd.items() if not k.startswith("d")}
        xtd = {k: v for k, v in xtd.items() if not k.startswith("d")}
        loader, _, test_loader = DataGenerator(xd, y[:, 0]).generate_dataloader(
            x_val=xtd, y_val=yt[:, 0], x_test=xtd, y_test=yt[:, 0], batch_size=BATCH)
        history = SequenceFeature(lists[0], vocab[0], embed_dim=DIM, pooling="concat", shared_with="s0", padding_idx=0)
        model = RDIN(sparse[1:] + sequences[1:], [history], [sparse[0]], mlp_params={"dims": DIN_MLP},
                     attention_mlp_params={"dims": ATTENTION, "activation": "prelu"})
        trainer = CTRTrainer(model, optimizer_params={"lr": 1e-3, "weight_decay": 0}, n_epoch=1,
                             earlystop_patience=10, device="cpu", model_path=out_dir)
        trainer.train_one_epoch(loader)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        probs = np.asarray(trainer.predict(model, test_loader))[:, None]
        predict_seconds = time.perf_counter() - start
    else:
        features = sparse + sequences + dense
        loader, _, _ = DataGenerator(xd, y).generate_dataloader(x_val=xtd, y_val=yt, x_test=xtd, y_test=yt,
                                                                batch_size=BATCH)
        types = ["classification", "classification"]
        towers = [{"dims": PLE["tower"]}, {"dims": PLE["tower"]}]
        if model_name == "ple":
            model = RPLE(features, types, n_level=PLE["levels"], n_expert_specific=PLE["specific"],
                         n_expert_shared=PLE["shared"], expert_params={"dims": PLE["experts"]},
                         tower_params_list=towers)
        else:
            model = RMMOE(features, types, n_expert=MMOE["experts_n"], expert_params={"dims": MMOE["experts"]},
                          tower_params_list=towers)
        trainer = MTLTrainer(model, task_types=types, optimizer_params={"lr": 1e-3, "weight_decay": 0}, n_epoch=1,
                             earlystop_patience=10, device="cpu", model_path=out_dir)
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


def child(library: str, model_name: str, rows: int, threads: int, workload: str = "default") -> None:
    torch.set_num_threads(threads)
    make = make_sequence_data if workload == "sequence" else make_data
    x, y, vocab = make(rows, seed=0)
    xt, yt, _ = make(rows // 4, seed=1)
    train_s, predict_s, probs, (train_flops, predict_flops) = RUNNERS[library](model_name, x, y, xt, yt, vocab)
    print(json.dumps({
        "train_rows_s": rows / train_s, "predict_rows_s": len(yt) / predict_s,
        "auc0": auc(yt[:, 0], probs[:, 0]),
        "auc1": auc(yt[:, 1], probs[:, 1]) if probs.shape[1] > 1 else float("nan"),  # single-task DIN: t0 only
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
    parser.add_argument("--workload", choices=sorted(MODELS), default="default",
                        help="sequence: + 3 item histories sharing s0's table (see the module docstring)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", help="default: ple,mmoe; with --workload sequence also ple-din,mmoe-din,din")
    parser.add_argument("--libraries", default=",".join(RUNNERS), help="mtlrec-bf16: bf16 autocast (opt-in)")
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rows, args.threads, args.workload)
        return
    model_names = args.models.split(",") if args.models else list(MODELS[args.workload])
    unknown = sorted(set(model_names) - set(MODELS[args.workload]))
    if unknown:
        parser.error(f"models {unknown} not in the {args.workload} workload; it has {list(MODELS[args.workload])}")
    ceiling = matmul_ceiling(args.threads)
    print(f"fp32 matmul ceiling ({args.threads} threads): {ceiling:.1f} GFLOP/s; {args.rows:,} training rows, "
          f"median of {args.rounds} rounds", flush=True)
    if args.workload == "sequence":
        print(f"sequence workload: s0 = item ({ITEMS:,} ids) + {SPARSE - 1} sparse + {DENSE} dense + {HISTORIES} "
              f"histories of 1..{MAXLEN} item ids sharing s0's table (peers: padded to {MAXLEN})", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for model_name in model_names:
        libraries = [lib for lib in args.libraries.split(",")
                     if model_name not in PEERS_LACK or lib.startswith("mtlrec")]
        for r in range(args.rounds):
            for library in libraries:
                out = subprocess.run([sys.executable, __file__, "--child", library, model_name, "--rows", str(args.rows),
                                      "--threads", str(args.threads), "--workload", args.workload],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{library} {model_name} failed:\n{out.stderr[-3000:]}")
                results.setdefault((model_name, library), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"\n{model_name}:")
        if model_name in PEERS_LACK:
            print(f"  h0 by target attention against s0: mtlrec alone. Neither DeepCTR-Torch nor torch-rechub has "
                  f"{PEERS_LACK[model_name]}: their MMOE/PLE pool sequence features by sum/mean/max only "
                  "(VarLenSparseFeat combiner, SequenceFeature pooling); their DIN models are single-task (model din)")
        elif model_name == "din":
            print("  single-task DIN on t0 (h0 attended against s0, h1/h2 mean), each library's own, not the multi-task "
                  "models; torch-rechub's DIN reads no dense features (its embedding layer drops them), so its AUC "
                  "is not comparable; mtlrec: shared_bottom (256, 128) with one task")
        print(f"{'library':>14} {'train rows/s':>13} {'predict rows/s':>15} {'peak MB':>8} {'AUC t0':>7} {'AUC t1':>7}"
              f" {'train GFLOP/s':>14} {'% ceiling':>10}")
        medians = {}
        for library in libraries:
            med = {k: statistics.median(r[k] for r in results[(model_name, library)]) for k in results[(model_name, library)][0]}
            medians[library] = med
            auc1 = "-" if med["auc1"] != med["auc1"] else f"{med['auc1']:.4f}"  # NaN: single-task
            print(f"{library:>14} {med['train_rows_s']:>13,.0f} {med['predict_rows_s']:>15,.0f} {med['peak_mb']:>8.0f}"
                  f" {med['auc0']:>7.4f} {auc1:>7} {med['train_gflops']:>14.1f} {100 * med['train_gflops'] / ceiling:>9.0f}%",
                  flush=True)
        print_bound(medians, ceiling)
        print_peaks({library: [r["peak_mb"] for r in results[(model_name, library)]] for library in libraries})
        if args.workload == "sequence":
            print_against_peers(medians)


def print_peaks(peaks: dict[str, list[float]]) -> None:
    """Each library's peak memory in every round (the table shows the median), and mtlrec's
    median against the lowest peer's."""
    rounds = "; ".join(f"{name} {', '.join(f'{p:.0f}' for p in values)}" for name, values in peaks.items())
    print(f"{'':>14} peak MB by round: {rounds}")
    peers = [statistics.median(v) for name, v in peaks.items() if not name.startswith("mtlrec")]
    if peers and "mtlrec" in peaks:
        print(f"{'':>14} mtlrec's peak against the lowest peer: {statistics.median(peaks['mtlrec']) - min(peers):+,.0f} MB")


def print_against_peers(medians: dict[str, dict]) -> None:
    """mtlrec (fp32) over the faster peer in rows/s, and its AUC against the peers' (peak memory:
    `print_peaks`)."""
    peers = {name: m for name, m in medians.items() if not name.startswith("mtlrec")}
    mine = medians.get("mtlrec")
    if not peers or mine is None:
        return
    ratios = [f"{kind} {mine[f'{kind}_rows_s'] / max(m[f'{kind}_rows_s'] for m in peers.values()):.2f}x"
              for kind in ("train", "predict")]
    aucs = [f"AUC {t} {mine[f'auc{i}'] - max(m[f'auc{i}'] for m in peers.values()):+.4f}"
            for i, t in enumerate(("t0", "t1")) if mine[f"auc{i}"] == mine[f"auc{i}"]]
    print(f"{'':>14} mtlrec against the best peer: {', '.join(ratios)}; {', '.join(aucs)}")


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

"""`mtlrec train | evaluate | predict | bench | tune | sweep | analyze | report | rank | export | serve | models |
plan`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from mtlrec import gbdt, models
from mtlrec.config import ConfigError, apply_overrides, load_config, validate_config
from mtlrec.data import DataError, read_table, write_table
from mtlrec.folders import partial_folder
from mtlrec.plan import add_plan_arguments, cli_plan
from mtlrec.train import distributed
from mtlrec.train.checkpoint import has_checkpoint
from mtlrec.train.trainer import NonFiniteLoss

DEMO_MODELS = "single_task,shared_bottom,omoe,mmoe,cgc,ple"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlrec", description="Multi-task learning for recommender systems.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the config's model and save it as a folder")
    train.add_argument("config", help="experiment YAML")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set model.name=mmoe --set train.epochs=5")
    train.add_argument("--out", help="model folder (default: OUTPUT_DIR/NAME from the config)")
    train.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in OUT.partial (train.checkpoint_every)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing model folder (once the new model is saved whole)")

    evaluate = commands.add_parser("evaluate", help="metrics of a saved model on a labelled table")
    evaluate.add_argument("model", help="model folder")
    evaluate.add_argument("data", help="CSV or Parquet file with the label columns")

    predict = commands.add_parser("predict", help="write one prediction column per task")
    predict.add_argument("model", help="model folder")
    predict.add_argument("data", help="CSV or Parquet file")
    predict.add_argument("--out", required=True, help="output .csv or .parquet")
    predict.add_argument("--keep", nargs="*", default=[], metavar="COLUMN",
                         help="input columns copied to the output (e.g. an id)")

    bench = commands.add_parser("bench", help="train several models for several seeds and compare")
    bench.add_argument("config", help="experiment YAML")
    bench.add_argument("--models", default=DEMO_MODELS, help=f"comma-separated (default {DEMO_MODELS})")
    bench.add_argument("--seeds", type=int, default=1, help="seeds per model (default 1)")
    bench.add_argument("--reference", default="mmoe",
                       help="model every other is also compared with seed by seed (default mmoe)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--out", help="results folder (default: OUTPUT_DIR/NAME)")
    bench.add_argument("--tune", type=int, default=0, metavar="N",
                       help="first tune every model with N trials of the config's tune.space (equal budget)")

    tune = commands.add_parser("tune", help="search the config's tune.space with Optuna; write the best config")
    tune.add_argument("config", help="experiment YAML with a tune section")
    tune.add_argument("--trials", type=int, default=20,
                      help="finished trials the study should hold, counting those of earlier runs (default 20)")
    tune.add_argument("--model", help="a bench model: search its options (models.NAME.X or model.X) and write the "
                                      "best into models.NAME")
    tune.add_argument("--timeout", type=float, metavar="SECONDS", help="start no trial after this many seconds")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--out", help="folder of the study (tune.db) and the best config (tune_best.yaml) "
                                    "(default: OUTPUT_DIR/NAME-tune, or NAME-tune-MODEL)")
    tune.add_argument("--overwrite", action="store_true", help="delete the study in OUT and start over")

    sweep = commands.add_parser("sweep", help="bench on synthetic data at several task correlations")
    sweep.add_argument("config", help="experiment YAML with synthetic data")
    sweep.add_argument("--correlations", default="0,0.25,0.5,0.75,1", help="comma-separated p values")
    sweep.add_argument("--models", default="shared_bottom,omoe,mmoe", help="comma-separated")
    sweep.add_argument("--seeds", type=int, default=1)
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--out", help="results folder (default: OUTPUT_DIR/NAME-sweep)")

    analyze = commands.add_parser("analyze", help="expert utilisation: mean gate weight per expert")
    analyze.add_argument("model", help="model folder")
    analyze.add_argument("data", help="CSV or Parquet file")
    analyze.add_argument("--out", help="folder for utilisation.csv and utilisation.png (default: the model folder)")

    report = commands.add_parser("report", help="(re)write the figures and report.html of a bench folder")
    report.add_argument("bench", help="folder written by mtlrec bench")

    rank = commands.add_parser("rank", help="rank rows per group by the fused score of all tasks")
    rank.add_argument("model", help="model folder")
    rank.add_argument("data", help="CSV or Parquet file")
    rank.add_argument("--group-by", required=True, help="column that defines a ranking list (user, request)")
    rank.add_argument("--top-k", type=int, default=10)
    rank.add_argument("--out", help="write each group's top k rows with scores here (.csv/.parquet)")
    rank.add_argument("--set", action="append", default=[], metavar="rank.KEY=VALUE",
                      help="override the model's rank block, e.g. --set rank.weights.click=2 "
                           "--set rank.item.power=0.3")

    export = commands.add_parser("export", help="ONNX or TorchScript, from raw feature values to predictions")
    export.add_argument("model", help="model folder")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", help="output file (default: MODEL/model.onnx, MODEL/model.int8.onnx with --int8, "
                                      "or MODEL/model.torchscript.pt)")
    export.add_argument("--int8", action="store_true",
                        help="ONNX with dynamic INT8 weights (ONNX Runtime's quantiser); prints fp32 and int8 sizes")
    export.add_argument("--int8-embeddings", action="store_true",
                        help="with --int8: store the embedding tables in 8 bits too")
    export.add_argument("--check", metavar="DATA",
                        help="labelled CSV or Parquet file: print the export's largest difference from the trained "
                             "model and each metric both ways")

    serve = commands.add_parser("serve", help="HTTP JSON scoring service")
    serve.add_argument("model", help="model folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-rows", type=int, default=10_000, help="rows per request at most")
    serve.add_argument("--max-bytes", type=int, default=8_000_000, help="request body bytes at most (413 past it)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model")
    serve.add_argument("--max-in-flight", type=int, default=64, help="requests held per worker (503 past it)")
    serve.add_argument("--timeout", type=float, default=10.0, help="seconds to answer a request (504 past it)")
    serve.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto",
                       help="ONNX Runtime where it can serve the model, else torch")

    commands.add_parser("models", help="list the models and their options")
    planner = commands.add_parser("plan", help="TorchRec's sharding plan for the config's tables: a dry run, no GPU needed")
    add_plan_arguments(planner)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, ValueError, NonFiniteLoss, OSError, ImportError) as err:
        print(f"mtlrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtlrec {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """Where an interrupted `train` can continue from, if anywhere."""
    folder = getattr(args, "folder", None)  # set by _train once the config is read
    if folder is None:
        return ""
    work = partial_folder(folder)
    if has_checkpoint(work):
        return f"; checkpoint at {work} (continue with --resume)"
    return "; no checkpoint was written (set train.checkpoint_every to make runs resumable)"


def _train(args) -> int:
    from mtlrec.experiment import run_experiment

    config = load_config(args.config, args.set)
    folder = args.folder = Path(args.out) if args.out else Path(config.output_dir) / config.name
    device = distributed.init_from_environment(config.train.device)  # under torchrun: join the group
    if device is not None:
        config = config.with_device(device)
    rank = distributed.world()[0]
    try:
        result = run_experiment(config, folder, resume=args.resume, overwrite=args.overwrite)
        distributed.barrier()  # rank 0 may still be writing; leave the group together
    finally:
        distributed.leave()
    if rank == 0:
        print(f"saved {folder}  ({result.parameters:,} parameters, {result.seconds:.1f} s)")
        _print_metrics(result.test_metrics or result.history[-1])
        if result.hit_epoch_cap:
            print(f"note: the last of train.epochs = {config.train.epochs} epochs was the best on the validation "
                  "split: the model may still have been improving (raise train.epochs)", file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    from mtlrec.trained import load

    _print_metrics(load(args.model).evaluate(read_table(args.data)))
    return 0


def _predict(args) -> int:
    from mtlrec.trained import load

    table = read_table(args.data)
    missing = [c for c in args.keep if c not in table.columns]
    if missing:
        raise DataError(f"--keep: no column(s) {missing} in {args.data}")
    predictions = load(args.model).predict(table)
    clashes = {c: f"{c}_pred" for c in predictions.columns if c in args.keep}
    for kept, renamed in clashes.items():
        print(f"note: --keep column {kept!r} has a prediction's name: the prediction is written as {renamed!r}",
              file=sys.stderr)
    out = pd.concat([table[args.keep], predictions.rename(columns=clashes)], axis=1)
    write_table(out, args.out)
    print(f"wrote {len(out)} rows to {args.out}")
    return 0


def _bench(args) -> int:
    from mtlrec.bench import markdown_table, run_bench

    config = load_config(args.config, args.set)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name != gbdt.NAME:  # the LightGBM reference row (its options were checked with the config)
            models.check_options(name, config.models.get(name, {}))
    out = Path(args.out) if args.out else Path(config.output_dir) / config.name
    summary = run_bench(config, names, args.seeds, out, reference=args.reference, tune_trials=args.tune)
    print(markdown_table(summary))
    print(f"\nresults, models, figures and report.html under {out}/")
    return 0


def _tune(args) -> int:
    from mtlrec.tune import STUDY_FILE, default_folder, run_search, show_values

    config = load_config(args.config, args.set)
    out = Path(args.out) if args.out else default_folder(config, args.model)
    try:
        result = run_search(config, args.trials, out, model=args.model, timeout=args.timeout,
                            overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"mtlrec tune: interrupted; the finished trials are in {out / STUDY_FILE}: run the same command to go on",
              file=sys.stderr)
        return 130
    print(f"\nbest of {result.finished} trials: trial {result.best_number}  {result.metric} {result.best_value:.6g}  "
          f"{show_values(result.best_values)}")
    print(f"wrote {result.best_config}: mtlrec train trains that trial again"
          + (f", mtlrec bench builds {args.model} from its models.{args.model}" if args.model else "")
          + f"; the study: {result.storage}")
    return 0


def _sweep(args) -> int:
    from mtlrec.bench import run_sweep

    config = load_config(args.config, args.set)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    correlations = [float(p) for p in args.correlations.split(",")]
    out = Path(args.out) if args.out else Path(config.output_dir) / f"{config.name}-sweep"
    rows = run_sweep(config, correlations, names, args.seeds, out)
    metrics = [k for k in rows[0] if "/" in k and not k.endswith(" std") and not k.startswith("gain")]
    print(pd.DataFrame(rows)[["correlation", "model", *metrics]].to_string(index=False, float_format="%.4f"))
    print(f"\nsweep.json, sweep.csv, sweep.png and each bench under {out}/")
    return 0


def _analyze(args) -> int:
    from mtlrec.analysis import gate_load, gate_utilisation, load_imbalance, utilisation_table
    from mtlrec.analysis.plots import utilisation
    from mtlrec.trained import load

    trained = load(args.model)
    data = read_table(args.data)
    loads = gate_load(trained, data)  # routed (top-k) gates only; {} otherwise
    table = utilisation_table(trained, gate_utilisation(trained, data), loads or None)
    out = Path(args.out) if args.out else Path(args.model)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "utilisation.csv", index=False)
    utilisation(table, out / "utilisation.png")
    shares = table.groupby(["gate", "owner"], sort=False)["weight"].sum().unstack(fill_value=0.0)
    print("mean gate weight on each kind of expert (rows sum to 1):")
    print(shares.to_string(float_format="%.3f"))
    if loads:
        print("\nrouted gates: max load / mean load over their experts (1 = balanced); per expert in the 'load' column:")
        print(pd.Series(load_imbalance(loads), name="imbalance").to_string(float_format="%.3f"))
    print(f"\nper expert: {out / 'utilisation.csv'}, figure: {out / 'utilisation.png'}")
    return 0


def _report(args) -> int:
    from mtlrec.bench import write_outputs

    folder = Path(args.bench)
    if not (folder / "bench.json").exists():
        raise FileNotFoundError(f"{folder} has no bench.json; run mtlrec bench first")
    write_outputs(json.loads((folder / "bench.json").read_text()), folder, folder.name)
    print(f"wrote {folder / 'report.html'}")
    return 0


def _rank(args) -> int:
    from mtlrec.rank import rank_table
    from mtlrec.trained import load

    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    trained = load(args.model)
    if args.set:
        trained.config = ranked_with(trained.config, args.set)
    top, metrics, notes = rank_table(trained, read_table(args.data), args.group_by, args.top_k)
    if args.out:
        write_table(top, args.out)
        print(f"wrote {len(top)} rows ({top[args.group_by].nunique()} groups) to {args.out}")
    else:
        print(top.head(3 * args.top_k).to_string(index=False, max_cols=12))
    _print_metrics(metrics)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def ranked_with(config, overrides: list[str]):
    """`config` with its `rank` block overridden (`rank.KEY=VALUE`); other keys are an error, as
    they would not change a trained model."""
    other = [o for o in overrides if not o.startswith("rank.")]
    if other:
        raise ValueError(f"mtlrec rank --set takes rank.* keys only (the model is trained): {other}")
    return validate_config(apply_overrides(config.to_dict(), overrides))


def _export(args) -> int:
    from mtlrec.export import export_onnx, export_torchscript
    from mtlrec.quantize import INT8_FILE, agreement, export_int8
    from mtlrec.trained import load

    onnx_only = [flag for flag, given in (("--int8", args.int8), ("--int8-embeddings", args.int8_embeddings),
                                          ("--check", args.check)) if given]
    if args.format == "torchscript" and onnx_only:
        raise ValueError(f"{', '.join(onnx_only)}: ONNX only; TorchScript exports are not quantised or checked "
                         "(leave out --format torchscript)")
    if args.int8_embeddings and not args.int8:
        raise ValueError("--int8-embeddings quantises the tables of an --int8 export: add --int8")
    trained = load(args.model)
    default = INT8_FILE if args.int8 else "model.onnx" if args.format == "onnx" else "model.torchscript.pt"
    out = Path(args.out) if args.out else Path(args.model) / default
    if args.int8:
        summary = export_int8(trained, out, embeddings=args.int8_embeddings).summary()
    else:
        (export_onnx if args.format == "onnx" else export_torchscript)(trained, out)
        summary = str(out)
    print(f"wrote {summary}")
    if args.check:
        print(agreement(trained, out, read_table(args.check)).describe())
    return 0


def _serve(args) -> int:
    from mtlrec.serve import run_service

    run_service(args.model, host=args.host, port=args.port, workers=args.workers, max_rows=args.max_rows,
                max_bytes=args.max_bytes, max_in_flight=args.max_in_flight, timeout_s=args.timeout,
                backend=args.backend)
    return 0


def _models(args) -> int:
    for name in models.list_models():
        print(f"{name}: {models.spec(name).summary}")
        for option, default in models.model_options(name).items():
            print(f"    {option} = {default!r}")
    return 0


def _print_metrics(metrics: dict) -> None:
    width = max([24, *(len(key) for key in metrics)])  # long names (uncalibrated/logloss/TASK) stay aligned
    for key, value in metrics.items():
        shown = "undefined" if isinstance(value, float) and math.isnan(value) else value
        print(f"{key:>{width}}  {shown:.6f}" if isinstance(shown, float) else f"{key:>{width}}  {shown}")


COMMANDS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "bench": _bench, "sweep": _sweep,
            "tune": _tune, "analyze": _analyze, "report": _report, "rank": _rank, "export": _export,
            "serve": _serve, "models": _models, "plan": cli_plan}

if __name__ == "__main__":
    sys.exit(main())

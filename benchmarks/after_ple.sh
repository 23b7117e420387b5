#!/usr/bin/env bash
# Where the architectures after PLE help: every new model against single-task, MMoE and PLE,
# 5 seeds each, on census (both task groups of the MMoE paper), the synthetic generator at low
# and high task correlation, and the synthetic behaviour-history data. Sizes: each config's
# `models:` block. Writes runs/after_ple/<data set>/ (bench.md with paired differences against
# single_task and mmoe), then prints the tables.
#   bash benchmarks/after_ple.sh            # about an hour on 2 CPU cores
#   SEEDS=3 bash benchmarks/after_ple.sh    # fewer seeds
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-5}
OUT=${OUT:-runs/after_ple}
MODELS=single_task,mmoe,ple,ml_mmoe,dselect_k,routed_moe,home,snr_trans,snr_aver,dbmtl,pepnet,stem
source benchmarks/datasets.sh

bench() { "$BIN/mtlrec" bench "$@" --models "$MODELS" --seeds "$SEEDS"; }

each_data_set "$OUT" bench
"$BIN/python" benchmarks/after_ple_table.py "$OUT"/*/bench.json

#!/usr/bin/env bash
# Where a strong non-neural baseline stands: LightGBM (one booster per task, mtlrec/gbdt.py)
# against single-task, MMoE and PLE, 5 seeds each, on census (both task groups of the MMoE
# paper), the synthetic generator at low and high task correlation, and the synthetic
# behaviour-history data (whose lists LightGBM does not read). Writes runs/reference/<data set>/
# (bench.md: paired differences against single_task and mmoe), then prints the tables.
#   bash benchmarks/reference_rows.sh         # about 15 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-5}
OUT=${OUT:-runs/reference}
MODELS=single_task,mmoe,ple,lightgbm
source benchmarks/datasets.sh

bench() { "$BIN/mtlrec" bench "$@" --models "$MODELS" --seeds "$SEEDS"; }

each_data_set "$OUT" bench
"$BIN/python" benchmarks/after_ple_table.py "$OUT"/*/bench.json

#!/usr/bin/env bash
# Equal-budget tuned comparison (the papers compare tuned models): single-task, MMoE, CGC and PLE
# each tuned with TRIALS trials of the config's tune.space (train.lr and the model's own
# sizes, judged on the first seed's validation split), then 5 seeds each, with the LightGBM row;
# census, both task groups of the MMoE paper, the demo's synthetic data and the history data.
# Writes runs/tuned/<data set>/ (bench.md: the table,
# paired differences against single_task and mmoe, and each model's best values).
#   bash benchmarks/tuned_bench.sh              # about 45 minutes on 2 CPU cores
#   TRIALS=5 SEEDS=3 bash benchmarks/tuned_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-5}
TRIALS=${TRIALS:-10}
OUT=${OUT:-runs/tuned}
MODELS=single_task,mmoe,cgc,ple,lightgbm
source benchmarks/datasets.sh   # COLLEGE: the second census task group

bench() { "$BIN/mtlrec" bench "$@" --models "$MODELS" --seeds "$SEEDS" --tune "$TRIALS" --set train.threads=2; }

bench configs/census.yaml --out "$OUT/census_income"
bench configs/census.yaml --out "$OUT/census_education" --set name=census_education \
  --set "tasks=[{name: college, expression: \"$COLLEGE\"}, {name: never_married, expression: \"marital_stat == 'Never married'\"}]"
bench configs/demo.yaml --out "$OUT/synthetic_p0.3"
bench configs/history.yaml --out "$OUT/history"
cat "$OUT"/*/bench.md

#!/usr/bin/env bash
# Where the loss weightings help: every weighting (fixed included) with MMoE and PLE, 5 seeds,
# on census (both task groups of the MMoE paper) and the synthetic generator at low and high
# task correlation, plus the single-task baseline once per data set. Sizes and training: each
# config's `models:` and `train:` blocks, except that census trains at batch 2048 with lr 0.002
# (CENSUS_SET; the config's 512 and 0.001 take 4x the steps, and a gradient method's step costs
# T passes over the id tables whatever the batch); only train.weighting changes between runs.
# Writes runs/weighting/<data set>/<weighting>/bench.json; then
#   python benchmarks/weighting_table.py runs/weighting     # the README tables
#   bash benchmarks/weighting_quality.sh                     # 2 streams, about 2 h on 2 cores
#   SEEDS=3 STREAMS=1 WEIGHTINGS="fixed pcgrad" bash benchmarks/weighting_quality.sh
#   ONLY=census_education WEIGHTINGS="fixed mgda" bash benchmarks/weighting_quality.sh   # one data set
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-5}
OUT=${OUT:-runs/weighting}
STREAMS=${STREAMS:-2}
WEIGHTINGS=${WEIGHTINGS:-$("$BIN/python" -c "from mtlrec.losses.weighting import WEIGHTINGS; print(' '.join(sorted(WEIGHTINGS)))")}
CENSUS_SET=${CENSUS_SET:---set train.batch_size=2048 --set train.lr=0.002}
source benchmarks/datasets.sh
export OMP_NUM_THREADS=1

# one data set: the single-task baseline, then each weighting with MMoE and PLE
data_set() {
  local name=$1; shift
  local dir="$OUT/$name"
  mkdir -p "$dir"
  [ -f "$dir/single_task/bench.json" ] || "$BIN/mtlrec" bench "$@" --models single_task --seeds "$SEEDS" \
    --out "$dir/single_task" > "$dir/single_task.log" 2>&1
  for w in $WEIGHTINGS; do
    [ -f "$dir/$w/bench.json" ] && continue   # done in an earlier run: resume where it stopped
    "$BIN/mtlrec" bench "$@" --models mmoe,ple --seeds "$SEEDS" --reference mmoe \
      --set "train.weighting=$w" --out "$dir/$w" > "$dir/$w.log" 2>&1 || echo "FAILED: $name $w (see $dir/$w.log)"
    echo "$(date +%T) $name $w done"
  done
}

census_income() { data_set census_income configs/census.yaml $CENSUS_SET; }
census_education() {
  data_set census_education configs/census.yaml $CENSUS_SET --set name=census_education \
    --set "tasks=[{name: college, expression: \"$COLLEGE\"}, {name: never_married, expression: \"marital_stat == 'Never married'\"}]"
}
synthetic_low() { data_set synthetic_p0.2 configs/demo.yaml --set data.synthetic.correlation=0.2; }
synthetic_high() { data_set synthetic_p0.9 configs/demo.yaml --set data.synthetic.correlation=0.9; }

if [ -n "${ONLY:-}" ]; then   # one data set: ONLY=census_education WEIGHTINGS="fixed pcgrad" ...
  "$ONLY"
elif [ "$STREAMS" -ge 2 ]; then
  (census_income; census_education) &
  (synthetic_low; synthetic_high) &
  wait
else
  census_income; census_education; synthetic_low; synthetic_high
fi

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
COLLEGE="education in ('Some college but no degree', 'Associates degree-occup /vocational', \
'Associates degree-academic program', 'Bachelors degree(BA AB BS)', 'Masters degree(MA MS MEng MEd MSW MBA)', \
'Prof school degree (MD DDS DVM LLB JD)', 'Doctorate degree(PhD EdD)')"

bench() { "$BIN/mtlrec" bench "$@" --models "$MODELS" --seeds "$SEEDS"; }

bench configs/census.yaml --out "$OUT/census_income"
bench configs/census.yaml --out "$OUT/census_education" --set name=census_education \
  --set "tasks=[{name: college, expression: \"$COLLEGE\"}, {name: never_married, expression: \"marital_stat == 'Never married'\"}]"
bench configs/demo.yaml --out "$OUT/synthetic_p0.2" --set data.synthetic.correlation=0.2
bench configs/demo.yaml --out "$OUT/synthetic_p0.9" --set data.synthetic.correlation=0.9
bench configs/history.yaml --out "$OUT/history"
"$BIN/python" benchmarks/after_ple_table.py "$OUT"/*/bench.json

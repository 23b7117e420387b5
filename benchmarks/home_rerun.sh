#!/usr/bin/env bash
# HoME again after its task gates began to read [z_c, z_s] (task_gate_input: group_and_shared):
# the home rows of benchmarks/after_ple.sh re-run on their own, 5 seeds, and merged with that
# run's other models (same configs and seeds: the same splits), then the compact table.
#   bash benchmarks/home_rerun.sh      # after benchmarks/after_ple.sh; about 10 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${SEEDS:-5}
BASE=${BASE:-runs/after_ple}
OUT=${OUT:-runs/after_ple_home}
source benchmarks/datasets.sh

bench() { "$BIN/mtlrec" bench "$@" --models home --seeds "$SEEDS"; }

each_data_set "$OUT" bench
for d in $DATA_SETS; do
  base="$BASE/$d"; [ "$d" = history ] && [ -d "$BASE/history5" ] && base="$BASE/history5"
  "$BIN/python" benchmarks/after_ple_table.py --compact "$base/bench.json+$OUT/$d/bench.json"
done

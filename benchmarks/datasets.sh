# The five data sets the architecture comparisons run on (sourced by after_ple.sh, home_rerun.sh
# and reference_rows.sh): census with both task groups of the MMoE paper, the synthetic generator
# at low and high task correlation, and the synthetic behaviour-history data.
#   each_data_set OUT COMMAND...   runs `COMMAND CONFIG --out OUT/NAME [--set ...]` for each of them
COLLEGE="education in ('Some college but no degree', 'Associates degree-occup /vocational', \
'Associates degree-academic program', 'Bachelors degree(BA AB BS)', 'Masters degree(MA MS MEng MEd MSW MBA)', \
'Prof school degree (MD DDS DVM LLB JD)', 'Doctorate degree(PhD EdD)')"
DATA_SETS="census_income census_education synthetic_p0.2 synthetic_p0.9 history"

each_data_set() {
  local out=$1; shift
  "$@" configs/census.yaml --out "$out/census_income"
  "$@" configs/census.yaml --out "$out/census_education" --set name=census_education \
    --set "tasks=[{name: college, expression: \"$COLLEGE\"}, {name: never_married, expression: \"marital_stat == 'Never married'\"}]" \
    --set "models.dbmtl.dependencies={college: [never_married]}"
  "$@" configs/demo.yaml --out "$out/synthetic_p0.2" --set data.synthetic.correlation=0.2
  "$@" configs/demo.yaml --out "$out/synthetic_p0.9" --set data.synthetic.correlation=0.9
  "$@" configs/history.yaml --out "$out/history"
}

#!/usr/bin/env bash
# The tables of docs/fp-agreement.md: every Table 2 setting of the paper-
# table runs (light baselines and Table 3(c) rows in runs/results/bars, the paper recipes in
# runs/results/paper{,2,3}: same prompts, seeds and FP images), read by the shapes evaluator against
# the FP image of the same seed (benchmarks/fp_agreement.py). Scoring only, about 1 min on one core.
#
#   bash benchmarks/fp_agreement_tables.sh            # prints the table, writes docs/results/fp-agreement.json
set -euo pipefail
cd "$(dirname "$0")/.."
R=${RUNS:-runs/results}
S=""
for wa in w8a8 w8a6 w4a8 w4a6; do
  S+="qdiff-$wa,tfmq-$wa,"
  S+="$R/paper/qdiff-paper-$wa,$R/paper2/tfmq-paper-$wa,$R/paper3/dgq-$wa-k8-adaround,dgq-$wa-k16-adaround,dgq-$wa-k16,"
done
S=${S//qdiff-w4a8,tfmq-w4a8,/}   # the light baselines were not run at W4A8
S+="dgq-w8a6-k16-nolog-nostart-static,dgq-w4a6-k16-nolog-nostart-static"
python -m benchmarks.fp_agreement --run "$R/bars" --settings "$S" --markdown \
  --pair dgq-w8a6-k16:tfmq-w8a6 --pair dgq-w4a6-k16:tfmq-w4a6 \
  --pair dgq-w8a6-k16-adaround:"$R/paper/qdiff-paper-w8a6" --pair dgq-w4a6-k16-adaround:"$R/paper2/tfmq-paper-w4a6" \
  --pair "$R/paper3/dgq-w4a6-k8-adaround:$R/paper2/tfmq-paper-w4a6" \
  --pair dgq-w8a6-k16:dgq-w8a6-k16-nolog-nostart-static --pair dgq-w4a6-k16:dgq-w4a6-k16-nolog-nostart-static \
  --pair dgq-w4a6-k16-adaround:dgq-w4a6-k16 --pair dgq-w4a8-k16-adaround:dgq-w4a8-k16 \
  --json "${JSON:-docs/results/fp-agreement.json}"

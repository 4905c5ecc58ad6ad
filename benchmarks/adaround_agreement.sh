#!/usr/bin/env bash
# AdaRound vs round-to-nearest, image by image (docs/adaround.md#closer-to-fp-image-by-image): DGQ
# K=16 at W4A6 and W4A8 on the 200 paper-table prompts (runs/results/bars) and on 600 more held-out
# prompts (runs/adaround600, `PROMPTS=assets/prompts/shapes_eval_more_600.txt LIMIT=600
# OUT=runs/adaround600 SHARDS=2 bash benchmarks/adaround_eval.sh`), each read by the shapes
# evaluator against the FP image of the same seed, then pooled. LONG200 / LONG600: the same
# settings' folders made with a longer reconstruction (`ROUNDING_FILE=…`; left out when unset).
# QSTATS="w4a6 w4a8": also the widths' DGQ images calibrated on the quantized network, the authors'
# way (`benchmarks/adaround_stats.py --run RUN --w-bits 4 --a-bits A --rounding nearest|adaround`
# writes RUN/dgq-w4aA-k16[-adaround]-qstats), AdaRound against nearest with those statistics.
# THIRD800: the W4A6 pair on 800 further held-out prompts (default runs/adaround800, made by
# `PROMPTS=assets/prompts/shapes_eval_third_800.txt LIMIT=800 OUT=runs/adaround800 SHARDS=2
# SETTINGS=fp,dgq:W4A6:K16,dgq:W4A6:K16:adaround bash benchmarks/adaround_eval.sh`), pooled with
# the 800 above into 1,600 (skipped when the folder is missing).
# Scoring only, about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTD=${OUTD:-docs/results}
one() {  # run folder, long-rounding folder or "", json out[, widths, widths with quantized-network statistics]
  local run=$1 long=$2 json=$3 widths=${4:-w4a6 w4a8} qstats=${5-${QSTATS:-}} s="" pairs=()
  for wa in $widths; do
    local WA=${wa^^}
    s+="DGQ $WA K=16 nearest=dgq-$wa-k16,DGQ $WA K=16 AdaRound=dgq-$wa-k16-adaround,"
    pairs+=(--pair "dgq-$wa-k16-adaround:dgq-$wa-k16")
    if [[ " $qstats " == *" $wa "* ]]; then
      s+="DGQ $WA K=16 nearest (quantized-network statistics)=dgq-$wa-k16-qstats,"
      s+="DGQ $WA K=16 AdaRound (quantized-network statistics)=dgq-$wa-k16-adaround-qstats,"
      pairs+=(--pair "dgq-$wa-k16-adaround-qstats:dgq-$wa-k16-qstats")
    fi
    if [ -n "$long" ]; then
      s+="DGQ $WA K=16 AdaRound long=$long/dgq-$wa-k16-adaround,"
      pairs+=(--pair "$long/dgq-$wa-k16-adaround:dgq-$wa-k16")
    fi
  done
  python -m benchmarks.fp_agreement --run "$run" --settings "${s%,}" "${pairs[@]}" --json "$json" --per-image
}
one runs/results/bars "${LONG200:-}" "$OUTD/adaround-agree-200.json"
one runs/adaround600 "${LONG600:-}" "$OUTD/adaround-agree-600.json"
python -m benchmarks.fp_agreement --pool "$OUTD/adaround-agree-200.json" "$OUTD/adaround-agree-600.json" \
  --json "$OUTD/adaround-agree-800.json"
THIRD=${THIRD800:-runs/adaround800}
if [ -d "$THIRD" ]; then
  one "$THIRD" "" "$OUTD/adaround-agree-third800.json" w4a6 ""
  python -m benchmarks.fp_agreement --pool "$OUTD/adaround-agree-200.json" "$OUTD/adaround-agree-600.json" \
    "$OUTD/adaround-agree-third800.json" --json "$OUTD/adaround-agree-1600.json"
fi

#!/usr/bin/env bash
# The AdaRound bar (docs/adaround.md): DGQ with the learned weight rounding against DGQ with
# round-to-nearest at W4A8 and W4A6, on 200 held-out prompts at 25 steps, scored against FP
# (PSNR/SSIM on the same seeds, and the shapes evaluator's alignment). Resumable.
# Needs the W4 rounding: shipped for the embedded model, else `python -m dgq reconstruct --w-bits 4`.
#
#   bash benchmarks/adaround_eval.sh              # one process
#   SHARDS=2 bash benchmarks/adaround_eval.sh     # two single-thread CPU processes (2 cores)
#   LIMIT=40 bash benchmarks/adaround_eval.sh     # fewer prompts (a quick look; same images as the first 40)
#   PROMPTS=assets/prompts/shapes_eval_more_600.txt LIMIT=600 OUT=runs/adaround600 SHARDS=2 bash benchmarks/adaround_eval.sh
#                                                 # 600 more held-out prompts (docs/adaround.md)
#   ROUNDING_FILE=path/to/rounding.safetensors SETTINGS=dgq:W4A6:K16:adaround bash benchmarks/adaround_eval.sh
#                                                 # a rounding learned with other settings (eval --rounding-file)
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PROMPTS:-assets/prompts/shapes_eval_240.txt}
STEPS=${STEPS:-25}
LIMIT=${LIMIT:-200}
SHARDS=${SHARDS:-1}
OUT=${OUT:-runs/adaround}
SETTINGS=${SETTINGS:-fp,dgq:W4A6:K16,dgq:W4A6:K16:adaround,dgq:W4A8:K16,dgq:W4A8:K16:adaround}
ARGS=(--model tiny --prompts-file "$P" --limit "$LIMIT" --steps "$STEPS" --batch-size 20
      --metrics "${METRICS:-align,psnr,ssim}" --out "$OUT" --settings "$SETTINGS")
if [ -n "${ROUNDING_FILE:-}" ]; then ARGS+=(--rounding-file "$ROUNDING_FILE"); fi

SHARDS=$SHARDS OUT=$OUT bash benchmarks/eval_shards.sh "${ARGS[@]}"

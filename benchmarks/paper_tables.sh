#!/usr/bin/env bash
# Regenerates the embedded-model tables of docs/results.md (resumable: rerun after an interruption;
# settings are ordered so the most informative rows finish first).
# 200 held-out prompts (assets/prompts/shapes_eval_240.txt), image i uses seed 42 + i, the
# model's guidance scale (assets/tiny-sd/dgq_defaults.json).
#
#   STEPS=10 bash benchmarks/paper_tables.sh            # one process
#   STEPS=10 SHARDS=2 bash benchmarks/paper_tables.sh   # two single-thread CPU processes (2 cores)
#   BARS=1 STEPS=25 SHARDS=2 OUT=runs/results/bars bash benchmarks/paper_tables.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P=assets/prompts/shapes_eval_240.txt
STEPS=${STEPS:-10}
SHARDS=${SHARDS:-1}
OUT=${OUT:-runs/results/table2}
# BARS=1: the 12 settings of the embedded model's quantization bars (Table 2 rows at W8A8, W8A6 and
# W4A6 for the three methods, Table 3(c)'s static uniform attention at A6); SETTINGS=… any list.
BARS_SETTINGS=fp,dgq:W8A8:K16,tfmq:W8A8,qdiff:W8A8,dgq:W8A6:K16,tfmq:W8A6,qdiff:W8A6,dgq:W4A6:K16,tfmq:W4A6,\
qdiff:W4A6,dgq:W8A6:K16:nolog:nostart:static,dgq:W4A6:K16:nolog:nostart:static
ALL_SETTINGS=fp,tfmq:W4A6,dgq:W4A6:K16,tfmq:W8A8,dgq:W8A8:K16,qdiff:W4A6,\
dgq:W4A6:K16:nogroups,dgq:W4A6:K16:nolog:nostart:static,tfmq:W4A4,dgq:W4A4:K16,\
dgq:W4A6:K8,dgq:W4A6:K16:axis=channel,dgq:W4A6:K16:axis=pixel,dgq:W4A6:K2,dgq:W4A6:K16:static,dgq:W4A6:K16:nostart,\
qdiff:W8A8,dgq:W8A8:K8,dgq:W8A8:K2,qdiff:W8A6,tfmq:W8A6,dgq:W8A6:K8,dgq:W8A6:K16,\
qdiff:W4A8,tfmq:W4A8,dgq:W4A8:K8,dgq:W4A8:K16,qdiff:W4A4,dgq:W4A4:K8,tfmq:W8A4,dgq:W8A4:K16
if [ "${BARS:-0}" = 1 ]; then DEFAULT_SETTINGS=$BARS_SETTINGS; else DEFAULT_SETTINGS=$ALL_SETTINGS; fi
SETTINGS=${SETTINGS:-$DEFAULT_SETTINGS}
ARGS=(--model tiny --prompts-file "$P" --limit 200 --steps "$STEPS" --batch-size 20
      --domain-fid-refs 1000 --out "$OUT" --settings "$SETTINGS")

SHARDS=$SHARDS OUT=$OUT bash benchmarks/eval_shards.sh "${ARGS[@]}"

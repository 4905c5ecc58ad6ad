#!/usr/bin/env bash
# Regenerates the embedded-model tables of docs/results.md (resumable: rerun after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
P=assets/prompts/shapes_eval_240.txt
# Table 2 structure: FP, qdiff, tfmq, DGQ K=8, DGQ K=16 at W8A8, W8A6, W4A8, W4A6, plus W4A4 and W8A4
python -m dgq eval --model tiny --prompts-file "$P" --limit 200 --batch-size 20 --out runs/results/table2 \
  --settings table2,qdiff:W4A4,tfmq:W4A4,dgq:W4A4:K8,dgq:W4A4:K16,qdiff:W8A4,tfmq:W8A4,dgq:W8A4:K8,dgq:W8A4:K16
# Table 3 ablations at W4A6 (and K at W8A8, where the paper finds K=2 best)
python -m dgq eval --model tiny --prompts-file "$P" --limit 200 --batch-size 20 --out runs/results/ablation \
  --settings fp,dgq:W4A6:K16,dgq:W4A6:K16:nolog:nostart:static,dgq:W4A6:K16:nogroups,dgq:W4A6:K16:axis=channel,dgq:W4A6:K16:axis=pixel,dgq:W4A6:K2,dgq:W4A6:K8,dgq:W4A6:K16:static,dgq:W4A6:K16:nostart,dgq:W8A8:K2,dgq:W8A8:K8

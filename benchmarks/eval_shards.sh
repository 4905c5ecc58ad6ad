#!/usr/bin/env bash
# Run one `python -m dgq eval` over SHARDS single-thread CPU processes (default 1: one ordinary
# process); rank r > 0 logs to $OUT/rank<r>.log, rank 0 scores once every rank has finished.
# Used by the table scripts:  SHARDS=2 OUT=runs/x bash benchmarks/eval_shards.sh --model tiny ...
set -euo pipefail
SHARDS=${SHARDS:-1}
: "${OUT:?set OUT to the --out folder of the eval}"
if [ "$SHARDS" -le 1 ]; then
  exec python -m dgq eval "$@"
fi
mkdir -p "$OUT"
pids=()
for ((r = 1; r < SHARDS; r++)); do
  OMP_NUM_THREADS=1 RANK=$r WORLD_SIZE=$SHARDS python -m dgq eval "$@" > "$OUT/rank$r.log" 2>&1 &
  pids+=($!)
done
OMP_NUM_THREADS=1 RANK=0 WORLD_SIZE=$SHARDS python -m dgq eval "$@"
for p in "${pids[@]}"; do wait "$p"; done

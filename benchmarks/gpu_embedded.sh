#!/usr/bin/env bash
# The embedded model's GPU job: one command, about 9 minutes on one H100/H200 (docs/embedded-model.md,
# "What a GPU run would test"). Three trainings run at once on the GPU:
#
#   A  the shipped UNet trained on for A_SECONDS on the shipped frozen text tower (the FP-quality gap:
#      on the CPU it had 52 k samples on this tower; the base needed 1.5 M for 92 % shape);
#   B  a deeper text tower (TEXT_LAYERS layers, width 64, so the same UNet fits) trained
#      contrastively from scratch for CLIP_SECONDS, frozen, then the shipped UNet trained on it for
#      B_SECONDS: the hypothesis that SD's `<start>` sink needs a text tower whose `<start>` state
#      is a massive-activation outlier, which a 2-layer tower trained for minutes did not grow;
#   C  run A with SD v1.4's 8 heads (size m8: the same weights, so it starts from the shipped UNet),
#      the heads hypothesis at a GPU's training length (C_SECONDS; 0 skips it).
#
# Then each is exported at guidance 3.0 and measured the way the docs measure the shipped model:
# `benchmarks.start_sink` (where the cross-attention mass goes, and the `<start>` state's norm and
# largest entry) and `dgq.tiny.report` (FP quality on the 200 held-out prompts). Everything lands in
# OUT; the files a device call brings back (weights, JSON, one log archive) are copied to KEEP.
# `start_sink --logits` adds why the mass goes where it goes (first choices, sharpness, output norms).
# TRAIN=0 measures the saves already in OUT.
#
#   bash benchmarks/gpu_embedded.sh                      # on the GPU machine (DEV=cuda)
#   DEV=cpu N_LATENTS=2048 A_SECONDS=20 CLIP_SECONDS=20 B_SECONDS=20 C_SECONDS=20 CLIP_IMAGES=2048 EVAL_N=0 \
#     REPORT_N=8 SINK_N=2 PROCS=1 bash benchmarks/gpu_embedded.sh     # a dry run of every step
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-embedded}
KEEP=${KEEP:-$OUT/keep}
DEV=${DEV:-cuda}
N_LATENTS=${N_LATENTS:-300000}   # 4 training captions each; the caption table takes ~1 min per 300 k
PROCS=${PROCS:-15}
A_SECONDS=${A_SECONDS:-270}
CLIP_SECONDS=${CLIP_SECONDS:-80}
CLIP_IMAGES=${CLIP_IMAGES:-40000}
B_SECONDS=${B_SECONDS:-190}
C_SECONDS=${C_SECONDS:-$A_SECONDS}
TEXT_LAYERS=${TEXT_LAYERS:-6}
EVAL_N=${EVAL_N:-0}      # the trainer's own quick scores (the report below measures each run anyway)
REPORT_N=${REPORT_N:-200}
SINK_N=${SINK_N:-16}
PY=${PY:-python}         # python3 on the device machine
G=3.0
mkdir -p "$OUT" "$KEEP"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }

log "latents ($N_LATENTS)"
[ -f "$OUT/latents.safetensors" ] || "$PY" -m dgq.tiny.train latents --n "$N_LATENTS" \
  --out "$OUT/latents.safetensors" --procs "$PROCS" --device "$DEV"

C=(--device "$DEV" --captions train --paraphrase-p 0.5 --background-p 1.0
   --latents "$OUT/latents.safetensors" --batch 512 --uncond dropout --p-uncond 0.1
   --eval-guidance "$G" --eval-n "$EVAL_N" --procs 1 --init assets/tiny-sd)
rc=0
if [ "${TRAIN:-1}" = 1 ]; then
log "A: shipped tower, ${A_SECONDS}s | B: ${TEXT_LAYERS}-layer tower ${CLIP_SECONDS}s, then UNet ${B_SECONDS}s" \
  "| C: 8 heads, ${C_SECONDS}s"
"$PY" -m dgq.tiny.train train --sizes m "${C[@]}" --text-encoder assets/tiny-sd/text_encoder --seconds "$A_SECONDS" \
  --lr 6e-4 --warmup 100 --out "$OUT/a" > "$OUT/a.log" 2>&1 &
A_PID=$!
(
  "$PY" -m dgq.tiny.clip train --device "$DEV" --text-layers "$TEXT_LAYERS" --seconds "$CLIP_SECONDS" \
    --n-images "$CLIP_IMAGES" --out "$OUT/clip"
  "$PY" -m dgq.tiny.clip export --weights "$OUT/clip/clip.safetensors" --out "$OUT/clip/tiny-clip" \
    --text-out "$OUT/clip/text_encoder"
  "$PY" -m dgq.tiny.train train --sizes m "${C[@]}" --text-encoder "$OUT/clip/text_encoder" --seconds "$B_SECONDS" \
    --lr 1e-3 --warmup 100 --out "$OUT/b"
) > "$OUT/b.log" 2>&1 &
B_PID=$!
C_PID=
if [ "$C_SECONDS" != 0 ]; then
  "$PY" -m dgq.tiny.train train --sizes m8 "${C[@]}" --text-encoder assets/tiny-sd/text_encoder \
    --seconds "$C_SECONDS" --lr 6e-4 --warmup 100 --out "$OUT/c" > "$OUT/c.log" 2>&1 &
  C_PID=$!
fi
wait "$A_PID" || rc=$?
wait "$B_PID" || rc=$?
[ -z "$C_PID" ] || wait "$C_PID" || rc=$?
[ "$rc" = 0 ] || { log "a training failed (rc $rc)"; tail -20 "$OUT"/[abc].log; }
fi

save() { case $1 in c) echo "$OUT/c/m8.safetensors" ;; *) echo "$OUT/$1/m.safetensors" ;; esac; }
for x in a b c; do [ -f "$(save $x)" ] && cp "$(save $x)" "$KEEP/$x.safetensors"; done
[ -f "$OUT/clip/clip.safetensors" ] && cp "$OUT/clip/clip.safetensors" "$KEEP/clip.safetensors"
measure() {  # one run: export at the model's guidance, where the mass goes, FP quality
  local x=$1
  "$PY" -m dgq.tiny.train export --weights "$(save "$x")" --out "$OUT/$x/pipe" --guidance "$G"
  "$PY" -m benchmarks.start_sink --model "$OUT/$x/pipe" --label "$x" --n "$SINK_N" --out "$OUT/$x-sink.json" \
    --note "benchmarks/gpu_embedded.sh run $x" || log "start_sink $x failed"
  "$PY" -m benchmarks.start_sink --model "$OUT/$x/pipe" --label "$x" --n "$SINK_N" --out "$OUT/$x-sink.json" \
    --logits || log "start_sink --logits $x failed"
  "$PY" -m dgq.tiny.report --model "$OUT/$x/pipe" --n "$REPORT_N" --out "$OUT/$x-quality.json" || log "report $x failed"
}
pids=()
for x in a b c; do
  [ -f "$(save $x)" ] || continue
  log "measure $x"
  OMP_NUM_THREADS=${MEASURE_THREADS:-5} measure "$x" > "$OUT/measure-$x.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
table = {}
for x in "abc":
    f = out / f"{x}-sink.json"
    if f.exists():
        table.update(json.loads(f.read_text()))
(out / "sink.json").write_text(json.dumps(table, indent=1))
PYEOF
for f in sink.json a-quality.json b-quality.json c-quality.json; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$KEEP/$f"; done
tar czf "$KEEP/logs.tgz" -C "$OUT" $(cd "$OUT" && ls ./*.log)
"$PY" -m benchmarks.start_sink --table --out "$OUT/sink.json" 2>/dev/null || true
for f in "$OUT"/*-quality.json; do
  [ -f "$f" ] && "$PY" -c 'import json,sys; print(sys.argv[1], json.load(open(sys.argv[1]))["scores"])' "$f"
done
log "done (rc $rc)"
exit "$rc"

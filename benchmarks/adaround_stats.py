"""Statistics from the FP network or from the quantized one (dgq-method.md §H-9), measured.

DGQ's calibration normally observes the FP network (`dgq.calibrate(pipe)`); the authors observe the
network with its weights already quantized and provisional A-bit activations. This script makes the
second calibration (`dgq.calibrate(pipe, stats_network=BaselineConfig(W, A, weight_rounding=R))`:
weights at W bits with rounding R, activations per-tensor per step at A bits from the FP
calibration), generates DGQ with it for the prompts of a finished `benchmarks/adaround_eval.sh` run
and scores both against that run's FP images (PSNR/SSIM, same seeds) and with the shapes
evaluator (alignment). The FP-statistics images are that run's own `dgq-w{W}a{A}-k{K}[-adaround]`
folder, so the two rows differ only in where the statistics came from.

    python benchmarks/adaround_stats.py --run runs/adaround --w-bits 4 --a-bits 6 --rounding adaround
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _images(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/adaround", help="a finished adaround_eval.sh output folder")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=6)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--rounding", default="adaround", choices=["nearest", "adaround"])
    ap.add_argument("--limit", type=int, default=0, help="first N images only (default: all of the run)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--out", default=None, help="where the quantized-statistics images go (default RUN/<slug>-qstats)")
    a = ap.parse_args(argv)

    import dgq
    from dgq import metrics as M
    from dgq.eval.plan import image_file
    from dgq.eval.settings import canonical_spec
    from dgq.tiny.evaluator import load_evaluator, to_tensor_batch

    run = Path(a.run)
    plan = json.loads((run / "plan.json").read_text())
    prompts = json.loads((run / "prompts.json").read_text())
    n = len(prompts) if not a.limit else min(a.limit, len(prompts))
    cfg = dgq.DGQConfig(w_bits=a.w_bits, a_bits=a.a_bits, groups=a.groups, weight_rounding=a.rounding)
    slug = canonical_spec(cfg).lower().replace(":", "-").replace("=", "-")
    fp_paths = [image_file(run / "fp", i) for i in range(n)]
    fps_paths = [image_file(run / slug, i) for i in range(n)]
    missing = [p for p in fp_paths + fps_paths if not p.is_file()]
    if missing:
        print(f"error: {len(missing)} images of the run are missing (e.g. {missing[0]}); finish the run first",
              file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else run / f"{slug}-qstats"
    out.mkdir(parents=True, exist_ok=True)

    pipe = dgq.load_pipeline("tiny")
    t0 = time.perf_counter()
    provisional = dgq.BaselineConfig(w_bits=a.w_bits, a_bits=a.a_bits, weight_rounding=a.rounding)
    calib = dgq.calibrate(pipe, steps=plan["steps"], guidance=plan["guidance"], stats_network=provisional,
                          progress=False)
    calib_s = time.perf_counter() - t0
    studio = dgq.Studio(pipe, calib, max_batch=max(16, a.batch_size))
    seed = int(plan["seed"])
    for s in range(0, n, a.batch_size):
        idx = list(range(s, min(n, s + a.batch_size)))
        if all(image_file(out, i).is_file() for i in idx):
            continue
        g = studio.generate([prompts[i] for i in idx], seed=[seed + i for i in idx], config=cfg,
                            steps=int(plan["steps"]), guidance=float(plan["guidance"]))
        for i, im in zip(idx, g.images):
            im.save(image_file(out, i))
        print(f"{idx[-1] + 1}/{n} images", file=sys.stderr, flush=True)
    q_paths = [image_file(out, i) for i in range(n)]

    ev = load_evaluator(None)
    fp = _images(fp_paths)
    rows = {}
    for name, paths in (("fp-statistics", fps_paths), ("quantized-statistics", q_paths)):
        x = _images(paths)
        sc = ev.score(torch.cat([to_tensor_batch(list(x[i:i + 64])) for i in range(0, n, 64)]), prompts[:n])
        rows[name] = {"psnr": float(M.psnr(x, fp)), "ssim": float(M.ssim(x, fp)), "align_all": sc["all"], "n": n}
    result = {"config": cfg.label(), "provisional": provisional.label(), "calibration_seconds": round(calib_s, 1),
              "run": str(run), "rows": rows}
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a guidance-distilled embedded model can reach at most, measured without training one.

`python -m dgq.tiny.train train --teacher T --guided S:E --guided-below B --guided-full F`
trains a student whose conditional branch is v_u + w(t)·(v_c − v_u) of the teacher's, with
w = 1 − r(t)·(1 − E/S) and r = 1 below F, falling linearly to 0 at B. A perfect student sampled at
scale S is therefore the teacher with the per-step scale S·w(t). This script samples exactly that
(the teacher's UNet output rewritten per call) and scores it with the attribute evaluator, so a
schedule can be chosen, and a student's gap to its ceiling measured, before and after training.

    python benchmarks/guided_ceiling.py --n 200 --scale 7.5 --schedule 1.5:650:700 --schedule 2:650:700
    python benchmarks/guided_ceiling.py --n 240 --prompt-seed 90000000 --schedule 1.5:650:700   # held-out

Each --schedule is E:F:B; "none" samples the teacher at S throughout. Prompts are renderer seeds
--prompt-seed + i (default: the tuning prompts, 80,000,000), image i from seed i, 25 PNDM steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

KEYS = ("single_color", "single_shape", "single_position", "pair_colors")


def parse_schedule(text: str) -> tuple[float, float, float] | None:
    if text == "none":
        return None
    try:
        e, full, below = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--schedule {text!r}: expected E:F:B such as 1.5:650:700, or none") from None
    if not (e > 0 and 0 <= full < below):
        raise ValueError(f"--schedule {text!r}: needs E > 0 and 0 <= F < B")
    return e, full, below


def weight(t: float, scale: float, schedule: tuple[float, float, float] | None) -> float:
    """w(t) of the module docstring: the share of (v_c − v_u) a perfect student keeps at t."""
    if schedule is None:
        return 1.0
    from dgq.tiny.train import ramp  # the trainer's own ramp, so the two cannot drift

    e, full, below = schedule
    r = float(ramp(torch.tensor([t]), below, full))
    return 1.0 - r * (1.0 - e / scale)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="the teacher ('tiny' or a pipeline folder)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--prompt-seed", type=int, default=80_000_000)
    ap.add_argument("--scale", type=float, default=7.5, help="the sampling scale S")
    ap.add_argument("--schedule", action="append", default=None, help="E:F:B, or none (repeatable)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=None, help="also write the scores as JSON here")
    a = ap.parse_args(argv)
    schedules = [(s, parse_schedule(s)) for s in (a.schedule or ["none", "1.5:650:700"])]

    import dgq
    from dgq.tiny.evaluator import load_evaluator
    from dgq.tiny.render import sample

    pipe = dgq.load_pipeline(a.model, device="cpu")
    prompts = [sample(a.prompt_seed + i)[1] for i in range(a.n)]
    rows = run(pipe, load_evaluator(), prompts, a.scale, schedules, a.steps)
    report = {"model": a.model, "n": a.n, "prompt_seed": a.prompt_seed, "scale": a.scale, "steps": a.steps,
              "schedules": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


def run(pipe, evaluator, prompts: list[str], scale: float, schedules: list, steps: int = 25) -> dict:
    """Scores per schedule; the pipeline's UNet is rewritten per call and restored afterwards."""
    from dgq.tiny.train import quick_score

    pipe.set_progress_bar_config(disable=True)
    unet, real = pipe.unet, pipe.unet.forward
    current: dict = {}

    def forward(x, timestep, *args, **kw):
        out = real(x, timestep, *args, **kw)
        w = weight(float(torch.as_tensor(timestep).flatten()[0]), scale, current["schedule"])
        as_dict = kw.get("return_dict", True)
        pred = out.sample if as_dict else out[0]
        u, c = pred.chunk(2)  # the pipeline's CFG batch: unconditional half first
        pred = torch.cat([u, u + w * (c - u)])
        return type(out)(sample=pred) if as_dict else (pred,)

    unet.forward = forward
    rows = {}
    try:
        for name, sched in schedules:
            current["schedule"] = sched
            t0 = time.time()
            score = quick_score(pipe, evaluator, prompts, "cpu", steps=steps, guidance=scale, batch=50)
            rows[name] = {k: None if score.get(k) is None else round(100 * score[k], 1) for k in KEYS}
            print(f"{name:>14}  {rows[name]}  {time.time() - t0:.0f}s", flush=True)
    finally:
        del unet.forward  # the instance attribute goes; the class's forward is back
    return rows


if __name__ == "__main__":
    main()

"""Where classifier-free guidance breaks the embedded model (prints figures; asserts nothing).

The embedded model meets its quality bar at its own scale (2.0) and fails at 7.5. This script
measures, on the 200-prompt *tuning* set (renderer seeds 80,000,000 + i, never the held-out
report prompts), three things that locate the failure:

1. **Guidance by interval.** 25 PNDM steps at 2.0 except a window of steps at 7.5. If 7.5 on the
   noisiest steps is harmless and 7.5 on the late steps is not, the damage is done where the
   image is refined, not where its layout is chosen.
2. **Is it the decoder?** Statistics of the final latents at 2.0 and 7.5, and the evaluator's
   scores when the 7.5 latents are shrunk towards the data mean (z' = μ + (z − μ)/k) before
   decoding. If shrinking does not help, the latents are wrong, not merely out of the
   autoencoder's range.
3. **Conditional vs unconditional predictions on real latents.** For renders noised to t: the
   x₀ error of the conditional, unconditional, 2.0-guided and 7.5-guided predictions, and
   |v_c − v_u| / |v|. Guidance multiplies the disagreement by (s − 1).

    python benchmarks/guidance_diagnosis.py                       # 64 prompts, ~4 min on 2 cores
    python benchmarks/guidance_diagnosis.py --n 200 --out docs/tiny-guidance-diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TUNING_SEED = 80_000_000
KEYS = ("single_color", "single_shape", "single_position", "pair_colors")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=64, help="tuning prompts (seeds 80,000,000 + i)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--low", type=float, default=2.0, help="the model's scale")
    p.add_argument("--high", type=float, default=7.5, help="the scale under test")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)

    import torch

    import dgq
    from dgq.tiny.evaluator import load_evaluator
    from dgq.tiny.render import render_batch as _images

    torch.manual_seed(0)
    pipe = dgq.load_pipeline(a.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    ev = load_evaluator()
    renders, prompts = _images(list(range(TUNING_SEED, TUNING_SEED + a.n)))  # [-1, 1] images, captions
    sf = pipe.vae.config.scaling_factor
    t0 = time.time()

    def run(first: float, switch: dict[int, float] | None = None, latent: bool = False):
        """Generate every prompt (image i from seed i); `switch[k]` = scale from step k on."""
        def cb(pp, i, _t, kw):
            if switch and (i + 1) in switch:
                pp._guidance_scale = switch[i + 1]
            return kw

        out = []
        for i in range(0, a.n, a.batch):
            chunk = prompts[i : i + a.batch]
            gens = [torch.Generator().manual_seed(s) for s in range(i, i + len(chunk))]
            r = pipe(chunk, num_inference_steps=a.steps, guidance_scale=first, generator=gens,
                     callback_on_step_end=cb, output_type="latent" if latent else "pil")
            if latent:
                out.append(r.images)
            else:
                out.extend(r.images)
        return torch.cat(out) if latent else out

    def score(images) -> dict[str, float]:
        s = ev.score(images, prompts)  # None where no prompt asks (e.g. no two-object prompt)
        return {k: None if s.get(k) is None else round(100 * s[k], 1) for k in KEYS}

    def decode(z):
        """As the pipeline decodes its output latents."""
        with torch.no_grad():
            return pipe.image_processor.postprocess(pipe.vae.decode(z / sf).sample, output_type="pil")

    report: dict = {"model": a.model, "prompts": f"render.sample({TUNING_SEED} + i), i < {a.n}", "steps": a.steps,
                    "low": a.low, "high": a.high}

    # 1. guidance by interval (steps counted from the noisiest, 0-based)
    lo, hi, n = a.low, a.high, a.steps
    third = n // 3
    windows = {
        f"all {lo}": (lo, None),
        f"all {hi}": (hi, None),
        f"{hi} on steps 0-{third - 1}, {lo} after": (hi, {third: lo}),
        f"{hi} on steps 0-{2 * third - 1}, {lo} after": (hi, {2 * third: lo}),
        f"{lo} on steps 0-{third - 1}, {hi} after": (lo, {third: hi}),
        f"{lo} on steps 0-{2 * third - 1}, {hi} after": (lo, {2 * third: hi}),
    }
    report["interval"] = {}
    for name, (first, sw) in windows.items():
        report["interval"][name] = score(run(first, sw))
        print(f"interval  {name:32s} {report['interval'][name]}", flush=True)

    # 2. the decoder
    with torch.no_grad():
        z_data = pipe.vae.encode(renders).latents * sf
    mu = z_data.mean((0, 2, 3), keepdim=True)
    z_lo, z_hi = run(lo, latent=True), run(hi, latent=True)

    def stats(z):
        return {"channel_std": [round(v, 2) for v in z.std((0, 2, 3)).tolist()],
                "share_abs_over_3": round(float((z.abs() > 3).float().mean()), 4)}

    report["latents"] = {"data": stats(z_data), f"g{lo}": stats(z_lo), f"g{hi}": stats(z_hi)}
    report["shrunk_decode"] = {f"g{hi}, k={k}": score(decode(mu + (z_hi - mu) / k)) for k in (1.0, 1.5, 2.0, 3.0)}
    for k, v in report["latents"].items():
        print(f"latents   {k:10s} {v}")
    for k, v in report["shrunk_decode"].items():
        print(f"decode    {k:12s} {v}")

    # 3. conditional vs unconditional on real latents
    ab = pipe.scheduler.alphas_cumprod
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in (980, 800, 600, 400, 250, 150, 80, 40, 10):
        e = torch.randn(z_data.shape, generator=g)
        al = ab[t]
        xt = al.sqrt() * z_data + (1 - al).sqrt() * e
        v = al.sqrt() * e - (1 - al).sqrt() * z_data
        with torch.no_grad():
            vc = pipe.unet(xt, t, encoder_hidden_states=cond).sample
            vu = pipe.unet(xt, t, encoder_hidden_states=uncond).sample

        def x0_err(vv):
            return round(float(((al.sqrt() * xt - (1 - al).sqrt() * vv - z_data) ** 2).mean()), 4)

        rows.append({"t": t, "x0_mse_cond": x0_err(vc), "x0_mse_uncond": x0_err(vu),
                     f"x0_mse_g{lo}": x0_err(vu + lo * (vc - vu)), f"x0_mse_g{hi}": x0_err(vu + hi * (vc - vu)),
                     "rel_disagreement": round(float((vc - vu).norm() / v.norm()), 3)})
        print("t=%4d  %s" % (t, {k: v for k, v in rows[-1].items() if k != "t"}), flush=True)
    report["predictions"] = rows
    report["seconds"] = round(time.time() - t0, 1)
    print(f"{report['seconds']} s")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()

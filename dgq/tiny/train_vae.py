"""Train the embedded model's autoencoder on renders, resumably (the shipped one came from here).

The text-to-image part (UNet + text encoder) trains with `dgq.tiny.train`, on a CPU or a GPU; the
autoencoder is a separate, earlier stage that the shipped model reuses unchanged::

    python -m dgq.tiny.train_vae --run-dir runs/tiny --steps 900

It writes `vae.safetensors` and `vae.json` into the run folder (checkpoints every few minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dgq.tiny import render as R
from dgq.tiny.models import make_vae
from dgq.tiny.render import render_batch as _images
from dgq.tiny.train import atomic_save

log = logging.getLogger("dgq.tiny.train_vae")


def train_vae(run: Path, steps: int, batch: int = 16, lr: float = 1e-3, seed: int = 0, finetune_steps: int = 200) -> None:
    """Autoencoder on renders (L1 + L2), then normalise the latents per channel.

    A penalty that pins each latent channel to N(0, 1) during training kept colours out of the
    latents in our runs (reconstructions came back grey), so the autoencoder trains freely and the
    per-channel mean/std are folded into the encoder's last convolution afterwards; the decoder is
    then fine-tuned briefly on the normalised latents. The pipeline's `scaling_factor` stays 1.
    """
    ck = run / "vae.safetensors"
    vae = make_vae()
    state = {"step": 0, "normalized": False}
    if ck.exists():
        vae.load_state_dict(load_file(str(ck)))
        state = json.loads((run / "vae.json").read_text())
    if state["step"] < steps:
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        t0 = time.time()
        for step in range(state["step"], steps):
            x, _ = _images([10_000_000 + seed * 1_000_000 + step * batch + i for i in range(batch)])
            rec = vae.decoder(vae.encoder(x))
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + _chroma_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = lr * (0.3 if step > 0.8 * steps else 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log.info("vae step %d l1+l2 %.4f (%.0fs)", step, loss.item(), time.time() - t0)
            if (step + 1) % 100 == 0 or step == steps - 1:
                atomic_save(vae.state_dict(), ck)
                (run / "vae.json").write_text(json.dumps({"step": step + 1, "normalized": False}))
        state = {"step": steps, "normalized": False}
        vae_colour_report(vae)
    if not state.get("normalized"):
        _normalize_latents(vae, batch, lr, finetune_steps, seed)
        atomic_save(vae.state_dict(), ck)
        (run / "vae.json").write_text(json.dumps({"step": state["step"], "normalized": True}))
        vae_colour_report(vae)


def _chroma_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 on the colour part (each pixel minus its channel mean): early in training an
    autoencoder settles on grey reconstructions, which this term makes expensive."""
    return 2.0 * F.l1_loss(rec - rec.mean(1, keepdim=True), x - x.mean(1, keepdim=True))


def _normalize_latents(vae, batch: int, lr: float, steps: int, seed: int) -> None:
    with torch.no_grad():
        x, _ = _images([20_000_000 + i for i in range(512)])
        z = vae.encoder(x)
        m, s = z.mean((0, 2, 3)), z.std((0, 2, 3))
        last = [mod for mod in vae.encoder.modules() if isinstance(mod, torch.nn.Conv2d)][-1]
        last.weight.div_(s.view(-1, 1, 1, 1))
        last.bias.sub_(m).div_(s)
        z2 = vae.encoder(x)
        log.info("latents normalised: mean %s std %s", z2.mean((0, 2, 3)).numpy().round(3), z2.std((0, 2, 3)).numpy().round(3))
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=lr * 0.5)
    for step in range(steps):
        x, _ = _images([30_000_000 + seed * 1_000_000 + step * batch + i for i in range(batch)])
        with torch.no_grad():
            z = vae.encoder(x)
        rec = vae.decoder(z)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + _chroma_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("decoder fine-tune step %d l1+l2 %.4f", step, loss.item())


@torch.no_grad()
def vae_colour_report(vae) -> dict[str, float]:
    """Mean absolute RGB error of each object colour after a reconstruction (0–255 scale)."""
    errs: dict[str, list[float]] = {c: [] for c in R.COLORS}
    rng = random.Random(123)
    for _ in range(200):
        scene = R.random_scene(rng, two_object_prob=0.0)
        img = R.render(scene)
        x = torch.from_numpy(R.to_array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
        rec = vae.decoder(vae.encoder(x)).clamp(-1, 1)
        rec = ((rec[0].permute(1, 2, 0) + 1) * 127.5).numpy()
        o = scene.objects[0]
        cx, cy = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}[o.position]
        patch = rec[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3).mean(0)
        errs[o.color].append(float(np.abs(patch - np.array(R.COLORS[o.color])).mean()))
    report = {c: round(float(np.mean(v)), 1) for c, v in errs.items() if v}
    log.info("vae colour error (0-255, object centre): %s", report)
    return report


# ----------------------------------------------------------------------------- latents
@torch.no_grad()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dgq.tiny.train_vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/tiny")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    train_vae(run, a.steps)


if __name__ == "__main__":
    main()

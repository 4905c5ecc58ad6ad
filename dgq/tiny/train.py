"""Train the embedded text-to-image model on the shapes domain, resumably, on 2 CPU cores.

Stages (each resumable, each writes into `--run-dir`):

1. ``vae``     – an autoencoder (×4 downsampling, 4 latent channels) on renders, with a soft
                 constraint that keeps every latent channel near zero mean and unit variance, so
                 the pipeline's `scaling_factor` is 1 and no channel drowns in the noise.
2. ``latents`` – render and encode a fixed training set once (encoding every step wastes time).
3. ``unet``    – UNet2DConditionModel + CLIPTextModel, v-prediction, classifier-free-guidance
                 dropout, EMA weights, checkpoints every few minutes (safetensors + JSON).
4. ``export``  – assemble a `StableDiffusionPipeline` and `save_pretrained` it (fp16 safetensors).

Usage::

    python -m dgq.tiny.train all --run-dir runs/tiny --unet-hours 2.0
    python -m dgq.tiny.train unet --run-dir runs/tiny --unet-hours 1.0   # continue later
    python -m dgq.tiny.train export --run-dir runs/tiny --out assets/tiny-sd
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dgq.tiny import render as R
from dgq.tiny.models import make_scheduler, make_text_encoder, make_unet, make_vae
from dgq.tiny.tokenizer import build_clip_tokenizer

log = logging.getLogger("dgq.tiny.train")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"json": json.dumps(meta or {})})
    os.replace(tmp, path)


def _images(seeds: list[int]) -> tuple[torch.Tensor, list[str]]:
    arrs, caps = [], []
    for s in seeds:
        _, cap, img = R.sample(s)
        arrs.append(R.to_array(img))
        caps.append(cap)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, caps


# ----------------------------------------------------------------------------- VAE
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
                _atomic_save(vae.state_dict(), ck)
                (run / "vae.json").write_text(json.dumps({"step": step + 1, "normalized": False}))
        state = {"step": steps, "normalized": False}
        vae_colour_report(vae)
    if not state.get("normalized"):
        _normalize_latents(vae, batch, lr, finetune_steps, seed)
        _atomic_save(vae.state_dict(), ck)
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
def make_latents(run: Path, n: int) -> None:
    out = run / "latents.safetensors"
    if out.exists():
        log.info("latents: %s exists", out)
        return
    vae = make_vae()
    vae.load_state_dict(load_file(str(run / "vae.safetensors")))
    vae.eval()
    tok = build_clip_tokenizer()
    lat, ids, caps = [], [], []
    t0 = time.time()
    for i in range(0, n, 256):
        x, c = _images(list(range(i, min(n, i + 256))))
        lat.append(vae.encoder(x).half())
        ids.append(tok(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.int())
        caps += c
        if i % 5120 == 0:
            log.info("latents %d/%d (%.0fs)", i, n, time.time() - t0)
    latents = torch.cat(lat)
    log.info("latents: per-channel mean %s std %s", latents.float().mean((0, 2, 3)).numpy().round(3),
             latents.float().std((0, 2, 3)).numpy().round(3))
    _atomic_save({"latents": latents, "input_ids": torch.cat(ids)}, out, {"n": n})


# ----------------------------------------------------------------------------- UNet
def train_unet(run: Path, hours: float, batch: int = 64, lr: float = 1e-3, p_uncond: float = 0.1,
               ema_decay: float = 0.999, seed: int = 0, ckpt_minutes: float = 5.0,
               init_from: Path | None = None) -> None:
    torch.manual_seed(seed)
    data = load_file(str(run / "latents.safetensors"))
    latents, input_ids = data["latents"], data["input_ids"].long()
    n = latents.shape[0]
    tok = build_clip_tokenizer()
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet, text = make_unet(), make_text_encoder()
    sched = make_scheduler("ddpm")
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": lr},
        {"params": list(text.parameters()), "lr": lr},
    ], weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    state = {"step": 0, "samples": 0, "seconds": 0.0}
    ck = run / "unet_ckpt.safetensors"
    if not ck.exists() and init_from is not None:  # continue from a shipped pipeline (fresh optimizer)
        from diffusers import UNet2DConditionModel  # noqa: PLC0415
        from transformers import CLIPTextModel  # noqa: PLC0415

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(init_from / "unet")).float().state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(str(init_from / "text_encoder")).float().state_dict())
        for e, p in zip(ema, params):
            e.copy_(p.detach())
        prev = json.loads((init_from / "training.json").read_text())
        state = {"step": prev["unet_steps"], "samples": prev["unet_samples"], "seconds": float(prev["unet_seconds"])}
        log.info("unet: initialised from %s (%d samples so far)", init_from, state["samples"])
    if ck.exists():
        sd = load_file(str(ck))
        unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
        text.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})
        for i, e in enumerate(ema):
            e.copy_(sd[f"ema.{i}"])
        opt_state = opt.state_dict()
        for i in range(len(params)):
            opt_state["state"][i] = {"step": sd[f"opt.{i}.step"], "exp_avg": sd[f"opt.{i}.exp_avg"],
                                     "exp_avg_sq": sd[f"opt.{i}.exp_avg_sq"]}
        opt.load_state_dict(opt_state)
        state = json.loads((run / "unet_state.json").read_text())
        log.info("unet: resumed at step %d (%d samples)", state["step"], state["samples"])
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(seed + state["step"])
    t_start, last_ck = time.time(), time.time()
    budget = hours * 3600
    losses: list[float] = []

    def checkpoint() -> None:
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"text.{k}": v for k, v in text.state_dict().items()})
        tensors.update({f"ema.{i}": e for i, e in enumerate(ema)})
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if st:
                tensors.update({f"opt.{i}.step": st["step"].reshape(1).float() if torch.is_tensor(st["step"]) else torch.tensor([float(st["step"])]),
                                f"opt.{i}.exp_avg": st["exp_avg"], f"opt.{i}.exp_avg_sq": st["exp_avg_sq"]})
        _atomic_save(tensors, ck)
        tmp = run / "unet_state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, run / "unet_state.json")
        log.info("unet: checkpoint at step %d", state["step"])

    unet.train(); text.train()
    while time.time() - t_start < budget:
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = latents[idx].float()
        ids = input_ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < p_uncond
        ids[drop] = empty_ids
        # half the batch uniform, half from the noisier 70 %: layout and colour are decided there,
        # and that is where the words must be used
        n_t = sched.config.num_train_timesteps
        t = torch.cat([torch.randint(0, n_t, (batch - batch // 2,), generator=gen),
                       torch.randint(int(0.3 * n_t), n_t, (batch // 2,), generator=gen)])
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        ctx = text(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (state["step"] + 1) / 500)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        opt.step()
        d = min(ema_decay, (1 + state["step"]) / (10 + state["step"]))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        state["step"] += 1
        state["samples"] += batch
        losses.append(loss.item())
        if state["step"] % 100 == 0:
            el = time.time() - t_start
            log.info("unet step %d samples %d loss %.4f (%.1f samples/s)", state["step"], state["samples"],
                     float(np.mean(losses[-100:])), (len(losses) * batch) / el)
        if time.time() - last_ck > ckpt_minutes * 60:
            state["seconds"] += time.time() - last_ck
            last_ck = time.time()
            checkpoint()
    state["seconds"] += time.time() - last_ck
    checkpoint()


# ----------------------------------------------------------------------------- export
def export(run: Path, out: Path) -> None:
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    unet, text, vae = make_unet(), make_text_encoder(), make_vae()
    vae.load_state_dict(load_file(str(run / "vae.safetensors")))
    sd = load_file(str(run / "unet_ckpt.safetensors"))
    unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})
    params = list(unet.parameters()) + list(text.parameters())
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(sd[f"ema.{i}"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=make_scheduler("pndm"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    state = json.loads((run / "unet_state.json").read_text())
    (out / "training.json").write_text(json.dumps({
        "unet_steps": state["step"], "unet_samples": state["samples"], "unet_seconds": round(state["seconds"]),
        "vae_steps": json.loads((run / "vae.json").read_text())["step"],
        "hardware": f"{os.cpu_count()} CPU cores", "command": "python -m dgq.tiny.train all",
    }, indent=2))
    log.info("exported to %s", out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dgq.tiny.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "latents", "unet", "export", "all"])
    p.add_argument("--run-dir", default="runs/tiny")
    p.add_argument("--out", default="assets/tiny-sd")
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--n-latents", type=int, default=100_000)
    p.add_argument("--unet-hours", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--init-from", default=None, help="continue UNet training from a shipped pipeline folder "
                   "(e.g. assets/tiny-sd); its VAE is reused")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    init = Path(a.init_from) if a.init_from else None
    if init is not None and not (run / "vae.safetensors").exists():
        vae_sd = {k: v.float() for k, v in load_file(str(init / "vae" / "diffusion_pytorch_model.safetensors")).items()}
        _atomic_save(vae_sd, run / "vae.safetensors")
        (run / "vae.json").write_text(json.dumps({"step": a.vae_steps, "normalized": True}))
    if a.stage in ("vae", "all"):
        train_vae(run, a.vae_steps)
    if a.stage in ("latents", "all"):
        make_latents(run, a.n_latents)
    if a.stage in ("unet", "all"):
        train_unet(run, a.unet_hours, batch=a.batch, lr=a.lr, init_from=init)
    if a.stage in ("export", "all"):
        export(run, Path(a.out))


if __name__ == "__main__":
    main()

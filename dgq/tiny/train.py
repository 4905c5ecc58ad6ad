"""Train the embedded model's UNet and text encoder — one trainer for a CPU or a GPU.

The loop (v-prediction, classifier-free-guidance dropout, EMA, clipping, cosine schedule, periodic
EMA saves with quick held-out scores) is one function, `train_size`; `--device cpu|cuda` chooses
where it runs. Training draws from a latents file made once by `latents` (renders encoded with
the shipped autoencoder, which `dgq.tiny.train_vae` trained and which is not retrained here):
encoding every step would cost more than the UNet step on small images.

A UNet this small leaves most of a large GPU idle (each step is a few hundred small kernels), so
each requested size trains in its own process on the same device, for the same wall-clock budget,
with a cosine learning-rate schedule over that budget. Every `--save-every` seconds a worker
writes its EMA weights (fp16 safetensors, step counts in the metadata) and scores them on
held-out prompts with the attribute evaluator, so a run cut short still leaves its last weights
and a learning curve. Why not the fixed 60k-latent CPU set of the first trainer: at about 400k
samples from it the model fitted its training images rather than the words; a million fresh
scenes removed that.

    python -m dgq.tiny.train train --sizes s,m,mt --seconds 360 --n-latents 1000000 --out runs/gpu
    python -m dgq.tiny.train train --sizes m --device cpu --init assets/tiny-sd --seconds 600 --out runs/ft
    python -m dgq.tiny.train export --weights runs/gpu/m.safetensors --out assets/tiny-sd

Sizes are `dgq.tiny.models.ARCHS`. The autoencoder, tokenizer and scheduler come from `--base`
(default: the shipped `assets/tiny-sd`). Commands recorded before this module absorbed the GPU
trainer name it `dgq.tiny.train_gpu`; the options are unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dgq.paths import TINY_DIR

log = logging.getLogger("dgq.tiny.train")
DEFAULT_BASE = TINY_DIR


# ----------------------------------------------------------------------------- data
_TOK = None


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    """safetensors written to a temporary name, then renamed: a killed run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"json": json.dumps(meta or {})})
    os.replace(tmp, path)


def _render_chunk(args: tuple[int, int, str]) -> tuple[np.ndarray, np.ndarray]:
    """Renders seeds [start, start + count) and tokenizes their captions (runs in a worker)."""
    global _TOK
    from transformers import CLIPTokenizer  # noqa: PLC0415

    from dgq.tiny import render as R  # noqa: PLC0415

    start, count, tok_dir = args
    if _TOK is None:
        _TOK = CLIPTokenizer.from_pretrained(tok_dir)
    imgs, caps = [], []
    for s in range(start, start + count):
        _, cap, img = R.sample(s)
        imgs.append(R.to_array(img))
        caps.append(cap)
    ids = _TOK(caps, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    return np.stack(imgs), ids.astype(np.int32)


@torch.no_grad()
def make_latents(base: Path, n: int, out: Path, device: str, procs: int, chunk: int = 2048) -> None:
    """Render seeds 0..n-1 (the seeds `dgq.tiny.train` uses), encode them, save latents + ids."""
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    vae = AutoencoderTiny.from_pretrained(str(base / "vae"), dtype=torch.float32).to(device).eval()
    jobs = [(i, min(chunk, n - i), str(base / "tokenizer")) for i in range(0, n, chunk)]
    lat, ids = [], []
    t0 = time.time()
    with mp.get_context("spawn").Pool(procs) as pool:
        for k, (img, tok) in enumerate(pool.imap(_render_chunk, jobs)):
            x = torch.from_numpy(img).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            lat.append(vae.encoder(x).half().cpu())
            ids.append(torch.from_numpy(tok))
            if k % 50 == 0:
                log.info("latents %d/%d (%.0fs)", (k + 1) * chunk, n, time.time() - t0)
    latents = torch.cat(lat)
    log.info("latents: %d in %.0fs; per-channel mean %s std %s", n, time.time() - t0,
             latents[:50000].float().mean((0, 2, 3)).numpy().round(3),
             latents[:50000].float().std((0, 2, 3)).numpy().round(3))

    atomic_save({"latents": latents, "input_ids": torch.cat(ids)}, out, {"n": n})


# ----------------------------------------------------------------------------- one size
_RUN_KEYS = ("samples", "seconds", "lr", "batch", "n_latents")
# recorded when the saved weights have them (older saves do not): how the run trained
_RUN_OPTIONAL = ("device", "uncond", "p_uncond", "distill_below", "guided", "guided_below", "guided_full",
                 "guided_weight", "teacher", "t_sampling", "t_max", "text_encoder", "captions")


def _run_record(meta: dict) -> dict:
    """One training run as `training.json` and the weights' history list it."""
    rec = {k: meta[k] for k in _RUN_KEYS}
    rec.update({k: meta[k] for k in _RUN_OPTIONAL if meta.get(k) is not None})
    return rec


def _check_guided(guided: tuple[float, ...]) -> None:
    """(S, E) of `train_size(guided=…)`: guidance S is to act like E at low noise."""
    if len(guided) != 2 or not guided[0] > 1 or not guided[1] > 0:
        raise ValueError(f"guided=(S, E) needs two numbers, S > 1 and E > 0, not {guided!r}")


def ramp(t: torch.Tensor, below: int, full: float | None = None) -> torch.Tensor:
    """Per-sample weight [B, 1, 1, 1]: 1 below t = `full` (default below / 2), falling linearly to 0 at `below`."""
    full = below / 2 if full is None else full
    return ((below - t.float()) / (below - full)).clamp(0, 1).view(-1, 1, 1, 1)


def load_weights(path: Path) -> tuple[dict, dict, str, list[dict]]:
    """UNet and text-encoder state dicts, size name and training history of `path`.

    `path` is either a trainer save (`<size>.safetensors`, EMA weights + JSON metadata) or an
    exported pipeline folder such as `assets/tiny-sd` (its `training.json` names the size and
    the runs), so a fine-tune can start from the shipped model in a clean checkout.
    """
    path = Path(path)
    if path.is_dir():
        info_path = path / "training.json"
        if not info_path.exists():
            raise ValueError(f"{path} is a folder without training.json: not a model this trainer exported")
        info = json.loads(info_path.read_text())
        unet_sd = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
        text_sd = load_file(str(path / "text_encoder" / "model.safetensors"))
        return ({k: v.float() for k, v in unet_sd.items()}, {k: v.float() for k, v in text_sd.items()},
                info["size"], list(info["runs"]))
    prior, unet_sd, text_sd = _read_save(path)
    return unet_sd, text_sd, prior["size"], prior.get("history", []) + [_run_record(prior)]


def _caption_variants(n: int, tok, paraphrase_p: float, background_p: float, seed: int, k: int = 4) -> torch.Tensor:
    """Token ids [n, k, 77] of `k` training captions for each of the latents of seeds 0 … n − 1."""
    import random  # noqa: PLC0415

    from dgq.tiny.captions import scene_of, training_caption  # noqa: PLC0415

    rng = random.Random(seed)
    caps = []
    for s in range(n):
        scene = scene_of(s)
        caps += [training_caption(scene, rng, paraphrase_p, background_p) for _ in range(k)]
    return token_ids(tok, caps).view(n, k, 77).int()


def token_ids(tok, captions: list[str], length: int = 77) -> torch.Tensor:
    """`tok(captions, padding="max_length", max_length=length).input_ids`, word by word from a cache.

    Why: a million latents carry four million captions, which the tokenizer takes minutes over,
    while the domain writes a few hundred distinct words. CLIP's pre-tokenizer never joins text
    across whitespace, so a caption's ids are `<start>`, the ids of each whitespace-separated
    word in turn, `<end>`, then padding (tests/test_train.py checks equality with the tokenizer)."""
    words: dict[str, list[int]] = {}
    rows: dict[str, np.ndarray] = {}
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    out = np.empty((len(captions), length), dtype=np.int64)
    for i, cap in enumerate(captions):
        row = rows.get(cap)
        if row is None:
            ids = [bos]
            for w in cap.split():
                got = words.get(w)
                if got is None:
                    got = words[w] = tok(w, add_special_tokens=False).input_ids
                ids += got
            ids = ids[:length - 1] + [eos]
            row = rows[cap] = np.array(ids + [pad] * (length - len(ids)), dtype=np.int64)
        out[i] = row
    return torch.from_numpy(out)


def _read_save(path: Path) -> tuple[dict, dict, dict]:
    """A trainer save's JSON metadata and its UNet / text-encoder state dicts (fp32)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    sd = load_file(str(path))
    return (meta, {k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")},
            {k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")})


def _save_ema(unet_ema, text_ema, path: Path, meta: dict) -> None:

    tensors = {f"unet.{k}": v.detach().half().cpu() for k, v in unet_ema.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().half().cpu() for k, v in text_ema.state_dict().items()})
    atomic_save(tensors, path, meta)


@torch.no_grad()
def quick_score(pipe, evaluator, prompts: list[str], device: str, steps: int = 25, guidance: float = 7.5,
                batch: int = 128) -> dict:
    """Held-out prompts at full precision, image i from seed i, scored by the attribute evaluator."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator(device).manual_seed(i + j) for j in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       height=64, width=64, output_type="pil").images
    return evaluator.score(images, prompts)


def train_size(size: str, latents_path: Path, base: Path, out: Path, seconds: float, batch: int, lr: float,
               device: str, seed: int, save_every: float, eval_n: int, p_uncond: float = 0.1,
               ema_decay: float = 0.9995, schedule: str = "cosine", keep_saves: bool = False,
               eval_guidance: tuple[float, ...] = (7.5,), init: Path | None = None,
               uncond: str = "dropout", distill_below: int = 0, t_sampling: str = "mixed",
               eval_seed: int | None = None, t_max: int | None = None,
               guided: tuple[float, float] | None = None, guided_below: int = 700, warmup: int = 300,
               guided_full: float | None = None, teacher: Path | None = None, guided_weight: float = 0.0,
               text_encoder: Path | None = None, captions: str = "template", paraphrase_p: float = 0.5,
               background_p: float = 1.0, threads: int | None = None) -> None:
    """Train one size for `seconds` of wall-clock time; write `out/<size>.safetensors` as it goes.

    `uncond` chooses how the unconditional branch (the one classifier-free guidance subtracts)
    is trained: "dropout" replaces the caption of a `p_uncond` share of samples by the empty
    prompt, as SD did; "paired" runs every noised latent through both branches, so the
    unconditional one sees every sample instead of one in ten. Guidance multiplies the two
    branches' disagreement by s - 1, so at 7.5 a small error of the rarely trained branch
    becomes as large as the signal (docs/embedded-model.md).

    `distill_below` (paired only): below t = distill_below / 2 the unconditional branch regresses
    onto the conditional prediction (stop-gradient) instead of the sampled v, blending back to
    the sampled v at t = distill_below. Where the noised latent already shows what the caption
    says, both branches estimate the same E[v | x_t]; the conditional prediction is that
    estimate with far less variance than one sampled target. It drives down the part of the
    disagreement that is the unconditional branch's own error, not the part an exact model has
    too (what `guided` addresses).

    `guided` = (S, E) (paired only): below t = guided_below / 2 the conditional branch is
    trained onto v_u + (E / S)·(v − v_u) (v_u the unconditional prediction, stop-gradient),
    blending back to v at t = guided_below, so that guidance S acts there like guidance E: the
    guided prediction v_u + S·(v_c − v_u) becomes v_u + E·(v − v_u). Why: on flat CSS colours
    even an exact unconditional branch is unsure of the colour at these noise levels, and
    guidance 7.5 overshoots the caption's colour by 6.5 times that doubt, clipping orange to red
    (docs/embedded-model.md). Guidance stays S where the layout is chosen. The price: at
    scales well below S the late steps lean towards the unconditional prediction. `guided_full`
    moves the t below which the blend is complete (default guided_below / 2); the scale switch
    that works at sampling time sits near t = 650, so the blend must be complete there.

    `teacher` (paired only; a save or an exported folder): both branches regress onto a frozen
    teacher's predictions instead of the sampled v: the unconditional one onto the teacher's
    v_u, the conditional one onto the teacher's v_c, or with `guided` onto
    v_u + (E / S)·(v_c − v_u) at low noise. The targets are then exact functions of x_t, with
    none of the sampled target's variance, so a CPU fine-tune of tens of thousands of samples
    converges instead of levelling off far from the objective; the student starts at the
    teacher and only has to learn where to damp its conditional branch.

    `guided_weight` (with `guided`): adds guided_weight × the error of the guided prediction
    v_u + S·(v_c − v_u) against the same combination of the targets. Sampling at scale S
    multiplies the conditional branch's error by S and the unconditional one's by S − 1, so the
    per-branch losses weigh the errors that matter 1/S² too little; this term weighs them as the
    sampler sees them.

    `t_sampling`: "mixed" draws half of each batch from the noisier 70 % of timesteps (where
    layout and colour are decided), "uniform" draws all of it uniformly. `eval_seed`: renderer
    seed of the first quick-score prompt (default: the report's held-out prompts; pass the
    tuning seeds, 80,000,000, when the scores are used to choose between runs). `t_max`: draw
    timesteps below it only, for a fine-tune aimed at the less noisy steps (with "uniform").

    `text_encoder` (a `CLIPTextModel` folder, e.g. the domain CLIP's text tower): the UNet is
    conditioned on its last hidden state and the tower stays **frozen**, as SD's CLIP text
    encoder did; only the UNet trains. `captions`: "template" uses the captions stored with the
    latents; "train" draws each sample's caption from `dgq.tiny.captions.training_caption` (four
    variants per latent, paraphrases with probability `paraphrase_p`, the background named with
    probability `background_p`), from the seed the latent was rendered from.
    """
    if captions not in ("template", "train"):
        raise ValueError(f"captions must be 'template' or 'train', not {captions!r}")
    if threads:
        torch.set_num_threads(threads)
    if uncond not in ("dropout", "paired"):
        raise ValueError(f"uncond must be 'dropout' or 'paired', not {uncond!r}")
    if t_sampling not in ("mixed", "uniform"):
        raise ValueError(f"t_sampling must be 'mixed' or 'uniform', not {t_sampling!r}")
    if t_max is not None and (t_sampling != "uniform" or not 0 < t_max <= 1000):
        raise ValueError("t_max needs t_sampling='uniform' and 0 < t_max <= 1000")
    if guided is not None:
        _check_guided(guided)
        if uncond != "paired" or distill_below:
            raise ValueError("guided=(S, E) needs uncond='paired' and no distill_below")
    if distill_below and uncond != "paired":
        raise ValueError("distill_below needs uncond='paired' (both branches on the same noised latent)")
    if teacher is not None and (uncond != "paired" or distill_below):
        raise ValueError("teacher needs uncond='paired' and no distill_below")
    if guided_weight and guided is None:
        raise ValueError("guided_weight needs guided=(S, E)")
    if guided_full is not None and not 0 <= guided_full < guided_below:
        raise ValueError(f"guided_full must lie in [0, guided_below = {guided_below}), not {guided_full}")
    import copy  # noqa: PLC0415

    from diffusers import StableDiffusionPipeline  # noqa: PLC0415
    from transformers import CLIPTokenizer  # noqa: PLC0415

    from dgq.tiny.evaluator import load_evaluator  # noqa: PLC0415
    from dgq.tiny.models import make_scheduler, make_text_encoder, make_unet, same_weights  # noqa: PLC0415
    from dgq.tiny.render import sample  # noqa: PLC0415
    from dgq.tiny.report import HELD_OUT_SEED  # noqa: PLC0415

    torch.manual_seed(seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    data = load_file(str(latents_path))
    latents, input_ids = data["latents"].to(device), data["input_ids"].to(device).long()
    n = latents.shape[0]
    tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    unet, text = make_unet(size), make_text_encoder(size)
    history: list[dict] = []
    if init is not None:  # continue from saved EMA weights (fresh optimizer and schedule)
        unet_sd, text_sd, init_size, history = load_weights(init)
        if not same_weights(init_size, size):
            raise ValueError(f"{init} holds size {init_size!r}, whose weights do not fit {size!r}")
        unet.load_state_dict(unet_sd)
        text.load_state_dict(text_sd)
        log.info("[%s] initialised from %s (%d samples)", size, init, sum(h["samples"] for h in history))
    frozen_text = text_encoder is not None
    if frozen_text:
        from transformers import CLIPTextModel  # noqa: PLC0415

        text = CLIPTextModel.from_pretrained(str(text_encoder), dtype=torch.float32)
        text.requires_grad_(False).eval()
        log.info("[%s] conditioned on the frozen text tower %s", size, text_encoder)
    variants = None
    if captions == "train":
        variants = _caption_variants(n, tok, paraphrase_p, background_p, seed).to(device)
    teacher_nets = None
    if teacher is not None:
        t_unet_sd, t_text_sd, t_size, _ = load_weights(teacher)
        t_unet, t_text = make_unet(t_size), make_text_encoder(t_size)
        t_unet.load_state_dict(t_unet_sd)
        t_text.load_state_dict(t_text_sd)
        teacher_nets = (t_unet.to(device).eval().requires_grad_(False), t_text.to(device).eval().requires_grad_(False))
    unet, text = unet.to(device), text.to(device)
    params = list(unet.parameters()) + ([] if frozen_text else list(text.parameters()))
    fused = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **fused)
    unet_ema, text_ema = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema = list(unet_ema.parameters()) + ([] if frozen_text else list(text_ema.parameters()))
    alphas = make_scheduler("ddpm").alphas_cumprod.to(device)
    n_t = len(alphas)
    gen = torch.Generator(device).manual_seed(seed)

    pipe = StableDiffusionPipeline.from_pretrained(str(base), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.unet, pipe.text_encoder = unet_ema, text_ema
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator(device=device)
    first_seed = HELD_OUT_SEED if eval_seed is None else eval_seed
    prompts = [sample(first_seed + i)[1] for i in range(eval_n)]

    step, samples, t0, last_save = 0, 0, time.time(), time.time()
    losses: list[torch.Tensor] = []
    curve: list[dict] = []

    def save_and_score(final: bool = False) -> None:
        el = time.time() - t0
        meta = {"size": size, "step": step, "samples": samples, "seconds": round(el), "batch": batch, "lr": lr,
                "history": history, "total_samples": samples + sum(h["samples"] for h in history),
                "budget_seconds": seconds,
                "schedule": schedule,
                "n_latents": n, "device": torch.cuda.get_device_name() if device == "cuda" else device,
                "ema_decay": ema_decay, "p_uncond": p_uncond, "seed": seed, "uncond": uncond,
                "distill_below": distill_below, "t_sampling": t_sampling, "eval_seed": first_seed,
                "t_max": t_max, "warmup": warmup, "guided": list(guided) if guided else None,
                "guided_below": guided_below if guided else None,
                "guided_full": guided_full if guided and guided_full is not None else None,
                "teacher": str(teacher) if teacher is not None else None,
                "guided_weight": guided_weight or None,
                "text_encoder": f"{text_encoder} (frozen)" if frozen_text else None,
                "captions": captions if captions == "template" else
                f"train (paraphrase_p {paraphrase_p}, background_p {background_p})"}
        keys = ("single_color", "single_shape", "single_position", "pair_colors", "background")
        point: dict = {"samples": samples, "seconds": round(el)}
        for g in eval_guidance if eval_n else ():
            t1 = time.time()
            score = quick_score(pipe, evaluator, prompts, device, guidance=g)
            point[f"g{g:g}"] = {k: v for k, v in score.items() if isinstance(v, float)}
            log.info("[%s] %s step %d samples %d (%.0f samples/s) guidance %g, eval %.0fs: %s", size,
                     "FINAL" if final else "save", step, samples, samples / max(el, 1e-9), g, time.time() - t1,
                     {k: round(100 * score[k], 1) for k in keys if isinstance(score.get(k), float)})
        curve.append(point)
        meta["curve"] = curve
        _save_ema(unet_ema, text_ema, out / f"{size}.safetensors", meta)
        if keep_saves:
            _save_ema(unet_ema, text_ema, out / f"{size}-{samples // 1000}k.safetensors", meta)

    unet.train()
    if not frozen_text:
        text.train()
    half = batch // 2
    while True:
        el = time.time() - t0
        if el >= seconds:
            break
        frac = el / seconds
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0
        cur = lr * min(1.0, (step + 1) / max(warmup, 1)) * decay
        for g in opt.param_groups:
            g["lr"] = cur
        idx = torch.randint(0, n, (batch,), device=device, generator=gen)
        x0 = latents[idx].float()
        ids = input_ids[idx] if variants is None else \
            variants[idx, torch.randint(0, variants.shape[1], (batch,), device=device, generator=gen)]
        if uncond == "dropout":  # drawn before t, as it always was: old seeds give the same batches
            drop = torch.rand(batch, device=device, generator=gen) < p_uncond
            ids = torch.where(drop[:, None], empty, ids)
        if t_sampling == "mixed":  # half uniform, half from the noisier 70 %: layout and colour are decided there
            t = torch.cat([torch.randint(0, n_t, (batch - half,), device=device, generator=gen),
                           torch.randint(int(0.3 * n_t), n_t, (half,), device=device, generator=gen)])
        else:
            t = torch.randint(0, t_max or n_t, (batch,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        if uncond == "dropout":
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                with torch.set_grad_enabled(not frozen_text):
                    ctx = text(ids)[0]
                pred = unet(xt, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), v)
        else:
            both = torch.cat([ids, empty.expand(batch, -1)])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                pred = unet(torch.cat([xt, xt]), torch.cat([t, t]), encoder_hidden_states=text(both)[0]).sample
            pc, pu = pred.float().chunk(2)
            if teacher_nets is not None:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                    tp = teacher_nets[0](torch.cat([xt, xt]), torch.cat([t, t]),
                                         encoder_hidden_states=teacher_nets[1](both)[0]).sample
                target_c, target_u = tp.float().chunk(2)
                if guided is not None:
                    blend = target_u + (guided[1] / guided[0]) * (target_c - target_u)
                    target_c = target_c + ramp(t, guided_below, guided_full) * (blend - target_c)
            else:
                target_u = v
                if distill_below:
                    target_u = v + ramp(t, distill_below) * (pc.detach() - v)
                target_c = v
                if guided is not None:
                    ud = pu.detach()
                    blend = ud + (guided[1] / guided[0]) * (v - ud)
                    target_c = v + ramp(t, guided_below, guided_full) * (blend - v)
            loss = 0.5 * (F.mse_loss(pc, target_c) + F.mse_loss(pu, target_u))
            if guided_weight:
                s_ = guided[0]
                loss = loss + guided_weight * F.mse_loss(pu + s_ * (pc - pu), target_u + s_ * (target_c - target_u))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        step += 1
        samples += batch
        losses.append(loss.detach())
        if step % 200 == 0:
            log.info("[%s] step %d samples %d loss %.4f lr %.2e (%.0f samples/s)", size, step, samples,
                     torch.stack(losses).mean().item(), cur, samples / (time.time() - t0))
            losses.clear()
        if time.time() - last_save > save_every:
            save_and_score()
            last_save = time.time()
    save_and_score(final=True)


# ----------------------------------------------------------------------------- export
def text_layers(text_sd: dict[str, torch.Tensor]) -> int:
    """How many transformer layers a text encoder's state dict holds (a frozen tower may be deeper
    than its UNet size's own encoder)."""
    idx = {int(m.group(1)) for k in text_sd if (m := re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", k))}
    if not idx:
        raise ValueError("not a CLIPTextModel state dict: no encoder.layers.* tensors")
    return max(idx) + 1


def export(weights: Path, out: Path, base: Path = DEFAULT_BASE, guidance: float | None = None) -> None:
    """A `StableDiffusionPipeline` folder from trained weights + the base's VAE and tokenizer.

    `guidance` is written to `dgq_defaults.json` (the scale the library uses for this model when
    a caller gives none); without it the base's file is copied, if it has one.
    """
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    from dgq.tiny.models import make_scheduler, make_text_encoder, make_unet, make_vae  # noqa: PLC0415
    from dgq.tiny.tokenizer import build_clip_tokenizer  # noqa: PLC0415

    meta, unet_sd, text_sd = _read_save(weights)
    unet, text = make_unet(meta["size"]), make_text_encoder(meta["size"], text_layers(text_sd))
    unet.load_state_dict(unet_sd)
    text.load_state_dict(text_sd)
    # built from the architecture + weights, not from_pretrained: a re-saved config would record
    # this machine's path (`_name_or_path`)
    vae = make_vae()
    vae.load_state_dict({k: v.float() for k, v in load_file(str(base / "vae" / "diffusion_pytorch_model.safetensors")).items()})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=make_scheduler("pndm"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    base_training = json.loads((base / "training.json").read_text()) if (base / "training.json").exists() else {}
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    if guidance is not None:
        (staging / "dgq_defaults.json").write_text(json.dumps({"guidance": float(guidance)}, indent=1))
    elif (base / "dgq_defaults.json").exists():
        (staging / "dgq_defaults.json").write_text((base / "dgq_defaults.json").read_text())
    runs = meta.get("history", []) + [_run_record(meta)]
    (staging / "training.json").write_text(json.dumps({
        "unet_samples": sum(r["samples"] for r in runs), "unet_seconds": sum(r["seconds"] for r in runs),
        "size": meta["size"], "runs": runs, "schedule": meta.get("schedule", "cosine"),
        "hardware": meta["device"], "curve_of_last_run": meta.get("curve", []),
        "vae": "reused from the previous shipped model", "vae_steps": base_training.get("vae_steps"),
    }, indent=2))
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)
    log.info("exported %s (%s, %d samples) to %s", weights, meta["size"], meta["samples"], out)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dgq.tiny.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="render + encode latents, then train each size in parallel")
    t.add_argument("--sizes", default="s,m,mt", help="comma-separated dgq.tiny.models.ARCHS names")
    t.add_argument("--seconds", type=float, default=360.0, help="wall-clock training budget per size")
    t.add_argument("--n-latents", type=int, default=1_000_000)
    t.add_argument("--batch", type=int, default=512)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--save-every", type=float, default=120.0, help="seconds between saves + quick scores")
    t.add_argument("--eval-n", type=int, default=240, help="held-out prompts per quick score (0: none)")
    t.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="render processes")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--base", default=str(DEFAULT_BASE), help="pipeline folder whose VAE/tokenizer are reused")
    t.add_argument("--out", default="runs/gpu")
    t.add_argument("--latents", default=None, help="latents file (default: <out>/latents.safetensors)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", default=None, help="continue from saved weights of the same size (one size only)")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="learning-rate schedule")
    t.add_argument("--keep-saves", action="store_true", help="also keep every save as <size>-<k samples>k")
    t.add_argument("--eval-guidance", default="7.5", help="comma-separated guidance scales of the quick scores")
    t.add_argument("--p-uncond", type=float, default=0.1, help="caption dropout share (--uncond dropout)")
    t.add_argument("--uncond", choices=["dropout", "paired"], default="dropout",
                   help="how the unconditional branch is trained (see train_size)")
    t.add_argument("--distill-below", type=int, default=0,
                   help="paired: the unconditional branch follows the conditional one below this t / 2 (0: off)")
    t.add_argument("--t-sampling", choices=["mixed", "uniform"], default="mixed")
    t.add_argument("--guided", default=None, metavar="S:E",
                   help="paired: at low noise train the conditional branch so that guidance S acts like E")
    t.add_argument("--guided-below", type=int, default=700, help="--guided applies below this t (ramped from t/2)")
    t.add_argument("--guided-full", type=float, default=None,
                   help="--guided is complete below this t (default: --guided-below / 2)")
    t.add_argument("--guided-weight", type=float, default=0.0,
                   help="with --guided: weight of the guided prediction's own error (see train_size)")
    t.add_argument("--teacher", default=None,
                   help="paired: regress both branches onto this frozen model (a save or an exported folder)")
    t.add_argument("--warmup", type=int, default=300, help="linear learning-rate warm-up steps")
    t.add_argument("--t-max", type=int, default=None, help="uniform: draw timesteps below this one only")
    t.add_argument("--ema-decay", type=float, default=0.9995)
    t.add_argument("--eval-seed", type=int, default=None,
                   help="renderer seed of the first quick-score prompt (default: the held-out prompts)")
    t.add_argument("--text-encoder", default=None,
                   help="CLIPTextModel folder to condition on, frozen (e.g. the domain CLIP's text tower)")
    t.add_argument("--captions", choices=["template", "train"], default="template",
                   help="template: the latents file's captions; train: dgq.tiny.captions.training_caption")
    t.add_argument("--paraphrase-p", type=float, default=0.5, help="--captions train: share of paraphrases")
    t.add_argument("--background-p", type=float, default=1.0, help="--captions train: share naming the background")
    t.add_argument("--threads", type=int, default=None, help="torch threads of each worker")
    t.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    la = sub.add_parser("latents", help="only render + encode the latents file (shared by several runs)")
    la.add_argument("--n", type=int, default=1_000_000)
    la.add_argument("--out", required=True)
    la.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    la.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    la.add_argument("--base", default=str(DEFAULT_BASE))
    e = sub.add_parser("export", help="save trained weights as a StableDiffusionPipeline folder")
    e.add_argument("--weights", required=True)
    e.add_argument("--out", default=str(DEFAULT_BASE))
    e.add_argument("--base", default=str(DEFAULT_BASE))
    e.add_argument("--guidance", type=float, default=None, help="the model's default CFG scale (dgq_defaults.json)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    base = Path(a.base)
    guided = None
    if getattr(a, "guided", None):
        try:
            guided = tuple(float(v) for v in a.guided.split(":"))
            _check_guided(guided)
        except ValueError as e:
            p.error(f"--guided {a.guided!r}: expected S:E with S > 1 and E > 0, such as 7.5:2 ({e})")
    if a.cmd == "export":
        export(Path(a.weights), Path(a.out), base, a.guidance)
        return
    if a.cmd == "latents":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        make_latents(base, a.n, Path(a.out), a.device, a.procs)
        return
    from dgq.tiny.models import ARCHS  # noqa: PLC0415

    sizes = [s for s in a.sizes.split(",") if s]
    bad = [s for s in sizes if s not in ARCHS]
    if bad:
        p.error(f"unknown sizes {bad}; allowed: {', '.join(ARCHS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lat = Path(a.latents) if a.latents else out / "latents.safetensors"
    if a.worker:
        train_size(a.worker, lat, base, out, a.seconds, a.batch, a.lr, a.device, a.seed, a.save_every, a.eval_n,
                   schedule=a.schedule, keep_saves=a.keep_saves,
                   eval_guidance=tuple(float(g) for g in a.eval_guidance.split(",") if g),
                   init=Path(a.init) if a.init else None, p_uncond=a.p_uncond, uncond=a.uncond,
                   distill_below=a.distill_below, t_sampling=a.t_sampling, ema_decay=a.ema_decay,
                   eval_seed=a.eval_seed, t_max=a.t_max, guided_below=a.guided_below, warmup=a.warmup,
                   guided=guided, guided_full=a.guided_full, guided_weight=a.guided_weight, teacher=Path(a.teacher) if a.teacher else None,
                   text_encoder=Path(a.text_encoder) if a.text_encoder else None, captions=a.captions,
                   paraphrase_p=a.paraphrase_p, background_p=a.background_p, threads=a.threads)
        return
    if a.init and len(sizes) != 1:
        p.error("--init continues one size: give exactly one in --sizes")
    if not lat.exists():
        make_latents(base, a.n_latents, lat, a.device, a.procs)
    procs = []
    for s in sizes:
        cmd = [sys.executable, "-m", "dgq.tiny.train", "train", "--worker", s, "--sizes", s,
               "--seconds", str(a.seconds), "--batch", str(a.batch), "--lr", str(a.lr),
               "--save-every", str(a.save_every), "--eval-n", str(a.eval_n), "--device", a.device,
               "--base", str(base), "--out", str(out), "--latents", str(lat), "--seed", str(a.seed),
               "--schedule", a.schedule, "--eval-guidance", a.eval_guidance, "--p-uncond", str(a.p_uncond),
               "--uncond", a.uncond, "--distill-below", str(a.distill_below), "--t-sampling", a.t_sampling,
               "--ema-decay", str(a.ema_decay)] + (["--keep-saves"] if a.keep_saves else [])
        cmd += ["--eval-seed", str(a.eval_seed)] if a.eval_seed is not None else []
        cmd += ["--t-max", str(a.t_max)] if a.t_max is not None else []
        cmd += ["--guided", a.guided, "--guided-below", str(a.guided_below)] if a.guided else []
        cmd += ["--guided-full", str(a.guided_full)] if a.guided_full is not None else []
        cmd += ["--teacher", a.teacher] if a.teacher else []
        cmd += ["--guided-weight", str(a.guided_weight)] if a.guided_weight else []
        cmd += ["--warmup", str(a.warmup), "--captions", a.captions, "--paraphrase-p", str(a.paraphrase_p),
                "--background-p", str(a.background_p)]
        cmd += ["--text-encoder", a.text_encoder] if a.text_encoder else []
        cmd += ["--threads", str(a.threads)] if a.threads else []
        cmd += ["--init", a.init] if a.init else []
        procs.append((s, subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "2"})))
    failed = [(s, pr.wait()) for s, pr in procs]
    failed = [(s, rc) for s, rc in failed if rc]
    if failed:
        raise SystemExit(f"sizes failed: {failed}")


if __name__ == "__main__":
    main()

"""The domain CLIP: a contrastive text–image model of the shapes domain, SD's text encoder for it.

SD v1.x conditions its UNet on the last hidden state of OpenAI's CLIP text tower, trained
contrastively and then frozen. The embedded model does the same with this model:

* text tower: a `CLIPTextModel` (causal, 77 tokens, SD's tokenizer, final layer norm) — the
  pipeline's `text_encoder`, frozen while the UNet trains;
* image tower: a small `CLIPVisionModel` (ViT, 16×16 patches of the 64×64 renders);
* symmetric InfoNCE over the batch with CLIP's learned temperature (`CLIPModel(return_loss=True)`),
  on renders and captions drawn from `dgq.tiny.captions` (template, paraphrases, backgrounds
  named or not), light noise/blur augmentation so generated images score like renders.

Stored once: the text tower's tensors are `assets/tiny-sd/text_encoder`, so `assets/tiny-clip`
holds the CLIPModel config, the image tower, both projections and the temperature, and a JSON file
naming the text tower with its SHA-256. `load_domain_clip` joins the two into one `CLIPModel` and
refuses a text tower whose checksum differs (a retrained pipeline with a stale CLIP).
`export --full OUT` writes a standalone `CLIPModel` folder.

    python -m dgq.tiny.clip train --init-text runs/base --seconds 600 --out runs/clip
    python -m dgq.tiny.clip export --weights runs/clip/clip.safetensors --text-out assets/tiny-sd/text_encoder \
        --out assets/tiny-clip
    python -m dgq.tiny.clip test          # ranking accuracy on fresh renders
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dgq.fingerprint import file_sha256
from dgq.paths import TINY_CLIP_DIR, TINY_DIR

log = logging.getLogger("dgq.tiny.clip")
CLIP_DIR = TINY_CLIP_DIR
TEXT_TOWER_FILE = "text_tower.json"
CLIP_TRAIN_SEED = 20_000_000  # renders of CLIP training: 2·10^7 onwards (no other data set uses them)
CLIP_TEST_SEED = 96_000_000  # fresh renders of the ranking test
TRAIN_TOKENS = 40  # causal text tower: positions < 40 are exact without the padding after them
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


def make_clip(text_config: Any) -> Any:
    """A `CLIPModel` whose text tower has `text_config` (the pipeline's) and a small ViT image tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig  # noqa: PLC0415

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                              image_size=64, patch_size=16, num_channels=3, hidden_act="quick_gelu",
                              projection_dim=text_config.projection_dim)
    cfg = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                     projection_dim=text_config.projection_dim)
    return CLIPModel(cfg)


def pixels(images: Any) -> torch.Tensor:
    """Images (PIL list, uint8 NHWC array or [-1, 1] NCHW tensor) as the image tower's input."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        from dgq.tiny.evaluator import to_uint8_batch  # noqa: PLC0415

        arr = to_uint8_batch(images)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (64, 64):
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x  # mean 0.5 / std 0.5 normalisation of [0, 1] values is exactly [-1, 1]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and blur of the strength a sampler leaves, so generated images are read like renders."""
    b = x.shape[0]
    amt = torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    x = x + amt * torch.randn(x.shape, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0]) / 4
        w = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), w, groups=3)
    return x.clamp(-1, 1)


def _render(seeds: Sequence[int]) -> torch.Tensor:
    from dgq.tiny import render as R  # noqa: PLC0415

    arr = np.stack([R.to_array(R.render(_scene(s))) for s in seeds])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _scene(seed: int):
    from dgq.tiny.captions import scene_of  # noqa: PLC0415

    return scene_of(seed)


def train(out: Path, seconds: float, init_text: Path | None, n_images: int = 40_000, batch: int = 256,
          lr: float = 1e-3, text_lr: float = 3e-4, seed: int = 0, paraphrase_p: float = 0.5,
          background_p: float = 0.5, threads: int | None = None, init: Path | None = None,
          freeze_text: bool = False, text_layers: int | None = None, device: str = "cpu") -> dict:
    """Train the domain CLIP for `seconds`; writes `out/clip.safetensors` (atomically, at the end and
    every 2 minutes) and returns the last log point. `init_text`: a pipeline folder or trainer save
    whose text encoder starts the text tower (the base model's), else random. `init`: an earlier
    `clip.safetensors` to continue from (fresh optimizer and schedule). `freeze_text`: train the
    image tower, both projections and the temperature only — the text tower stays as it is, so a
    UNet already training on it keeps its conditioning. `text_layers`: a text tower of that depth
    (width 64 as the pipeline's; with `init_text`, the layers both have start from it, the rest
    random). `device`: where the model trains (renders and augmentation stay on the CPU)."""
    from transformers import CLIPTokenizer  # noqa: PLC0415

    from dgq.tiny.captions import training_caption  # noqa: PLC0415
    from dgq.tiny.models import make_text_encoder  # noqa: PLC0415
    from dgq.tiny.train import atomic_save, load_weights  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    text = make_text_encoder("m", text_layers)
    if init_text is not None:
        _, text_sd, _, _ = load_weights(init_text)
        missing, unexpected = text.load_state_dict(text_sd, strict=text_layers is None)
        if len(unexpected) == len(text_sd):
            raise ValueError(f"no tensor of {init_text}'s text encoder fits the text tower")
        if missing or unexpected:
            log.info("text tower: %d tensors from %s, %d new, %d of it unused", len(text_sd) - len(unexpected),
                     init_text, len(missing), len(unexpected))
    model = make_clip(text.config)
    model.text_model.load_state_dict(text.state_dict())
    if init is not None:
        model.load_state_dict(load_file(str(init)))
    model.to(device)
    tok = CLIPTokenizer.from_pretrained(str(TINY_DIR / "tokenizer"))
    t0 = time.time()
    seeds = list(range(CLIP_TRAIN_SEED, CLIP_TRAIN_SEED + n_images))
    images = torch.cat([_render(seeds[i:i + 2048]) for i in range(0, n_images, 2048)])
    scenes = [_scene(s) for s in seeds]
    log.info("rendered %d images in %.0fs", n_images, time.time() - t0)
    if freeze_text:
        model.text_model.requires_grad_(False)
    text_params = [p for p in model.text_model.parameters() if p.requires_grad] + [model.text_projection.weight]
    other = [p for n, p in model.named_parameters() if not n.startswith(("text_model.", "text_projection."))]
    # no weight decay on the text tower: it would shrink the embeddings of the tokens no caption uses
    opt = torch.optim.AdamW([{"params": text_params, "lr": text_lr, "base": text_lr, "weight_decay": 0.0},
                             {"params": other, "lr": lr, "base": lr}], weight_decay=0.02)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    step, t0, last_save, point = 0, time.time(), time.time(), {}
    # what every save records besides the step and the last log point
    run = {"batch": batch, "paraphrase_p": paraphrase_p, "background_p": background_p, "n_images": n_images,
           "first_seed": CLIP_TRAIN_SEED, "history": [], "init_text": str(init_text) if init_text else None,
           "device": device,
           "config": model.config.to_dict()}
    accs: list[float] = []
    losses: list[float] = []
    while time.time() - t0 < seconds:
        frac = (time.time() - t0) / seconds
        for g in opt.param_groups:
            g["lr"] = g["base"] * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        caps = [training_caption(scenes[i], rng, paraphrase_p, background_p) for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=TRAIN_TOKENS, truncation=True, return_tensors="pt")
        o = model(input_ids=ids.input_ids.to(device), pixel_values=_augment(images[idx], gen).to(device),
                  return_loss=True)
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(o.loss.item())
        accs.append((o.logits_per_image.argmax(1).cpu() == torch.arange(batch)).float().mean().item())
        if step % 100 == 0:
            point = {"step": step, "seconds": round(time.time() - t0), "loss": float(np.mean(losses)),
                     "batch_acc": float(np.mean(accs)), "temperature": float(1 / model.logit_scale.exp())}
            log.info("clip step %d loss %.3f batch acc %.3f T %.4f (%.1f steps/s)", step, point["loss"],
                     point["batch_acc"], point["temperature"], step / (time.time() - t0))
            losses.clear()
            accs.clear()
        if time.time() - last_save > 120:
            _save_train(model, out, {**run, "step": step, "last": point}, atomic_save)
            last_save = time.time()
    _save_train(model, out, {**run, "step": step, "last": point}, atomic_save)
    return point


def _save_train(model, out: Path, meta: dict, atomic_save) -> None:
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "clip.safetensors", meta)


# ----------------------------------------------------------------------------- shipped folder
def export(weights: Path, out: Path, text_out: Path | None, full: bool = False) -> None:
    """Write the CLIP folder from a training save.

    `text_out`: the pipeline's text_encoder folder to (re)write with the text tower (fp16, as the
    pipeline ships it). `full`: a standalone CLIPModel folder with the text tower inside instead of
    the shared-tower layout.
    """
    from safetensors import safe_open  # noqa: PLC0415
    from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415

    with safe_open(str(weights), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    model = CLIPModel(CLIPConfig(**meta["config"]))
    model.load_state_dict(load_file(str(weights)))
    model = model.half()
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    if full:
        model.save_pretrained(str(staging), safe_serialization=True)
    else:
        if text_out is None:
            raise ValueError("the shared-tower layout needs --text-out (the pipeline's text_encoder folder)")
        from transformers import CLIPTextModel  # noqa: PLC0415

        text = CLIPTextModel(model.config.text_config)
        text.load_state_dict(model.text_model.state_dict())
        text = text.half()
        text_staging = text_out.with_name(text_out.name + ".staging")
        if text_staging.exists():
            shutil.rmtree(text_staging)
        text.save_pretrained(str(text_staging), safe_serialization=True)
        _replace(text_staging, text_out)
        staging.mkdir(parents=True)
        model.config.save_pretrained(str(staging))
        rest = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("text_model.")}
        save_file(rest, str(staging / "model.safetensors"), metadata={"format": "pt"})
        rel = os.path.relpath(text_out, out)
        (staging / TEXT_TOWER_FILE).write_text(json.dumps({
            "text_tower": rel, "sha256": file_sha256(text_out / "model.safetensors"),
            "why": "the text tower's tensors are stored once, as the pipeline's frozen text_encoder"}, indent=1))
    (staging / "training.json").write_text(json.dumps({k: meta[k] for k in meta if k != "config"}, indent=1))
    _replace(staging, out)
    log.info("exported %s to %s", weights, out)


def _replace(staging: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def load_domain_clip(path: str | Path | None = None, device: str = "cpu") -> Any:
    """The domain `CLIPModel` (fp32, eval mode) from its folder (default `assets/tiny-clip`).

    A folder with `text_tower.json` takes its text tower from the pipeline folder it names and
    checks its SHA-256; a standalone CLIPModel folder loads as it is. Raises FileNotFoundError or
    ValueError with the reason, never returns a model with random towers.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel  # noqa: PLC0415

    path = Path(path or CLIP_DIR)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no domain CLIP at {path} (config.json missing)")
    link = path / TEXT_TOWER_FILE
    if not link.is_file():
        return CLIPModel.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    info = json.loads(link.read_text())
    text_dir = (path / info["text_tower"]).resolve()
    text_file = text_dir / "model.safetensors"
    if not text_file.is_file():
        raise FileNotFoundError(f"the domain CLIP's text tower {text_dir} is missing")
    if file_sha256(text_file) != info["sha256"]:
        raise ValueError(f"{text_file} is not the text tower {path} was trained with (SHA-256 differs): "
                         "re-export the CLIP with the pipeline's text encoder")
    model = CLIPModel(CLIPConfig.from_pretrained(str(path)))
    rest = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in rest.items()}, strict=False)
    if unexpected or any(not k.startswith("text_model.") for k in missing):
        raise ValueError(f"{path}/model.safetensors does not match its config ({unexpected or missing})")
    text = CLIPTextModel.from_pretrained(str(text_dir), dtype=torch.float32)
    model.text_model.load_state_dict(text.state_dict())
    return model.float().to(device).eval()


def _features(out: Any) -> torch.Tensor:
    """Projected embeddings from `get_*_features` (a tensor, or an output object in transformers 5)."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


class DomainClipScorer:
    """CLIP score with the domain CLIP: the `ClipScorer` interface (`similarities`, `score`,
    `description`), so `eval` and the app score the embedded model through the same code path."""

    batch_size = 256

    def __init__(self, path: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import CLIPTokenizer  # noqa: PLC0415

        self.path = Path(path or CLIP_DIR)
        self.model = load_domain_clip(self.path, device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(TINY_DIR / "tokenizer"))
        self.device = device
        self.random_weights = False
        self.description = f"domain CLIP from {self.path}"

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids)), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        x = pixels(images).to(self.device)
        return F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1)

    def similarities(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        from dgq.similarity import paired_cosines  # noqa: PLC0415

        prompts = list(prompts)
        x = pixels(images)
        return paired_cosines(len(x), prompts, self.batch_size,
                              lambda chunk: (self.embed_images(x[chunk]), self.embed_text(prompts[chunk])))

    def score(self, images: Any, prompts: Sequence[str]) -> float:
        return float(np.mean(self.similarities(images, prompts)))


def ranking_accuracy(scorer: DomainClipScorer, n: int = 500, group: int = 50, first_seed: int = CLIP_TEST_SEED,
                     paraphrased: bool = False) -> float:
    """Share of fresh renders whose own caption ranks first among the captions of `group` renders
    (captions of scenes with the same facts count as the same caption)."""
    from dgq.tiny import render as R  # noqa: PLC0415
    from dgq.tiny.captions import paraphrase, scene_of  # noqa: PLC0415

    seeds = list(range(first_seed, first_seed + n))
    images = _render(seeds)
    scenes = [scene_of(s) for s in seeds]
    caps = [paraphrase(sc, random.Random(s)) if paraphrased else R.caption(sc, random.Random(s))
            for sc, s in zip(scenes, seeds)]
    keys = [(sc.objects, sc.background, sc.relation) for sc in scenes]
    hits = 0
    for g in range(0, n, group):
        img = scorer.embed_images(images[g:g + group])
        txt = scorer.embed_text(caps[g:g + group])
        sim = img @ txt.T
        for i in range(sim.shape[0]):
            best = int(sim[i].argmax())
            hits += keys[g + best] == keys[g + i]
    return hits / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dgq.tiny.clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the domain CLIP")
    t.add_argument("--out", default="runs/clip")
    t.add_argument("--seconds", type=float, default=600)
    t.add_argument("--init-text", default=None, help="pipeline folder or trainer save whose text encoder starts the tower")
    t.add_argument("--n-images", type=int, default=40_000)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--text-lr", type=float, default=3e-4)
    t.add_argument("--paraphrase-p", type=float, default=0.5)
    t.add_argument("--background-p", type=float, default=0.5)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--init", default=None, help="a clip.safetensors to continue from")
    t.add_argument("--freeze-text", action="store_true", help="keep the text tower as it is (image side only)")
    t.add_argument("--text-layers", type=int, default=None, help="text tower depth (default: the pipeline's, 2)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = sub.add_parser("export", help="write the CLIP folder (and the pipeline's text encoder) from a save")
    e.add_argument("--weights", required=True)
    e.add_argument("--out", default=str(CLIP_DIR))
    e.add_argument("--text-out", default=None, help="the pipeline's text_encoder folder to write")
    e.add_argument("--full", action="store_true", help="a standalone CLIPModel folder (text tower inside)")
    r = sub.add_parser("test", help="ranking accuracy on fresh renders")
    r.add_argument("--clip", default=None)
    r.add_argument("--n", type=int, default=1000)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.cmd == "train":
        train(Path(a.out), a.seconds, Path(a.init_text) if a.init_text else None, a.n_images, a.batch, a.lr,
              a.text_lr, paraphrase_p=a.paraphrase_p, background_p=a.background_p, threads=a.threads,
              init=Path(a.init) if a.init else None, freeze_text=a.freeze_text, text_layers=a.text_layers,
              device=a.device)
    elif a.cmd == "export":
        export(Path(a.weights), Path(a.out), Path(a.text_out) if a.text_out else None, a.full)
    else:
        scorer = DomainClipScorer(a.clip)
        res = {"template": ranking_accuracy(scorer, a.n), "paraphrased": ranking_accuracy(scorer, a.n, paraphrased=True)}
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

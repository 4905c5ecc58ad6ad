"""An attribute classifier for the shapes domain: the judge of what a generated image shows.

Why a classifier and not CLIP: the embedded model lives in a synthetic domain (flat shapes on flat
backgrounds at 64×64) where a general CLIP model is nearly blind to the details that quantization
breaks first — which colour went to which object, left vs. right, small vs. large. A small CNN
trained on the renderer's own output reads those attributes almost perfectly, so a drop in its
accuracy on generated images measures the generator, not the judge.

The network (`ShapesNet`) has one shared trunk and separate heads:

* ``count`` (1 or 2 objects) and ``background`` — for every image;
* ``color``, ``shape``, ``size``, ``position`` — meaningful only for single-object scenes;
* ``color0``, ``shape0``, ``color1``, ``shape1``, ``relation`` — only for two-object scenes, slot 0
  being the left/top object (the renderer's convention for ``Scene.objects[0]``).

Heads of the other count are trained with their loss masked out, so their outputs on an image of the
wrong count are meaningless; `Evaluator.score` therefore counts an object attribute as correct only
when the predicted count matches the prompt too.

Image inputs (`to_tensor_batch`) may be

* a PIL image or a list of PIL images (converted to RGB),
* a ``uint8`` numpy array HWC (one image) or NHWC (a batch), or a list of HWC arrays,
* a float ``torch.Tensor`` in [0, 1], CHW or NCHW (values outside [0, 1] raise: a [-1, 1] tensor
  straight out of a VAE is the usual mistake and would silently read as wrong colours).

Images that are not 64×64 are resized (bilinear, antialiased) to 64×64.

Seeds: evaluator training uses ``render`` seeds >= 50_000_000, its test set seeds >= 60_000_000;
the embedded model trains on seeds < 50_000_000, so the judge never saw the generator's data.

CLI::

    python -m dgq.tiny.evaluator train --out assets/evaluator
    python -m dgq.tiny.evaluator test  [--path assets/evaluator] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from dgq.paths import EVALUATOR_DIR
from dgq.tiny import render as R

log = logging.getLogger("dgq.tiny.evaluator")

FORMAT_VERSION = 1
IMAGE_SIZE = R.IMAGE_SIZE
TRAIN_SEED_START = 50_000_000
TEST_SEED_START = 60_000_000
WEIGHTS_NAME = "evaluator.safetensors"
CONFIG_NAME = "config.json"

#: Label vocabulary of every head, in logit order. Stored in config.json and checked on load, so a
#: change of the renderer's constants cannot silently permute the labels of shipped weights.
HEADS: dict[str, tuple[str, ...]] = {
    "count": ("1", "2"),
    "background": tuple(R.BACKGROUNDS),
    "color": tuple(R.COLORS),
    "shape": tuple(R.SHAPES),
    "size": tuple(R.SIZES),
    "position": tuple(R.POSITIONS),
    "color0": tuple(R.COLORS),
    "shape0": tuple(R.SHAPES),
    "color1": tuple(R.COLORS),
    "shape1": tuple(R.SHAPES),
    "relation": tuple(R.RELATIONS),
}
SINGLE_HEADS = ("color", "shape", "size", "position")
PAIR_HEADS = ("color0", "shape0", "color1", "shape1", "relation")
_IGNORE = -100


def default_path() -> Path:
    """The shipped weights: ``assets/evaluator`` (see `dgq.paths`)."""
    return EVALUATOR_DIR


# ----------------------------------------------------------------------------- image inputs
def to_tensor_batch(images: Any, size: int | None = IMAGE_SIZE) -> torch.Tensor:
    """Convert any supported image input (see module docstring) to float NCHW in [0, 1], resized to
    size×size (bilinear, antialiased) unless already that size; ``size=None`` keeps the resolution."""
    if isinstance(images, torch.Tensor):
        x = images.detach().to(torch.float32, copy=False).cpu()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a float tensor (N,3,H,W) or (3,H,W) in [0,1], got shape {tuple(x.shape)}")
        if images.dtype == torch.uint8:
            raise TypeError("uint8 tensors are ambiguous here; pass a uint8 numpy HWC array or a float tensor in [0,1]")
        lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float image tensors must lie in [0, 1]; got range [{lo:.3f}, {hi:.3f}]")
        x = x.clamp(0, 1)
    elif isinstance(images, Image.Image):
        x = _from_uint8(np.asarray(images.convert("RGB"), dtype=np.uint8)[None])
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 HWC/NHWC, got dtype {images.dtype}")
        arr = images[None] if images.ndim == 3 else images
        x = _from_uint8(arr)
    elif isinstance(images, Sequence):
        if len(images) == 0:
            return torch.zeros(0, 3, size or IMAGE_SIZE, size or IMAGE_SIZE)
        parts = [to_tensor_batch(im, size) for im in images]
        if len({p.shape[-2:] for p in parts}) > 1:
            raise ValueError("images of different sizes in one batch")
        return torch.cat(parts, 0)
    else:
        raise TypeError(f"unsupported image input type {type(images).__name__}")
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x.contiguous()


def to_uint8_batch(images: Any) -> np.ndarray:
    """Any supported image input as a uint8 NHWC array at its own resolution (no resizing)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return images[None] if images.ndim == 3 else images
    if isinstance(images, Image.Image):
        return np.asarray(images.convert("RGB"), dtype=np.uint8)[None]
    if isinstance(images, torch.Tensor):
        x = to_tensor_batch(images, size=None)
        return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if isinstance(images, Sequence):
        parts = [to_uint8_batch(im) for im in images]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError("images of different sizes in one batch")
        return np.concatenate(parts, 0) if parts else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    raise TypeError(f"unsupported image input type {type(images).__name__}")


def _from_uint8(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 HWC/NHWC RGB images, got shape {arr.shape}")
    return torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------- network
class ShapesNet(nn.Module):
    """Four conv stages (64→32→16→8→4 px), a flatten that keeps the 4×4 layout, one hidden layer.

    Flattening instead of global pooling keeps *where* things are, which position, relation and the
    slot order of a pair depend on. The hidden layer's activations are the "penultimate features"
    used for the domain FID.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), feature_dim: int = 256,
                 heads: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__()
        heads = heads or HEADS
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = cout
        self.trunk = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(channels)
        self.fc = nn.Linear(cin * side * side, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(labels)) for name, labels in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) for images in [0, 1]."""
        h = self.trunk((x - 0.5) * 2.0)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------- labels / data
def scene_labels(scene: R.Scene) -> dict[str, int]:
    """Class indices for every head; heads that do not apply to the scene's count get `_IGNORE`."""
    lab = {k: _IGNORE for k in HEADS}
    lab["count"] = len(scene.objects) - 1
    lab["background"] = HEADS["background"].index(scene.background)
    if len(scene.objects) == 1:
        o = scene.objects[0]
        lab["color"] = HEADS["color"].index(o.color)
        lab["shape"] = HEADS["shape"].index(o.shape)
        lab["size"] = HEADS["size"].index(o.size)
        lab["position"] = HEADS["position"].index(o.position)
    else:
        a, b = scene.objects
        lab["color0"] = HEADS["color0"].index(a.color)
        lab["shape0"] = HEADS["shape0"].index(a.shape)
        lab["color1"] = HEADS["color1"].index(b.color)
        lab["shape1"] = HEADS["shape1"].index(b.shape)
        lab["relation"] = HEADS["relation"].index(scene.relation)
    return lab


def render_batch(seeds: Sequence[int], two_object_prob: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render scenes for `seeds` (via `random_scene`) as float NCHW in [0,1] plus label tensors."""
    imgs, labels = [], []
    for s in seeds:
        scene = R.random_scene(random.Random(s), two_object_prob)
        imgs.append(R.to_array(R.render(scene)))
        labels.append(scene_labels(scene))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    y = {k: torch.tensor([lab[k] for lab in labels]) for k in HEADS}
    return x, y


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Perturbations that a generated image shows and a render does not, none that changes a label.

    Per image: gaussian blur (σ up to 1 px, half of the images), gaussian noise (σ up to ~8/255,
    half of the images), a brightness gain of ±2 % and a per-channel offset of at most 4/255, then
    uint8 quantisation. No flips or crops: left/right/top/bottom are labels.
    """
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # blur: separable 5-tap gaussian, per-image sigma; sigma≈0 leaves the image untouched
    sigma = torch.where(u(n) < 0.5, 0.3 + 0.7 * u(n), torch.full((n,), 1e-3))
    t = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (n*3, 5)
    h = x.reshape(1, n * 3, *x.shape[-2:])
    h = F.conv2d(F.pad(h, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * 3)
    h = F.conv2d(F.pad(h, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * 3)
    x = h.reshape_as(x)
    # colour: gain and per-channel offset of a few units
    gain = 1.0 + 0.04 * (u(n, 1, 1, 1) - 0.5)
    offset = (u(n, 3, 1, 1) - 0.5) * (8.0 / 255.0)
    x = x * gain + offset
    # noise
    noise_std = torch.where(u(n) < 0.5, u(n) * (8.0 / 255.0), torch.zeros(n))
    x = x + torch.randn(x.shape, generator=gen) * noise_std[:, None, None, None]
    return (x.clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------- evaluator
class Evaluator:
    """Inference wrapper around a trained `ShapesNet` (eval mode, no grad, batched)."""

    def __init__(self, model: ShapesNet, config: dict[str, Any] | None = None, device: str = "cpu",
                 batch_size: int = 256) -> None:
        # channels-last runs this small CNN ~1.6× faster on CPU (measured on the 2-core build machine)
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        self.config = config or {}
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, images: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x = to_tensor_batch(images)
        preds: dict[str, list[np.ndarray]] = {k: [] for k in self.model.heads}
        feats: list[np.ndarray] = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i:i + self.batch_size].to(self.device).contiguous(memory_format=torch.channels_last)
            f = self.model.features(xb)
            feats.append(f.cpu().numpy())
            for name, head in self.model.heads.items():
                preds[name].append(head(f).argmax(1).cpu().numpy())
        if x.shape[0] == 0:
            return {k: np.zeros(0, dtype=np.int64) for k in preds}, np.zeros((0, self.model.fc.out_features))
        return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)

    def predict_indices(self, images: Any) -> dict[str, np.ndarray]:
        """Arg-max class index of every head for every image (heads of the other count included)."""
        return self._run(images)[0]

    def predict(self, images: Any) -> list[dict[str, Any]]:
        """What each image shows, as read by the heads of its predicted object count.

        One object: ``{"count": 1, "background", "objects": [{"color","shape","size","position"}],
        "relation": None}``; two: ``{"count": 2, "background", "objects": [{"color","shape"}, {"color",
        "shape"}], "relation"}`` with ``objects[0]`` the left/top one.
        """
        return _readings(self.predict_indices(images))

    def predict_and_judge(self, images: Any, prompts: Sequence[str]) -> tuple[list[dict[str, Any]],
                                                                             list[dict[str, bool] | None]]:
        """`predict` and `judge` of the same images from one pass of the network (paired
        comparisons against FP need both)."""
        p = self.predict_indices(images)
        return _readings(p), _verdicts(p, prompts)

    def features(self, images: Any) -> np.ndarray:
        """Penultimate-layer features (N, feature_dim) float64, for the domain FID."""
        return self._run(images)[1].astype(np.float64)

    def judge(self, images: Any, prompts: Sequence[str]) -> list[dict[str, bool] | None]:
        """Per image, which of its prompt's asks it meets: ``{key: bool}`` with the keys of `score`
        that apply to the prompt's kind (``single_*`` or ``pair_*``, plus ``count``,
        ``background``, ``all``); None for a prompt outside the grammar. Why per image: paired
        comparisons (a quantized image against the FP image of the same seed) need the verdicts
        themselves, not their means.
        """
        return _verdicts(self.predict_indices(images), prompts)

    def score(self, images: Any, prompts: Sequence[str]) -> dict[str, float | int | None]:
        """Per-attribute accuracy of `images` against what each prompt asks.

        Prompts are parsed with `render.parse_caption`; those outside the grammar are counted in
        ``n_unparsed`` and left out of every accuracy (never guessed). Keys:

        * ``single_{count,color,shape,size,position,background,all}`` over single-object prompts;
        * ``pair_{count,colors,shapes,relation,background,all}`` over two-object prompts, where
          ``colors``/``shapes`` mean both slots right (slot 0 = left/top object, so a swapped pair
          is wrong: that is attribute binding);
        * ``count``, ``background``, ``all`` over all parsed prompts;
        * ``n``, ``n_unparsed``, ``n_single``, ``n_pair``.

        An object attribute counts only when the predicted object count matches the prompt's (the
        heads of the other count are untrained on such images). An accuracy with no prompts of its
        kind is ``None``.
        """
        judged = self.judge(images, prompts)
        hits: dict[str, list[bool]] = {}
        for j in judged:
            for k, ok in (j or {}).items():
                hits.setdefault(k, []).append(ok)
        keys = ["count", "background", "all"] + [f"single_{k}" for k in
                                                  ("count", *SINGLE_HEADS, "background", "all")] + [
            f"pair_{k}" for k in ("count", "colors", "shapes", "relation", "background", "all")]
        out: dict[str, float | int | None] = {
            "n": len(judged), "n_unparsed": sum(j is None for j in judged),
            "n_single": len(hits.get("single_count", [])), "n_pair": len(hits.get("pair_count", [])),
        }
        for k in keys:
            v = hits.get(k)
            out[k] = float(np.mean(v)) if v else None
        return out


def _readings(p: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """`Evaluator.predict`'s dicts from the heads' arg-max indices."""
    out = []
    for i in range(len(p["count"])):
        lab = lambda head: HEADS[head][int(p[head][i])]  # noqa: E731
        if p["count"][i] == 0:
            objs = [{"color": lab("color"), "shape": lab("shape"), "size": lab("size"),
                     "position": lab("position")}]
            out.append({"count": 1, "background": lab("background"), "objects": objs, "relation": None})
        else:
            objs = [{"color": lab("color0"), "shape": lab("shape0")},
                    {"color": lab("color1"), "shape": lab("shape1")}]
            out.append({"count": 2, "background": lab("background"), "objects": objs,
                        "relation": lab("relation")})
    return out


def _verdicts(p: dict[str, np.ndarray], prompts: Sequence[str]) -> list[dict[str, bool] | None]:
    """`Evaluator.judge`'s verdicts from the heads' arg-max indices."""
    prompts = list(prompts)
    if len(prompts) != len(p["count"]):
        raise ValueError(f"{len(p['count'])} images but {len(prompts)} prompts")
    out: list[dict[str, bool] | None] = []
    for i, prompt in enumerate(prompts):
        try:
            scene = R.parse_caption(prompt)
        except ValueError:
            out.append(None)
            continue
        got = {k: int(v[i]) for k, v in p.items()}
        want = scene_labels(scene)
        count_ok = got["count"] == want["count"]
        bg_ok = got["background"] == want["background"]
        hits: dict[str, bool] = {}
        if want["count"] == 0:
            attrs = {k: count_ok and got[k] == want[k] for k in SINGLE_HEADS}
            hits.update({f"single_{k}": ok for k, ok in attrs.items()})
            every = count_ok and bg_ok and all(attrs.values())
            hits.update(single_count=count_ok, single_background=bg_ok, single_all=every)
        else:
            colors = count_ok and got["color0"] == want["color0"] and got["color1"] == want["color1"]
            shapes = count_ok and got["shape0"] == want["shape0"] and got["shape1"] == want["shape1"]
            rel = count_ok and got["relation"] == want["relation"]
            every = count_ok and bg_ok and colors and shapes and rel
            hits.update(pair_count=count_ok, pair_colors=colors, pair_shapes=shapes, pair_relation=rel,
                        pair_background=bg_ok, pair_all=every)
        hits.update(count=count_ok, background=bg_ok, all=every)
        out.append({k: bool(v) for k, v in hits.items()})
    return out


def reading_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What reading `b` (`Evaluator.predict`'s dict for one image) shows differently from reading
    `a`, in words ("shape circle → square", "object 2 colour red → blue"); [] when the evaluator
    reads the same scene in both. Why: the app tells a user what quantization changed in an image,
    not only by how many dB."""
    if a["count"] != b["count"]:
        return [f"count {a['count']} → {b['count']}"]
    out = [f"background {a['background']} → {b['background']}"] if a["background"] != b["background"] else []
    two = a["count"] == 2
    for i, (oa, ob) in enumerate(zip(a["objects"], b["objects"])):
        for k in oa:
            if oa[k] != ob.get(k):
                out.append(f"{f'object {i + 1} ' if two else ''}{k} {oa[k]} → {ob.get(k)}")
    if a.get("relation") != b.get("relation"):
        out.append(f"relation {a.get('relation')} → {b.get('relation')}")
    return out


def load_evaluator(path: str | Path | None = None, device: str = "cpu") -> Evaluator:
    """Load shipped or trained weights: a directory with evaluator.safetensors + config.json, or the
    .safetensors file itself (config.json next to it). Default: `default_path()`."""
    p = Path(path) if path is not None else default_path()
    weights = p / WEIGHTS_NAME if p.is_dir() else p
    cfg_path = weights.parent / CONFIG_NAME
    if not weights.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"no evaluator weights at {p} (need {WEIGHTS_NAME} and {CONFIG_NAME}); "
                                f"train them with `python -m dgq.tiny.evaluator train --out {p}`")
    config = json.loads(cfg_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: unsupported format_version {config.get('format_version')}")
    heads = {k: tuple(v) for k, v in config["heads"].items()}
    if heads != HEADS:
        raise ValueError(f"{cfg_path}: label vocabulary differs from dgq.tiny.render's constants; "
                         "retrain the evaluator")
    model = ShapesNet(config["channels"], config["feature_dim"], heads)
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match the architecture (missing {missing}, "
                         f"unexpected {unexpected})")
    return Evaluator(model, config, device=device)


# ----------------------------------------------------------------------------- training
def _save(model: ShapesNet, config: dict[str, Any], out_dir: Path) -> None:
    """fp16 safetensors + JSON, each written to a temp file then `os.replace`d (atomic)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
               if v.is_floating_point()}
    tmp = out_dir / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "dgq-evaluator", "format_version": str(FORMAT_VERSION)})
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; these are shipped in the repository
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    tmp = out_dir / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / CONFIG_NAME)


def fresh_renders(n: int = 2000, seed_start: int = TEST_SEED_START) -> tuple[list[Image.Image], list[str]]:
    """Fresh renders and captions from `render.sample` (default two-object rate), disjoint seeds."""
    images, prompts = [], []
    for s in range(seed_start, seed_start + n):
        _, cap, img = R.sample(s)
        images.append(img)
        prompts.append(cap)
    return images, prompts


def evaluate(evaluator: Evaluator, n: int = 2000, seed_start: int = TEST_SEED_START,
             augmented: bool = False) -> dict[str, float | int | None]:
    """`Evaluator.score` on `n` fresh renders (optionally with training-style augmentation)."""
    images, prompts = fresh_renders(n, seed_start)
    if augmented:
        x = to_tensor_batch(images)
        x = augment(x, torch.Generator().manual_seed(seed_start))
        return evaluator.score(x, prompts)
    return evaluator.score(images, prompts)


def train_evaluator(out_dir: str | Path, *, steps: int = 1100, batch_size: int = 64, lr: float = 3e-3,
                    weight_decay: float = 1e-4, two_object_prob: float = 0.5,
                    seed_start: int = TRAIN_SEED_START, max_seconds: float = 330.0, threads: int | None = 1,
                    channels: Sequence[int] = (16, 32, 64, 128), feature_dim: int = 256,
                    test_n: int = 2000, log_every: int = 100) -> dict[str, Any]:
    """Train on freshly rendered, augmented batches and write fp16 safetensors + config.json.

    Data is rendered on the fly (≈0.3 ms per image, cheap next to the network), seed
    ``seed_start + step * batch_size + i``, so no image repeats and none comes from the generator's
    seed range. Pairs are oversampled (`two_object_prob` 0.5 vs. the renderer's 0.3) because their
    five heads learn from pairs only. One-cycle schedule (warm-up, cosine decay) over `steps`; if
    `max_seconds` runs out first the schedule is compressed to end on time (the CPU is shared with
    other jobs, so step time is not predictable). `threads=1` leaves the other core to them.

    Returns the config written, including the fp16 weights' accuracy on `test_n` fresh renders.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    torch.manual_seed(seed_start)
    gen = torch.Generator().manual_seed(seed_start)
    model = ShapesNet(channels, feature_dim).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    t0 = time.monotonic()
    step, progress, losses = 0, 0.0, []
    model.train()
    while progress < 1.0:
        # progress drives the schedule: by step count, or by the clock if that runs out sooner
        elapsed = time.monotonic() - t0
        progress = max(step / steps, elapsed / max_seconds)
        if progress >= 1.0:
            break
        frac_warm = warm / steps
        if progress < frac_warm:
            cur_lr = lr * progress / frac_warm
        else:
            cur_lr = lr * 0.5 * (1 + math.cos(math.pi * (progress - frac_warm) / (1 - frac_warm)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        seeds = range(seed_start + step * batch_size, seed_start + (step + 1) * batch_size)
        x, y = render_batch(seeds, two_object_prob)
        x = augment(x, gen).contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y[k], ignore_index=_IGNORE)
                   for k in HEADS if (y[k] != _IGNORE).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % log_every == 0:
            log.info("step %d  loss %.4f  lr %.2e  %.0fs", step, float(np.mean(losses[-log_every:])), cur_lr,
                     time.monotonic() - t0)
    train_seconds = time.monotonic() - t0
    if step < steps:
        log.warning("time budget of %.0fs reached after %d of %d steps", max_seconds, step, steps)
    model = model.to(memory_format=torch.contiguous_format).eval()
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "architecture": "ShapesNet",
        "channels": list(channels),
        "feature_dim": feature_dim,
        "image_size": IMAGE_SIZE,
        "input": "float NCHW RGB in [0,1]",
        "heads": {k: list(v) for k, v in HEADS.items()},
        "training": {
            "steps": step, "planned_steps": steps, "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "two_object_prob": two_object_prob,
            "seed_start": seed_start, "seed_end": seed_start + step * batch_size,
            "seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "augmentation": "blur sigma<=1px (p=.5), noise sigma<=8/255 (p=.5), gain +-2%, "
                            "offset +-4/255 per channel, uint8 quantisation; no flips",
        },
    }
    _save(model, config, out)
    # measure the accuracy of what was shipped (fp16 weights), then record it in the config
    ev = load_evaluator(out)
    config["test"] = {"n": test_n, "seed_start": TEST_SEED_START,
                      "clean": evaluate(ev, test_n), "augmented": evaluate(ev, test_n, augmented=True)}
    _save(model, config, out)
    log.info("trained in %.0fs (%d steps); test accuracy %s", train_seconds, step, config["test"]["clean"])
    return config


# ----------------------------------------------------------------------------- CLI
def _print_scores(title: str, scores: dict[str, float | int | None]) -> None:
    print(title)
    for k, v in scores.items():
        print(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dgq.tiny.evaluator", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the attribute classifier")
    tr.add_argument("--out", default=str(default_path()))
    tr.add_argument("--steps", type=int, default=1100)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--max-seconds", type=float, default=330.0)
    tr.add_argument("--threads", type=int, default=1)
    te = sub.add_parser("test", help="per-attribute accuracy on fresh renders")
    te.add_argument("--path", default=None)
    te.add_argument("--n", type=int, default=2000)
    te.add_argument("--seed-start", type=int, default=TEST_SEED_START)
    te.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "train":
        cfg = train_evaluator(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              max_seconds=args.max_seconds, threads=args.threads)
        print(f"wrote {args.out} ({cfg['training']['steps']} steps, {cfg['training']['seconds']} s)")
        _print_scores("clean renders:", cfg["test"]["clean"])
        _print_scores("augmented renders:", cfg["test"]["augmented"])
        return 0
    torch.set_num_threads(args.threads)
    ev = load_evaluator(args.path)
    t = time.monotonic()
    _print_scores(f"clean renders (n={args.n}, seeds {args.seed_start}+):", evaluate(ev, args.n, args.seed_start))
    _print_scores("augmented renders:", evaluate(ev, args.n, args.seed_start, augmented=True))
    print(f"({time.monotonic() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

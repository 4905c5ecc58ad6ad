"""Image metrics of DGQ Studio: fidelity to the full-precision model and to the prompt.

Importing this module touches neither the network nor a GPU; heavy libraries (open_clip,
torchvision) are imported only when a scorer is built.

Result convention (so a report can never show a made-up number): a metric is a ``float``, or, when
it cannot be computed here — weights not on this machine, an evaluator not trained — a string that
starts with ``"unavailable: "`` and says why and what to pass. Constructors raise
`MetricUnavailable` (whose message is that string); ``try_load`` class methods and the plain
functions `clip_score` / `fid` return it instead.

* `psnr`, `ssim` — per-image against a reference image (typically the full-precision model's output
  for the same prompt and seed), averaged. uint8 RGB semantics: data range 255.
* `domain_fid` — Fréchet distance in the feature space of the shapes-domain evaluator
  (`dgq.tiny.evaluator`), references fresh renders. Cheap and meaningful for the embedded model.
* `ClipScorer` — open_clip cosine similarity of image and prompt (a plain cosine in [-1, 1], *not*
  ×100: the DGQ paper's ~0.30 for SD is on this scale). Never downloads.
* `FidScorer` — standard FID with the pytorch-fid InceptionV3 (TF-ported FID weights,
  ``pt_inception-2015-12-05-6726825d.pth``). Never downloads. torchmetrics' FID was not used
  because it needs torch-fidelity and fetches its weights from the internet.

Images may be anything `dgq.tiny.evaluator.to_tensor_batch` accepts: PIL images, uint8 numpy
HWC/NHWC arrays, float tensors in [0, 1] CHW/NCHW, or lists of these.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dgq.similarity import paired_cosines
from dgq.tiny.evaluator import Evaluator, load_evaluator, to_tensor_batch, to_uint8_batch

log = logging.getLogger("dgq.metrics")

UNAVAILABLE = "unavailable: "
MetricValue = float | str
#: Seeds of the renders `domain_fid` compares against (disjoint from the generator's training seeds
#: < 50M, the evaluator's training seeds 50M+ and its test seeds 60M+).
DOMAIN_FID_REF_SEED = 70_000_000
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed on this machine; ``str(exc)`` starts with ``"unavailable: "``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason if reason.startswith(UNAVAILABLE) else UNAVAILABLE + reason)

    @property
    def reason(self) -> str:
        return str(self)


def is_unavailable(value: Any) -> bool:
    """True for an ``"unavailable: ..."`` metric result."""
    return isinstance(value, str) and value.startswith(UNAVAILABLE)


# ----------------------------------------------------------------------------- PSNR / SSIM
def _pair_tensors(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_uint8_batch(a), to_uint8_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    tx = torch.from_numpy(np.array(x, copy=True)).permute(0, 3, 1, 2).to(torch.float64)
    ty = torch.from_numpy(np.array(y, copy=True)).permute(0, 3, 1, 2).to(torch.float64)
    return tx, ty


def psnr(a: Any, b: Any, reduction: str = "mean") -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB of uint8 RGB images (data range 255), per image pair.

    ``reduction="mean"`` averages the per-image values (the usual convention for "PSNR to the FP
    model"), ``"none"`` returns them. Identical images give ``inf`` (and so does a mean containing
    one); no epsilon is added, because a finite cap would be a made-up number. Computed in float64
    (10·log10(255²/MSE)), the same formula as torchmetrics' but without its float32 rounding.
    """
    x, y = _pair_tensors(a, b)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).numpy()
    with np.errstate(divide="ignore"):
        vals = 10.0 * np.log10(255.0 ** 2 / mse)
    return vals if reduction == "none" else float(np.mean(vals))


def ssim(a: Any, b: Any, reduction: str = "mean") -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004) of uint8 RGB images, per image pair, averaged unless
    ``reduction="none"``. Identical images give 1.

    Standard constants: gaussian window 11×11, σ 1.5, K1 0.01, K2 0.03, data range 255, population
    statistics, per channel. Borders follow torchmetrics (reflect-pad by 5, average the whole map),
    so the numbers equal torchmetrics' `structural_similarity_index_measure(data_range=255)`
    (checked to 1e-9 with torchmetrics 1.9) without importing torchmetrics, which takes ~10 s here.
    skimage instead averages only the windows that fit inside the image, which at 64×64 gives
    noticeably different values — compare SSIMs only from the same implementation.
    """
    x, y = _pair_tensors(a, b)
    n, c, h, w = x.shape
    if min(h, w) < 11:
        raise ValueError(f"SSIM needs images of at least 11×11 pixels, got {h}×{w}")
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(t ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.pad(z.reshape(n * c, 1, h, w), (5, 5, 5, 5), mode="reflect")
        z = F.conv2d(z, g.view(1, 1, 1, 11))
        return F.conv2d(z, g.view(1, 1, 11, 1))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx * mx).clamp(min=0)
    vy = (blur(y * y) - my * my).clamp(min=0)
    cxy = blur(x * y) - mx * my
    s_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    vals = s_map.reshape(n, -1).mean(1).numpy()
    return vals if reduction == "none" else float(np.mean(vals))


# ----------------------------------------------------------------------------- Fréchet distance
def _sym_trace_sqrt(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(Σ1 Σ2) via the symmetric form sqrt(Σ1) Σ2 sqrt(Σ1): exact for PSD inputs, no complex
    parts, and much faster than `scipy.linalg.sqrtm` at 2048 dimensions."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(s1h @ sigma2 @ s1h)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """‖μ1-μ2‖² + tr(Σ1 + Σ2 - 2 sqrt(Σ1 Σ2)) between two gaussians.

    Up to 1024 dimensions this is pytorch-fid's computation (`scipy.linalg.sqrtm`, an ε·I offset if
    the root is not finite, imaginary parts dropped when negligible), so numbers match published
    tools. When sqrtm is unreliable (it warns of a singular product — dead ReLU features do that —
    or leaves a non-negligible imaginary part) and above 1024 dimensions (sqrtm takes ~30 s at 2048
    on one core) the exact symmetric form tr sqrt(sqrt(Σ1) Σ2 sqrt(Σ1)) is used instead.
    """
    import scipy.linalg  # noqa: PLC0415

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean: float | None = None
    if mu1.shape[0] <= 1024:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if not np.isfinite(covmean).all():
                offset = np.eye(sigma1.shape[0]) * eps
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
            log.debug("sqrtm reports a singular product; using the symmetric form")
        elif np.iscomplexobj(covmean):
            if np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                tr_covmean = float(np.trace(covmean.real))
            else:
                log.debug("sqrtm has a large imaginary part (%.3g); using the symmetric form",
                          float(np.abs(covmean.imag).max()))
        elif np.isfinite(covmean).all():
            tr_covmean = float(np.trace(covmean))
    if tr_covmean is None:
        tr_covmean = _sym_trace_sqrt(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of (N, D) features; Σ with N-1 normalisation like pytorch-fid."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N>=2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_features(feat1: np.ndarray, feat2: np.ndarray | None = None, *, mu2: np.ndarray | None = None,
                      sigma2: np.ndarray | None = None) -> float:
    """Fréchet distance between feature samples `feat1` and either samples `feat2` or stats (μ2, Σ2).

    With fewer samples than dimensions the covariances are low rank and sqrtm of their product is
    ill-conditioned (large spurious imaginary parts) and slow; writing Σ1 = AᵀA, Σ2 = BᵀB (A, B the
    centred samples / sqrt(N-1)) the trace term is exactly the nuclear norm of A Bᵀ (or
    Σ sqrt(eig(A Σ2 Aᵀ)) against given stats), which is small and well-conditioned.
    Note that FID is biased upward for small N; compare numbers only at equal sample counts.
    """
    x1 = np.asarray(feat1, np.float64)
    if x1.ndim != 2 or x1.shape[0] < 2:
        raise ValueError(f"need (N>=2, D) features, got shape {x1.shape}")
    n1, d = x1.shape
    mu1 = x1.mean(0)
    a = (x1 - mu1) / math.sqrt(n1 - 1)
    if feat2 is not None:
        x2 = np.asarray(feat2, np.float64)
        if x2.ndim != 2 or x2.shape[0] < 2 or x2.shape[1] != d:
            raise ValueError(f"reference features must be (N>=2, {d}), got {x2.shape}")
        # dimensions constant at the same value in both sets (dead ReLU units) add exactly 0 to the
        # distance but make both covariances singular; drop them
        keep = ~((x1 == x1[:1]).all(0) & (x2 == x1[:1]).all(0))
        x1, x2 = x1[:, keep], x2[:, keep]
        n1, d = x1.shape
        mu1 = x1.mean(0)
        a = (x1 - mu1) / math.sqrt(n1 - 1)
        m2 = x2.mean(0)
        b = (x2 - m2) / math.sqrt(x2.shape[0] - 1)
        if min(n1, x2.shape[0]) < d:
            diff = mu1 - m2
            tr = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
            return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr)
        return frechet_distance(mu1, a.T @ a, m2, b.T @ b)
    if mu2 is None or sigma2 is None:
        raise ValueError("pass reference features or both mu2 and sigma2")
    m2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if m2.shape != (d,) or s2.shape != (d, d):
        raise ValueError(f"reference stats must be ({d},) and ({d},{d}), got {m2.shape} and {s2.shape}")
    if n1 < d:
        diff = mu1 - m2
        ev = np.linalg.eigvalsh(a @ s2 @ a.T)
        tr = float(np.sqrt(np.clip(ev, 0, None)).sum())
        return float(diff @ diff + (a * a).sum() + np.trace(s2) - 2 * tr)
    return frechet_distance(mu1, a.T @ a, m2, s2)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid-format ``.npz`` (loaded with ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: an FID stats file needs arrays 'mu' and 'sigma', has {list(f.keys())}")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as a pytorch-fid-format ``.npz`` atomically (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- domain FID
@functools.lru_cache(maxsize=1)
def _default_evaluator() -> Evaluator:
    return load_evaluator()


def domain_fid(gen_images: Any, ref_images: Any = None, n_ref: int = 2000, *, evaluator: Evaluator | None = None,
               ref_seed_start: int = DOMAIN_FID_REF_SEED, two_object_prob: float = 0.3) -> MetricValue:
    """FID in the shapes-domain evaluator's penultimate feature space (256-d).

    Inception features know nothing about 64×64 flat shapes; the evaluator's features are trained to
    separate exactly the attributes the prompts ask for, so this distance reacts to wrong colours,
    shapes and layouts and to texture artefacts alike. References: `ref_images`, or `n_ref` fresh
    renders (`render.random_scene` with the renderer's default two-object rate, seeds from
    `ref_seed_start`). Returns ``"unavailable: ..."`` when the evaluator weights are missing.
    Biased upward at small sample counts: compare runs only at equal numbers of images.
    """
    if evaluator is None:
        try:
            evaluator = _default_evaluator()
        except FileNotFoundError as e:
            return f"{UNAVAILABLE}domain FID needs the shapes evaluator ({e})"
    if ref_images is None:
        import random  # noqa: PLC0415

        from dgq.tiny import render as R  # noqa: PLC0415

        ref_images = [R.to_array(R.render(R.random_scene(random.Random(s), two_object_prob)))
                      for s in range(ref_seed_start, ref_seed_start + n_ref)]
    return fid_from_features(evaluator.features(gen_images), evaluator.features(ref_images))


# ----------------------------------------------------------------------------- offline guard
@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE semantics for the duration of a model build (env var and the already-imported
    huggingface_hub constant), so that nothing inside open_clip / transformers can reach the hub."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hfc  # noqa: PLC0415
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of open_clip here
        hfc = None
    old_const = getattr(hfc, "HF_HUB_OFFLINE", None)
    if hfc is not None:
        hfc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hfc is not None:
            hfc.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ----------------------------------------------------------------------------- CLIP score
def find_local_open_clip_weights(model_name: str, pretrained: str, cache_dir: str | Path | None = None) -> Path | None:
    """Where open_clip's weights for (`model_name`, `pretrained` tag) already lie on this machine,
    or None. Looks in the HF hub cache (the .safetensors alternative first, as open_clip does) and
    in open_clip's URL cache (``~/.cache/clip``); performs no network request."""
    import open_clip  # noqa: PLC0415
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME  # noqa: PLC0415

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        return None
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

        model_id, filename = os.path.split(hub)  # "org/repo/" -> default file name, as open_clip does
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for fn in candidates:
            hit = try_to_load_from_cache(model_id, fn, cache_dir=str(cache_dir) if cache_dir else None)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    url = cfg.get("url", "")
    if url:
        p = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if p.is_file():
            return p
    return None


class ClipScorer:
    """open_clip image–text cosine similarity; loads local weights only, never downloads.

    Weights come from `weights_path` (an open_clip checkpoint file), else from the local HF/open_clip
    cache for the `pretrained` tag. ``pretrained=None`` with no `weights_path` builds the architecture
    with RANDOM weights — only for exercising the code path offline in tests; its scores mean
    nothing (`random_weights` is True and a warning is logged).
    """

    def __init__(self, model_name: str = "ViT-g-14", pretrained: str | None = "laion2b_s34b_b88k",
                 weights_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 device: str = "cpu", batch_size: int = 32) -> None:
        try:
            import open_clip  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover
            raise MetricUnavailable(f"open_clip is not installed ({e})") from e
        self.model_name, self.pretrained, self.device, self.batch_size = model_name, pretrained, device, batch_size
        label = f"open_clip {model_name}/{pretrained}"
        kwargs: dict[str, Any] = {}
        if weights_path is not None:
            source: Path | None = Path(weights_path)
            if not source.is_file():
                raise MetricUnavailable(f"CLIP weights file {source} not found (pass --clip-weights PATH)")
            label = f"open_clip {model_name} from {source}"
        elif pretrained is not None:
            source = find_local_open_clip_weights(model_name, pretrained, cache_dir)
            if source is None:
                if not open_clip.get_pretrained_cfg(model_name, pretrained):
                    raise MetricUnavailable(f"open_clip has no pretrained tag {model_name}/{pretrained}")
                raise MetricUnavailable(f"{label} weights not found locally (pass --clip-weights PATH)")
        else:
            source = None
            label = f"open_clip {model_name} with RANDOM weights (tests only)"
            log.warning("ClipScorer: %s — scores are meaningless", label)
        if source is not None and pretrained is not None:
            # a file path bypasses open_clip's tag config: re-apply the tag's preprocessing/activation
            pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                             ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
                if key in pcfg:
                    kwargs[arg] = pcfg[key]
            if pcfg.get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
        try:
            with _hf_offline():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=str(source) if source is not None else None, device=device,
                    cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
                tokenizer = open_clip.get_tokenizer(model_name, cache_dir=str(cache_dir) if cache_dir else None)
        except MetricUnavailable:
            raise
        except Exception as e:  # corrupt/mismatched file, unknown model, tokenizer needing the hub
            raise MetricUnavailable(f"could not load {label}: {type(e).__name__}: {e}") from e
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.random_weights = source is None
        self.source = str(source) if source is not None else None
        self.description = label

    @classmethod
    def try_load(cls, model_name: str = "ViT-g-14", pretrained: str | None = "laion2b_s34b_b88k",
                 weights_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 **kwargs: Any) -> tuple[ClipScorer | None, str]:
        """(scorer, "loaded ...") or (None, "unavailable: <why, and what to pass>")."""
        try:
            s = cls(model_name, pretrained, weights_path, cache_dir, **kwargs)
        except MetricUnavailable as e:
            return None, e.reason
        return s, f"loaded {s.description}"

    @torch.no_grad()
    def similarities(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with its prompt, shape (N,), in [-1, 1]."""
        from PIL import Image  # noqa: PLC0415

        arr = to_uint8_batch(images)
        prompts = list(prompts)

        def embed(chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
            pix = torch.stack([self.preprocess(Image.fromarray(a)) for a in arr[chunk]]).to(self.device)
            tok = self.tokenizer(prompts[chunk]).to(self.device)
            return (F.normalize(self.model.encode_image(pix).float(), dim=-1),
                    F.normalize(self.model.encode_text(tok).float(), dim=-1))

        return paired_cosines(len(arr), prompts, self.batch_size, embed)

    def score(self, images: Any, prompts: Sequence[str]) -> float:
        """Mean cosine similarity (CLIP score on the 0–1 scale, not ×100)."""
        return float(np.mean(self.similarities(images, prompts)))


def clip_score(images: Any, prompts: Sequence[str], scorer: ClipScorer | None = None, **load_kwargs: Any) -> MetricValue:
    """CLIP score as a float, or ``"unavailable: ..."`` when no weights are on this machine."""
    if scorer is None:
        scorer, reason = ClipScorer.try_load(**load_kwargs)
        if scorer is None:
            return reason
    return scorer.score(images, prompts)


# ----------------------------------------------------------------------------- Inception FID
def _fid_inception() -> torch.nn.Module:
    """pytorch-fid's FIDInceptionV3: torchvision's Inception3 with the TF graph's pooling quirks
    (avg-pool without padded zeros in A/C/E blocks, max-pool in the last E block)."""
    from torchvision.models import inception as tvi  # noqa: PLC0415

    class FIDInceptionA(tvi.InceptionA):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b5, b3, bp], 1)

    class FIDInceptionC(tvi.InceptionC):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
            bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b7, bd, bp], 1)

    class FIDInceptionE(tvi.InceptionE):
        def __init__(self, in_channels: int, max_pool: bool) -> None:
            super().__init__(in_channels)
            self.max_pool = max_pool

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.max_pool:
                bp = F.max_pool2d(x, 3, stride=1, padding=1)
            else:
                bp = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            return torch.cat([b1, b3, bd, self.branch_pool(bp)], 1)

    net = tvi.Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net.eval()


def _pool3(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """2048-d pool features of images in [0, 1] (bilinear resize to 299, scale to [-1, 1])."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = getattr(net, name)(x)
    x = F.max_pool2d(x, 3, stride=2)
    x = net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                 "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        x = getattr(net, name)(x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def find_local_inception_weights() -> Path | None:
    """pytorch-fid's weights in the torch hub cache (where pytorch-fid itself caches them), or None."""
    p = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME
    return p if p.is_file() else None


class FidScorer:
    """Standard FID (pytorch-fid InceptionV3, 2048-d pool3 features); never downloads.

    `inception_weights`: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (loaded with
    ``torch.load(weights_only=True)``, no arbitrary unpickling) or a ``.safetensors`` with the same
    keys; None looks in the torch hub cache. ``random_init=True`` builds the network with random
    weights for offline tests — its numbers mean nothing; only real weights give FIDs comparable to
    the literature.
    """

    def __init__(self, inception_weights: str | Path | None = None, *, random_init: bool = False,
                 device: str = "cpu", batch_size: int = 32) -> None:
        self.device, self.batch_size = device, batch_size
        if inception_weights is not None:
            path: Path | None = Path(inception_weights)
            if not path.is_file():
                raise MetricUnavailable(f"Inception weights file {path} not found")
        elif random_init:
            path = None
        else:
            path = find_local_inception_weights()
            if path is None:
                raise MetricUnavailable(f"FID Inception weights not found locally (pass --inception-weights PATH "
                                        f"to pytorch-fid's {FID_WEIGHTS_NAME})")
        try:
            net = _fid_inception()
        except ImportError as e:  # pragma: no cover
            raise MetricUnavailable(f"torchvision is not installed ({e})") from e
        if path is not None:
            try:
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file  # noqa: PLC0415

                    state = load_file(str(path))
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                missing, unexpected = net.load_state_dict(state, strict=False)
            except Exception as e:
                raise MetricUnavailable(f"could not read Inception weights {path}: {type(e).__name__}: {e}") from e
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise MetricUnavailable(f"{path} is not a pytorch-fid Inception state dict "
                                        f"(missing {missing[:3]}..., unexpected {list(unexpected)[:3]}...)")
        else:
            log.warning("FidScorer with RANDOM Inception weights (tests only) — FIDs are meaningless")
        self.net = net.to(device).eval()
        self.random_weights = path is None
        self.source = str(path) if path is not None else None

    @classmethod
    def try_load(cls, inception_weights: str | Path | None = None, **kwargs: Any) -> tuple[FidScorer | None, str]:
        """(scorer, "loaded ...") or (None, "unavailable: ...")."""
        try:
            s = cls(inception_weights, **kwargs)
        except MetricUnavailable as e:
            return None, e.reason
        return s, f"loaded FID Inception from {s.source or 'RANDOM weights (tests only)'}"

    @torch.no_grad()
    def features(self, images: Any) -> np.ndarray:
        """(N, 2048) pool3 features; images at their own resolution, upsampled to 299 like pytorch-fid."""
        arr = to_uint8_batch(images)
        out = []
        for i in range(0, len(arr), self.batch_size):
            x = torch.from_numpy(np.array(arr[i:i + self.batch_size], copy=True)).permute(0, 3, 1, 2).float() / 255
            out.append(_pool3(self.net, x.to(self.device)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))

    def stats(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the images' features, e.g. to `save_stats` a reference set once."""
        return feature_stats(self.features(images))

    def compute(self, gen_images: Any, ref_images: Any = None, ref_stats: str | Path | None = None) -> float:
        """FID of `gen_images` against `ref_images` or a pytorch-fid ``.npz`` with ``mu``/``sigma``."""
        feats = self.features(gen_images)
        if ref_images is not None:
            return fid_from_features(feats, self.features(ref_images))
        if ref_stats is None:
            raise ValueError("pass ref_images or ref_stats")
        mu, sigma = load_stats(ref_stats)
        return fid_from_features(feats, mu2=mu, sigma2=sigma)


def fid(gen_images: Any, ref_images: Any = None, ref_stats: str | Path | None = None,
        inception_weights: str | Path | None = None, scorer: FidScorer | None = None) -> MetricValue:
    """Inception FID as a float, or ``"unavailable: ..."`` when the weights are not on this machine."""
    if scorer is None:
        scorer, reason = FidScorer.try_load(inception_weights)
        if scorer is None:
            return reason
    return scorer.compute(gen_images, ref_images, ref_stats)


__all__ = [
    "UNAVAILABLE", "MetricUnavailable", "MetricValue", "is_unavailable", "psnr", "ssim", "frechet_distance",
    "feature_stats", "fid_from_features", "load_stats", "save_stats", "domain_fid", "ClipScorer", "clip_score",
    "find_local_open_clip_weights", "FidScorer", "fid", "find_local_inception_weights", "to_tensor_batch",
    "DOMAIN_FID_REF_SEED",
]

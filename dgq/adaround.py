"""Learned weight rounding (AdaRound): the math, the stored result and where it is kept.

Why: at 4 bits, rounding each weight to its nearest code is far from the best choice for the
layer's *output*; AdaRound learns, per weight, whether to round down or up (never further), so
the block's output matches the full-precision one (dgq-method.md §A.3). The paper's SD v1.4 rows
stand on it. The search itself — BRECQ block reconstruction — is in `dgq.reconstruction`; this
module holds what both the search and the quantized layers need:

* the rectified sigmoid h(α) = clamp(σ(α)·(ζ − γ) + γ, 0, 1) with γ = −0.1, ζ = 1.1, the soft
  weight s·(clamp(⌊w/s⌋ + h(α) + z, 0, 2^b − 1) − z) and the regulariser Σ(1 − |2h(α) − 1|^β);
* `Rounding`: per layer a bit mask (1 = round up from ⌊w/s⌋) with the per-channel (scale, zero)
  it was learned for, saved as safetensors (masks packed 8 per byte: 0.4 MB per bit-width for the
  embedded model's 3.3 M weights) plus a JSON sidecar with the settings, the per-block errors and
  a checksum; writes are atomic; a file for other weights, another format or a corrupted one
  raises `RoundingMismatch` and is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgq import stored
from dgq.paths import ASSETS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GAMMA, ZETA = -0.1, 1.1
ROUNDINGS = ("nearest", "adaround", "adaround-tiar")
SHIPPED_DIR = ASSETS / "tiny-sd-calibration"  # the embedded model's roundings (W4, W8)
_SEP = "|"


# ----------------------------------------------------------------------------- math
def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(α) = clamp(σ(α)·(ζ − γ) + γ, 0, 1): reaches exactly 0 and 1, so rounding can settle."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def weight_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w/s per output channel in fp32, shaped [out, rest] (the division the nearest codes use)."""
    return w.detach().float().reshape(w.shape[0], -1) / scale.float()[:, None]


def init_alpha(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """α with h(α) = the fractional part of w/s, as AdaRound starts (so the soft weight begins at
    the FP weight, clamping aside); shaped [out, rest]."""
    x = weight_grid(w, scale)
    rest = (x - torch.floor(x)).clamp(1e-6, 1 - 1e-6)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def soft_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight AdaRound trains through: s·(clamp(⌊w/s⌋ + h(α) + z, 0, 2^b − 1) − z)."""
    x = weight_grid(w, scale)
    s, z = scale.float()[:, None], zero.float()[:, None]
    q = torch.clamp(torch.floor(x) + rectified_sigmoid(alpha) + z, 0, 2**bits - 1)
    return ((q - z) * s).reshape(w.shape)


def round_reg(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ(1 − |2h(α) − 1|^β): zero once every h(α) is 0 or 1; a large β only pushes the
    undecided values near 0.5, a small one all of them."""
    return (1.0 - (2.0 * rectified_sigmoid(alpha) - 1.0).abs().pow(beta)).sum()


def beta_at(it: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float:
    """β annealed linearly from `start` to `end` after the warm-up (BRECQ's LinearTempDecay)."""
    t0 = warmup * iters
    if it < t0:
        return start
    rel = (it - t0) / max(1e-9, iters - t0)
    return end + (start - end) * max(0.0, 1.0 - rel)


def nearest_mask(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The mask that reproduces round-to-nearest: round(w/s) − ⌊w/s⌋ (bool, [out, rest])."""
    x = weight_grid(w, scale)
    return (torch.round(x) - torch.floor(x)) > 0.5


def mask_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, mask: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes clamp(⌊w/s⌋ + mask + z, 0, 2^b − 1): every weight on the floor or the ceiling
    of its grid cell; with `nearest_mask` these equal `primitives.weight_codes`."""
    x = weight_grid(w, scale)
    m = mask.reshape(x.shape).to(x.device, x.dtype)
    q = torch.clamp(torch.floor(x) + m + zero.float().to(x.device)[:, None], 0, 2**bits - 1)
    return q.to(torch.uint8).reshape(w.shape)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ReconSettings:
    """How a rounding is learned; every field is part of the stored file's key.

    Args:
        iters (`int`, defaults to 200): Adam steps per reconstruction unit (the authors: 20,000 on
            a GPU; the default reconstructs the embedded model in a few CPU minutes, and already
            lowers every unit's output MSE by 18–50 %, docs/adaround.md).
        batch_size (`int`, defaults to 8): samples per step (the authors' 8).
        samples (`int`, defaults to 128): UNet inputs drawn at random from every (prompt, step,
            CFG half) of the calibration runs; each unit's inputs and targets are kept for these.
        lr (`float`, defaults to 3e-3): Adam's learning rate on α (the authors: 1e-3 over 20k
            steps; with 20× fewer steps a larger rate lets undecided weights still flip).
        reg_weight (`float`, defaults to 0.01): λ of the rounding regulariser.
        beta_start / beta_end (`float`, defaults to 20 / 2): β's annealing range.
        warmup (`float`, defaults to 0.2): share of the steps without the regulariser.
        steps (`int`, defaults to 25) / guidance (`float | None`): the calibration runs' sampler
            steps and CFG scale (None = the model's default).
        seed (`int`, defaults to 0): sample choice and batch order.
        tiar (`bool`, defaults to False): TFMQ-DM's temporal-information-aware reconstruction —
            the time-embedding MLP and every ResNet's `time_emb_proj` learned first as one unit
            against their FP outputs over the calibrated timesteps (`dgq.reconstruction`); the
            rounding it gives is the `"adaround-tiar"` weight rounding.
    """

    iters: int = 200
    batch_size: int = 8
    samples: int = 128
    lr: float = 3e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    tiar: bool = False

    def __post_init__(self) -> None:
        check_positive_ints(self, ("iters", "batch_size", "samples", "steps"))
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup!r} must be in [0, 1)")
        if self.lr <= 0 or self.reg_weight < 0 or self.beta_end <= 0 or self.beta_start < self.beta_end:
            raise ValueError("need lr > 0, reg_weight ≥ 0 and beta_start ≥ beta_end > 0")

    def to_dict(self) -> dict[str, Any]:
        """The fields; `tiar` only when set, so the keys of files made before it existed hold."""
        d = asdict(self)
        if not d["tiar"]:
            del d["tiar"]
        return d

    @property
    def rounding(self) -> str:
        """The weight-rounding name the result serves (`QuantConfig.weight_rounding`)."""
        return "adaround-tiar" if self.tiar else "adaround"


def check_positive_ints(settings: Any, names: tuple[str, ...]) -> None:
    """ValueError unless each named field of a settings dataclass is a positive int (not a bool)."""
    for name in names:
        v = getattr(settings, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")


def rounding_name(meta: dict[str, Any]) -> str:
    """"adaround" or "adaround-tiar": which weight rounding a stored file (its metadata) is."""
    return "adaround-tiar" if (meta.get("settings") or {}).get("tiar") else "adaround"


def settings_key(settings: ReconSettings, guidance: float, prompts_sha: str, weight_search: str) -> str:
    """A short hash of everything besides the weights and the bit-width that changes the result."""
    d = dict(settings.to_dict(), guidance=guidance, prompts_sha=prompts_sha, weight_search=weight_search,
             format_version=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- stored result
RoundingMismatch = stored.StoredMismatch  # a stored rounding that must not be used


@dataclass
class Rounding:
    """Learned rounding of every quantized layer at one bit-width.

    `layers[name] = (mask [out, rest] bool, scale [out], zero [out])`; `meta` holds the weights
    fingerprint, bits, settings (and their key), the per-unit errors and the seconds it took.
    """

    bits: int
    search: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    def codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        mask, s, z = self.layers[name]
        return mask_codes(w, s, z, mask, self.bits)

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` and `<path>.json` (metadata + sha256), each atomically."""
        tensors: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[int]] = {}
        for name, (mask, s, z) in self.layers.items():
            tensors[f"{name}{_SEP}mask"] = pack_mask(mask)
            tensors[f"{name}{_SEP}s"] = s.detach().float()
            tensors[f"{name}{_SEP}z"] = z.detach().float()
            shapes[name] = list(mask.shape)
        meta = dict(self.meta, bits=self.bits, search=self.search, shapes=shapes)
        return stored.write_pair(path, tensors, meta, FORMAT_VERSION)

    @classmethod
    def read_meta(cls, path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON sidecar, checked against `expect` and the format (no tensor is read)."""
        return stored.read_meta(path, FORMAT_VERSION, expect, "rounding")

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None, layers: dict | None = None) -> Rounding:
        """Load and verify (format, `expect`ed keys, checksum, shapes, and with `layers` that it
        covers exactly those: `check_layers`); raises `RoundingMismatch`."""
        meta = cls.read_meta(path, expect)
        tensors = stored.read_tensors(path, meta, "rounding")
        try:
            found = {}
            for name, shape in meta["shapes"].items():
                mask = unpack_mask(tensors[f"{name}{_SEP}mask"], tuple(shape))
                s, z = tensors[f"{name}{_SEP}s"], tensors[f"{name}{_SEP}z"]
                if s.shape != (shape[0],) or z.shape != (shape[0],):
                    raise ValueError(f"layer {name}: scale shape {tuple(s.shape)} for {shape[0]} channels")
                found[name] = (mask, s, z)
        except (KeyError, ValueError, TypeError) as e:
            raise RoundingMismatch(f"unreadable rounding tensors {Path(path).with_suffix('.safetensors')}: {e}") from e
        out = cls(int(meta["bits"]), str(meta["search"]), found, meta)
        if layers is not None:
            out.check_layers(layers)
        return out

    def check_layers(self, layers: dict) -> None:
        """Raise `RoundingMismatch` unless this rounding covers exactly `layers` (name → wrapped layer)."""
        if set(self.layers) != set(layers):
            missing = sorted(set(layers) - set(self.layers))[:3]
            raise RoundingMismatch(f"rounding covers other layers than this model's (e.g. missing {missing})")
        for name, layer in layers.items():
            mask = self.layers[name][0]
            if mask.shape[0] != layer.weight.shape[0] or mask.numel() != layer.weight.numel():
                raise RoundingMismatch(f"rounding of {name} has shape {tuple(mask.shape)}, the layer {tuple(layer.weight.shape)}")


# ----------------------------------------------------------------------------- where files live
def file_stem(weights: str, bits: int, key: str) -> str:
    return f"{weights}-w{bits}-{key}"


def candidates(folders: list[Path], weights: str, bits: int, prefer: dict[str, Any] | None = None,
               name: str = "adaround", search: str | None = None) -> list[Path]:
    """Stored roundings `name` ("adaround" | "adaround-tiar") for (weights, bits) in `folders`,
    best first: those made with the `prefer`red settings (default: `ReconSettings()`'s) first,
    then the others newest first (by their recorded creation time). `search`: only roundings
    learned on that weight-range search ("mse" | "minmax"): a rounding's codes hold only with the
    ranges it was learned on, so another search's file would be offered and then not apply."""
    prefer = ReconSettings(tiar=name == "adaround-tiar").to_dict() if prefer is None else prefer
    expect = {"weights": weights, "bits": bits, **({} if search is None else {"search": search})}
    found: list[tuple[int, float, Path]] = []
    for order, folder in enumerate(folders):
        if not folder.is_dir():
            continue
        for js in folder.glob(f"{weights}-w{bits}-*.json"):
            p = js.with_suffix("")
            try:
                meta = Rounding.read_meta(p, expect)
            except RoundingMismatch:
                continue
            if rounding_name(meta) != name:
                continue
            exact = meta.get("settings") == prefer
            found.append((0 if exact else 1, -float(meta.get("created", 0)) + order * 1e-3, p))
    return [p for *_, p in sorted(found, key=lambda t: (t[0], t[1]))]


def load_best(folders: list[Path], weights: str, bits: int, layers: dict,
              prefer: dict[str, Any] | None = None, name: str = "adaround") -> Rounding | None:
    """The first stored rounding `name` for (weights, bits) that loads, verifies and fits `layers`,
    learned on the weight-range search those layers use."""
    for p in candidates(folders, weights, bits, prefer, name, search=layers_search(layers)):
        try:
            r = Rounding.load(p, {"weights": weights, "bits": bits}, layers)
        except RoundingMismatch as e:
            log.warning("rounding at %s not used: %s", p, e)
            continue
        log.info("rounding W%d loaded from %s", bits, p)
        return r
    return None


def layers_search(layers: dict) -> str | None:
    """The weight-range search ("mse" | "minmax") of wrapped layers (None: no layer)."""
    first = next(iter(layers.values()), None)
    return None if first is None else str(first.weight_search)


def rounding_folders(model_id: str) -> list[Path]:
    """Where a model's learned roundings are looked for: `$DGQ_CACHE/adaround/`, then (embedded
    model) the shipped files next to its calibration."""
    from dgq.loading import is_embedded  # noqa: PLC0415
    from dgq.paths import cache_dir  # noqa: PLC0415

    return [cache_dir() / "adaround"] + ([SHIPPED_DIR] if is_embedded(model_id) else [])


def install(layers: dict, rounding: Rounding) -> None:
    """Hand each wrapped layer its learned mask and range, and drop weights cached at these bits
    with another rounding (`QuantMixin.quantized_weight` reads `_dgq_wround`)."""
    rounding.check_layers(layers)
    key = (rounding.bits, rounding.search, rounding_name(rounding.meta))
    for name, layer in layers.items():
        store = layer.__dict__.setdefault("_dgq_wround", {})
        store[key] = rounding.layers[name]
        layer._dgq_wcache.pop(key, None)


def now() -> float:
    return round(time.time(), 3)

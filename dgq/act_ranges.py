"""Learned activation step sizes on disk (`qdiff-paper`): the settings they were learned with, the
stored result and where it is looked for. Learning them is `dgq.act_recon`; the `Studio` only
loads them, through this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dgq import stored
from dgq.adaround import check_positive_ints
from dgq.fingerprint import weights_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SEP = "|"
ATTENTION_SITES = ("q", "k", "v", "p")  # an attention module's learned quantizers: `<module>.<site>`
INITS = ("ema", "steps")  # where learned step sizes start (`ActReconSettings.init`)


@dataclass(frozen=True)
class ActReconSettings:
    """How the step sizes are learned; every field is part of the stored file's key.

    Args:
        iters (`int`, defaults to 100): Adam steps per unit (Q-Diffusion: 5,000 on a GPU).
        batch_size (`int`, defaults to 8): samples per step (Q-Diffusion's 8).
        samples (`int`, defaults to 128): UNet inputs drawn from the calibration runs.
        lr (`float`, defaults to 2e-3): Adam's learning rate on Δ (Q-Diffusion: 4e-4 over 5,000
            steps; over 100 steps on the embedded model W4A6, 2e-3 lowered the units' output error
            by 11.0 % (geometric mean) against 4.4 % for 4e-4).
        p (`float`, defaults to 2.4): exponent of the reconstruction loss (Q-Diffusion's `--p`).
        steps (`int`, defaults to 25) / guidance (`float | None`): the calibration runs.
        seed (`int`, defaults to 0): sample choice and batch order.
        attention (`bool`, defaults to True): learn every attention module's Q, K, V and
            probability step sizes too, as Q-Diffusion does (False: they keep the light `qdiff`'s
            MSE ranges).
        attn_lr (`float`, defaults to 0.02): Adam's learning rate on those, relative to each
            initial step (Q-Diffusion uses `lr` for all: at 6 bits a probability step is about
            1e-3, which an absolute 2e-3 overshoots).
        init (`str`, defaults to `"ema"`): where the step sizes start. `"ema"` is Q-Diffusion's
            `--running_stat` initialisation (`dgq.act_recon.running_ranges`): every quantizer's
            range is MSE-searched on 16 random samples, then follows an EMA (momentum 0.95) of
            the min/max of shuffled batches of 8 over `ema_samples` UNet inputs, through the
            network with AdaRound weights and its activations quantized. `"steps"` is this
            project's earlier shortcut: the mean over the calibrated steps of each step's min/max
            for the layer inputs, the light `qdiff`'s MSE ranges for Q, K, V and probabilities.
        ema_samples (`int`, defaults to 3200): UNet inputs the running statistics go over, drawn
            from every call of the calibration runs (64 prompts × 25 steps × 2 CFG halves = 3,200
            on the embedded model, all of them; Q-Diffusion's SD run: 128 per step × 25 steps).
    """

    iters: int = 100
    batch_size: int = 8
    samples: int = 128
    lr: float = 2e-3
    p: float = 2.4
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    attention: bool = True
    attn_lr: float = 0.02
    init: str = "ema"
    ema_samples: int = 3200

    def __post_init__(self) -> None:
        check_positive_ints(self, ("iters", "batch_size", "samples", "steps", "ema_samples"))
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; allowed: {', '.join(INITS)}")
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be True or False, not {self.attention!r}")
        if not self.lr > 0 or not self.p > 0 or not self.attn_lr > 0:
            raise ValueError("need lr > 0, attn_lr > 0 and p > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ActRanges:
    """Learned per-tensor (or per-half) activation ranges of every quantized layer input, and of
    the attention modules' Q, K, V and probabilities (`<module>.q|k|v|p`; p: step, zero 0).

    `sites[name] = (scale, zero)`: shape [1] for one range, [C] per input channel for a split
    input (the two halves' values repeated over their channels)."""

    w_bits: int
    a_bits: int
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` and `<path>.json` atomically (`dgq.stored`)."""
        tensors = {}
        for name, (s, z) in self.sites.items():
            tensors[f"{name}{_SEP}s"], tensors[f"{name}{_SEP}z"] = s.float(), z.float()
        st = stored.write_pair(path, tensors, dict(self.meta, w_bits=self.w_bits, a_bits=self.a_bits), FORMAT_VERSION)
        self.meta = stored.read_meta(path, FORMAT_VERSION, what="activation ranges")  # with its checksum
        return st

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None) -> ActRanges:
        """Load and verify (format, `expect`ed keys, checksum); raises `StoredMismatch`."""
        meta = stored.read_meta(path, FORMAT_VERSION, expect, "activation ranges")
        tensors = stored.read_tensors(path, meta, "activation ranges")
        sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            for name in meta["sites"]:
                s, z = tensors[f"{name}{_SEP}s"], tensors[f"{name}{_SEP}z"]
                if s.shape != z.shape or s.dim() != 1 or not bool((s > 0).all()):
                    raise ValueError(f"site {name}: bad scale/zero {tuple(s.shape)}/{tuple(z.shape)}")
                sites[name] = (s, z)
        except (KeyError, ValueError, TypeError) as e:
            raise stored.StoredMismatch(f"unreadable activation ranges {path}: {e}") from e
        return cls(int(meta["w_bits"]), int(meta["a_bits"]), sites, meta)


# ----------------------------------------------------------------------------- identity and lookup
def identity(studio, w_bits: int, a_bits: int, settings: ActReconSettings,
             prompts: list[str] | None = None) -> dict[str, Any]:
    """What a stored result must match — weights, rounding, calibration, bits — and the key of
    everything else that changes it (settings, guidance, the prompts it was learned on)."""
    from dgq.loading import default_guidance  # noqa: PLC0415

    guidance = default_guidance(studio.pipe) if settings.guidance is None else settings.guidance
    rounding = studio.rounding(w_bits)
    d = {"model": studio.model_id, "weights": weights_fingerprint(studio.pipe.unet), "guidance": guidance,
         "rounding": None if rounding is None else rounding.meta.get("sha256"),
         "calibration": studio.calibration.meta.get("sha256"),
         "prompts_sha": None if prompts is None else hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]}
    key = hashlib.sha256(json.dumps(dict(d, settings=settings.to_dict(), w_bits=w_bits, a_bits=a_bits,
                                         format_version=FORMAT_VERSION), sort_keys=True).encode()).hexdigest()[:12]
    return dict(d, key=key)


def file_stem(weights: str, w_bits: int, a_bits: int, key: str) -> str:
    return f"{weights}-qdiff-w{w_bits}a{a_bits}-{key}"


def folders(model_id: str) -> list[Path]:
    """`$DGQ_CACHE/act-recon/`, then (embedded model) the shipped files beside its calibration."""
    from dgq.adaround import SHIPPED_DIR  # noqa: PLC0415
    from dgq.loading import is_embedded  # noqa: PLC0415
    from dgq.paths import cache_dir  # noqa: PLC0415

    return [cache_dir() / "act-recon"] + ([SHIPPED_DIR] if is_embedded(model_id) else [])


def covers(r: ActRanges, studio) -> bool:
    """Whether `r` holds every quantized layer input of the Studio's UNet, and the Q, K, V and
    probabilities of either all its attention modules or none (learned without them)."""
    from dgq.attention import attention_names  # noqa: PLC0415

    layers = set(studio._qlayers)
    rest = set(r.sites) - layers
    attention = {f"{a}.{x}" for a in attention_names(studio.pipe.unet) for x in ATTENTION_SITES}
    return layers <= set(r.sites) and rest in (set(), attention)


def find(studio, w_bits: int, a_bits: int, settings: ActReconSettings | None = None,
         where: list[Path] | None = None, key: str | None = None) -> tuple[ActRanges, Path] | None:
    """The stored result for the Studio's weights, rounding and calibration at (W, A) that loads
    and verifies: with `key`, only that one; else those learned with the default settings first,
    then any other, newest first. Looks in `where` (default `folders(model)`)."""
    if not studio.load_rounding(w_bits):
        return None
    want = identity(studio, w_bits, a_bits, settings or ActReconSettings())
    expect = {k: want[k] for k in ("weights", "rounding", "calibration")} | {"w_bits": w_bits, "a_bits": a_bits}
    if key is not None:
        expect["key"] = key
    default = (settings or ActReconSettings()).to_dict()
    found: list[tuple[int, float, Path]] = []
    for folder in where if where is not None else folders(studio.model_id):
        if not folder.is_dir():
            continue
        for js in folder.glob(f"{want['weights']}-qdiff-w{w_bits}a{a_bits}-*.json"):
            try:
                meta = stored.read_meta(js.with_suffix(""), FORMAT_VERSION, expect, "activation ranges")
            except stored.StoredMismatch:
                continue
            found.append((0 if meta.get("settings") == default else 1, -float(meta.get("created", 0)), js.with_suffix("")))
    for *_, p in sorted(found, key=lambda t: (t[0], t[1])):
        try:
            r = ActRanges.load(p, expect)
        except stored.StoredMismatch as e:
            log.warning("activation ranges at %s not used: %s", p, e)
            continue
        if not covers(r, studio):
            log.warning("activation ranges at %s cover other layers; not used", p)
            continue
        return r, p.with_suffix(".safetensors")
    return None

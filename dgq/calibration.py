"""Calibration: run the FP pipeline once, keep only bit-width-independent statistics.

For every quantized input ("site": a wrapped layer's input, or Q/K/V/probabilities of an
attention module) and every calibrated timestep we keep

* per-index min/max along both candidate axes (channel, pixel/token) — for convs also along the
  output positions of the im2col view, which is what a pixel group scales;
* per-tensor min/max and their EMA over calibration batches (momentum 0.95, the TFMQ baseline);
* the spread metric D_d for both axes and K-means group labels for every K offered and both axes;
* a fixed-size random sample of values over all timesteps (the Q-Diffusion MSE search);
* log-domain histograms and maxima of the attention probabilities (`<start>` column apart).

A scale for any bit-width is then one division, so switching W or A never recalibrates.
Statistics are taken on the FP network (bit-width independence requires it; the authors'
code gathers them on a provisionally quantized network, dgq-method.md H-9).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dgq import primitives as P
from dgq.fingerprint import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: probability histograms binned on the float32 exponent/mantissa
GROUP_KS = (2, 4, 8, 16)
ALL = -1  # key of the statistics aggregated over every timestep
SAMPLE_PER_CALL = 256
SAMPLE_MAX = 4096
EMA_MOMENTUM = 0.95
GROUPED_KINDS = ("conv", "linear", "q", "k", "v")


@dataclass
class SiteInfo:
    """Static description of one quantized input."""

    name: str
    kind: str  # conv | linear | linear2 | q | k | v | p
    cross: bool = False
    channels: int = 0
    pixel_shape: tuple[int, ...] = ()  # (H, W) for convs and spatial tokens, (T,) otherwise
    conv: dict[str, Any] | None = None  # kernel_size, stride, padding, dilation

    @property
    def variants(self) -> tuple[str, ...]:
        """"x0" = statistics without the `<start>` token (cross-attention keys)."""
        return ("full", "x0") if (self.kind == "k" and self.cross) else ("full",)

    def out_pixel_shape(self) -> tuple[int, ...]:
        if self.kind != "conv" or not self.conv:
            return self.pixel_shape
        h, w = self.pixel_shape
        k, s, p, d = (self.conv[n] for n in ("kernel_size", "stride", "padding", "dilation"))
        return ((h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)

    def needs_unfold(self) -> bool:
        return bool(self.kind == "conv" and self.conv and (max(self.conv["kernel_size"]) > 1 or max(self.conv["stride"]) > 1))


def _reduce_axes(x: torch.Tensor, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Axes to reduce for per-channel and per-pixel statistics of a site's input."""
    if kind == "conv":  # [B, C, H, W]
        return (0, 2, 3), (0, 1)
    if kind == "linear":  # [B, N, C]
        return (0, 1), (0, 2)
    # q/k/v: [B, heads, T, d] — channels (d) and tokens shared by all heads
    return (0, 1, 2), (0, 1, 3)


class StatsCollector:
    """Aggregates statistics on the fly while the FP pipeline runs (bounded memory)."""

    def __init__(self, seed: int = 0) -> None:
        self.sites: dict[str, SiteInfo] = {}
        self.acc: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        # per call: (timestep, [min, max] or [min, max, min_x0, max_x0]); the per-tensor ranges
        # and their EMAs are folded from these in `finalize` (a loop over floats, not ~20 tensor
        # ops on every call of every site)
        self.scalars: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.t: int | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def set_timestep(self, t: float) -> None:
        self.t = int(round(t))

    # ------------------------------------------------------------------ observation
    def _update(self, site: str, t: int, vals: dict[str, torch.Tensor]) -> None:
        """Fold one call's statistics into timestep `t`'s accumulators; the all-steps set gets its
        min/max/histograms from the per-timestep ones in `finalize` (same values, half the work)."""
        acc = self.acc.setdefault((site, t), {})
        for k, v in vals.items():
            v = v.cpu()
            if k not in acc:
                acc[k] = v.clone()
            elif k.startswith("hist"):
                acc[k].add_(v)
            elif "min" in k:
                torch.minimum(acc[k], v, out=acc[k])
            elif "max" in k:
                torch.maximum(acc[k], v, out=acc[k])
            else:
                raise KeyError(f"no aggregation rule for statistic {k!r}")

    def _fold_scalars(self, site: str) -> None:
        """Per-tensor min/max (tmin/tmax) and their EMAs over calls (momentum 0.95, the TFMQ
        baseline's), per timestep and over all steps in call order, from the per-call scalars."""
        calls = self.scalars.get(site)
        if not calls:
            return
        vals = torch.stack([v for _, v in calls]).double().tolist()
        names = ("", "_x0") if len(vals[0]) == 4 else ("",)
        for j, sfx in enumerate(names):
            per: dict[int, list[float]] = {}  # t -> [tmin, tmax, ema_min, ema_max]
            run: tuple[float, ...] | None = None
            for (t, _), v in zip(calls, vals):
                lo, hi = v[2 * j], v[2 * j + 1]
                e = (min(lo, 0.0), max(hi, 0.0))
                cur = per.get(t)
                per[t] = [lo, hi, *e] if cur is None else [min(cur[0], lo), max(cur[1], hi), *_ema(cur[2:], e)]
                run = e if run is None else _ema(run, e)
            for t, (lo, hi, elo, ehi) in per.items():
                acc = self.acc[(site, t)]
                acc["tmin" + sfx], acc["tmax" + sfx] = torch.tensor(lo), torch.tensor(hi)
                acc["ema_min" + sfx], acc["ema_max" + sfx] = torch.tensor(elo), torch.tensor(ehi)
            assert run is not None
            acc_all = self.acc.setdefault((site, ALL), {})
            acc_all["ema_min" + sfx], acc_all["ema_max" + sfx] = torch.tensor(run[0]), torch.tensor(run[1])

    def _fold_all(self, site: str, t_keys: list[int]) -> dict[str, torch.Tensor]:
        """The all-steps accumulators of `site`: min/max/sum over its per-timestep ones."""
        acc_all = self.acc.setdefault((site, ALL), {})
        per_t = [self.acc[(site, t)] for t in t_keys]
        for k in per_t[0]:
            if k.startswith("ema"):
                continue
            stack = torch.stack([a[k] for a in per_t])
            if k.startswith("hist"):
                acc_all[k] = stack.sum(0)
            elif "min" in k:
                acc_all[k] = stack.amin(0)
            else:
                acc_all[k] = stack.amax(0)
        return {k: acc_all[k] for k in per_t[0]}  # the per-timestep field order

    def _register(self, site: str, kind: str, x: torch.Tensor, cross: bool, conv: dict | None) -> SiteInfo:
        info = self.sites.get(site)
        if info is None:
            if kind == "conv":
                ch, px = x.shape[1], tuple(x.shape[2:])
            elif kind == "linear":
                ch, px = x.shape[-1], (x.shape[1],)
            elif kind in ("q", "k", "v"):
                ch, px = x.shape[-1], (x.shape[2],)
            else:
                ch, px = (x.shape[-1], ()) if kind == "linear2" else (0, ())
            info = SiteInfo(site, kind, cross, int(ch), tuple(int(p) for p in px), conv)
            self.sites[site] = info
        return info

    @torch.no_grad()
    def observe(self, site: str, x: torch.Tensor, kind: str, cross: bool = False, conv: dict | None = None) -> None:
        """Record the input `x` of a site (kind: conv, linear, linear2, q, k, v)."""
        if self.t is None:
            raise RuntimeError("StatsCollector used outside a UNet call (no timestep set)")
        x = x.detach().float()
        info = self._register(site, kind, x, cross, conv)
        # one pass over x: min/max over the batch axis, everything else from that smaller tensor
        mn0, mx0 = x.amin(dim=0), x.amax(dim=0)  # (torch.aminmax with a dim is ~10× slower on CPU)
        scal = [mn0.min(), mx0.max()]
        if kind in GROUPED_KINDS:
            ch_axes, px_axes = _reduce_axes(x, kind)
            ch_axes = tuple(a - 1 for a in ch_axes if a != 0)  # axes of mn0/mx0 (batch reduced)
            px_axes = tuple(a - 1 for a in px_axes if a != 0)
            vals = {"ch_min": mn0.amin(dim=ch_axes), "ch_max": mx0.amax(dim=ch_axes),
                    "px_min": mn0.amin(dim=px_axes).flatten(), "px_max": mx0.amax(dim=px_axes).flatten()}
            if info.kind == "k" and cross:  # statistics without the <start> key row
                vals["chx_min"] = mn0[:, 1:].amin(dim=(0, 1))  # [heads, T−1, d] → d
                vals["chx_max"] = mx0[:, 1:].amax(dim=(0, 1))
                scal += [vals["chx_min"].min(), vals["chx_max"].max()]
            self._update(site, self.t, vals)
        else:
            self.acc.setdefault((site, self.t), {})
        sc = torch.stack(scal)
        self.scalars.setdefault(site, []).append((self.t, sc.cpu()))
        flat = x.reshape(-1)
        idx = torch.randint(0, flat.numel(), (SAMPLE_PER_CALL,), generator=self.gen).to(flat.device)
        self.samples.setdefault(site, []).append(torch.cat([flat[idx], sc[:2]]).cpu())

    @torch.no_grad()
    def observe_probs(self, site: str, p: torch.Tensor, cross: bool) -> None:
        """Record softmax probabilities [B, heads, Nq, Nk]; the `<start>` column apart for cross."""
        if self.t is None:
            raise RuntimeError("StatsCollector used outside a UNet call (no timestep set)")
        p = p.detach().float()
        self._register(site, "p", p, cross, None)
        rest = p[..., 1:] if cross else p
        vals = {"hist": P.log_hist(rest), "pmax": p.max(), "pmax_rest": rest.max()}
        vals["hist0"] = P.log_hist(p[..., 0]) if cross else torch.zeros(P.N_LOG_BINS + 1, dtype=torch.float64)
        self._update(site, self.t, vals)

    # ------------------------------------------------------------------ finalize
    def finalize(self, meta: dict[str, Any]) -> Calibration:
        """Stack per-timestep statistics, derive D_d and K-means groups; return a Calibration."""
        t_keys = sorted({t for (_, t) in self.acc if t != ALL}, reverse=True)
        keys = t_keys + [ALL]
        tensors: dict[str, torch.Tensor] = {}
        for name in self.sites:
            self._fold_scalars(name)
        for name, info in self.sites.items():
            per_t = [self.acc[(name, t)] for t in t_keys] + [self._fold_all(name, t_keys)]
            for fld in per_t[0]:
                tensors[f"{name}|{fld}"] = torch.stack([a[fld] for a in per_t])
            if name in self.samples:
                s = torch.cat(self.samples[name])
                if s.numel() > SAMPLE_MAX:
                    keep = torch.randperm(s.numel(), generator=self.gen)[:SAMPLE_MAX - 2]
                    s = torch.cat([s[keep], s.min()[None], s.max()[None]])
                tensors[f"{name}|sample"] = s
            if info.kind == "conv" and info.needs_unfold():
                tensors[f"{name}|opx_min"], tensors[f"{name}|opx_max"] = _output_position_stats(
                    tensors[f"{name}|px_min"], tensors[f"{name}|px_max"], info)
        for k, v in tensors.items():  # stored in fp16: round now so memory and file agree exactly
            if v.dtype == torch.float32 and _STORE_HALF(k):
                tensors[k] = v.half().float()
            elif v.dtype == torch.float64:
                tensors[k] = v.float()
        calib = Calibration(tensors, {n: i for n, i in self.sites.items()}, keys, meta)
        calib.derive_groups()
        return calib


def _ema(prev: Sequence[float], new: Sequence[float]) -> tuple[float, ...]:
    """One EMA step (momentum 0.95, as the TFMQ baseline) of each value."""
    return tuple(EMA_MOMENTUM * p + (1 - EMA_MOMENTUM) * n for p, n in zip(prev, new))


def _STORE_HALF(key: str) -> bool:
    """Value statistics are stored in fp16 (ranges need 3 digits); counts and D stay fp32."""
    fld = key.split("|", 1)[1]
    return not (fld.startswith("hist") or fld.startswith("D|") or fld.startswith("lab|"))


def _output_position_stats(px_min: torch.Tensor, px_max: torch.Tensor, info: SiteInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-position min/max of a conv's receptive field (im2col columns), zero padding
    included as in the authors' unfolded convolution."""
    h, w = info.pixel_shape
    c = info.conv
    assert c is not None
    pad = (c["padding"][1], c["padding"][1], c["padding"][0], c["padding"][0])
    mx = F.pad(px_max.view(-1, 1, h, w), pad, value=0.0)
    mn = F.pad(px_min.view(-1, 1, h, w), pad, value=0.0)
    kw = dict(kernel_size=c["kernel_size"], stride=c["stride"], dilation=c["dilation"])
    omax = F.max_pool2d(mx, **kw).flatten(1)
    omin = -F.max_pool2d(-mn, **kw).flatten(1)
    return omin, omax


@dataclass
class Calibration:
    """Bit-width-independent statistics of one (model, prompts, steps, scheduler, resolution).

    Tensors are stacked over `t_keys` (calibrated timesteps, descending, then `ALL`).
    """

    tensors: dict[str, torch.Tensor]
    sites: dict[str, SiteInfo]
    t_keys: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    _groups: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ lookup
    def t_index(self, t_key: int) -> int:
        return self.t_keys.index(t_key)

    def nearest_t(self, t: float) -> int:
        """The calibrated timestep closest to `t` (another step count or scheduler still works)."""
        steps = [k for k in self.t_keys if k != ALL]
        return min(steps, key=lambda k: (abs(k - t), k))

    def get(self, site: str, fld: str, t_key: int) -> torch.Tensor:
        return self.tensors[f"{site}|{fld}"][self.t_index(t_key)]

    def has(self, site: str, fld: str) -> bool:
        return f"{site}|{fld}" in self.tensors

    def axis_stats(self, site: str, t_key: int, axis: str, variant: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-index (min, max) along `axis` ("channel" or "pixel"), as the quantizer groups them."""
        info = self.sites[site]
        i = self.t_index(t_key)
        if axis == "channel":
            if variant == "x0":
                return self.tensors[f"{site}|chx_min"][i], self.tensors[f"{site}|chx_max"][i]
            return self.tensors[f"{site}|ch_min"][i], self.tensors[f"{site}|ch_max"][i]
        pre = "opx" if info.needs_unfold() else "px"
        lo, hi = self.tensors[f"{site}|{pre}_min"][i], self.tensors[f"{site}|{pre}_max"][i]
        if variant == "x0":
            lo, hi = lo[1:], hi[1:]
        return lo, hi

    def spread(self, site: str, t_key: int, variant: str = "full") -> tuple[float, float]:
        """(D_channel, D_pixel)."""
        d = self.tensors[f"{site}|D|{variant}"][self.t_index(t_key)]
        return float(d[0]), float(d[1])

    def chosen_axis(self, site: str, t_key: int, variant: str = "full") -> str:
        """argmax_d D_d; ties go to the authors' dim-1 axis (pixel for linear/attention, channel for conv)."""
        dc, dp = self.spread(site, t_key, variant)
        if self.sites[site].kind == "conv":
            return "pixel" if dp > dc else "channel"
        return "channel" if dc > dp else "pixel"

    def labels(self, site: str, t_key: int, axis: str, k: int, variant: str = "full") -> torch.Tensor:
        return self.tensors[f"{site}|lab|{variant}|{axis}|{k}"][self.t_index(t_key)].long()

    def groups(self, site: str, t_key: int, axis: str, k: int, variant: str = "full") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, group lo, group hi) — bit-width independent, memoised."""
        key = (site, t_key, axis, k, variant)
        hit = self._groups.get(key)
        if hit is None:
            labels = self.labels(site, t_key, axis, k, variant)
            amin, amax = self.axis_stats(site, t_key, axis, variant)
            hit = (labels, *P.group_ranges(labels, amin, amax, k))
            self._groups[key] = hit
        return hit

    # ------------------------------------------------------------------ derivation
    def derive_groups(self, ks: Sequence[int] = GROUP_KS) -> None:
        """D_d for both axes and K-means labels for every K and both axes, batched by size."""
        problems: dict[int, list[tuple[str, str, str, torch.Tensor]]] = {}
        for name, info in self.sites.items():
            if info.kind not in GROUPED_KINDS:
                continue
            for variant in info.variants:
                d_rows = []
                for t in self.t_keys:
                    cl, ch = self.axis_stats(name, t, "channel", variant)
                    pl, ph = self.axis_stats(name, t, "pixel", variant)
                    d_rows.append(torch.stack([P.spread_metric(cl, ch), P.spread_metric(pl, ph)]))
                self.tensors[f"{name}|D|{variant}"] = torch.stack(d_rows).float()
                for axis in ("channel", "pixel"):
                    pts = torch.stack([torch.stack(self.axis_stats(name, t, axis, variant), -1) for t in self.t_keys])
                    problems.setdefault(pts.shape[1], []).append((name, variant, axis, pts))
        for n_pts, items in problems.items():
            allpts = torch.cat([it[3] for it in items])  # [G, P, 2]
            for k in ks:
                chunk = max(1, int(4e6 // (n_pts * k)))
                labs = torch.cat([P.kmeans(allpts[i : i + chunk], k) for i in range(0, allpts.shape[0], chunk)])
                off = 0
                for name, variant, axis, pts in items:
                    g = pts.shape[0]
                    self.tensors[f"{name}|lab|{variant}|{axis}|{k}"] = labs[off : off + g].to(torch.uint8)
                    off += g

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path) -> None:
        """Atomically write `<path>.safetensors` and `<path>.json` (metadata + checksum)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
        tmp = st.with_name(st.name + ".tmp")
        save_file({k: (v.half() if v.dtype == torch.float32 and _STORE_HALF(k) else
                       v.float() if v.dtype == torch.float64 else v).contiguous()
                   for k, v in self.tensors.items()}, str(tmp))
        digest = file_sha256(tmp)
        meta = dict(self.meta, format_version=FORMAT_VERSION, t_keys=self.t_keys, sha256=digest,
                    sites={n: _site_to_json(i) for n, i in self.sites.items()})
        tmp_js = js.with_name(js.name + ".tmp")
        tmp_js.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, st)
        os.replace(tmp_js, js)

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None) -> Calibration:
        """Load and verify. Raises `CalibrationMismatch` when stale, mismatched or corrupted."""
        path = Path(path)
        st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
        if not st.exists() or not js.exists():
            raise CalibrationMismatch(f"no calibration at {path}")
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationMismatch(f"unreadable calibration metadata {js}: {e}") from e
        if not isinstance(meta, dict):
            raise CalibrationMismatch(f"calibration metadata {js} is not a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CalibrationMismatch(f"calibration format {meta.get('format_version')} != {FORMAT_VERSION}")
        for k, v in (expect or {}).items():
            if meta.get(k) != v:
                raise CalibrationMismatch(f"calibration was made for {k}={meta.get(k)!r}, not {v!r}")
        if file_sha256(st) != meta.get("sha256"):
            raise CalibrationMismatch(f"checksum mismatch: {st} is corrupted")
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError) as e:
            raise CalibrationMismatch(f"unreadable calibration tensors {st}: {e}") from e
        tensors = {k: v.float() if v.dtype in (torch.float16, torch.float64) else v for k, v in tensors.items()}
        try:
            sites, t_keys = _validated(meta, tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CalibrationMismatch(f"calibration {js} does not hold a valid calibration: "
                                      f"{type(e).__name__}: {e}") from e
        meta = {k: v for k, v in meta.items() if k not in ("sites", "t_keys")}
        return cls(tensors, sites, t_keys, meta)


class CalibrationMismatch(RuntimeError):
    """A cached calibration that must not be used (stale, for another setup, or corrupted)."""


def _validated(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, SiteInfo], list[int]]:
    """Sites and timesteps of a loaded calibration, checked against its tensors: a file that parses
    but lacks a field, holds a wrong type or a tensor of the wrong length is rejected (and rebuilt
    by `calibrate`) instead of failing later, in every run, deep inside a quantizer."""
    raw_sites, raw_t = meta["sites"], meta["t_keys"]
    if not isinstance(raw_sites, dict) or not raw_sites:
        raise TypeError("'sites' must be a non-empty object")
    if not isinstance(raw_t, list) or not raw_t or not all(isinstance(t, int) and not isinstance(t, bool) for t in raw_t):
        raise TypeError("'t_keys' must be a non-empty list of integers")
    if ALL not in raw_t:
        raise ValueError("'t_keys' lacks the all-timesteps key")
    sites = {}
    for name, d in raw_sites.items():
        if not isinstance(d, dict):
            raise TypeError(f"site {name!r} is not an object")
        info = _site_from_json(name, d)
        if info.kind not in ("conv", "linear", "linear2", "q", "k", "v", "p") or not isinstance(info.cross, bool):
            raise ValueError(f"site {name!r} has kind={info.kind!r}, cross={info.cross!r}")
        if not isinstance(info.channels, int) or not all(isinstance(n, int) and n > 0 for n in info.pixel_shape):
            raise TypeError(f"site {name!r} has channels={info.channels!r}, pixel_shape={info.pixel_shape!r}")
        if info.conv is not None and not isinstance(info.conv, dict):
            raise TypeError(f"site {name!r} has conv={info.conv!r}")
        sites[name] = info
    for key, t in tensors.items():
        site = key.split("|", 1)[0]
        if site not in sites:
            raise ValueError(f"tensor {key!r} belongs to no site")
        fld = key.split("|")[1] if "|" in key else ""
        if fld != "sample" and (t.dim() == 0 or t.shape[0] != len(raw_t)):
            raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}; expected one row per timestep ({len(raw_t)})")
        if fld in ("ch_min", "ch_max") and (t.dim() != 2 or t.shape[1] != sites[site].channels):
            raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}; site has {sites[site].channels} channels")
    missing = [n for n in sites if not any(k.startswith(n + "|") for k in tensors)]
    if missing:
        raise ValueError(f"no statistics for site(s) {missing[:3]}")
    return sites, [int(t) for t in raw_t]


def _site_to_json(i: SiteInfo) -> dict[str, Any]:
    return {"kind": i.kind, "cross": i.cross, "channels": i.channels, "pixel_shape": list(i.pixel_shape), "conv": i.conv}


def _site_from_json(name: str, d: dict[str, Any]) -> SiteInfo:
    conv = d.get("conv")
    if conv:
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in conv.items()}
    return SiteInfo(name, d["kind"], d["cross"], d["channels"], tuple(d["pixel_shape"]), conv)


def prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]

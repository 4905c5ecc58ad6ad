"""Figures and image composites for the app: matplotlib `Figure` objects (never pyplot's global
state) and PIL images. Pure functions of numpy data; nothing here touches a model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

VARIANT_COLORS = ("#4c78a8", "#f58518", "#54a24b")  # FP, baseline, DGQ
START = "<start>"


def upscale(img: Image.Image, min_size: int) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor to at least `min_size` px (small models)."""
    f = max(1, -(-min_size // max(img.size)))
    return img if f == 1 else img.resize((img.width * f, img.height * f), Image.NEAREST)


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _cmap(name: str):
    import matplotlib  # noqa: PLC0415

    return matplotlib.colormaps[name]


# ----------------------------------------------------------------------------- attention
def overlay(image: Image.Image, amap: np.ndarray, size: int = 128, alpha: float = 0.55) -> Image.Image:
    """`amap` (any h×w, normalised to its max) as a heat map over `image`, both at size×size."""
    base = image.convert("RGB").resize((size, size), Image.NEAREST)
    a = np.asarray(amap, dtype=np.float64)
    a = a - a.min()
    a = a / a.max() if a.max() > 0 else a
    heat = Image.fromarray((a * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    rgb = (_cmap("jet")(np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(rgb), alpha)


def token_map(image: Image.Image, amap: np.ndarray, size: int = 160, star: bool = False) -> Image.Image:
    """One token's map over one variant's image; `<start>` (star) gets a red frame."""
    tile = overlay(image, amap, size)
    if star:
        ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], outline="#d62728", width=3)
    return tile


def token_mass_figure(tokens: Sequence[str], masses: dict[str, np.ndarray]):
    """Grouped bars: mean attention probability per token for each variant (`<start>` first)."""
    n = len(tokens)
    names = list(tokens) + ["(padding)"]
    fig = _figure(max(6.0, 0.55 * (n + 1) + 2), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(masses))
    shares = []
    for i, (label, m) in enumerate(masses.items()):
        vals = np.concatenate([m[:n], [max(0.0, float(m[n:].sum()))]])
        ax.bar(np.arange(n + 1) + (i - (len(masses) - 1) / 2) * width, vals, width, label=label,
               color=VARIANT_COLORS[i % 3])
        shares.append(f"{label}: {100 * float(m[0]):.0f}%")
    ax.set_xticks(np.arange(n + 1), names, rotation=45, ha="right", fontsize=8)
    ax.get_xticklabels()[0].set_color("#d62728")
    ax.set_ylabel("mean attention probability")
    ax.set_title("cross-attention mass per token — <start> share: " + " · ".join(shares), fontsize=9)
    ax.legend(fontsize=7)
    return fig


def histogram_figure(hists: dict[str, dict[str, np.ndarray]]):
    """Fig. 5(a): counts of cross- vs self-attention probabilities, log count axis, per variant."""
    fig = _figure(4.0 * max(1, len(hists)), 3.2)
    axes = fig.subplots(1, max(1, len(hists)), sharey=True, squeeze=False)[0]
    for ax, (label, h) in zip(axes, hists.items()):
        centers = (h["edges"][:-1] + h["edges"][1:]) / 2
        cross_all = h.get("cross", 0) + h.get("start", 0)
        for vals, name, color in ((cross_all, "cross-attention (all tokens)", "#4c78a8"),
                                  (h.get("start"), "… of which <start>", "#d62728"),
                                  (h.get("self"), "self-attention", "#54a24b")):
            if vals is None or np.ndim(vals) == 0:
                continue
            ax.step(centers, np.maximum(vals, 0.5), where="mid", label=name, color=color, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("attention probability")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0.8)
    axes[0].set_ylabel("count (log)")
    axes[0].legend(fontsize=7, loc="upper center")
    return fig


def step_max_figure(series: dict[str, list[dict[str, Any]]]):
    """Fig. 5(b): per UNet call, max cross-attention over non-<start> tokens vs max self-attention."""
    fig = _figure(6.5, 3.2)
    ax = fig.add_subplot()
    for i, (label, rows) in enumerate(series.items()):
        t = [r["t"] for r in rows]
        cross = [float(np.max(r["cross"])) if r["cross"] is not None else np.nan for r in rows]
        self_ = [float(np.max(r["self"])) if r["self"] is not None else np.nan for r in rows]
        c = VARIANT_COLORS[i % 3]
        ax.plot(t, cross, "-o", ms=3, color=c, label=f"{label}: cross (no <start>)")
        ax.plot(t, self_, ":", color=c, label=f"{label}: self")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t (sampling runs right to left → left to right)")
    ax.set_ylabel("max probability")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("per-step maximum: cross-attention varies, self-attention stays", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- outliers
def outlier_figure(info: dict[str, Any], groups: dict[str, Any] | None, log_scale: bool = True):
    """Fig. 4(b): per-pixel max |x| as an H×W map, per-channel max |x| as bars, DGQ groups coloured."""
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    ch = np.asarray(info["channel_absmax"], dtype=np.float64)
    px = info.get("pixel_absmax")
    labels = groups.get("labels") if groups else None
    g_axis = groups.get("axis") if groups else "tensor"
    k = int(groups.get("k", 1)) if groups else 1
    px_labels = None
    if labels is not None and g_axis == "pixel":
        shape = tuple(groups.get("pixel_shape") or ())
        px_labels = np.asarray(labels).reshape(shape) if shape and int(np.prod(shape)) == len(labels) else np.asarray(labels)
    n = 2 + (px_labels is not None)
    fig = _figure(4.2 * n, 3.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    tab = _cmap("tab20")
    # per pixel
    ax = axes[0]
    if px is None:
        ax.text(0.5, 0.5, "no spatial axis for this input", ha="center", va="center")
        ax.set_axis_off()
    elif np.ndim(px) == 2:
        arr = np.asarray(px, dtype=np.float64)
        norm = LogNorm(vmin=max(arr.min(), 1e-6), vmax=max(arr.max(), 1e-5)) if log_scale else None
        im = ax.imshow(arr, cmap="magma", norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(f"per-pixel max |x| ({arr.shape[0]}×{arr.shape[1]})", fontsize=9)
    else:
        arr = np.asarray(px, dtype=np.float64)
        ax.bar(np.arange(arr.size), arr, color="#72554b", width=1.0)
        ax.set_yscale("log" if log_scale else "linear")
        ax.set_xlabel("token / position index")
        ax.set_title("per-position max |x|", fontsize=9)
    # per channel
    ax = axes[1]
    colors: Any = "#4c78a8"
    if labels is not None and g_axis == "channel" and len(labels) == ch.size:
        colors = [tab(int(g) % 20) for g in labels]
    ax.bar(np.arange(ch.size), ch, color=colors, width=1.0)
    ax.set_yscale("log" if log_scale else "linear")
    ax.set_xlabel("channel index" + (f" (colour = DGQ group, K={k})" if g_axis == "channel" else ""))
    ax.set_title("per-channel max |x|", fontsize=9)
    if px_labels is not None:
        ax = axes[2]
        if px_labels.ndim == 2:
            ax.imshow(px_labels, cmap=tab, vmin=0, vmax=19, interpolation="nearest")
        else:
            ax.bar(np.arange(px_labels.size), np.ones(px_labels.size), color=[tab(int(g) % 20) for g in px_labels], width=1.0)
            ax.set_yticks([])
        ax.set_title(f"DGQ groups along pixels (K={k})", fontsize=9)
    fig.suptitle(f"{info['layer']} — t={info['t']} ({info['kind']})", fontsize=9)
    return fig


def spread_figure(points: list[tuple[str, float, float | None, str]], selected: str | None):
    """D_channel vs D_pixel of every recorded layer at one step; colour = the axis DGQ's rule picks."""
    fig = _figure(5.0, 4.0)
    ax = fig.add_subplot()
    pts = [(n, c, p, a) for n, c, p, a in points if p is not None and c > 0 and p > 0]
    for axis, color in (("channel", "#4c78a8"), ("pixel", "#f58518")):
        sel = [(c, p) for _, c, p, a in pts if a == axis]
        if sel:
            ax.scatter([s[0] for s in sel], [s[1] for s in sel], s=14, color=color, label=f"axis = {axis}", alpha=0.8)
    for n, c, p, _ in pts:
        if n == selected:
            ax.scatter([c], [p], s=90, facecolors="none", edgecolors="#d62728", linewidths=2, label="selected layer")
    if pts:
        lo = min(min(c for _, c, _, _ in pts), min(p for _, _, p, _ in pts))
        hi = max(max(c for _, c, _, _ in pts), max(p for _, _, p, _ in pts))
        ax.plot([lo, hi], [lo, hi], "--", color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("D_channel")
    ax.set_ylabel("D_pixel")
    ax.set_title("spread of outliers per layer (above the line → group pixels)", fontsize=9)
    ax.legend(fontsize=7)
    return fig

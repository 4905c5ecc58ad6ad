"""Analysis recorder: what the app draws, aggregated on the fly with bounded memory.

Attach with ``with dgq.record() as rec: studio.generate(...)`` (`dgq.tracing`). While the UNet runs it keeps

* per layer and selected step: per-channel and per-pixel min/max of the layer's input (so max |x|,
  D_channel, D_pixel and the live axis choice can be shown);
* cross-attention maps of the first conditional prompt, mean over heads, summed per
  (resolution, step) and per layer (over steps) — the `<start>` column included;
* fixed-bin histograms of cross-attention (`<start>` column apart) and self-attention probabilities;
* the per-call max of cross-attention over non-`<start>` tokens and of self-attention (Fig. 5b).

Nothing stores a full attention tensor. Views are computed after the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from dgq import primitives as P

HIST_BINS = 200


@dataclass
class Recorder:
    """Bounded-memory recording of one generation (see module docstring).

    Args:
        outlier_steps: UNet call indices at which layer inputs are recorded (None = every call).
        layers: layer names to record (None = all wrapped layers).
        cfg: whether the batch holds [unconditional; conditional] halves (classifier-free guidance).
    """

    outlier_steps: Sequence[int] | None = None
    layers: Sequence[str] | None = None
    cfg: bool = True
    tokens: list[str] = field(default_factory=list)
    latent_hw: tuple[int, int] | None = None
    t: float | None = None
    call_index: int = -1
    _outliers: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    _maps_rt: dict[tuple[int, int], list] = field(default_factory=dict)  # (res, t) -> [sum, n]
    _maps_layer: dict[str, list] = field(default_factory=dict)
    _hist: dict[str, torch.Tensor] = field(default_factory=dict)
    _step_max: dict[int, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ hooks (called by dgq)
    def set_timestep(self, t: float, call_index: int) -> None:
        self.t, self.call_index = t, call_index

    def set_latent_shape(self, hw: tuple[int, int]) -> None:
        self.latent_hw = (int(hw[0]), int(hw[1]))

    def _cond(self, x: torch.Tensor) -> torch.Tensor:
        """The conditional half of a CFG batch."""
        return x[x.shape[0] // 2 :] if self.cfg and x.shape[0] % 2 == 0 else x

    @torch.no_grad()
    def observe_layer(self, name: str, x: torch.Tensor, kind: str, ctx: Any = None) -> None:
        if self.outlier_steps is not None and self.call_index not in self.outlier_steps:
            return
        if self.layers is not None and name not in self.layers:
            return
        x = x.detach().float()
        rec: dict[str, Any] = {"kind": kind, "t": int(round(self.t or 0))}
        if kind == "conv":
            rec["ch_min"], rec["ch_max"] = x.amin((0, 2, 3)).cpu(), x.amax((0, 2, 3)).cpu()
            rec["px_min"], rec["px_max"] = x.amin((0, 1)).flatten().cpu(), x.amax((0, 1)).flatten().cpu()
            rec["pixel_shape"] = tuple(x.shape[2:])
        elif kind == "linear":
            rec["ch_min"], rec["ch_max"] = x.amin((0, 1)).cpu(), x.amax((0, 1)).cpu()
            rec["px_min"], rec["px_max"] = x.amin((0, 2)).cpu(), x.amax((0, 2)).cpu()
            rec["pixel_shape"] = self._spatial(x.shape[1])
        else:
            rec["ch_min"], rec["ch_max"] = x.amin(0).cpu(), x.amax(0).cpu()
        key = (name, self.call_index)
        old = self._outliers.get(key)
        if old is not None:  # same layer twice in one call: aggregate
            for k in ("ch_min", "px_min"):
                if k in rec:
                    rec[k] = torch.minimum(rec[k], old[k])
            for k in ("ch_max", "px_max"):
                if k in rec:
                    rec[k] = torch.maximum(rec[k], old[k])
        self._outliers[key] = rec

    def _spatial(self, n: int) -> tuple[int, ...]:
        """(h, w) of a token sequence of length n at the current latent size, else (n,)."""
        if self.latent_hw is None:
            r = int(math.isqrt(n))
            return (r, r) if r * r == n else (n,)
        hh, ww = self.latent_hw
        f = math.sqrt(hh * ww / n)
        h, w = round(hh / f), round(ww / f)
        return (h, w) if h * w == n else (n,)

    @torch.no_grad()
    def observe_attention(self, name: str, probs: torch.Tensor, cross: bool, ctx: Any = None) -> None:
        p = self._cond(probs.detach().float())
        t = int(round(self.t or 0))
        kind = "cross" if cross else "self"
        if cross:
            rest, start = p[..., 1:], p[..., 0]
            self._add_hist("cross", rest)
            self._add_hist("start", start)
            m = p[0].mean(0)  # [Nq, Nk] first conditional prompt, mean over heads
            shape = self._spatial(m.shape[0])
            res = shape[0]
            for store, key in ((self._maps_rt, (res, t)), (self._maps_layer, name)):
                if key in store:
                    store[key][0] += m.cpu()
                    store[key][1] += 1
                else:
                    store[key] = [m.cpu().clone(), 1, shape]
            cur = rest.amax(dim=(1, 2, 3)).cpu()
        else:
            self._add_hist("self", p)
            cur = p.amax(dim=(1, 2, 3)).cpu()
        s = self._step_max.setdefault(self.call_index, {"t": t, "cross": None, "self": None})
        s[kind] = cur if s[kind] is None else torch.maximum(s[kind], cur)

    def _add_hist(self, key: str, x: torch.Tensor) -> None:
        h = torch.histc(x.flatten(), bins=HIST_BINS, min=0.0, max=1.0).double().cpu()
        self._hist[key] = self._hist[key] + h if key in self._hist else h

    # ------------------------------------------------------------------ views
    def _need(self, what: dict, name: str) -> None:
        if not what:
            raise RuntimeError(f"the recorder holds no {name}: attach it to a generation "
                               "(`with dgq.record() as rec: studio.generate(...)`)")

    def layer_names(self) -> list[str]:
        return sorted({n for n, _ in self._outliers})

    def call_indices(self) -> list[int]:
        return sorted({c for _, c in self._outliers})

    def outliers(self, layer: str, call_index: int | None = None) -> dict[str, Any]:
        """Per-channel and per-pixel max |x|, D_channel, D_pixel and the live axis of one layer."""
        self._need(self._outliers, "layer statistics")
        calls = [c for n, c in self._outliers if n == layer]
        if not calls:
            raise KeyError(f"layer {layer!r} was not recorded; recorded: {self.layer_names()[:5]}…")
        c = call_index if call_index is not None else calls[len(calls) // 2]
        if (layer, c) not in self._outliers:
            c = min(calls, key=lambda x: abs(x - c))
        r = self._outliers[(layer, c)]
        out: dict[str, Any] = {"layer": layer, "call_index": c, "t": r["t"], "kind": r["kind"],
                               "channel_absmax": torch.maximum(r["ch_min"].abs(), r["ch_max"].abs()).numpy()}
        d_ch = float(P.spread_metric(r["ch_min"], r["ch_max"]))
        out["D_channel"] = d_ch
        if "px_min" in r:
            px = torch.maximum(r["px_min"].abs(), r["px_max"].abs()).numpy()
            shape = r["pixel_shape"]
            out["pixel_absmax"] = px.reshape(shape) if len(shape) == 2 else px
            d_px = float(P.spread_metric(r["px_min"], r["px_max"]))
            out["D_pixel"] = d_px
            if r["kind"] == "conv":
                out["axis"] = "pixel" if d_px > d_ch else "channel"
            else:
                out["axis"] = "channel" if d_ch > d_px else "pixel"
        else:
            out["D_pixel"], out["axis"] = None, "tensor"
        return out

    def resolutions(self) -> list[int]:
        return sorted({r for r, _ in self._maps_rt}, reverse=True)

    def timesteps(self) -> list[int]:
        return sorted({t for _, t in self._maps_rt}, reverse=True)

    def attention_layers(self) -> list[str]:
        return sorted(self._maps_layer)

    def cross_attention(self, token: int | str = 0, resolution: int | None = None, t: int | None = None,
                        layer: str | None = None) -> np.ndarray:
        """Map [h, w] of one token (index or text, 0 = `<start>`), mean over heads and layers.

        `resolution`/`t` select (None = all, maps upsampled to the largest resolution);
        `layer` selects one attention module (summed over steps)."""
        self._need(self._maps_rt, "cross-attention maps")
        j = self._token_index(token)
        if layer is not None:
            s, n, shape = self._maps_layer[layer]
            return (s[:, j] / n).reshape(shape).numpy()
        items = [(k, v) for k, v in self._maps_rt.items()
                 if (resolution is None or k[0] == resolution) and (t is None or k[1] == t)]
        if not items:
            raise KeyError(f"no maps at resolution={resolution}, t={t}; have {self.resolutions()} / {self.timesteps()}")
        target = max(v[2] for _, v in items)
        acc = torch.zeros(target)
        n = 0
        for _, (s, cnt, shape) in items:
            m = (s[:, j] / cnt).reshape(1, 1, *shape)
            if tuple(shape) != tuple(target):
                m = torch.nn.functional.interpolate(m, size=target, mode="bilinear", align_corners=False)
            acc += m[0, 0]
            n += 1
        return (acc / n).numpy()

    def layer_maps(self, layer: str) -> np.ndarray:
        """Every token's map of one attention module, [tokens, h, w] (mean over heads, summed over
        steps as `cross_attention(layer=…)`): one call instead of one per token."""
        self._need(self._maps_rt, "cross-attention maps")
        s, n, shape = self._maps_layer[layer]
        return (s / n).T.reshape(s.shape[1], *shape).numpy()

    def _token_index(self, token: int | str) -> int:
        if isinstance(token, int):
            return token
        if token in ("<start>", "<|startoftext|>"):
            return 0
        if token in self.tokens:
            return self.tokens.index(token)
        raise KeyError(f"token {token!r} is not in the prompt; tokens: {self.tokens}")

    def token_mass(self, resolution: int | None = None, t: int | None = None) -> np.ndarray:
        """Mean attention probability per token (index 0 = `<start>`), over pixels, heads, layers."""
        self._need(self._maps_rt, "cross-attention maps")
        items = [v for k, v in self._maps_rt.items()
                 if (resolution is None or k[0] == resolution) and (t is None or k[1] == t)]
        if not items:
            raise KeyError(f"no maps at resolution={resolution}, t={t}")
        return np.mean([(s / n).mean(0).numpy() for s, n, _ in items], axis=0)

    def histograms(self) -> dict[str, np.ndarray]:
        """Counts per bin over [0, 1] for "cross" (non-`<start>`), "start" and "self"; plus "edges"."""
        self._need(self._hist, "attention histograms")
        out = {k: v.numpy() for k, v in self._hist.items()}
        out["edges"] = np.linspace(0.0, 1.0, HIST_BINS + 1)
        return out

    def step_max(self) -> list[dict[str, Any]]:
        """Per UNet call: t, max cross-attention over non-`<start>` tokens, max self-attention
        (one value per conditional prompt)."""
        self._need(self._step_max, "attention maxima")
        return [{"call_index": c, "t": v["t"],
                 "cross": None if v["cross"] is None else v["cross"].numpy(),
                 "self": None if v["self"] is None else v["self"].numpy()}
                for c, v in sorted(self._step_max.items())]


def token_names(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Readable token strings: `<start>` / `<end>` for CLIP's markers, word-end marks dropped."""
    names = []
    for i in ids:
        s = tokenizer.convert_ids_to_tokens(int(i))
        names.append({"<|startoftext|>": "<start>", "<|endoftext|>": "<end>"}.get(s, s.replace("</w>", "")))
    return names

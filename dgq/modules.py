"""Wrapped Conv2d/Linear layers and the in-place `quantize_` verb that installs them.

`quantize_(unet)` turns every Conv2d/Linear of the UNet except `conv_in`/`conv_out` into a
quantizable layer *in place*: the module object, its parameters and its place in the tree stay
the same, only its class gains a forward that asks the active `RunContext` what to do. With no
active run — or the FP config — the forward is the original one, bit for bit. Quantized weights
(uint8 codes + per-channel scale/zero-point) are cached per bit-width on the layer; FP weights are
never overwritten, so every variant runs from the one model in memory.
"""

from __future__ import annotations

import fnmatch
import threading
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dgq import int8 as int8_exec
from dgq import primitives as P
from dgq.context import active
from dgq.quantizer import apply_act, fake_quant_prepared

DEFAULT_EXCLUDE = ("conv_in", "conv_out")
_WEIGHT_CACHE_MAX = 2  # bit-widths kept per layer; bounds memory at ~1.25-1.5× FP weights
# Layers below this size keep their dequantized weight (saves a dequantization per call, which
# dominates on small models); larger ones keep uint8 codes and dequantize per call.
_DEQUANT_CACHE_NUMEL = 1 << 20


class QuantMixin:
    """Shared logic of the wrapped layers; mixed in front of the original class."""

    dgq_name: str
    _dgq_wcache: dict
    _dgq_wranges: dict
    _dgq_lock: threading.Lock
    _dgq_orig_class: type
    weight_search: str = "mse"

    def quantized_weight(self, bits: int, rounding: str = "nearest") -> torch.Tensor:
        """The fake-quantized weight at `bits` (computed once per bit-width, then cached).

        `rounding="adaround"` takes the learned rounding `dgq.adaround.install` handed the layer
        (each weight on the floor or ceiling of its grid cell, with the range it was learned for)."""
        key = (bits, self.weight_search) if rounding == "nearest" else (bits, self.weight_search, rounding)
        entry = self._dgq_wcache.get(key)
        if entry is None:
            with self._dgq_lock:
                entry = self._dgq_wcache.get(key)
                if entry is None:
                    ranges = self._dgq_wranges.get(key)  # the searched per-channel range outlives the eviction
                    if rounding != "nearest":
                        entry = self._learned_codes(bits, rounding)
                    elif ranges is None:
                        entry = P.quantize_weight(self.weight, bits, self.weight_search)
                        self._dgq_wranges[key] = entry[1:]
                    else:
                        entry = (P.weight_codes(self.weight, *ranges, bits), *ranges)
                    if self.weight.numel() <= _DEQUANT_CACHE_NUMEL:
                        entry = P.dequantize_weight(*entry).to(self.weight.dtype)
                    while len(self._dgq_wcache) >= _WEIGHT_CACHE_MAX:
                        self._dgq_wcache.pop(next(iter(self._dgq_wcache)))
                    self._dgq_wcache[key] = entry
        if isinstance(entry, torch.Tensor):
            return entry
        codes, s, z = entry
        return P.dequantize_weight(codes, s, z).to(self.weight.dtype)

    def _learned_codes(self, bits: int, rounding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from dgq.adaround import mask_codes  # noqa: PLC0415 - only learned roundings need it

        if rounding not in ("adaround", "adaround-tiar"):
            raise ValueError(f"weight rounding {rounding!r}; allowed: nearest, adaround, adaround-tiar")
        learned = self.__dict__.get("_dgq_wround", {}).get((bits, self.weight_search, rounding))
        if learned is None:
            raise RuntimeError(f"{self.dgq_name}: no AdaRound rounding at W{bits} is loaded; run "
                               f"`python -m dgq reconstruct --w-bits {bits}{' --tiar' if rounding == 'adaround-tiar' else ''}` "
                               f"(or Studio.load_rounding({bits}, {rounding!r}))")
        mask, s, z = learned
        s, z = s.to(self.weight.device), z.to(self.weight.device)
        return mask_codes(self.weight, s, z, mask, bits), s, z

    def _weight_for(self, ctx) -> torch.Tensor:
        if self.__dict__.get("_dgq_fp_released"):  # an int8-only run: the packed codes are the weight
            return int8_exec.simulated_weight(self, -1 if ctx is None or ctx.params is None else ctx.params.w_bits)
        if ctx is None or ctx.params is None or ctx.params.w_bits >= 16:
            return self.weight
        return self.quantized_weight(ctx.params.w_bits, getattr(ctx.params.config, "weight_rounding", "nearest"))


class QuantLinearMixin(QuantMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx = active()
        if ctx is None:
            return F.linear(x, self.weight, self.bias)
        kind = "linear" if x.dim() == 3 else "linear2"
        if ctx.collector is not None:
            ctx.collector.observe(self.dgq_name, x, kind)
        if ctx.recorder is not None:
            ctx.recorder.observe_layer(self.dgq_name, x, kind, ctx)
        if ctx.perturbation is not None:
            x = ctx.perturbation.apply(x)
        if ctx.params is not None:
            q = ctx.params.act(self.dgq_name, ctx.t_key)
            if q is not None:
                if int8_exec.wants_int8(ctx):  # integer GEMM; None = it fell back (logged once)
                    y = int8_exec.linear(self, x, q, ctx.params.w_bits)
                    if y is not None:
                        return y
                x = apply_act(x, q, kind, slot=id(self))  # consumed by F.linear below
        return F.linear(x, self._weight_for(ctx), self.bias)


class QuantConv2dMixin(QuantMixin):
    def _geometry(self) -> dict:
        return {"kernel_size": tuple(self.kernel_size), "stride": tuple(self.stride),
                "padding": tuple(self.padding), "dilation": tuple(self.dilation)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx = active()
        if ctx is None:
            return self._conv_forward(x, self.weight, self.bias)
        if ctx.collector is not None:
            ctx.collector.observe(self.dgq_name, x, "conv", conv=self._geometry())
        if ctx.recorder is not None:
            ctx.recorder.observe_layer(self.dgq_name, x, "conv", ctx)
        if ctx.perturbation is not None:
            x = ctx.perturbation.apply(x)
        if int8_exec.wants_int8(ctx):  # integer GEMM; None = it fell back (logged once)
            q = ctx.params.act(self.dgq_name, ctx.t_key)
            if q is not None:
                unfold = q.mode == "pixel" and ctx.params.calib.sites[self.dgq_name].needs_unfold()
                y = int8_exec.conv2d(self, x, q, ctx.params.w_bits, unfold)
                if y is not None:
                    return y
        w = self._weight_for(ctx)
        if ctx.params is not None:
            q = ctx.params.act(self.dgq_name, ctx.t_key)
            if q is not None:
                if q.mode == "pixel" and ctx.params.calib.sites[self.dgq_name].needs_unfold():
                    return self._unfolded(x, w, q)
                x = apply_act(x, q, "conv", slot=id(self))  # consumed by the conv below
        return self._conv_forward(x, w, self.bias)

    def _unfolded(self, x: torch.Tensor, w: torch.Tensor, q) -> torch.Tensor:
        """Pixel groups of a k×k conv scale im2col columns (output positions): run the conv as
        unfold + GEMM so each column gets its group's scale, as the authors do."""
        if self.groups != 1 or self.padding_mode != "zeros":
            raise NotImplementedError("pixel-grouped quantization supports plain convolutions only")
        b, _, h, wd = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C·k·k, L]
        if cols.shape[-1] != q.scale.numel():
            raise RuntimeError(
                f"pixel groups were calibrated for {q.scale.numel()} positions but this input has "
                f"{cols.shape[-1]}: the resolution differs from the calibration's; recalibrate")
        cols = fake_quant_prepared(cols, q, "cols")
        out = w.view(w.shape[0], -1) @ cols
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (wd + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.view(b, -1, ho, wo)


_CLASS_CACHE: dict[type, type] = {}


def _quant_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        mixin = QuantConv2dMixin if issubclass(cls, nn.Conv2d) else QuantLinearMixin
        _CLASS_CACHE[cls] = type(f"Quant{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CLASS_CACHE[cls]


def default_filter(name: str, module: nn.Module) -> bool:
    """Every Conv2d/Linear of the UNet except conv_in/conv_out (the paper's scope)."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and name not in DEFAULT_EXCLUDE


def quantize_(
    unet: nn.Module,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    weight_search: str = "mse",
) -> list[str]:
    """Make the UNet quantizable in place; idempotent. Returns the wrapped layers' names.

    Args:
        unet: a diffusers `UNet2DConditionModel` (any module tree works).
        filter_fn: `(name, module) -> bool`; defaults to `default_filter`.
        include / exclude: fnmatch patterns on module names, applied after `filter_fn`.
        weight_search: "mse" (the authors' search) or "minmax".

    Example:
        >>> names = dgq.quantize_(pipe.unet)          # every conv/linear but conv_in/conv_out
    """
    from dgq.attention import install_attention  # noqa: PLC0415 - avoid an import cycle

    if weight_search not in ("mse", "minmax"):
        raise ValueError(f"weight_search={weight_search!r}; allowed: mse, minmax")
    filter_fn = filter_fn or default_filter
    wrapped = []
    for name, m in unet.named_modules():
        if isinstance(m, QuantMixin):
            if m.weight_search != weight_search:
                m.weight_search = weight_search
            wrapped.append(name)
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or not filter_fn(name, m):
            continue
        if include is not None and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        orig = type(m)
        m.__class__ = _quant_class(orig)
        m._dgq_orig_class = orig
        m.dgq_name = name
        m._dgq_wcache = {}
        m._dgq_wranges = {}  # (bits, search) -> (scale, zero) per output channel: small, never evicted
        m._dgq_lock = threading.Lock()
        m.weight_search = weight_search
        wrapped.append(name)
    install_attention(unet)
    return wrapped


def dequantize_(unet: nn.Module) -> None:
    """Undo `quantize_`: original classes and attention processors back, caches dropped."""
    from dgq.attention import uninstall_attention  # noqa: PLC0415

    for _, m in unet.named_modules():
        if isinstance(m, QuantMixin):
            m.__class__ = m._dgq_orig_class
            for a in ("_dgq_orig_class", "dgq_name", "_dgq_wcache", "_dgq_wranges", "_dgq_wround", "_dgq_lock",
                      "weight_search"):
                m.__dict__.pop(a, None)
    uninstall_attention(unet)


def quantized_layers(unet: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, QuantMixin)}


def clear_weight_cache(unet: nn.Module) -> None:
    for m in quantized_layers(unet).values():
        m._dgq_wcache.clear()
        m._dgq_wranges.clear()

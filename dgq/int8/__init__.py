"""Integer execution of the quantized layers (`execution="int8"` on a config); see `core`.

Public: `int_mm_available`, `has_vnni`, `fallbacks`/`reset_fallbacks` (which sites ran the
simulated path instead, and why), `pack_` (pack every layer's weight at a bit-width ahead of
time), `release_fp_weights_` (int8-only: drop the FP weights once packed) and `resident_bytes`.
"""

from __future__ import annotations

import torch
from torch import nn

from dgq.int8.core import (
    BACKENDS,
    PackedWeight,
    backend,
    fallback,
    fallbacks,
    has_vnni,
    int_mm_available,
    mm_supported,
    packed_weight,
    reset_fallbacks,
    set_backend,
    span_product,
    wants_int8,
)
from dgq.int8.layers import attention_scores, conv2d, linear

__all__ = ["BACKENDS", "PackedWeight", "attention_scores", "backend", "conv2d", "fallback", "fallbacks", "has_vnni",
           "int_mm_available", "linear", "mm_supported", "pack_", "packed_weight", "release_fp_weights_",
           "reset_fallbacks", "resident_bytes", "set_backend", "simulated_weight", "span_product", "wants_int8"]


def _layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's wrapped layers (what `dgq.modules.quantized_layers` lists), found by the
    attributes `quantize_` gives them: `dgq.modules` imports this package, not the reverse."""
    return {n: m for n, m in unet.named_modules()
            if getattr(m, "dgq_name", None) is not None and hasattr(m, "quantized_weight")}


def pack_(unet: nn.Module, bits: int) -> int:
    """Pack every quantized layer's weight at `bits` now (int8 codes + scales + sums; the
    per-channel ranges are the simulated path's); returns the packed bytes."""
    return sum(packed_weight(m, bits).nbytes() for m in _layers(unet).values())


def release_fp_weights_(unet: nn.Module, bits: int) -> int:
    """For an int8-only run: pack at `bits`, then replace each quantized layer's FP weight by an
    empty tensor and drop its dequantized caches. The layers then run int8 at `bits` only (their
    simulated fallback dequantizes the packed codes, bit-identical to the simulated weight); FP,
    other bit-widths and calibration need the model loaded again. Returns the FP bytes freed."""
    freed = 0
    for m in _layers(unet).values():
        packed_weight(m, bits)
        if getattr(m, "_dgq_fp_released", False):
            continue
        freed += m.weight.numel() * m.weight.element_size()
        m._dgq_wcache.clear()
        m.weight = nn.Parameter(torch.empty(0, dtype=m.weight.dtype, device=m.weight.device), requires_grad=False)
        m._dgq_fp_released = True
    return freed


def simulated_weight(layer: nn.Module, bits: int) -> torch.Tensor:
    """The simulated weight of a layer whose FP weight was released (from its packed codes)."""
    packed = getattr(layer, "_dgq_int8", {}).get(bits)
    if packed is None:
        raise RuntimeError(f"{layer.dgq_name}: FP weights were released for an int8-only run at other bits; "
                           "load the model again for FP, simulated or other bit-widths")
    return packed.dequantized().to(layer.weight.dtype)


def resident_bytes(unet: nn.Module) -> int:
    """Bytes the model holds: parameters, buffers, weight caches and packed int8 weights
    (each storage counted once)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for t in list(unet.parameters()) + list(unet.buffers()):
        add(t)
    for m in _layers(unet).values():
        for entry in m._dgq_wcache.values():
            for t in (entry if isinstance(entry, tuple) else (entry,)):
                add(t)
        for pw in getattr(m, "_dgq_int8", {}).values():
            for t in (pw.codes, pw.codes_t, pw.scale, pw.offset, pw.sums):
                if t is not None:
                    add(t)
            for w, sums in pw._perm.values():
                add(w)
    return sum(seen.values())

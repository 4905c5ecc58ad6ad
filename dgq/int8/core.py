"""Integer execution: the quantized layers run as int8 × int8 → int32 GEMMs (`torch._int_mm`).

The simulated path dequantizes codes and multiplies in fp32. Here the same codes — the same
rounding of the same fp32 products, the same clamps — are multiplied as integers and only the
int32 sums are rescaled in fp32, so a layer's output equals the simulated one up to fp32
rounding (the sums are exact; the simulated GEMM rounds at every addition).

Notation for one reduction ``Σ_d x̂_d ŵ_d``: a uniform code is ``code ∈ [0, 2^b − 1]`` with
zero-point ``z``; the value is ``s·(code − z)``. Codes are held in int8 as ``e = code − 2^(b−1)``
(in range for any b ≤ 8), so ``code − z = e + m`` with the integer offset ``m = 2^(b−1) − z``.
With ``a`` the activation side and ``b`` the weight side, over a span of d where both scales and
offsets are constant along d:

    Σ_d (e_a + m_a)(e_b + m_b) = e_a·e_b + m_a·Σ e_b + m_b·Σ e_a + n·m_a·m_b

one GEMM plus rank-1 corrections (the weight sums are computed once per packed weight). Scales
and offsets that vary along the *rows* of either operand (per output channel for weights, per
pixel/token for pixel groups) factor out of the sum: one GEMM. Scales that vary along the
reduction (channel groups) split it into one GEMM per group, over channels permuted into group
order (the permuted weight is cached per grouping).

Convolutions run as im2col + GEMM (the centered codes are unfolded, so zero padding is a zero
value exactly as in the simulated conv; pixel groups of a k×k conv quantize the im2col columns,
as the simulated path does). Attention's Q·Kᵀ runs on int8 codes; the `<start>` key kept in FP
is a rank-1 fp32 product; P·V stays in floating point (the log2 probabilities are powers of two,
not uniform codes).

Where `torch._int_mm` is missing, or the device's kernel does not take a shape, the layer falls
back to the simulated path and says so once (`fallbacks()` lists them). A CPU without VNNI
(`has_vnni()`) still runs `torch._int_mm` exactly, but through a slow generic loop; see
docs/int8.md for the measured figures.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgq import primitives as P

log = logging.getLogger(__name__)

_FALLBACKS: dict[str, str] = {}
_FB_LOCK = threading.Lock()
_PERM_CACHE_MAX = 2  # permuted weights kept per layer (channel groups change with the timestep)
# Only small layers keep them: a large layer's gather costs far less than its GEMM, and a cached
# copy per grouping would cost an int8-only model its memory saving.
_PERM_CACHE_NUMEL = 1 << 20
_INT32_SAFE = (1 << 31) // 3  # each of the three terms of an exact sum stays below this in int32


# ----------------------------------------------------------------------------- backend
def int_mm_available(device: torch.device | str = "cpu") -> bool:
    """Whether the integer product can run on `device`: `torch._int_mm` exists and runs there
    (probed once per device type), or the fp32-exact backend is chosen."""
    dev = torch.device(device)
    if backend(dev) == "fp32-exact":
        return True
    hit = _PROBED.get(dev.type)
    if hit is None:
        hit = False
        if hasattr(torch, "_int_mm"):
            try:
                a = torch.ones(32, 32, dtype=torch.int8, device=dev)
                hit = int(torch._int_mm(a, a)[0, 0]) == 32
            except (RuntimeError, NotImplementedError):
                hit = False
        _PROBED[dev.type] = hit
    return hit


_PROBED: dict[str, bool] = {}


def mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Shape constraints of `torch._int_mm`: CUDA needs m > 16 and k, n multiples of 8; the CPU
    kernel takes any non-empty shape."""
    if m < 1 or k < 1 or n < 1:
        return False
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return True


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), the
    ones PyTorch's fast int8 CPU GEMM needs; without them `torch._int_mm` is exact but slow."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def fallback(site: str, reason: str) -> None:
    """Record that `site` ran the simulated path instead, logging it once per site."""
    with _FB_LOCK:
        if site in _FALLBACKS:
            return
        _FALLBACKS[site] = reason
    log.warning("int8 execution: %s runs the simulated path (%s)", site, reason)


def fallbacks() -> dict[str, str]:
    """Sites that fell back to the simulated path since the last `reset_fallbacks()`, with why."""
    with _FB_LOCK:
        return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    with _FB_LOCK:
        _FALLBACKS.clear()


def wants_int8(ctx) -> bool:
    """Whether the active run asks for integer execution."""
    return ctx is not None and ctx.params is not None and getattr(ctx.params.config, "execution", "") == "int8"


# ----------------------------------------------------------------------------- exact integer product
BACKENDS = ("auto", "int_mm", "fp32-exact")
_EXACT_CHUNK = 1024  # 1024 · 128² = 2^24: every partial sum of a chunk is an exact fp32 integer
_backend = os.environ.get("DGQ_INT8_BACKEND", "auto")


def set_backend(name: str) -> None:
    """`"int_mm"` = `torch._int_mm`; `"fp32-exact"` = the same int32 sums computed on fp32 GEMMs
    in chunks of 1024 along the reduction (each partial sum is an integer below 2^24, so fp32
    adds it exactly: bit-identical results, for CPUs whose `_int_mm` is a slow generic loop);
    `"auto"` (default; `DGQ_INT8_BACKEND`) = `int_mm` on CUDA or a CPU with VNNI, else fp32-exact."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"int8 backend {name!r}; allowed: {list(BACKENDS)}")
    _backend = name


def backend(device: torch.device | str = "cpu") -> str:
    """The backend the integer products use on `device` now."""
    if _backend != "auto":
        return _backend
    dev = torch.device(device)
    return "int_mm" if dev.type != "cpu" or has_vnni() else "fp32-exact"


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 ``a @ b`` of int8 matrices; `b` (and then `a` too, or not) may carry a batch dim."""
    if backend(a.device) == "int_mm":
        if b.dim() == 2:
            return torch._int_mm(a if a.is_contiguous() else a.contiguous(), b)
        if a.dim() == 2:  # shared left operand: the batch side by side, one product
            bt, n, cols = b.shape
            out = torch._int_mm(a.contiguous(), b.permute(1, 0, 2).reshape(n, bt * cols))
            return out.view(a.shape[0], bt, cols).permute(1, 0, 2)
        return torch.stack([torch._int_mm(x.contiguous(), y.contiguous()) for x, y in zip(a, b)])
    d = a.shape[-1]
    acc = None
    for i in range(0, d, _EXACT_CHUNK):
        part = torch.matmul(a[..., i:i + _EXACT_CHUNK].to(torch.float32), b[..., i:i + _EXACT_CHUNK, :].to(torch.float32))
        part = part.to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(-1) if v.dim() else v


def _row(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(-2) if v.dim() else v


def span_product(a: torch.Tensor, b: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, sa: torch.Tensor,
                 sb: torch.Tensor, sum_a: torch.Tensor | None = None, sum_b: torch.Tensor | None = None,
                 minus: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(sa ⊗ sb) · Σ_d (a + ma)(b + mb)`` for int8 `a` [(Bt,) R, n], `b` [(Bt,) n, N]: one
    integer product, rank-1 integer corrections (exact), then one fp32 rescale. `ma`/`sa` are
    0-d or [R] (per row of a), `mb`/`sb` 0-d or [N]; `sum_a` [R] / `sum_b` [N] are Σ_d a, Σ_d b
    when known. `minus` = (column indices, int64 [R, len]): integers taken off those columns of
    the sum before the rescale (a convolution's padding taps)."""
    n = a.shape[-1]
    acc = _mm(a, b)
    if sum_a is None:
        sum_a = a.sum(-1, dtype=torch.int32)
    if sum_b is None:
        sum_b = b.sum(-2, dtype=torch.int32)
    bound = n * (128 + int(ma.abs().max())) * (128 + int(mb.abs().max()))
    if bound >= _INT32_SAFE:  # offsets far from the codes (ranges that exclude 0): exact in int64
        acc, ma, mb, sum_a, sum_b = (t.to(torch.int64) for t in (acc, ma, mb, sum_a, sum_b))
    acc += _col(ma) * (_row(sum_b) + n * _row(mb))
    acc += _col(sum_a) * _row(mb)
    if minus is not None:
        acc[..., minus[0]] -= minus[1].to(acc.dtype)
    return acc.to(torch.float32).mul_(_col(sa) * _row(sb))


# ----------------------------------------------------------------------------- weights
@dataclass
class PackedWeight:
    """A layer's weight at one bit-width as int8 codes ``e = code − 2^(b−1)`` [O, D] (D in
    im2col order for convs), per-output-channel fp32 scale, integer offset ``2^(b−1) − z`` and
    code sums Σ_d e."""

    bits: int
    codes: torch.Tensor | None  # int8 [O, D] (convolutions)
    codes_t: torch.Tensor | None  # int8 [D, O] (linear layers: the GEMM's right operand)
    scale: torch.Tensor  # fp32 [O]
    offset: torch.Tensor  # int32 [O]
    sums: torch.Tensor  # int32 [O]
    shape: tuple[int, ...]
    _perm: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def nbytes(self) -> int:
        main = self.codes_t if self.codes_t is not None else self.codes
        return sum(t.numel() * t.element_size() for t in (main, self.scale, self.offset, self.sums))

    def dequantized(self) -> torch.Tensor:
        """The simulated path's weight, bit for bit: ``s·(code − z)`` in fp32."""
        codes = self.codes if self.codes is not None else self.codes_t.t()
        return ((codes.float() + self.offset.float().view(-1, 1)) * self.scale.view(-1, 1)).view(self.shape)

    def permuted(self, key: tuple, order: torch.Tensor, block: int, bounds: list[tuple[int, int]]):
        """(codes with their input channels in `order`, Σ_d of each span in `bounds`), cached per
        grouping; `block` is the kernel area (each channel owns `block` consecutive columns)."""
        hit = self._perm.get(key)
        if hit is None:
            with self._lock:
                hit = self._perm.get(key)
                if hit is None:
                    o = self.shape[0]
                    if self.codes_t is not None:
                        w = self.codes_t.index_select(0, order).contiguous()
                        sums = [w[i:j].sum(0, dtype=torch.int32) for i, j in bounds]
                    else:
                        w = self.codes.view(o, -1, block).index_select(1, order).reshape(o, -1).contiguous()
                        sums = [w[:, i:j].sum(1, dtype=torch.int32) for i, j in bounds]
                    hit = (w, sums)
                    if w.numel() <= _PERM_CACHE_NUMEL:  # large ones: gathered per call, never resident
                        while len(self._perm) >= _PERM_CACHE_MAX:
                            self._perm.pop(next(iter(self._perm)))
                        self._perm[key] = hit
        return hit


def packed_weight(layer, bits: int) -> PackedWeight:
    """The layer's packed weight at `bits` (built once; the per-channel range is the one the
    simulated path uses, searched once per bit-width and kept on the layer)."""
    store = layer.__dict__.setdefault("_dgq_int8", {})
    hit = store.get(bits)
    if hit is not None:
        return hit
    with layer._dgq_lock:
        hit = store.get(bits)
        if hit is None:
            if getattr(layer, "_dgq_fp_released", False):
                raise RuntimeError(f"{layer.dgq_name}: FP weights were released and W{bits} was not packed before")
            key = (bits, layer.weight_search)
            ranges = layer._dgq_wranges.get(key)
            if ranges is None:
                _, s, z = P.quantize_weight(layer.weight, bits, layer.weight_search)
                layer._dgq_wranges[key] = ranges = (s, z)
            s, z = ranges
            codes = P.weight_codes(layer.weight, s, z, bits)  # uint8 [O, ...]
            half = 1 << (bits - 1)
            e = (codes.reshape(codes.shape[0], -1).to(torch.int16) - half).to(torch.int8)
            is_linear = layer.weight.dim() == 2
            hit = PackedWeight(bits, None if is_linear else e.contiguous(), e.t().contiguous() if is_linear else None,
                               s.float().to(e.device), (half - z).to(torch.int32).to(e.device),
                               e.sum(1, dtype=torch.int32), tuple(layer.weight.shape))
            store[bits] = hit
    return hit


# ----------------------------------------------------------------------------- activations
def centered_codes(x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``code − z = clamp(round(x·(1/s)), −z, 2^b−1−z)`` in fp32, the very values the simulated
    quantizer multiplies by s (same fp32 product, same rounding)."""
    _, inv, lo, hi = params
    y = torch.mul(x.float(), inv)
    y.round_()
    torch.maximum(y, lo, out=y)
    torch.minimum(y, hi, out=y)
    return y


def to_int8(c: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 ``e = code − 2^(b−1)`` from centered codes c (``code = c − lo``, lo = −z)."""
    return (c - lo).sub_(1 << (bits - 1)).to(torch.int8)


def offsets(lo: torch.Tensor, bits: int) -> torch.Tensor:
    """``m = 2^(b−1) − z = 2^(b−1) + lo`` as int32 (same shape as lo)."""
    return (lo + (1 << (bits - 1))).to(torch.int32)


@dataclass(frozen=True)
class Partition:
    """Reduction indices grouped so that scales and offsets are constant within each span:
    `order` (a permutation), [start, stop) spans in that order, the original index of each
    span's first member, and a hashable key of the permutation."""

    order: torch.Tensor
    bounds: list[tuple[int, int]]
    first: list[int]
    key: bytes


def channel_labels(q, n: int) -> torch.Tensor:
    """Group id of each of the n channels of a channel-grouped quantizer (equal (scale, zero)
    pairs when it carries no labels)."""
    if q.labels is not None and q.labels.numel() == n:
        return q.labels.reshape(-1).cpu().long()
    pair = torch.stack([q.scale.float().reshape(-1), q.zero.float().reshape(-1)], 1).cpu()
    return torch.unique(pair, dim=0, return_inverse=True)[1]


def partition(labels: torch.Tensor) -> Partition:
    labels = labels - labels.min()
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels[order]).tolist()
    bounds, first, start = [], [], 0
    for c in counts:
        if c:
            bounds.append((start, start + c))
            first.append(int(order[start]))
            start += c
    return Partition(order, bounds, first, order.numpy().tobytes())


def channel_partition(q, n: int) -> Partition:
    """The partition of a channel-grouped site's n channels, cached on its quantizer."""
    key = ("int8-partition", n)
    hit = q._by_input.get(key)
    if hit is None:
        hit = q._by_input[key] = partition(channel_labels(q, n))
    return hit

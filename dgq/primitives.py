"""Pure quantization math: no modules, no state, unit-tested one function at a time.

Conventions (the authors' code, dgq-method.md §A.3, §B.3, §C.1, H-1):
* uniform asymmetric: ``s = (hi − lo)/(2^b − 1)``, ``z = round(−lo/s)``,
  ``q = clamp(round(x/s) + z, 0, 2^b − 1)``, ``x̂ = s·(q − z)``;
* base-2 log: ``q = round(−log2(x/s))``; codes 0 … 2^b − 2 dequantize to ``s·2^−q``, the last code
  means exactly zero (zeros and underflow), so every output is ``s·2^−k`` or 0 with b bits;
* all arithmetic in fp32, whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8

# Log-domain histogram used for attention probabilities: bins of 1/8 octave over [2^-40, 2^0].
LOG2_MIN, LOG2_BINS_PER_OCTAVE = -40.0, 8
_MANT_BITS = 3  # 2^3 = 8 bins per octave
_LOW_IDX = (127 + int(LOG2_MIN)) << _MANT_BITS  # float32 exponent/mantissa index of 2^-40
_HIGH_IDX = 127 << _MANT_BITS  # index of 1.0
N_LOG_BINS = _HIGH_IDX - _LOW_IDX + 1  # + one underflow bin (index 0) in storage
LOG_QUANTILES = (0.999, 0.9999, 0.99999)


# ----------------------------------------------------------------------------- uniform
def uniform_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point for the range [lo, hi] (elementwise; any shape)."""
    lo, hi = lo.float(), hi.float()
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(EPS)
    zero = torch.round(-lo / scale)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with broadcastable scale/zero-point; returns fp32."""
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def quant_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (for tests and storage)."""
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**bits - 1)


_SEARCH_CHUNK_ELEMS = 1 << 24  # candidates evaluated at once are bounded to ~64 MB of fp32


def mse_search(x: torch.Tensor, bits: int, p: float = 2.4, n: int = 80, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range by the authors' search: shrink min and max by (1 − 0.01·i), i < n; keep the
    candidate with the lowest mean |x − x̂|^p (the first one on ties). `dim=None` is per tensor;
    `dim=1` with a 2-D `x` is per row (per output channel for weights). Returns (lo, hi).

    Candidates are evaluated in stacked chunks rather than one by one: the same arithmetic, but a
    few dozen large ops instead of ~800 small ones per tensor (a bit-width switch re-runs this for
    every layer)."""
    x = x.float()
    rows = x.reshape(1, -1) if dim is None else x
    if dim is not None and (x.dim() != 2 or dim != 1):
        raise ValueError("mse_search: dim must be None or 1 with a 2-D input")
    lo0 = rows.amin(dim=1).clamp(max=0.0)
    hi0 = rows.amax(dim=1).clamp(min=0.0)
    f = (1.0 - 0.01 * torch.arange(n, dtype=torch.float64, device=x.device)).float()  # as the scalar loop rounds it
    chunk = max(1, min(n, _SEARCH_CHUNK_ELEMS // max(1, rows.numel())))
    errs = []
    for i in range(0, n, chunk):
        fi = f[i:i + chunk].view(-1, 1)
        lo, hi = lo0 * fi, hi0 * fi  # [c, R]
        s, z = uniform_qparams(lo, hi, bits)
        s3, z3 = s.unsqueeze(-1), z.unsqueeze(-1)
        q = torch.div(rows, s3).round_().add_(z3).clamp_(0, 2**bits - 1).sub_(z3).mul_(s3)  # [c, R, D]
        # |e|^p as exp(p·ln|e|): vectorised on CPU where pow with a fractional exponent is not (~2×)
        errs.append(q.sub_(rows).abs_().log_().mul_(p).exp_().mean(dim=-1))
    err = torch.cat(errs)  # [n, R]
    best = err.argmin(dim=0)  # first minimum = the sequential search's strict `<`
    fb = f[best]
    lo, hi = lo0 * fb, hi0 * fb
    if dim is None:
        return lo[0], hi[0]
    return lo, hi


def quantize_weight(w: torch.Tensor, bits: int, search: str = "mse") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel asymmetric weight quantization. Returns (uint8 codes, scale, zero).

    `search="mse"` is the authors' 80-candidate L2.4 search; `"minmax"` the plain range.
    """
    w2 = w.detach().float().reshape(w.shape[0], -1)
    if search == "mse":
        lo, hi = mse_search(w2, bits, dim=1)
    elif search == "minmax":
        lo, hi = w2.amin(1).clamp(max=0.0), w2.amax(1).clamp(min=0.0)
    else:
        raise ValueError(f"weight search {search!r}; allowed: mse, minmax")
    s, z = uniform_qparams(lo, hi, bits)
    return weight_codes(w, s, z, bits), s, z


def weight_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `w` with per-output-channel (scale, zero) (a known range: no search)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    return quant_codes(w2, scale[:, None], zero[:, None], bits).to(torch.uint8).reshape(w.shape)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() - zero.view(shape)) * scale.view(shape)


# ----------------------------------------------------------------------------- log2
def log_fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int, inplace: bool = False,
                   at_most_scale: bool = False) -> torch.Tensor:
    """Base-2 log quantize-dequantize of non-negative `x` (attention probabilities), fp32:
    ``s · 2^−clamp(round(−log2(x/s)), 0, 2^b−1)``, the last code meaning zero.

    `scale` broadcasts against `x` (a per-sample dynamic max has shape [B, 1, 1, 1]). Values above
    the scale clamp onto code 0. Computed without log2/exp2: round(log2 y) = floor(log2(y·√2)),
    and 2^floor(log2 z) is z with its float32 mantissa bits cleared — five cheap elementwise ops
    instead of ten with two transcendental ones (the quantizer runs on every attention map).
    Inputs below 2^-126 of the scale (float32 denormals) come out as 0 rather than a code
    past 126, which only matters for 8-bit probabilities and changes nothing numerically.
    `inplace=True` reuses an fp32 `x` as the output buffer. `at_most_scale=True` promises
    x ≤ scale (a dynamic scale is the max itself) and skips the clamp onto code 0.
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).clamp_min(EPS)
    if x.dtype == torch.float32 and inplace:
        z = x.mul_(math.sqrt(2.0) / scale)
    else:
        z = torch.mul(x.float(), math.sqrt(2.0) / scale)
    q = z.view(torch.int32).bitwise_and_(0x7F800000).view(torch.float32)  # 2^round(log2(x/s))
    if not at_most_scale:
        q.clamp_(max=1.0)
    smallest = 2.0 ** -(2**bits - 2)  # code 2^b−2; code 2^b−1 is zero
    torch.nn.functional.threshold_(q, 0.75 * smallest, 0.0)  # powers of two: keeps ≥ smallest, no mask tensor
    return q.mul_(scale)


def log_codes(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Integer codes of `log_fake_quant` (last code = zero)."""
    x = x.float()
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).clamp_min(EPS)
    ratio = (x / scale).clamp_min(0.0)
    code = torch.round(-torch.log2(ratio.clamp_min(2.0**-126))).clamp_min(0.0)
    code = torch.where(ratio > 0, code, torch.full_like(code, float(2**bits - 1)))
    return code.clamp_max(2**bits - 1)


# ----------------------------------------------------------------------------- grouping
def spread_metric(amin: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """D_d = (max_i a_max − min_i a_max) + (max_i a_min − min_i a_min) over the last axis."""
    return (amax.amax(-1) - amax.amin(-1)) + (amin.amax(-1) - amin.amin(-1))


def kmeanspp_init(px: torch.Tensor, py: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ centres (x [G, K], y [G, K]) of G batched 2-D problems (coordinates [G, P])."""
    g, p = px.shape
    rows = torch.arange(g)
    gen = torch.Generator().manual_seed(seed)
    cx = torch.empty(g, k, dtype=px.dtype)
    cy = torch.empty(g, k, dtype=px.dtype)
    first = torch.randint(0, p, (g,), generator=gen)
    cx[:, 0], cy[:, 0] = px[rows, first], py[rows, first]
    d2 = (px - cx[:, :1]) ** 2 + (py - cy[:, :1]) ** 2
    for j in range(1, k):
        w = d2 + 1e-30
        idx = torch.multinomial(w / w.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)
        cx[:, j], cy[:, j] = px[rows, idx], py[rows, idx]
        d2 = torch.minimum(d2, (px - cx[:, j : j + 1]) ** 2 + (py - cy[:, j : j + 1]) ** 2)
    return cx, cy


def kmeans(points: torch.Tensor, k: int, iters: int = 40, seed: int = 0) -> torch.Tensor:
    """Batched K-means on 2-D points [G, P, 2] → labels [G, P] (int64).

    k-means++ initialisation then Lloyd iterations, deterministic for a seed; the same algorithm
    as scikit-learn's default (k-means++, one init) without its per-call overhead, so thousands
    of (layer, timestep) problems cluster in one pass.
    """
    g, p, _ = points.shape
    pts = points.double()
    if k >= p:
        return torch.arange(p).clamp_max(k - 1).expand(g, p).clone()
    px, py = pts[..., 0], pts[..., 1]
    cx, cy = kmeanspp_init(px, py, k, seed)
    labels = torch.full((g, p), -1, dtype=torch.long)
    # Lloyd iterations on the problems whose labels still change: a converged problem is a fixed
    # point (same labels → same centroids → same labels), so dropping it gives the result of
    # iterating all of them together, at the cost of the slowest few instead of all
    live = torch.arange(g)
    for _ in range(iters):
        lx, ly = px[live], py[live]
        dist = lx[:, :, None] - cx[live][:, None, :]  # [G', P, K]; squares by in-place multiply,
        dist.mul_(dist)  # not `** 2` (the same float64 values, 2× faster on CPU)
        dy = ly[:, :, None] - cy[live][:, None, :]
        dist.add_(dy.mul_(dy))
        new = dist.argmin(-1)
        changed = (new != labels[live]).any(-1)
        labels[live] = new
        live, new, lx, ly = live[changed], new[changed], lx[changed], ly[changed]
        if live.numel() == 0:
            break
        count = torch.zeros(len(live), k, dtype=pts.dtype).scatter_add_(1, new, torch.ones_like(lx))
        sx = torch.zeros(len(live), k, dtype=pts.dtype).scatter_add_(1, new, lx)
        sy = torch.zeros(len(live), k, dtype=pts.dtype).scatter_add_(1, new, ly)
        nonempty = count > 0
        cx[live] = torch.where(nonempty, sx / count.clamp_min(1), cx[live])
        cy[live] = torch.where(nonempty, sy / count.clamp_min(1), cy[live])
    return _canonical_labels(labels, points, k)


def _canonical_labels(labels: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber groups by ascending mean of their members' max, so ids are stable and readable."""
    onehot = torch.nn.functional.one_hot(labels, k).float()
    cnt = onehot.sum(1).clamp_min(1)
    mean_hi = torch.einsum("gpk,gp->gk", onehot, points[..., 1].float()) / cnt
    mean_hi = torch.where(onehot.sum(1) > 0, mean_hi, torch.full_like(mean_hi, float("inf")))
    order = mean_hi.argsort(-1)
    rank = order.argsort(-1)
    return torch.gather(rank, 1, labels)


def group_ranges(labels: torch.Tensor, amin: torch.Tensor, amax: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group [lo, hi] = min of members' mins, max of members' maxes; empty groups → [0, 1].

    Shapes: labels/amin/amax [..., P] → lo/hi [..., K]. Not stretched to include 0 (§B.3)."""
    shape = labels.shape[:-1] + (k,)
    lo = torch.full(shape, float("inf")).scatter_reduce(-1, labels, amin.float(), "amin")
    hi = torch.full(shape, float("-inf")).scatter_reduce(-1, labels, amax.float(), "amax")
    empty = torch.isinf(lo)
    return torch.where(empty, torch.zeros_like(lo), lo), torch.where(empty, torch.ones_like(hi), hi)


# ----------------------------------------------------------------------------- probability histograms
def log_hist(x: torch.Tensor) -> torch.Tensor:
    """Counts of `x` (≥ 0, at most 1) in 1/8-octave bins over [2^-40, 1]; bin 0 = zero/underflow.

    The bin is read off the float32 bit pattern (exponent and top three mantissa bits), so each
    octave is split into eight equal-width bins: one shift and a bincount instead of log2 and
    histc (4-5× faster; the histogram is taken for every attention call during calibration)."""
    x = x.detach().float()
    idx = x.reshape(-1).view(torch.int32).bitwise_right_shift(23 - _MANT_BITS)
    counts = torch.bincount(idx.clamp_(0, _HIGH_IDX + 1), minlength=_HIGH_IDX + 2).double().cpu()
    h = torch.empty(N_LOG_BINS + 1, dtype=torch.float64)
    h[0] = counts[:_LOW_IDX].sum()
    h[1:] = counts[_LOW_IDX:_HIGH_IDX + 1]
    h[-1] += counts[_HIGH_IDX + 1]  # above 1 (not a probability): kept in the top bin
    return h


def _bin_edges() -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) edges of `log_hist` bins 1…N (float64)."""
    idx = torch.arange(_LOW_IDX, _HIGH_IDX + 1, dtype=torch.float64)
    octave = torch.exp2(torch.floor(idx / 8) - 127)
    m = torch.remainder(idx, 8)
    return octave * (1 + m / 8), octave * (1 + (m + 1) / 8)


def log_bin_centers() -> torch.Tensor:
    """Representative value of each `log_hist` bin (bin 0 → 0)."""
    lo, hi = _bin_edges()
    return torch.cat([torch.zeros(1, dtype=torch.float64), (lo + hi) / 2])


def hist_quantile(hist: torch.Tensor, q: float) -> float:
    """Upper edge of the bin holding quantile `q` of a `log_hist`."""
    c = torch.cumsum(hist, 0)
    total = float(c[-1])
    if total <= 0:
        return 1.0
    i = int(torch.searchsorted(c, torch.tensor(q * total, dtype=c.dtype)))
    if i == 0:
        return 2.0**LOG2_MIN
    return float(_bin_edges()[1][min(i, N_LOG_BINS) - 1])


def static_log_scale(hist: torch.Tensor, bits: int) -> float:
    """The static log scale: the quantile in {0.999, 0.9999, 0.99999} with the lowest L2 error."""
    v = log_bin_centers()
    best, best_s = math.inf, 1.0
    for q in LOG_QUANTILES:
        s = hist_quantile(hist, q)
        err = float((hist * (v - log_fake_quant(v, s, bits).double()) ** 2).sum())
        if err < best:
            best, best_s = err, s
    return best_s


def uniform_prob_scale(hist: torch.Tensor, top: float, bits: int, mse: bool) -> float:
    """Baseline probability quantizer (z = 0): s = top/(2^b−1), or the MSE-searched clipping of
    `top` (the Q-Diffusion style) evaluated on the histogram."""
    top = float(min(max(top, EPS), 1.0))
    if not mse:
        return top / (2**bits - 1)
    v = log_bin_centers()
    best, best_s = math.inf, top / (2**bits - 1)
    zero = torch.zeros((), dtype=torch.float64)
    for i in range(80):
        s = top * (1 - 0.01 * i) / (2**bits - 1)
        err = float((hist * (v - fake_quant(v, torch.tensor(s, dtype=torch.float64), zero, bits).double()).abs() ** 2.4).sum())
        if err < best:
            best, best_s = err, s
    return best_s

"""The int8 forward of each quantized layer kind; each returns None where it cannot run exactly
(or, for attention, would cost far more than the simulated path): the caller then takes the
simulated path, which `fallback` has logged."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dgq.int8.core import (
    PackedWeight,
    centered_codes,
    channel_labels,
    channel_partition,
    fallback,
    int_mm_available,
    mm_supported,
    offsets,
    packed_weight,
    partition,
    span_product,
    to_int8,
)
from dgq.quantizer import ActQuant, _shape

# Largest span count × score elements an integer Q·Kᵀ takes on (beyond: the simulated path)
ATTN_SPAN_BUDGET = 1 << 28


def _usable(site: str, x: torch.Tensor, m: int, k: int, n: int) -> bool:
    if x.requires_grad:
        fallback(site, "autograd is on (integer GEMMs have no gradient)")
        return False
    if not int_mm_available(x.device):
        fallback(site, f"torch._int_mm is not available on {x.device.type}")
        return False
    if not mm_supported(m, k, n, x.device):
        fallback(site, f"torch._int_mm on {x.device.type} does not take a {m}x{k} @ {k}x{n} product")
        return False
    return True


def _flat(params: tuple[torch.Tensor, ...], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, lo, integer offset) flattened to vectors (or 0-d for one tensor-wide set)."""
    s, _, lo, _ = params
    if s.dim():
        s, lo = s.reshape(-1), lo.reshape(-1)
    return s, lo, offsets(lo, bits)


# ----------------------------------------------------------------------------- linear
def linear(layer, x: torch.Tensor, q: ActQuant, w_bits: int) -> torch.Tensor | None:
    """`F.linear(fake_quant(x), ŵ, bias)` on integers: activations [..., K] as the GEMM's rows."""
    site = layer.dgq_name
    k, o = x.shape[-1], layer.out_features
    lead = x.shape[:-1]
    r = math.prod(lead)
    kind = "linear" if x.dim() == 3 else "linear2"
    if not _usable(site, x, r, k, o):
        return None
    if q.mode == "pixel" and (x.dim() != 3 or q.scale.numel() != x.shape[1]):
        return None  # the simulated path raises the resolution error
    pw = packed_weight(layer, w_bits)
    params = q.prepared(x.device, _shape(kind, q.mode))
    c = centered_codes(x, params)
    s, lo, m = _flat(params, q.bits)
    if q.mode == "channel":
        part = channel_partition(q, k)
        order = part.order.to(x.device)
        e = to_int8(c.reshape(r, k).index_select(1, order), lo.index_select(0, order), q.bits)
        w, sums = pw.permuted(("linear", part.key), order, 1, part.bounds)
        out = None
        for (i, j), f, sw in zip(part.bounds, part.first, sums):
            y = span_product(e[:, i:j], w[i:j], m[f], pw.offset, s[f], pw.scale, sum_b=sw)
            out = y if out is None else out.add_(y)
    else:
        e = to_int8(c, params[2], q.bits).reshape(r, k)
        if q.mode == "pixel":  # one scale per token: per row, repeated over the batch
            s, m = s.repeat(lead[0]), m.repeat(lead[0])
        out = span_product(e, pw.codes_t, m, pw.offset, s, pw.scale, sum_b=pw.sums)
    if layer.bias is not None:
        out += layer.bias.float()
    return out.view(*lead, o).to(x.dtype)


# ----------------------------------------------------------------------------- convolution
def _conv_out(layer, h: int, w: int) -> tuple[int, int]:
    k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    return ((h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


def conv2d(layer, x: torch.Tensor, q: ActQuant, w_bits: int, unfold_pixels: bool) -> torch.Tensor | None:
    """The quantized conv as im2col + GEMM: weights [O, C·k·k] as the rows, the batch's columns
    (output positions) as the GEMM's columns, one product per image. `unfold_pixels`: pixel
    groups are per output position (k×k or strided convs), quantizing the im2col columns."""
    site = layer.dgq_name
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        fallback(site, "grouped or non-zero-padded convolution")
        return None
    b, cin, h, wd = x.shape
    kk = math.prod(layer.kernel_size)
    ho, wo = _conv_out(layer, h, wd)
    n_pos, d = ho * wo, cin * kk
    o = layer.out_channels
    plain = kk == 1 and tuple(layer.stride) == (1, 1) and tuple(layer.padding) == (0, 0)
    if q.mode == "pixel" and not unfold_pixels and not plain:
        fallback(site, "per-input-pixel groups of a padded convolution")
        return None
    if not _usable(site, x, o, d, n_pos):
        return None
    geom = dict(kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    pw = packed_weight(layer, w_bits)
    if q.mode == "pixel":
        if unfold_pixels:
            cols = F.unfold(x.float(), **geom)  # [B, D, L]: each column quantized with its scale
            if cols.shape[-1] != q.scale.numel():
                return None  # the simulated path raises the resolution error
            params = q.prepared(x.device, _shape("cols", "pixel"))
        else:
            if q.scale.numel() != h * wd:
                return None
            cols, params = x, q.prepared(x.device, _shape("conv", "pixel", (h, wd)))
        c = centered_codes(cols, params)
        e = to_int8(c, params[2], q.bits).view(b, d, n_pos)
        s, _, m = _flat(params, q.bits)
        out = span_product(pw.codes, e, pw.offset, m, pw.scale, s, sum_a=pw.sums)
    else:
        params = q.prepared(x.device, _shape("conv", q.mode))
        c = centered_codes(x, params)
        s, lo, m = _flat(params, q.bits)
        taps = _padding_taps(layer, h, wd, geom) if not plain and any(p > 0 for p in layer.padding) else None
        if q.mode == "tensor":
            # int8 codes e = c − m, unfolded: the padding holds e = 0, i.e. the value s·m, taken
            # off again below (exact integers; a range that excludes 0 has no code for 0 itself)
            e = to_int8(c, lo, q.bits)
            cols = e.view(b, cin, h * wd) if plain else _unfold_int8(e, geom)
            minus = None if taps is None else _pad_minus(pw.codes.view(o, cin, kk).sum(1, dtype=torch.int32),
                                                         cin, pw.offset, m, taps)
            out = span_product(pw.codes, cols, pw.offset, m, pw.scale, s, sum_a=pw.sums, minus=minus)
        else:
            out = _conv_channel_groups(layer, pw, q, c, s, lo, m, geom, plain, kk, taps)
    if layer.bias is not None:
        out += layer.bias.float().view(1, -1, 1)
    return out.view(b, o, ho, wo).contiguous().to(x.dtype)


def _unfold_int8(e: torch.Tensor, geom: dict) -> torch.Tensor:
    """im2col of int8 codes with 0 in the padding (unfold runs in fp32: codes are exact there)."""
    return F.unfold(e.to(torch.float32), **geom).to(torch.int8)


def _padding_taps(layer, h: int, w: int, geom: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(output positions that read padding, [k·k, those] 1.0 where a tap reads padding), per
    input size, cached on the layer."""
    cache = layer.__dict__.setdefault("_dgq_int8_taps", {})
    hit = cache.get((h, w))
    if hit is None:
        valid = F.unfold(torch.ones(1, 1, h, w, device=layer.weight.device), **geom)[0]
        pad = 1.0 - valid
        cols = (pad.sum(0) > 0).nonzero().squeeze(1)
        hit = cache[(h, w)] = (cols, pad[:, cols].to(torch.int64))
    return hit


def _pad_minus(wsum_taps: torch.Tensor, n_ch: int, w_off: torch.Tensor, m, taps) -> tuple[torch.Tensor, torch.Tensor]:
    """What the padding's e = 0 (value m instead of 0) adds to the integer sums at the border:
    ``m · Σ_taps pad · (Σ_c e_w + n_ch · offset_w)`` per (output channel, border position), exact
    in float64. `wsum_taps` [O, k·k] = Σ over the span's channels of the weight codes."""
    cols, pad = taps
    u = (wsum_taps.to(torch.int64) + n_ch * w_off.view(-1, 1).to(torch.int64)) * int(m)
    return cols, (u.unsqueeze(-1) * pad.unsqueeze(0)).sum(1)


def _conv_channel_groups(layer, pw: PackedWeight, q: ActQuant, c: torch.Tensor, s, lo, m, geom: dict, plain: bool,
                         kk: int, taps) -> torch.Tensor:
    """Channel groups: input channels permuted into group order (weights permuted alike, cached),
    one GEMM per group's k·k-column span, the spans' rescaled sums added in fp32."""
    b, cin, h, wd = c.shape
    o = pw.shape[0]
    part = channel_partition(q, cin)
    order = part.order.to(c.device)
    e = to_int8(c, lo.view(1, -1, 1, 1), q.bits).index_select(1, order)
    e = e.view(b, cin, h * wd) if plain else _unfold_int8(e, geom)
    bounds = [(i * kk, j * kk) for i, j in part.bounds]
    w, sums = pw.permuted(("conv", part.key), order, kk, bounds)
    minus = [None] * len(bounds)
    if taps is not None:
        minus = [_pad_minus(w[:, i:j].reshape(o, -1, kk).sum(1, dtype=torch.int32), (j - i) // kk, pw.offset, m[f], taps)
                 for (i, j), f in zip(bounds, part.first)]
    out = None
    for (i, j), f, sw, mi in zip(bounds, part.first, sums, minus):
        y = span_product(w[:, i:j], e[:, i:j], pw.offset, m[f], pw.scale, s[f], sum_a=sw, minus=mi)
        out = y if out is None else out.add_(y)
    return out


# ----------------------------------------------------------------------------- attention
def _side(x: torch.Tensor, aq: ActQuant, keep_first: bool):
    """Codes of q or k [B, H, T, d] and their factors: ('tensor'|'row'|'col', scale, offset)."""
    params = aq.prepared(x.device, _shape("q", aq.mode))
    c = centered_codes(x, params)
    e = to_int8(c, params[2], aq.bits)
    s, _, m = _flat(params, aq.bits)
    mode = {"tensor": "tensor", "pixel": "row", "channel": "col"}[aq.mode]
    if keep_first and mode == "row":
        s, m = s[1:], m[1:]
    return c, params[0], e[:, :, 1:] if keep_first else e, mode, s, m


def attention_scores(site: str, q: torch.Tensor, k: torch.Tensor, aq: ActQuant, ak: ActQuant,
                     alpha: float) -> torch.Tensor | None:
    """``alpha · q̂ k̂ᵀ`` [B, H, Nq, Nk] from int8 codes of q and k: one GEMM per (batch, head)
    and per span of d over which both sides' scales are constant (channel groups of q and of k
    together split d by the pair of labels). The `<start>` key, kept in FP, is one fp32
    matrix-vector product (a rank-1 correction of the integer scores)."""
    b, h, n, d = q.shape
    nk = k.shape[2]
    start = ak.start_fp
    if (aq.mode == "pixel" and aq.scale.numel() != n) or (ak.mode == "pixel" and ak.scale.numel() != nk):
        return None  # the simulated path raises the resolution error
    if not _usable(site, q, n, d, nk - int(start)) or q.requires_grad or k.requires_grad:
        return None
    cq, sq_full, eq, qmode, sq, mq = _side(q, aq, False)
    _, _, ek, kmode, sk, mk = _side(k, ak, start)
    ekt = ek.transpose(-1, -2).contiguous()  # [B, H, d, Nk']
    labels = torch.zeros(d, dtype=torch.long)
    if qmode == "col":
        labels = channel_labels(aq, d)
    if kmode == "col":
        lk = channel_labels(ak, d)
        labels = labels * (int(lk.max()) + 1) + lk
    part = partition(labels) if (qmode == "col" or kmode == "col") else None
    if part is not None:
        order = part.order.to(q.device)
        eq, ekt = eq.index_select(3, order), ekt.index_select(2, order)
        if qmode == "col":
            sq, mq = sq.index_select(0, order), mq.index_select(0, order)
        if kmode == "col":
            sk, mk = sk.index_select(0, order), mk.index_select(0, order)
        spans = part.bounds
    else:
        spans = [(0, d)]
    if len(spans) > 1 and len(spans) * b * h * n * nk > ATTN_SPAN_BUDGET:
        # every span is a full [B·H, Nq, Nk] product: at SD's 4096 tokens with q and k both
        # channel-grouped that is tens of GB of traffic, far slower than the simulated path
        fallback(site, f"channel groups split d into {len(spans)} spans over {n}x{nk} scores")
        return None
    eq, ekt = eq.reshape(b * h, n, d), ekt.reshape(b * h, d, -1)
    acc = None
    for i, j in spans:  # one batched product over (batch, head) per span
        fq = (sq[i], mq[i]) if qmode == "col" else (sq, mq)
        fk = (sk[i], mk[i]) if kmode == "col" else (sk, mk)
        y = span_product(eq[..., i:j], ekt[:, i:j], fq[1], fk[1], fq[0], fk[0])
        acc = y if acc is None else acc.add_(y)
    rest = acc.mul_(alpha).view(b, h, n, -1)
    if not start:
        return rest
    # the <start> key: q̂ · k₀ in fp32, q̂ = s·(code − z) as the simulated quantizer gives it
    col0 = torch.matmul(cq * sq_full, k[:, :, 0].float().unsqueeze(-1)) * alpha
    return torch.cat([col0, rest], -1)

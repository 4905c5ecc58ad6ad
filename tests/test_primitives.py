from __future__ import annotations

import math

import pytest
import torch

from dgq import primitives as P


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_uniform_codes_in_range_and_error_at_most_half_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=g) * 3
    lo, hi = torch.tensor(-2.0), torch.tensor(2.5)
    s, z = P.uniform_qparams(lo, hi, bits)
    codes = P.quant_codes(x, s, z, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(codes, codes.round())
    xq = P.fake_quant(x, s, z, bits)
    inside = (x >= lo + s) & (x <= hi - s)  # away from the edges moved by the integer zero-point
    assert inside.any()
    assert (xq - x)[inside].abs().max() <= s / 2 + 1e-6
    # outside the range: clipped to the grid ends
    assert xq.max() <= hi + s and xq.min() >= lo - s


def test_weight_quantization_per_channel_mse_beats_minmax_with_outlier():
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((8, 4096))  # heavy tails: clipping pays off
    codes, s, z = P.quantize_weight(w, 4, "mse")
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert s.shape == (8,)
    err_mse = ((P.dequantize_weight(codes, s, z) - w).abs() ** 2.4).mean(1)
    c2, s2, z2 = P.quantize_weight(w, 4, "minmax")
    err_mm = ((P.dequantize_weight(c2, s2, z2) - w).abs() ** 2.4).mean(1)
    assert torch.all(err_mse <= err_mm + 1e-6)
    assert torch.all(err_mse < err_mm)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_log_quantizer_outputs_only_powers_of_two_of_scale_and_zero(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.softmax(torch.randn(2, 4, 16, 77, generator=g) * 4, -1)
    x[0, 0, 0, :5] = 0.0
    s = float(x.max())
    xq = P.log_fake_quant(x, s, bits)
    nz = xq[xq > 0]
    k = -torch.log2(nz / s)
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.min() >= 0 and k.max() <= 2**bits - 2
    assert torch.all(xq[0, 0, 0, :5] == 0)  # zeros stay zero
    codes = P.log_codes(x, s, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    # values above the scale clip to the scale
    assert float(P.log_fake_quant(torch.tensor([2 * s]), s, bits)) == pytest.approx(s)
    # relative error of representable values is at most a factor sqrt(2)
    big = x > s * 2.0 ** -(2**bits - 3)
    ratio = xq[big] / x[big]
    assert ratio.max() <= math.sqrt(2) + 1e-4 and ratio.min() >= 1 / math.sqrt(2) - 1e-4


def test_spread_metric_matches_definition():
    amin = torch.tensor([-1.0, -3.0, 0.0])
    amax = torch.tensor([2.0, 5.0, 1.0])
    assert float(P.spread_metric(amin, amax)) == pytest.approx((5 - 1) + (0 - (-3)))


def test_kmeans_separates_planted_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 2, generator=g) * 0.1
    b = torch.randn(5, 2, generator=g) * 0.1 + 20
    pts = torch.cat([a, b])[None]
    lab = P.kmeans(pts, 2)
    assert lab.shape == (1, 55)
    assert len(set(lab[0, :50].tolist())) == 1 and len(set(lab[0, 50:].tolist())) == 1
    assert lab[0, 0] != lab[0, 50]
    assert torch.equal(lab, P.kmeans(pts, 2))
    # canonical order: the group with the larger max gets the larger id
    assert lab[0, 50] > lab[0, 0]


def test_group_ranges_are_member_extremes_and_empty_groups_fall_back():
    labels = torch.tensor([0, 0, 1, 1])
    amin = torch.tensor([-1.0, -2.0, 5.0, 6.0])
    amax = torch.tensor([1.0, 3.0, 7.0, 9.0])
    lo, hi = P.group_ranges(labels, amin, amax, 3)
    assert lo.tolist() == [-2.0, 5.0, 0.0] and hi.tolist() == [3.0, 9.0, 1.0]


def test_static_log_scale_picks_a_quantile_and_uniform_prob_scale():
    x = torch.softmax(torch.randn(10000) * 3, 0)
    h = P.log_hist(x)
    assert float(h.sum()) == 10000
    s = P.static_log_scale(h, 4)
    assert 0 < s <= 2 * float(x.max())
    u = P.uniform_prob_scale(h, float(x.max()), 8, mse=False)
    assert u == pytest.approx(float(x.max()) / 255)
    assert P.uniform_prob_scale(h, float(x.max()), 8, mse=True) <= u + 1e-12


def _mse_search_reference(x, bits, p=2.4, n=80, dim=None):
    """The authors' loop, one candidate at a time (what the stacked search must reproduce)."""
    x = x.float()
    lo0 = x.min().clamp(max=0.0) if dim is None else x.amin(dim=dim).clamp(max=0.0)
    hi0 = x.max().clamp(min=0.0) if dim is None else x.amax(dim=dim).clamp(min=0.0)
    best = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(n):
        f = 1.0 - 0.01 * i
        lo, hi = lo0 * f, hi0 * f
        s, z = P.uniform_qparams(lo, hi, bits)
        xq = P.fake_quant(x, s, z, bits) if dim is None else P.fake_quant(x, s[:, None], z[:, None], bits)
        e = (x - xq).abs().pow(p)
        err = e.mean() if dim is None else e.mean(dim=dim)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi, best


def test_stacked_mse_search_matches_the_sequential_search():
    g = torch.Generator().manual_seed(11)
    for shape, dim in (((32, 72), 1), ((8, 1), 1), ((500,), None)):
        x = torch.randn(shape, generator=g) * (torch.rand(shape[0], 1, generator=g) * 3 if dim else 1.0)
        x[0] = x[0] * 20 if dim else x[0]  # one outlier row
        for bits in (2, 4, 8):
            lo, hi = P.mse_search(x, bits, dim=dim)
            rlo, rhi, rerr = _mse_search_reference(x, bits, dim=dim)
            s, z = P.uniform_qparams(lo, hi, bits)
            xq = P.fake_quant(x, s, z, bits) if dim is None else P.fake_quant(x, s[:, None], z[:, None], bits)
            e = (x - xq).abs().pow(2.4)
            err = e.mean() if dim is None else e.mean(dim=dim)
            # same candidate, or (on a float near-tie) one whose error is equal to 1e-5
            same = (lo == rlo) & (hi == rhi)
            assert bool((same | torch.isclose(err, rerr, rtol=1e-5)).all()), (shape, bits)
            assert same.float().mean() > 0.9


def _log_fake_quant_reference(x, scale, bits):
    """The definition with log2/exp2, which the bit-trick `log_fake_quant` must reproduce."""
    x = x.float()
    scale = torch.as_tensor(scale, dtype=torch.float32).clamp_min(P.EPS)
    zero_code = float(2**bits - 1)
    code = torch.round(torch.log2(x / scale).neg_()).clamp_(0.0, zero_code)
    out = torch.exp2(code.neg()).mul_(scale)
    return out.masked_fill_(code == zero_code, 0.0)


def test_log_quantizer_bit_trick_equals_the_log2_definition():
    g = torch.Generator().manual_seed(12)
    x = torch.softmax(torch.randn(2, 2, 32, 77, generator=g) * 4, -1)
    x[0, 0, 0, :4] = 0.0
    for bits in (3, 4, 6, 8):
        for s in (x.amax(dim=(1, 2, 3), keepdim=True), torch.tensor(0.3), 0.05):
            a = P.log_fake_quant(x, s, bits)
            b = _log_fake_quant_reference(x, s, bits)
            normal = x / torch.as_tensor(s) >= 2.0**-126  # float32 denormals are the documented exception
            assert torch.equal(a[normal], b[normal]), (bits, s)
            assert bool((a[~normal] == 0).all())


def _kmeans_all_together(points, k, iters=40, seed=0):
    """Reference: Lloyd iterations on every problem until all of them stop changing."""
    g, p, _ = points.shape
    pts = points.double()
    px, py = pts[..., 0], pts[..., 1]
    cx, cy = P.kmeanspp_init(px, py, k, seed)
    labels = torch.full((g, p), -1, dtype=torch.long)
    for _ in range(iters):
        new = ((px[:, :, None] - cx[:, None, :]) ** 2 + (py[:, :, None] - cy[:, None, :]) ** 2).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
        count = torch.zeros(g, k, dtype=pts.dtype).scatter_add_(1, labels, torch.ones_like(px))
        sx = torch.zeros(g, k, dtype=pts.dtype).scatter_add_(1, labels, px)
        sy = torch.zeros(g, k, dtype=pts.dtype).scatter_add_(1, labels, py)
        cx = torch.where(count > 0, sx / count.clamp_min(1), cx)
        cy = torch.where(count > 0, sy / count.clamp_min(1), cy)
    return P._canonical_labels(labels, points, k)


@pytest.mark.parametrize("k", [2, 8, 16])
def test_kmeans_dropping_converged_problems_equals_iterating_all(k):
    g = torch.Generator().manual_seed(k)
    # problems of very different difficulty, so they converge after different numbers of steps
    pts = torch.randn(40, 96, 2, generator=g) * torch.rand(40, 1, 2, generator=g) * 5
    pts[:10] = torch.randn(10, 96, 2, generator=g).round()  # many ties
    pts[..., 1] = pts[..., 0].abs() + pts[..., 1].abs()
    assert torch.equal(P.kmeans(pts, k), _kmeans_all_together(pts, k))
    assert torch.equal(P.kmeans(pts, k, iters=2), _kmeans_all_together(pts, k, iters=2))


def test_log_quantizer_may_skip_the_clamp_below_its_scale():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(2, 2, 8, 77, generator=g) * 4, -1)
    s = p.amax(dim=(1, 2, 3), keepdim=True)
    for bits in (4, 6, 8):
        assert torch.equal(P.log_fake_quant(p, s, bits, at_most_scale=True), P.log_fake_quant(p, s, bits))


def test_mse_search_builds_its_candidates_on_the_weights_device():
    # a CPU-only candidate table failed on CUDA weights; the meta device shows the same mismatch
    lo, hi = P.mse_search(torch.randn(4, 8).to("meta"), 4, dim=1)
    assert lo.device.type == "meta" and hi.device.type == "meta" and lo.shape == (4,)

"""Grouping on planted outliers, the `<start>` column, dynamic scales, K=1 = per-tensor."""

from __future__ import annotations

import torch

import dgq
from dgq.calibration import ALL, StatsCollector
from dgq.quantizer import ProbQuant, QuantParams, apply_act, apply_prob


def _collect(xs: dict[str, torch.Tensor], kind: str = "linear", cross: bool = False):
    c = StatsCollector()
    c.set_timestep(500)
    for name, x in xs.items():
        c.observe(name, x, kind, cross)
    return c.finalize({})


def test_planted_channel_outliers_pick_channel_axis_and_own_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 32, generator=g)  # [B, N tokens, C channels]
    x[..., 5] *= 40  # channel outlier
    cal = _collect({"lin": x})
    assert cal.chosen_axis("lin", 500) == "channel"
    lab = cal.labels("lin", 500, "channel", 2)
    assert (lab == lab[5]).sum() == 1  # the outlier channel alone in its group
    q = QuantParams(cal, dgq.DGQConfig(8, 8, groups=2)).act("lin", 500)
    assert q.mode == "channel" and q.scale[5] > 10 * q.scale[0]


def test_planted_pixel_outliers_pick_pixel_axis_and_own_group():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 32, generator=g)
    x[:, 7, :] *= 40  # token/pixel outlier
    x[:, 9, :] *= 40
    cal = _collect({"lin": x})
    assert cal.chosen_axis("lin", 500) == "pixel"
    lab = cal.labels("lin", 500, "pixel", 4)
    outl = {int(lab[7]), int(lab[9])}
    others = {int(v) for i, v in enumerate(lab) if i not in (7, 9)}
    assert not (outl & others)


def test_conv_pixel_groups_use_output_positions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=g)
    x[:, :, 2, 3] *= 50
    c = StatsCollector()
    c.set_timestep(10)
    c.observe("conv", x, "conv", conv={"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)})
    cal = c.finalize({})
    lo, hi = cal.axis_stats("conv", 10, "pixel")
    assert hi.numel() == 36
    # every output position whose 3×3 window covers (2, 3) sees the outlier
    big = (hi.view(6, 6) > 20).nonzero().tolist()
    assert sorted(big) == sorted([[r, c] for r in (1, 2, 3) for c in (2, 3, 4)])


def test_k1_equals_per_tensor():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, generator=g)
    cal = _collect({"lin": x})
    q1 = QuantParams(cal, dgq.DGQConfig(8, 6, groups=1)).act("lin", 500)
    qt = QuantParams(cal, dgq.BaselineConfig(8, 6, style="tfmq")).act("lin", 500)
    assert q1.mode == qt.mode == "tensor"
    assert torch.equal(apply_act(x, q1, "linear"), apply_act(x, qt, "linear"))


def test_start_key_row_kept_in_fp_bit_exact():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 77, 16, generator=g)
    k[:, :, 0] *= 30  # the <start> key is an outlier
    cal = _collect({"attn2.k": k}, kind="k", cross=True)
    q = QuantParams(cal, dgq.DGQConfig(8, 4, groups=4)).act("attn2.k", 500)
    assert q.start_fp
    out = apply_act(k, q, "k")
    assert torch.equal(out[:, :, 0], k[:, :, 0])
    assert not torch.equal(out[:, :, 1:], k[:, :, 1:])
    qoff = QuantParams(cal, dgq.DGQConfig(8, 4, groups=4, start_token=False)).act("attn2.k", 500)
    assert not torch.equal(apply_act(k, qoff, "k")[:, :, 0], k[:, :, 0])


def test_start_column_bit_exact_and_dynamic_scale_per_sample():
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(2, 2, 16, 77, generator=g) * 3, -1)
    p[1] = p[1] * 0.5  # second sample has a smaller max
    q = ProbQuant(bits=4, log=True, start_fp=True, dynamic=True, scope="sample")
    out = apply_prob(p, q)
    assert torch.equal(out[..., 0], p[..., 0])
    for b in range(2):
        s = p[b, ..., 1:].max()
        nz = out[b, ..., 1:][out[b, ..., 1:] > 0]
        k = -torch.log2(nz / s)
        assert torch.allclose(k, k.round(), atol=1e-4)  # each sample on its own grid
        assert torch.isclose(out[b, ..., 1:].max(), s)
    qb = ProbQuant(bits=4, log=True, start_fp=True, dynamic=True, scope="batch")
    ob = apply_prob(p, qb)[1, ..., 1:]
    sb = p[..., 1:].max()  # one scale for the whole batch (the authors' code)
    kb = -torch.log2(ob[ob > 0] / sb)
    assert torch.allclose(kb, kb.round(), atol=1e-4)


def test_time_aware_lookup_uses_nearest_calibrated_timestep():
    c = StatsCollector()
    for t in (900, 500, 100):
        c.set_timestep(t)
        c.observe("lin", torch.randn(1, 4, 4) * (t / 100), "linear")
    cal = c.finalize({})
    p = QuantParams(cal, dgq.DGQConfig(8, 8))
    assert p.key_for(880) == 900 and p.key_for(310) == 500 and p.key_for(0) == 100
    assert QuantParams(cal, dgq.DGQConfig(8, 8, time_aware=False)).key_for(880) == ALL
    assert QuantParams(cal, dgq.BaselineConfig(8, 8, style="qdiff")).key_for(880) == ALL


def test_stacked_site_build_equals_per_timestep_reference(random_calib):
    """`QuantParams` builds all timesteps of a site at once; every entry must equal the one-at-a-time
    reference, for every method, axis rule and K (what a bit-width switch relies on)."""
    configs = [dgq.DGQConfig(8, 6, groups=16), dgq.DGQConfig(4, 4, groups=2, axis="channel"),
               dgq.DGQConfig(8, 6, groups=8, axis="pixel", start_token=False), dgq.DGQConfig(8, 8, groups=1),
               dgq.DGQConfig(8, 6, time_aware=False), dgq.BaselineConfig(8, 6, style="tfmq"),
               dgq.BaselineConfig(8, 6, style="qdiff")]
    for cfg in configs:
        params = QuantParams(random_calib, cfg)
        keys = params._site_keys()
        for site, info in random_calib.sites.items():
            if info.kind == "p":
                continue
            stacked = params._build_site(site)
            assert set(stacked) == {(site, t) for t in keys}
            for t in keys:
                a, b = stacked[(site, t)], params._build_act(site, t)
                assert a.mode == b.mode and a.start_fp == b.start_fp, (cfg, site, t)
                assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), (cfg, site, t)
                assert (a.labels is None) == (b.labels is None)
                if a.labels is not None:
                    assert torch.equal(a.labels, b.labels)
                x = torch.randn(3, *((4, 4) if info.kind != "conv" else (4, 4, 4)))
                if a.mode == "tensor":
                    assert torch.equal(a.prepared(x.device, ())[1], b.prepared(x.device, ())[1])


def test_fake_quant_leaves_input_and_matches_reference_formula():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 5, 5, generator=g) * 3
    x16 = x.half()
    s, z = torch.rand(8, generator=g) * 0.1 + 0.01, torch.randint(0, 64, (8,), generator=g).float()
    q = dgq.quantizer.ActQuant(6, "channel", s, z)
    before = x.clone()
    out = apply_act(x, q, "conv")
    assert torch.equal(x, before)
    ref = (torch.clamp(torch.round(x * (1 / s).view(1, -1, 1, 1)) + z.view(1, -1, 1, 1), 0, 63) - z.view(1, -1, 1, 1)) * s.view(1, -1, 1, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert apply_act(x16, q, "conv").dtype == torch.float16


def test_apply_prob_in_place_equals_copy():
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(2, 2, 16, 77, generator=g) * 3, -1)
    for q in (ProbQuant(bits=4, log=True, start_fp=True, dynamic=True, scope="sample"),
              ProbQuant(bits=6, log=True, start_fp=False, dynamic=True, scope="batch")):
        ref = apply_prob(p, q)
        assert not torch.equal(ref, p)
        work = p.clone()
        assert torch.equal(apply_prob(work, q, inplace=True), ref)

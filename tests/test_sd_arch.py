"""SD v1.4's UNet architecture, built from its config (random weights or the meta device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dgq
from dgq.bops import bops, build_unet, count_macs
from dgq.calibration import StatsCollector
from dgq.context import RunContext, use
from dgq.modules import QuantMixin, quantize_
from dgq.quantizer import QuantParams


@pytest.fixture(scope="module")
def macs():
    return count_macs(build_unet("sd-v1-4", device="meta"))


def test_params_and_bops_match_table_2(macs):
    assert round(macs.params / 1e6, 2) == 859.52
    expected = {(32, 32): 823, (8, 8): 51.4, (8, 6): 38.6, (4, 8): 25.7, (4, 6): 19.3}
    for (w, a), tb in expected.items():
        r = bops(macs, w, a)
        assert round(r.bops / 1e12, 0 if tb > 100 else 1) == tb, (w, a, r.bops)
    assert bops(macs).size_mb == pytest.approx(3438.08, abs=0.01)
    assert 430 < bops(macs, 4, 6).size_mb < 440 and 860 < bops(macs, 8, 8).size_mb < 875
    # attention matmuls are the 823T - 694T difference (dgq-method.md §F.3)
    assert round(2 * macs.layer_macs * 1024 / 1e12) == 694


@pytest.fixture(scope="module")
def sd_unet():
    torch.manual_seed(0)
    unet = build_unet("sd-v1-4", device="cpu")
    unet.eval()
    return unet


def test_every_conv_linear_but_conv_in_out_is_wrapped(sd_unet):
    convs = [n for n, m in sd_unet.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in sd_unet.named_modules() if isinstance(m, nn.Linear)]
    assert (len(convs), len(linears)) == (98, 184)
    names = quantize_(sd_unet, weight_search="minmax")
    assert len(names) == 98 + 184 - 2
    assert "conv_in" not in names and "conv_out" not in names
    assert all(isinstance(sd_unet.get_submodule(n), QuantMixin) for n in names)
    from dgq.attention import DGQAttnProcessor

    procs = sd_unet.attn_processors
    assert len(procs) == 32 and all(isinstance(p, DGQAttnProcessor) for p in procs.values())
    assert sum(p.cross for p in procs.values()) == 16


def test_one_dgq_step_at_64x64_latent_on_cpu(sd_unet):
    """Calibrate on one UNet call, then run one DGQ W4A6 step: every attention module quantizes
    its probabilities (checked by counting calls into the probability quantizer)."""
    quantize_(sd_unet, weight_search="minmax")  # MSE over 860 M weights is GPU work; minmax here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    collector = StatsCollector()
    with torch.no_grad(), use(RunContext(collector=collector)):
        fp = sd_unet(x, 981, encoder_hidden_states=ctx).sample
    calib = collector.finalize({"model": "sd-v1-4-random"})
    assert len([s for s in calib.sites.values() if s.kind == "p"]) == 32
    params = QuantParams(calib, dgq.DGQConfig(4, 6, groups=16))
    seen = []
    orig = params.prob
    params.prob = lambda site, t: seen.append(site) or orig(site, t)  # type: ignore[method-assign]
    with torch.no_grad(), use(RunContext(params=params)):
        q = sd_unet(x, 981, encoder_hidden_states=ctx).sample
    assert len(set(seen)) == 32
    assert torch.isfinite(q).all() and q.shape == fp.shape
    assert not torch.equal(q, fp)

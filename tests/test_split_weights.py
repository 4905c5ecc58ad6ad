"""benchmarks/split_weights.py: the size of the paper baselines' weight-split deviation."""

from __future__ import annotations

import math

import torch

from dgq import primitives as P
from dgq import reconstruction as R
from dgq.loading import default_guidance

from benchmarks import split_weights as SW


def test_split_weight_quantizes_each_half_on_its_own_ranges():
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(8, 6, 1, 1, generator=gen) * 0.01, torch.randn(8, 10, 1, 1, generator=gen)], 1)
    got = SW.split_weight(w, 6, 4)
    for half in (w[:, :6], w[:, 6:]):  # each half equals per-output-channel quantization of that half alone
        want = P.dequantize_weight(*P.quantize_weight(half, 4))
        assert torch.equal(got[:, :6] if half.shape[1] == 6 else got[:, 6:], want)
    one = P.dequantize_weight(*P.quantize_weight(w, 4))
    small = slice(0, 6)  # the narrow half: one shared range rounds most of it to the same code
    assert (got[:, small] - w[:, small]).pow(2).mean() < 0.1 * (one[:, small] - w[:, small]).pow(2).mean()


def test_measure_on_a_random_pipeline(random_pipe, random_studio):
    from dgq.adaround import ReconSettings

    with R.torch_threads(1):
        data = R.sample_inputs(random_pipe, ReconSettings(samples=4, steps=2), ["a red circle", "a blue square"],
                               default_guidance(random_pipe))
        result = SW.measure(random_pipe, [4], data)
    assert result["split_layers"] >= 1 and result["samples"] == 4
    (row,) = result["rows"]
    assert len(row["layers"]) == result["split_layers"]
    assert all(x["weight_mse_split"] > 0 and x["weight_mse_one_range"] > 0 for x in row["layers"])
    assert math.isfinite(row["unet_mse_one_range"]) and row["unet_mse_one_range"] > 0
    assert row["unet_change"] == row["unet_mse_split"] / row["unet_mse_one_range"] - 1
    assert "| W4 |" in SW.table(result)


def test_adaround_blocks_learn_both_grids_from_the_same_inputs(random_pipe, random_studio):
    """`--adaround`: each split layer's block is reconstructed with one range and with the split,
    and the block and UNet figures are finite and positive."""
    from dgq import adaround as AR
    from dgq.adaround import ReconSettings
    from dgq.modules import quantized_layers

    bits = 3  # a width no other test stores or installs a rounding for
    cheap = ReconSettings(iters=20, batch_size=2, samples=4, steps=2)
    layers = quantized_layers(random_pipe.unet)
    with R.torch_threads(1):
        data = R.sample_inputs(random_pipe, cheap, ["a red circle", "a blue square"], default_guidance(random_pipe))
        rounding = R.reconstruct(random_pipe, bits, cheap, ["a red circle", "a blue square"], data=data)
        AR.install(layers, rounding)
        try:
            result = SW.adaround_blocks(random_pipe, bits, data, cheap)
        finally:
            key = (bits, rounding.search, "adaround")
            for layer in layers.values():
                layer.__dict__.get("_dgq_wround", {}).pop(key, None)
                layer._dgq_wcache.pop(key, None)
    assert len(result["blocks"]) >= 1
    for b in result["blocks"]:
        assert b["block_mse_one_range"] > 0 and b["block_mse_split"] > 0
    for k in ("unet_mse_shipped", "unet_mse_one_range", "unet_mse_split"):
        assert math.isfinite(result[k]) and result[k] > 0
    assert "| W3 |" in SW.adaround_table([result])

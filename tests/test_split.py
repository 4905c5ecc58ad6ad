"""Shortcut splitting: where the up-blocks concatenate, and the two halves' own ranges."""

from __future__ import annotations

import torch

from dgq import primitives as P
from dgq.calibration import ALL
from dgq.config import BaselineConfig
from dgq.methods import MethodInputs
from dgq.quantizer import QuantParams, apply_act
from dgq.split import half_ranges, split_labels, split_points


def test_split_points_are_where_the_skip_connection_is_concatenated(random_pipe, unet_call):
    unet = random_pipe.unet
    splits = split_points(unet)
    assert splits and all(k.startswith("up_blocks.") and k.endswith("conv_shortcut") for k in splits)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for b, block in enumerate(unet.up_blocks):
        def on_block(_m, _args, kwargs, b=b):
            seen[f"tuple{b}"] = kwargs["res_hidden_states_tuple"]
        handles.append(block.register_forward_pre_hook(on_block, with_kwargs=True))
        for i, res in enumerate(block.resnets):
            def on_res(_m, args, kwargs, b=b, i=i):
                seen[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = args[0] if args else kwargs["input_tensor"]
            handles.append(res.register_forward_pre_hook(on_res, with_kwargs=True))
    unet_call(unet, handles, 10)
    for site, split in splits.items():
        b, i = int(site.split(".")[1]), int(site.split(".")[3])
        x = seen[site]
        skip = seen[f"tuple{b}"][-1 - i]
        assert x.shape[1] == split + skip.shape[1], site
        assert torch.equal(x[:, split:], skip), site  # the second half is the skip connection itself


def test_half_ranges_and_labels():
    lo = torch.tensor([[-1.0, -2.0, 0.5, -0.25]])
    hi = torch.tensor([[1.0, 3.0, 9.0, 8.0]])
    a, b = half_ranges(lo, hi, 2)
    assert a.tolist() == [[-2.0, -0.25]] and b.tolist() == [[3.0, 9.0]]
    assert split_labels(4, 1).tolist() == [0, 1, 1, 1]


def test_split_quantizer_keeps_each_half_on_its_own_range(random_pipe, random_calib):
    calib = random_calib
    site, split = next(iter(split_points(random_pipe.unet).items()))
    t = [k for k in calib.t_keys if k != ALL][0]
    cfg = BaselineConfig(8, 6, style="tfmq-paper")
    params = QuantParams(calib, cfg, inputs=MethodInputs(splits={site: split}))
    q = params.act(site, t)
    assert q.mode == "channel"
    ch_lo, ch_hi = calib.get(site, "ch_min", t), calib.get(site, "ch_max", t)
    for sl in (slice(0, split), slice(split, None)):
        s, z = P.uniform_qparams(ch_lo[sl].min().clamp(max=0), ch_hi[sl].max().clamp(min=0), 6)
        assert torch.allclose(q.scale[sl], s.expand_as(q.scale[sl])) and torch.equal(q.zero[sl], z.expand_as(q.zero[sl]))
    # each half is quantized on its own grid: a narrow half keeps its resolution next to a wide one
    c = q.scale.numel()
    x = torch.zeros(2, c, 4, 4)
    for sl, n in ((slice(0, split), split), (slice(split, None), c - split)):
        ramp = torch.linspace(float(ch_lo[sl].min()), float(ch_hi[sl].max()), 16)
        x[:, sl] = ramp.repeat(2, n, 1).view(2, n, 4, 4)
    y = apply_act(x, q, "conv")
    err = (y - x).abs()
    assert float(err[:, :split].max()) <= float(q.scale[0]) / 2 + 1e-6
    assert float(err[:, split:].max()) <= float(q.scale[-1]) / 2 + 1e-6
    # the light TFMQ-DM keeps one range over the concatenation
    light = QuantParams(calib, BaselineConfig(8, 6, style="tfmq")).act(site, t)
    assert light.mode == "tensor"

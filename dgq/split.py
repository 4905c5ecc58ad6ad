"""Shortcut splitting (Q-Diffusion §3.3, `--split`; TFMQ-DM inherits it): the up-blocks' ResNets
take `cat([h, skip])`, two tensors of very different ranges (the decoder's features and the
encoder's skip connection). A single per-tensor range over the concatenation wastes most codes
on whichever half is narrower, so the paper recipes quantize each half with its own range.

Where: the 1×1 `conv_shortcut` of every up-block ResNet, whose input is the raw concatenation —
the layer Q-Diffusion splits (`QuantResBlock`'s `skip_connection(x, split=split)`). `conv1` sees
the concatenation after GroupNorm and SiLU and is not split there either.

A split is expressed as a two-group channel quantizer (channels `< split` use range 0, the rest
range 1), so the fused kernels, the display and the int8 path need nothing new.
"""

from __future__ import annotations

import torch
from torch import nn


def split_points(unet: nn.Module) -> dict[str, int]:
    """{`up_blocks.b.resnets.i.conv_shortcut`: channels of `h`} for every up-block ResNet whose
    input is a concatenation with a shortcut conv. `h` comes from the ResNet before it in the
    same block, or from the previous up block (the mid block for the first one)."""
    out: dict[str, int] = {}
    ups = getattr(unet, "up_blocks", None)
    if ups is None:
        return out
    mid = getattr(unet, "mid_block", None)
    prev = mid.resnets[-1].out_channels if mid is not None else None
    for b, block in enumerate(ups):
        for i, res in enumerate(block.resnets):
            h = block.resnets[i - 1].out_channels if i > 0 else prev
            sc = getattr(res, "conv_shortcut", None)
            if sc is not None and h is not None and 0 < h < sc.in_channels:
                out[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = int(h)
        prev = block.resnets[-1].out_channels
    return out


def split_labels(channels: int, split: int) -> torch.Tensor:
    """Group id per input channel: 0 for the first `split` (h), 1 for the skip connection."""
    lab = torch.ones(channels, dtype=torch.long)
    lab[:split] = 0
    return lab


def half_ranges(ch_lo: torch.Tensor, ch_hi: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-half (min, max) from per-channel statistics [..., C] → [..., 2] (zero always inside,
    as every per-tensor activation range in `dgq`)."""
    lo = torch.stack([ch_lo[..., :split].amin(-1), ch_lo[..., split:].amin(-1)], -1)
    hi = torch.stack([ch_hi[..., :split].amax(-1), ch_hi[..., split:].amax(-1)], -1)
    return lo.clamp(max=0), hi.clamp(min=0)

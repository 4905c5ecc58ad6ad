"""BOPs and model size, counted from the real module tree (the meta device needs no weights).

One UNet forward at batch 1 (no CFG) is traced with hooks: MACs of every Conv2d/Linear (bias adds
included) and of the two attention matmuls (QKᵀ and PV). As in the paper's Table 2,
``BOPs = 2 · MACs · w_bits · a_bits`` over all of them (dgq-method.md §F.3, H-6). On SD v1.4 this
gives 859.52 M parameters, 823 TBOPs at FP32 and 51.4 / 38.6 / 25.7 / 19.3 TBOPs at
W8A8 / W8A6 / W4A8 / W4A6.

Size: wrapped layers' weights at W bits plus their per-channel scale and zero-point (fp32);
everything else (biases, norms, conv_in/conv_out) at fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dgq.modules import default_filter

SD_V1_4_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
ARCHS = {"sd-v1-4": SD_V1_4_UNET_CONFIG}


def build_unet(arch: str = "sd-v1-4", device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The UNet of a known architecture with random weights (or none, on the meta device)."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {list(ARCHS)}")
    with torch.device(device):
        unet = UNet2DConditionModel(**ARCHS[arch])
    return unet.to(dtype) if str(device) != "meta" else unet


@dataclass
class MacCount:
    params: int
    layer_macs: int  # conv + linear
    attention_macs: int  # QKᵀ and PV
    quantized_weight_params: int
    quantized_out_channels: int
    per_layer: dict[str, int]

    @property
    def macs(self) -> int:
        return self.layer_macs + self.attention_macs


def count_macs(unet: nn.Module, text_len: int = 77) -> MacCount:
    """Trace one forward at batch 1 on the meta device (no weights needed, nothing computed)."""
    cfg = unet.config
    meta = torch.device("meta")
    per_layer: dict[str, int] = {}
    attn = [0]
    hooks = []

    def layer_hook(name):
        def hook(m, inp, out):
            if isinstance(m, nn.Conv2d):
                b, co, ho, wo = out.shape
                k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
                macs = b * co * ho * wo * k + (b * co * ho * wo if m.bias is not None else 0)
            else:
                n = out.numel() // m.out_features
                macs = n * m.in_features * m.out_features + (n * m.out_features if m.bias is not None else 0)
            per_layer[name] = per_layer.get(name, 0) + int(macs)
        return hook

    def attn_hook(m, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states")
        if enc is None and len(args) > 1:
            enc = args[1]
        if hs.dim() == 4:
            b, _, h, w = hs.shape
            n = h * w
        else:
            b, n = hs.shape[0], hs.shape[1]
        mlen = enc.shape[1] if enc is not None else n
        attn[0] += 2 * b * n * mlen * m.inner_dim

    from diffusers.models.attention_processor import Attention  # noqa: PLC0415

    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(layer_hook(name)))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        unet_meta = unet if next(unet.parameters()).device == meta else None
        if unet_meta is None:
            raise RuntimeError("pass a meta-device UNet (dgq.bops.to_meta(unet)) to count MACs")
        size = cfg.sample_size
        sample = torch.empty(1, cfg.in_channels, size, size, device=meta)
        ctx = torch.empty(1, text_len, cfg.cross_attention_dim, device=meta)
        with torch.no_grad():
            unet_meta(sample, torch.tensor([500], device=meta), encoder_hidden_states=ctx)
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in unet.parameters())
    qw, qch = 0, 0
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and default_filter(name, m):
            qw += m.weight.numel()
            qch += m.weight.shape[0]
    return MacCount(params, sum(per_layer.values()), attn[0], qw, qch, per_layer)


def to_meta(unet: nn.Module) -> nn.Module:
    """A weightless copy of `unet`'s architecture on the meta device (for counting only)."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    with torch.device("meta"):
        return UNet2DConditionModel(**dict(unet.config))


@dataclass
class BopsReport:
    params: int
    macs: int
    layer_macs: int
    attention_macs: int
    w_bits: int
    a_bits: int
    bops: float
    size_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bops(unet: nn.Module | MacCount, w_bits: int = 32, a_bits: int = 32) -> BopsReport:
    """BOPs and size of one UNet forward at W/A bits (32/32 = FP32).

    Example:
        >>> dgq.bops(dgq.bops_module.build_unet("sd-v1-4"), 4, 6).bops / 1e12   # ≈ 19.3
    """
    if not (1 <= w_bits <= 32 and 1 <= a_bits <= 32):
        raise ValueError(f"bits must be in 1..32, got W{w_bits}A{a_bits}")
    mc = unet if isinstance(unet, MacCount) else count_macs(unet if _is_meta(unet) else to_meta(unet))
    w_eff = min(w_bits, 32)
    quant_bytes = mc.quantized_weight_params * w_eff / 8
    overhead = 0 if w_bits >= 32 else mc.quantized_out_channels * 2 * 4
    rest_bytes = (mc.params - mc.quantized_weight_params) * 4
    size_mb = (quant_bytes + overhead + rest_bytes) / 1e6
    return BopsReport(mc.params, mc.macs, mc.layer_macs, mc.attention_macs, w_bits, a_bits,
                      float(2 * mc.macs * w_bits * a_bits), round(size_mb, 2))


def _is_meta(unet: nn.Module) -> bool:
    p = next(unet.parameters(), None)
    return p is not None and p.device.type == "meta"


def si(value: float, unit: str = "", sep: str = " ") -> str:
    """A count with an SI prefix, 3 significant digits: ``si(1.93e13, "BOPs") == "19.3 TBOPs"``.
    The one formatter of BOPs/MACs for the app and the evaluation tables."""
    for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= f:
            return f"{value / f:.3g}{sep}{p}{unit}"
    return f"{value:.3g}{sep if unit else ''}{unit}"


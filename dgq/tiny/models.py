"""Architectures of the embedded model: SD v1.x's component classes at small widths.

* UNet2DConditionModel with SD v1.4's block types (CrossAttnDownBlock2D …, a cross-attention
  mid block, CrossAttnUpBlock2D …) on a 16×16×4 latent, 2 heads (PyTorch's CPU attention is slow
  for many tiny heads).
* CLIPTextModel (causal, 77-token context, SD v1.x's vocabulary) at width 64.
* AutoencoderTiny for the image ↔ latent map (×4 downsampling, 4 channels). AutoencoderKL's
  GroupNorm layers normalise away the flat, image-wide colours of this domain (reconstructions
  came back in the wrong hue in our measurements); the VAE is never quantized, so this choice
  leaves the quantized code path exactly SD's.
* The noise schedule is DDPM's linear one (β up to 0.02, terminal ᾱ ≈ 4e-5) rather than SD's
  scaled-linear (ᾱ_T ≈ 5e-3): on a 16×16 latent SD's schedule leaves enough signal at t = T for a
  model to copy the layout from the noise instead of learning it from the words.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
    steps_offset=1,
    timestep_spacing="leading",
)


@dataclass(frozen=True)
class Arch:
    """Widths of one embedded-model size. The block types are SD v1.4's whatever the size."""

    block_out_channels: tuple[int, int, int] = (32, 64, 64)
    heads: int = 2
    text_layers: int = 2


ARCHS: dict[str, Arch] = {
    "s": Arch(),  # the first shipped model (CPU-trained): 1.5 M UNet parameters
    "m": Arch(block_out_channels=(48, 96, 96)),  # 3.3 M: the shipped model (assets/tiny-sd)
    "mt": Arch(block_out_channels=(48, 96, 96), text_layers=4),  # 3.3 M, a deeper text encoder
    # "m" with SD v1.4's 8 heads (head widths 6 / 12): the same weights, so it warm-starts from "m";
    # the heads hypothesis of the `<start>` sink (docs/embedded-model.md)
    "m8": Arch(block_out_channels=(48, 96, 96), heads=8),
}


def _arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown embedded-model size {name!r}; allowed: {', '.join(ARCHS)}")
    return ARCHS[name]


def same_weights(a: str, b: str) -> bool:
    """Whether sizes `a` and `b` have the same parameter shapes (they may differ in heads only),
    so that one can continue training from the other's weights."""
    x, y = _arch(a), _arch(b)
    return x.block_out_channels == y.block_out_channels and x.text_layers == y.text_layers


def make_unet(arch: str = "s") -> UNet2DConditionModel:
    a = _arch(arch)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=a.block_out_channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=64,
        attention_head_dim=a.heads,  # diffusers' legacy name: the number of heads, as in SD v1.x's config
    )


def make_text_encoder(arch: str = "s", layers: int | None = None) -> CLIPTextModel:
    """The arch's text encoder; `layers` overrides its depth (a deeper tower for the same UNet:
    the width, and so the UNet's cross-attention dimension, stays 64)."""
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=layers or _arch(arch).text_layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_vae() -> AutoencoderTiny:
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32),
        decoder_block_out_channels=(32, 32, 32),
        num_encoder_blocks=(1, 2, 2),
        num_decoder_blocks=(2, 2, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
        scaling_factor=1.0,
    )


def make_scheduler(kind: str = "pndm"):
    """The training schedule under any of the samplers the pipeline supports."""
    if kind == "ddpm":
        return DDPMScheduler(**SCHEDULE, clip_sample=False)
    if kind == "pndm":
        return PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    if kind == "ddim":
        return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    if kind == "euler":
        return EulerDiscreteScheduler(**SCHEDULE)
    raise ValueError(f"unknown scheduler {kind!r}; allowed: ddpm, pndm, ddim, euler")


def build_pipeline(seed: int = 0, unet=None, text_encoder=None, vae=None, scheduler: str = "pndm"):
    """A `StableDiffusionPipeline` of the embedded architecture (random weights unless given).

    Tests use it to exercise the whole code path offline without the shipped weights.
    """
    import torch  # noqa: PLC0415
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    from dgq.tiny.tokenizer import build_clip_tokenizer  # noqa: PLC0415

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=vae or make_vae(), text_encoder=text_encoder or make_text_encoder(), tokenizer=build_clip_tokenizer(),
        unet=unet or make_unet(), scheduler=make_scheduler(scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

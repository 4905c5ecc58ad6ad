"""The embedded model: renderer, tokenizer, shipped pipeline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dgq.tiny import render as R

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-sd"


def test_renderer_is_deterministic():
    for seed in (0, 1, 12345):
        s1, c1, i1 = R.sample(seed)
        s2, c2, i2 = R.sample(seed)
        assert s1 == s2 and c1 == c2 and np.array_equal(R.to_array(i1), R.to_array(i2))
    assert R.to_array(R.sample(0)[2]).shape == (64, 64, 3)


def test_captions_match_what_is_drawn():
    centre = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}
    for seed in range(300):
        scene, cap, img = R.sample(seed)
        parsed = R.parse_caption(cap)
        assert parsed.objects == tuple(R.Obj(o.color, o.shape, o.size, o.position) if len(scene.objects) == 1
                                       else R.Obj(o.color, o.shape) for o in scene.objects), cap
        assert parsed.background == scene.background and parsed.relation == scene.relation
        a = R.to_array(img).astype(int)
        assert tuple(a[0, 0]) == R.BACKGROUNDS[scene.background], cap  # corner shows the background
        if len(scene.objects) == 1:
            o = scene.objects[0]
            x, y = centre[o.position]
            assert np.abs(a[y, x] - np.array(R.COLORS[o.color])).max() <= 2, cap
        else:
            pos = [(17, 32), (47, 32)] if scene.relation == "left of" else [(32, 18), (32, 46)]
            for o, (x, y) in zip(scene.objects, pos):
                assert np.abs(a[y, x] - np.array(R.COLORS[o.color])).max() <= 2, cap
        for o in scene.objects:
            assert o.color != scene.background


def test_css_colours_and_invisible_objects_refused():
    assert R.COLORS["red"] == (255, 0, 0) and R.COLORS["green"] == (0, 128, 0) and R.COLORS["orange"] == (255, 165, 0)
    with pytest.raises(ValueError, match="invisible"):
        R.Scene((R.Obj("white", "circle"),), background="white")
    with pytest.raises(ValueError):
        R.parse_caption("an astronaut riding a horse")


def test_tokenizer_reproduces_sd_v1_4_ids():
    import open_clip

    from dgq.tiny.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    known = {  # SD v1.4's CLIPTokenizer ids
        "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
        "an astronaut riding a horse": [49406, 550, 18376, 6765, 320, 4558, 49407],
    }
    for text, ids in known.items():
        assert tok(text).input_ids == ids
    for text in ["a large red circle on the left", "A sports car running on Mars", "Hello, WORLD!! 123 naïve café"]:
        ref = open_clip.tokenize([text])[0]
        assert tok(text).input_ids == ref[ref > 0].tolist()
    padded = tok(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[-1] == 49407  # SD pads with <|endoftext|>


@pytest.mark.skipif(not (TINY / "model_index.json").exists(), reason="assets/tiny-sd not present")
def test_shipped_pipeline_loads_and_generates_fast():
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY), local_files_only=True, dtype=torch.float32)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.vae, AutoencoderTiny)
    types = set(pipe.unet.config.down_block_types) | set(pipe.unet.config.up_block_types)
    assert {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"} <= types
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    img = pipe("a large red circle on the left", num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0]
    assert time.time() - t0 < 30
    assert img.size == (64, 64)
    size = sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file())
    assert size <= 30e6 and max(f.stat().st_size for f in TINY.rglob("*") if f.is_file()) <= 10e6

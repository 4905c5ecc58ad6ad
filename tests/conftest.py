"""Shared fixtures: a small randomly initialised SD-format pipeline and its calibration."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# caches (calibration, kernels, weight ranges) of this test session only, unless the caller sets one
os.environ.setdefault("DGQ_CACHE", tempfile.mkdtemp(prefix="dgq-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CALIB_PROMPTS = ["a large red circle on the left", "a small blue square at the top",
                 "a green triangle above a yellow diamond", "a large white circle in the center on a black background"]


@pytest.fixture(scope="session")
def random_pipe():
    from dgq.tiny.models import build_pipeline

    pipe = build_pipeline(seed=0)
    pipe.dgq_model_id = "random-tiny"
    return pipe


@pytest.fixture(scope="session")
def random_calib(random_pipe, tmp_path_factory):
    import dgq

    return dgq.calibrate(random_pipe, CALIB_PROMPTS, steps=4, batch_size=4, cache=tmp_path_factory.mktemp("calib"),
                         progress=False)


@pytest.fixture(scope="session")
def random_studio(random_pipe, random_calib):
    import dgq

    return dgq.Studio(random_pipe, random_calib)


@pytest.fixture
def unet_call():
    """`call(unet, handles, timestep)`: one no-grad UNet call on random inputs (16×16 latent, 77
    random text states), then every hook in `handles` removed, whatever happened."""

    def call(unet, handles, timestep: int) -> None:
        try:
            with torch.no_grad():
                unet(torch.randn(1, unet.config.in_channels, 16, 16), torch.tensor([timestep]),
                     encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim))
        finally:
            for h in handles:
                h.remove()

    return call

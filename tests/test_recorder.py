from __future__ import annotations

import numpy as np
import pytest
import torch

import dgq
from dgq.context import Perturbation
from dgq.recorder import Recorder

PROMPT = "a large red circle on the left"


def test_recorder_maps_histograms_and_outliers(random_studio):
    with dgq.record() as rec:
        random_studio.generate(PROMPT, seed=0, steps=3, config=dgq.DGQConfig(8, 6))
    assert rec.tokens[0] == "<start>" and "red" in rec.tokens
    assert rec.resolutions() == [16, 8, 4]
    assert len(rec.timesteps()) == 3  # PLMS repeats one timestep: 4 UNet calls, 3 distinct t
    m = rec.cross_attention("<start>", resolution=16)
    assert m.shape == (16, 16) and np.all(m >= 0)
    assert rec.cross_attention("red").shape == (16, 16)  # all resolutions upsampled to the largest
    mass = rec.token_mass()
    assert mass.shape == (77,) and mass.sum() == pytest.approx(1.0, abs=1e-4)
    att = rec.attention_layers()[0]
    maps = rec.layer_maps(att)
    assert maps.shape[0] == 77 and maps.sum(0) == pytest.approx(np.full(maps.shape[1:], maps.sum(0).flat[0]), rel=1e-5)
    for j in (0, 3, 76):
        np.testing.assert_allclose(maps[j], rec.cross_attention(j, layer=att), rtol=1e-6)
    h = rec.histograms()
    assert set(h) == {"cross", "start", "self", "edges"} and h["self"].sum() > 0 and h["start"].sum() > 0
    sm = rec.step_max()
    assert [s["call_index"] for s in sm] == [0, 1, 2, 3] and all(s["cross"] is not None and s["self"] is not None for s in sm)
    layer = next(n for n in rec.layer_names() if "resnets" in n and "conv1" in n)
    o = rec.outliers(layer)
    assert o["pixel_absmax"].ndim == 2 and o["channel_absmax"].ndim == 1
    assert o["axis"] in ("channel", "pixel") and o["D_channel"] >= 0 and o["D_pixel"] >= 0
    with pytest.raises(KeyError):
        rec.cross_attention("zebra")


def test_empty_recorder_says_why():
    with pytest.raises(RuntimeError, match="attach it to a generation"):
        Recorder().cross_attention(0)


def test_nested_record_is_refused():
    with dgq.record():
        with pytest.raises(RuntimeError, match="already attached"):
            with dgq.record():
                pass


def test_outlier_steps_bound_what_is_kept(random_studio):
    rec = Recorder(outlier_steps=[0])
    random_studio.generate(PROMPT, seed=0, steps=3, recorder=rec)
    assert rec.call_indices() == [0]


def test_perturbation_zeroes_top_k_or_random_entries():
    x = torch.arange(24, dtype=torch.float32).view(2, 3, 4) - 5
    out = Perturbation(k=2, mode="outlier").apply(x)
    assert (out == 0).sum() == (x == 0).sum() + 4  # two per sample
    assert out[0].flatten()[-1] == 0 and out[1].flatten()[-1] == 0  # the largest |x| of each sample
    r1 = Perturbation(k=2, mode="random", seed=1).apply(x)
    r2 = Perturbation(k=2, mode="random", seed=1).apply(x)
    assert torch.equal(r1, r2)
    with pytest.raises(ValueError):
        Perturbation(k=1, mode="nope")


def test_outlier_drop_changes_the_image(random_studio):
    fp = np.asarray(random_studio.generate(PROMPT, seed=0, steps=3).image, dtype=float)
    od = np.asarray(random_studio.generate(PROMPT, seed=0, steps=3, perturbation=Perturbation(1, "outlier")).image, dtype=float)
    assert np.abs(fp - od).mean() > 0

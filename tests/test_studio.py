"""End to end on a small randomly initialised SD-format pipeline built in the test."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import dgq
from dgq.calibration import Calibration, CalibrationMismatch

PROMPT = "a large red circle on the left"


def _arr(g) -> np.ndarray:
    return np.asarray(g.image, dtype=np.float64)


def _gen(studio, config, seed=1, steps=4):
    return studio.generate(PROMPT, seed=seed, config=config, steps=steps)


def test_all_methods_run_and_are_reproducible(random_studio):
    fp = _gen(random_studio, dgq.FP)
    assert fp.image.size == (64, 64)
    assert np.array_equal(_arr(fp), _arr(_gen(random_studio, dgq.FP)))
    for cfg in (dgq.BaselineConfig(8, 8, "tfmq"), dgq.BaselineConfig(8, 8, "qdiff"), dgq.DGQConfig(8, 8),
                dgq.DGQConfig(4, 6, groups=8, axis="pixel"), dgq.DGQConfig(4, 6, groups=2, axis="channel"),
                dgq.DGQConfig(8, 6, dynamic_scale=False), dgq.DGQConfig(8, 6, log_quant=False, start_token=False),
                dgq.DGQConfig(8, 8, time_aware=False, scale_scope="batch")):
        a = _arr(_gen(random_studio, cfg))
        assert np.isfinite(a).all()
        assert np.array_equal(a, _arr(_gen(random_studio, cfg))), cfg.label()


def test_dgq_w8a8_closer_to_fp_than_tfmq_w4a4(random_studio):
    fp = _arr(_gen(random_studio, dgq.FP))
    d_dgq = np.abs(_arr(_gen(random_studio, dgq.DGQConfig(8, 8))) - fp).mean()
    d_tfmq = np.abs(_arr(_gen(random_studio, dgq.BaselineConfig(4, 4, "tfmq"))) - fp).mean()
    assert d_dgq < d_tfmq


def test_changing_bits_does_not_recalibrate(random_studio, monkeypatch):
    from dgq.calibration import StatsCollector

    calls = []
    monkeypatch.setattr(StatsCollector, "observe", lambda *a, **k: calls.append(1))
    before = random_studio.calibration
    for w, a in ((8, 8), (4, 6), (6, 4)):
        _gen(random_studio, dgq.DGQConfig(w, a))
    assert not calls and random_studio.calibration is before


def test_quant_off_equals_original_forward(random_pipe, random_studio):
    """With no active run, wrapped layers and our processor give the original UNet's output."""
    from dgq.modules import dequantize_, quantize_

    unet = random_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ours = unet(x, 500, encoder_hidden_states=ctx).sample
        with dgq.record():  # an FP run with a recorder takes the explicit-softmax path
            from dgq.context import RunContext, use
            from dgq.recorder import Recorder

            with use(RunContext(recorder=Recorder())):
                explicit = unet(x, 500, encoder_hidden_states=ctx).sample
        dequantize_(unet)
        try:
            orig = unet(x, 500, encoder_hidden_states=ctx).sample
        finally:
            quantize_(unet)
    assert torch.allclose(ours, orig, atol=1e-5)
    assert torch.allclose(explicit, orig, atol=1e-4)


def test_concurrent_generations_match_serial(random_studio):
    cfgs = [dgq.DGQConfig(4, 6), dgq.BaselineConfig(8, 6, "tfmq")]
    serial = [_arr(_gen(random_studio, c, seed=3)) for c in cfgs]
    out: dict[int, np.ndarray] = {}

    def run(i):
        out[i] = _arr(_gen(random_studio, cfgs[i], seed=3))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(out[0], serial[0]) and np.array_equal(out[1], serial[1])


def test_calibration_cache_round_trip_and_corruption_rebuilt(random_pipe, tmp_path, caplog):
    prompts = ["a small green square at the bottom", "a pink diamond above a cyan circle"]
    c1 = dgq.calibrate(random_pipe, prompts, steps=2, batch_size=2, cache=tmp_path, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    c2 = dgq.calibrate(random_pipe, prompts, steps=2, batch_size=2, cache=tmp_path, progress=False)
    assert c2.meta["sha256"] == json_sha(files[0])
    assert set(c1.tensors) == set(c2.tensors)
    assert all(torch.equal(c1.tensors[k], c2.tensors[k]) for k in c1.tensors)
    # corrupt one byte in the middle: detected and rebuilt
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.raises(CalibrationMismatch):
        Calibration.load(files[0].with_suffix(""))
    with caplog.at_level("WARNING"):
        c3 = dgq.calibrate(random_pipe, prompts, steps=2, batch_size=2, cache=tmp_path, progress=False)
    assert "recalibrating" in caplog.text
    assert all(torch.equal(c1.tensors[k], c3.tensors[k]) for k in c1.tensors)
    Calibration.load(files[0].with_suffix(""))  # the rebuilt file verifies again
    # a different step count is a different calibration, never the cached one
    with pytest.raises(CalibrationMismatch):
        Calibration.load(files[0].with_suffix(""), expect={"steps": 3})


def json_sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_inputs_raise_clear_errors(random_studio):
    with pytest.raises(ValueError, match="empty"):
        random_studio.generate("   ")
    with pytest.raises(ValueError, match="steps"):
        random_studio.generate(PROMPT, steps=0)
    with pytest.raises(ValueError, match="a_bits"):
        dgq.DGQConfig(8, 3)
    with pytest.raises(ValueError, match="groups"):
        dgq.DGQConfig(8, 8, groups=3)
    with pytest.raises(ValueError, match="style"):
        dgq.BaselineConfig(8, 8, style="nope")


def test_long_prompt_is_truncated_with_notice(random_studio):
    g = random_studio.generate(" ".join(["red"] * 100), seed=0, steps=2)
    assert g.truncated
    assert not random_studio.generate(PROMPT, seed=0, steps=2).truncated


def test_other_step_count_and_scheduler_use_nearest_timestep(random_pipe, random_calib):
    from diffusers import DDIMScheduler

    studio = dgq.Studio(random_pipe, random_calib)
    g = studio.generate(PROMPT, seed=0, steps=7, config=dgq.DGQConfig(8, 8))
    assert np.isfinite(_arr(g)).all()
    old = random_pipe.scheduler
    random_pipe.scheduler = DDIMScheduler.from_config(old.config)
    try:
        g = studio.generate(PROMPT, seed=0, steps=3, config=dgq.DGQConfig(8, 8))
        assert np.isfinite(_arr(g)).all()
    finally:
        random_pipe.scheduler = old


def test_config_round_trip():
    for c in (dgq.FP, dgq.BaselineConfig(4, 6, "qdiff"), dgq.DGQConfig(4, 6, groups=8, axis="channel", log_quant=False)):
        assert dgq.config_from_dict(c.to_dict()) == c


def test_fp16_pipeline_quantizes_in_fp32_arithmetic():
    from dgq.tiny.models import build_pipeline

    pipe = build_pipeline(seed=1).to(torch.float16)
    pipe.dgq_model_id = "random-tiny-fp16"
    calib = dgq.calibrate(pipe, ["a red circle", "a blue square"], steps=2, batch_size=2, cache=False, progress=False)
    studio = dgq.Studio(pipe, calib)
    g = studio.generate(PROMPT, seed=0, steps=2, config=dgq.DGQConfig(4, 6))
    assert pipe.unet.dtype == torch.float16
    assert np.isfinite(_arr(g)).all()


def test_w_only_change_reuses_activation_parameters(random_studio):
    a = random_studio.params(dgq.DGQConfig(8, 6, groups=4))
    b = random_studio.params(dgq.DGQConfig(4, 6, groups=4))
    c = random_studio.params(dgq.DGQConfig(8, 8, groups=4))
    assert a is not b and a.tables[0] is b.tables[0]  # the same activation tables
    assert c.tables[0] is not a.tables[0]
    assert a.w_bits == 8 and b.w_bits == 4


def test_searched_weight_range_survives_cache_eviction(random_pipe):
    from dgq.modules import quantized_layers

    dgq.quantize_(random_pipe.unet)
    layer = next(iter(quantized_layers(random_pipe.unet).values()))
    first = layer.quantized_weight(3).clone()
    assert (3, "mse") in layer._dgq_wranges
    layer._dgq_wcache.clear()  # evicted: the range is reused, not searched again
    assert torch.equal(layer.quantized_weight(3), first)


def test_prepare_builds_everything_a_first_generation_would(random_studio):
    """After `prepare`, a generation builds no parameters (the switch cost was paid up front)."""
    import dgq
    from dgq.quantizer import QuantParams

    cfg = dgq.DGQConfig(8, 5, groups=8)
    seconds = random_studio.prepare(cfg)
    assert seconds > 0
    params = random_studio.params(cfg)
    built = (len(params._act), len(params._prob))
    calls = []
    real = QuantParams._build_site
    QuantParams._build_site = lambda self, site: calls.append(site) or real(self, site)
    try:
        random_studio.generate("a red circle", seed=0, config=cfg, steps=3)
    finally:
        QuantParams._build_site = real
    assert not calls and (len(params._act), len(params._prob)) == built
    assert random_studio.prepare(dgq.FP) >= 0


def test_tokenizing_from_many_threads_never_mixes_padding_settings(random_pipe):
    """The pipeline pads to 77 tokens while `Studio.tokens` encodes untruncated: a fast tokenizer
    shared by threads keeps those settings in one object, so each thread gets its own copy."""
    from dgq.studio import _pipeline_view, thread_tokenizer

    tok = random_pipe.tokenizer
    prompt = "a large red circle on the left"
    want_pad = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    want_free = tok(prompt, truncation=False).input_ids
    assert len(want_pad) == 77 and len(want_free) < 77
    bad: list[int] = []
    owners: dict[str, object] = {}

    def pipeline_side() -> None:
        t = _pipeline_view(random_pipe).tokenizer  # what encode_prompt uses in a generation
        owners["pipeline"] = t
        for _ in range(3000):
            if t(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids != want_pad:
                bad.append(1)

    def studio_side() -> None:
        t = thread_tokenizer(tok)  # what Studio.tokens uses
        owners["studio"] = t
        for _ in range(3000):
            if t(prompt, truncation=False).input_ids != want_free:
                bad.append(2)

    threads = [threading.Thread(target=f) for f in (pipeline_side, studio_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert owners["pipeline"] is not owners["studio"] and owners["pipeline"] is not tok
    assert thread_tokenizer(tok) is thread_tokenizer(tok)  # one copy per thread, built once


def test_a_plain_pipeline_call_runs_the_variant_and_is_recorded(random_studio, random_pipe):
    """`with studio.use(config): pipe(prompt)` gives what `studio.generate` gives, and
    `with dgq.record(pipe)` records a plain call like a `generate` call."""
    cfg = dgq.DGQConfig(w_bits=4, a_bits=6, groups=8)
    prompt = "a large red circle on the left"
    want = random_studio.generate(prompt, seed=5, config=cfg, steps=3, guidance=7.5)
    with dgq.record() as ref:
        random_studio.generate(prompt, seed=5, config=cfg, steps=3, guidance=7.5)

    def plain():
        return random_pipe(prompt, num_inference_steps=3, guidance_scale=7.5, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(5),
                           height=random_studio.resolution, width=random_studio.resolution).images[0]

    fp = plain()
    with random_studio.use(cfg):
        quant = plain()
    assert np.array_equal(np.asarray(want.image, dtype=np.int16), np.round(quant * 255).astype(np.int16))
    assert np.abs(quant - fp).max() > 0  # the variant really ran
    with dgq.record(random_pipe) as rec, random_studio.use(cfg):
        plain()
    assert rec.tokens == ref.tokens and rec.tokens[0] == "<start>" and rec.cfg
    assert np.allclose(rec.token_mass(), ref.token_mass(), atol=1e-6)
    assert np.allclose(rec.cross_attention("<start>"), ref.cross_attention("<start>"), atol=1e-6)
    with dgq.record(random_pipe) as fp_rec:  # no studio.use: an FP run, recorded
        again = plain()
    # recording needs the probabilities, so attention runs explicitly instead of fused: float rounding only
    assert np.allclose(again, fp, atol=1e-5) and fp_rec.timesteps() and fp_rec.tokens == rec.tokens

"""The app's backend callbacks, called directly (no server), on a random embedded-architecture model.

Few steps keep this file around a minute on 2 CPU cores. Set DGQ_APP_TEST_MODEL=tiny to run it on
the embedded model instead.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

gr = pytest.importorskip("gradio")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from app import constants as C  # noqa: E402
from app.callbacks import Callbacks, make_configs, make_request, user_errors  # noqa: E402
from app.testing import make_engine  # noqa: E402

PROMPT = "a large red circle on the left"
STEPS = 4
QUANT = dict(w_bits=8, a_bits=6, groups=16, baseline="tfmq")


def _quiet(*_a, **_k):
    return None


@pytest.fixture(scope="module")
def cb():
    return Callbacks(make_engine())


@pytest.fixture(scope="module")
def first(cb):
    return cb.generate(PROMPT, 1, STEPS, 7.5, "", progress=_quiet, **QUANT)


def cols_fp_reading(first) -> tuple:
    cols = first[8]["columns"]
    return tuple(None if cols[k]["fp_reading"] is None else type(cols[k]["fp_reading"]) for k in ("fp", "baseline", "dgq"))


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_generate_three_columns_with_metrics(cb, first):
    fp, base, dq, fp_md, base_md, dgq_md, wipe, notice, payload, state = first
    res = cb.engine.model().resolution
    for img in (fp, base, dq):
        assert img.size[0] >= C.DISPLAY_MIN and img.size[0] % res == 0  # upscaled by an integer factor
    assert "FP32" in fp_md and "TFMQ-DM W8A6" in base_md and "DGQ W8A6 K=16" in dgq_md
    # what the evaluator reads differently from FP: a list of changes (the random model's images
    # differ), shown as its own row of the quantized columns only
    assert cols_fp_reading(first) == (None, list, list)
    assert "evaluator vs FP" in base_md and "evaluator vs FP" in dgq_md and "evaluator vs FP" not in fp_md
    cols = payload["columns"]
    assert cols["fp"]["psnr_db"] is None and cols["fp"]["bops"] > cols["dgq"]["bops"] > 0
    for name in ("baseline", "dgq"):
        m = cols[name]
        assert isinstance(m["psnr_db"], (float, str)) and 0.0 <= m["ssim"] <= 1.0
        assert m["weight_mb"] < cols["fp"]["weight_mb"]
        assert m["latency_s"] > 0
        assert isinstance(m["alignment"], (float, str))
    assert payload["tokens"][0] == "<start>" and not payload["truncated"] and notice == ""
    assert _arr(wipe[0]).shape == _arr(fp).shape and np.array_equal(_arr(wipe[1]), _arr(dq))
    assert state["request"]["steps"] == STEPS and state["dgq"]["method"] == "dgq"


def test_generate_is_deterministic_and_cached(cb, first):
    again = cb.generate(PROMPT, 1, STEPS, 7.5, "", progress=_quiet, **QUANT)
    for a, b in zip(first[:3], again[:3]):
        assert np.array_equal(_arr(a), _arr(b))
    assert all(c["cached"] for c in again[8]["columns"].values())


def test_slider_regenerates_only_quantized_and_never_recalibrates(cb, first):
    eng = cb.engine
    before = dict(eng.stats)
    calib = eng.model().studio.calibration
    out = cb.requantize(4, 6, 8, "qdiff", True, "auto", True, True, True, True, "nearest", "simulated", first[-1],
                       progress=_quiet)
    base, dq, base_md, dgq_md, wipe, payload, state = out
    assert eng.stats["generated"] - before["generated"] == 2  # baseline + DGQ; FP came from the cache
    assert eng.stats["calibrations"] == before["calibrations"] and eng.model().studio.calibration is calib
    assert "Q-Diffusion W4A6" in base_md and "DGQ W4A6 K=8" in dgq_md
    assert payload["columns"]["fp"]["cached"] and state["request"] == first[-1]["request"]
    assert np.array_equal(_arr(wipe[0]), _arr(first[0]))
    # the same settings through a fresh generate give the same images
    full = cb.generate(PROMPT, 1, STEPS, 7.5, "", 4, 6, 8, "qdiff", progress=_quiet)
    assert np.array_equal(_arr(full[1]), _arr(base)) and np.array_equal(_arr(full[2]), _arr(dq))


def test_requantize_without_a_generation_does_nothing(cb):
    out = cb.requantize(4, 6, 8, "tfmq", True, "auto", True, True, True, True, "nearest", "simulated", None,
                       progress=_quiet)
    assert len(out) == 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(steps=C.MAX_STEPS + 1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(seed=-1), "seed"),
    (dict(guidance=float("nan")), "guidance"),
    (dict(w_bits=9), "w_bits"),
    (dict(a_bits=3), "a_bits"),
    (dict(groups=3), "groups"),
    (dict(baseline="gptq"), "baseline"),
    (dict(axis="diagonal"), "axis"),
    (dict(log_quant="yes"), "log_quant"),
])
def test_bad_input_is_a_clear_gr_error(cb, kwargs, match):
    args = dict(prompt=PROMPT, seed=1, steps=STEPS, guidance=7.5, model="", **QUANT)
    args.update(kwargs)
    with pytest.raises(gr.Error, match=match):
        user_errors(cb.generate)(progress=_quiet, **args)


def test_unloadable_model_names_the_reason_and_others_keep_serving(cb, tmp_path):
    with pytest.raises(gr.Error, match="model: .* is not offered by this server") as e:
        user_errors(cb.generate)(PROMPT, 1, STEPS, 7.5, str(tmp_path / "missing"), progress=_quiet, **QUANT)
    assert str(tmp_path) not in str(e.value.message)[len("model: ") + 90:]  # the name is echoed, never more
    assert "not offered" in cb.model_status(str(tmp_path / "missing"))
    out = cb.generate(PROMPT, 1, STEPS, 7.5, "", progress=_quiet, **QUANT)
    assert out[0] is not None


def test_long_prompt_is_truncated_with_a_notice(cb):
    long = " ".join(["a large red circle on the left"] * 15)  # ~105 tokens
    out = cb.generate(long, 2, 2, 7.5, "", progress=_quiet, **QUANT)
    assert out[8]["truncated"] and "truncated" in out[7]


def test_attention_view_shows_start_token_for_every_variant(cb, first):
    gallery, mass, hist, stepmax, res_dd, layer_dd, t_dd, info = cb.attention_view(first[-1], "all", "all", "all")
    n_tokens = len(first[8]["tokens"])
    assert len(gallery) == 3 * n_tokens  # one row per token: FP | baseline | DGQ
    assert [c.split(" · ")[:2] for _, c in gallery[:3]] == [["★ <start>", "FP32"], ["★ <start>", "TFMQ-DM W8A6"],
                                                          ["★ <start>", "DGQ W8A6 K=16"]]
    assert "<start>" in info
    res = [v for _, v in res_dd.choices][1]
    t = [v for _, v in t_dd.choices][1]
    layer = [v for _, v in layer_dd.choices][1]
    for sel in ((res, "all", "all"), ("all", "all", t), ("all", layer, "all")):
        g = cb.attention_view(first[-1], *sel)[0]
        assert g[0][1].startswith("★ <start>")
    for fig in (mass, hist, stepmax):
        assert fig.axes


def test_outlier_view_and_drop_demo(cb, first):
    fig, spread, md, layer_dd, step_dd = cb.outlier_view(first[-1], None, None, True)
    assert "D_channel" in md and "rule picks" in md and fig.axes and spread.axes
    layer = layer_dd.value
    step = [v for _, v in step_dd.choices][0]
    fig2, _, md2, *_ = cb.outlier_view(first[-1], layer, step, False)
    assert layer in md2
    fp, dropped, rand, md3 = cb.outlier_drop(first[-1], 1, progress=_quiet)
    assert np.array_equal(_arr(fp), _arr(first[0])) and dropped.size == rand.size == fp.size
    assert "PSNR vs FP" in md3


def test_views_need_a_generation(cb):
    with pytest.raises(gr.Error, match="Generate"):
        user_errors(cb.outlier_drop)(None, 1, progress=_quiet)


def test_input_helpers():
    from app.models import ModelPolicy

    req = make_request(" a red circle ", 5.0, 4.0, 7, "", ModelPolicy("tiny", ()))
    assert (req.prompt, req.seed, req.steps, req.guidance, req.model) == ("a red circle", 5, 4, 7.0, "tiny")
    base, dq = make_configs(4, 6, 8, "qdiff", True, "pixel", False, True, True, False)
    assert base.label() == "Q-Diffusion W4A6" and dq.label().startswith("DGQ W4A6 K=8 axis=pixel")


def test_gpu_decorator_is_a_no_op_without_spaces():
    from app import gpu

    if gpu.ON_SPACES:
        pytest.skip("the spaces package is installed")

    def f(x):
        return x

    assert gpu.gpu(f) is f


def test_cached_example_gets_the_state_generate_would_give(cb, first):
    row = [PROMPT, "", 1, STEPS, 7.5, 8, 6, 16, "tfmq", True, "auto", True, True, True, True]
    out = cb.example(*row)
    assert len(out) == len(first) - 1 and cb.example_state(row) == first[-1]  # no state in the example cache
    assert np.array_equal(_arr(out[2]), _arr(first[2]))


def test_an_enabled_local_folder_is_calibrated_once_under_two_spellings(tmp_path):
    from pathlib import Path

    from app.models import ModelPolicy
    from app.testing import make_engine, random_model_folder

    engine = make_engine()
    folder = Path(random_model_folder())
    engine.policy = ModelPolicy("tiny", (), allow_local=True)
    (tmp_path / "link").symlink_to(folder)
    cb = Callbacks(engine)
    names = [str(folder), str(folder.parent / ".." / folder.parent.name / folder.name), str(tmp_path / "link")]
    for name in names:
        out = cb.generate(PROMPT, 1, 2, 7.5, name, progress=_quiet, **QUANT)
        assert out[0] is not None
    assert engine.stats["calibrations"] == 1 and list(engine._models) == [str(folder.resolve())]
    assert str(folder.parent) not in cb.model_status(names[1])  # named back by the folder's name only


def test_execution_and_weight_rounding_toggles(cb):
    out = cb.generate(PROMPT, 1, 2, 7.5, "", 8, 8, 16, "tfmq", execution="int8", progress=_quiet)
    metrics = out[8]["columns"]
    assert "int8" in metrics["dgq"]["label"] and "int8" in metrics["baseline"]["label"]
    assert metrics["dgq"]["config"]["execution"] == "int8"
    # the random test model has no learned rounding: the toggle says where one exists, nothing runs
    with pytest.raises(gr.Error, match="weight_rounding: no learned adaround weight rounding at w_bits=4; this model has none"):
        user_errors(cb.generate)(PROMPT, 1, 2, 7.5, "", 4, 6, 16, "tfmq", weight_rounding="adaround", progress=_quiet)
    # the paper-recipe baselines say what is missing for them, before anything runs
    with pytest.raises(gr.Error, match="baseline: no learned adaround-tiar weight rounding at w_bits=4; this model has none"):
        user_errors(cb.generate)(PROMPT, 1, 2, 7.5, "", 4, 6, 16, "tfmq-paper", progress=_quiet)
    with pytest.raises(gr.Error, match="baseline: no learned adaround weight rounding at w_bits=4"):
        user_errors(cb.generate)(PROMPT, 1, 2, 7.5, "", 4, 6, 16, "qdiff-paper", progress=_quiet)


def test_a_scorer_is_loaded_once_and_a_failed_load_keeps_its_reason():
    import threading

    from app.engine import _LazyScorer

    calls = []

    def failing():
        calls.append("f")
        return None, "unavailable: no weights at /nowhere"

    lazy = _LazyScorer(failing, threading.Lock())
    assert lazy.get() is None and lazy.get() is None
    assert lazy.reason == "unavailable: no weights at /nowhere" and calls == ["f"]
    ok = _LazyScorer(lambda: (calls.append("ok") or "scorer", "loaded"), threading.Lock())
    assert ok.get() == "scorer" and ok.get() == "scorer" and calls == ["f", "ok"]

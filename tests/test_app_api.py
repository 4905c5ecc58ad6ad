"""The named API endpoint `/generate`, called with gradio_client on a locally launched app
(127.0.0.1, a free port), on a random embedded-architecture model. Offline; ~1–2 min on 2 cores."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from PIL import Image  # noqa: E402

from app.testing import launch  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def served():
    demo, url = launch()
    demo.dgq_engine.model()  # wait for the background load + calibration
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


def _call(client, prompt="a large red circle on the left", seed=7, **kw):
    args = dict(prompt=prompt, seed=seed, steps=STEPS, guidance=7.5, model="", w_bits=8, a_bits=6, groups=16,
                baseline="tfmq")
    args.update(kw)
    return client.predict(**args, api_name="/generate")


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_endpoint_is_documented(client):
    info = client.view_api(print_info=False, return_format="dict")
    params = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    assert params[:9] == ["prompt", "seed", "steps", "guidance", "model", "w_bits", "a_bits", "groups", "baseline"]
    assert {"use_groups", "axis", "log_quant", "start_token", "dynamic_scale", "time_aware"} <= set(params)
    assert "/requantize" not in info["named_endpoints"] and len(info["named_endpoints"]) == 1


def test_three_images_and_metrics(client):
    fp, base, dq, fp_md, base_md, dgq_md, wipe, notice, metrics = _call(client)
    arrs = [_pixels(p) for p in (fp, base, dq)]
    assert arrs[0].shape == arrs[1].shape == arrs[2].shape and arrs[0].shape[0] >= 256
    assert "FP32" in fp_md and "TFMQ-DM W8A6" in base_md and "DGQ W8A6 K=16" in dgq_md
    assert len(wipe) == 2 and np.array_equal(_pixels(wipe[1]), arrs[2])
    cols = metrics["columns"]
    assert set(cols) == {"fp", "baseline", "dgq"}
    for name in ("baseline", "dgq"):
        for key in ("latency_s", "psnr_db", "ssim", "alignment", "bops", "weight_mb"):
            assert cols[name][key] is not None, (name, key)
    assert metrics["request"]["seed"] == 7 and metrics["tokens"][0] == "<start>"


@pytest.mark.parametrize("kw, match", [
    (dict(prompt=""), "prompt is empty"),
    (dict(steps=10_000), "steps|maximum"),
    (dict(w_bits=1), "w_bits|minimum"),
    (dict(groups=3), "groups|choices"),
    (dict(model="/no/such/model/folder"), "model: .* is not offered by this server"),
    (dict(seed="abc"), "seed: 'abc' is not an integer"),
    (dict(seed=1.5), "seed: 1.5 is not an integer"),
    (dict(steps=51), "steps: 51 is out of range; allowed: integers 1..50"),
    (dict(w_bits="4"), "w_bits: '4' is not an integer"),
    (dict(prompt=123), "prompt: 123 \\(int\\) is not text"),
    (dict(prompt="\u200b\u200b"), "prompt: the prompt is empty"),
    (dict(model=True), "model: True \\(bool\\) is not a model name"),
])
def test_bad_input_is_an_app_error_and_the_app_keeps_serving(client, kw, match):
    with pytest.raises(gradio_client.exceptions.AppError, match=match):
        _call(client, **kw)


def test_app_still_serves_after_errors(client):
    out = _call(client, seed=8)
    assert os.path.exists(out[0])


def test_parallel_clients_get_what_they_get_alone(served, client):
    demo, url = served
    settings = [dict(prompt="a large red circle on the left", seed=11, w_bits=4, a_bits=6, groups=8,
                     baseline="qdiff", axis="pixel"),
                dict(prompt="a small blue square at the top", seed=12, w_bits=8, a_bits=8, groups=16,
                     baseline="tfmq", log_quant=False)]
    demo.dgq_engine.clear_results()
    other = gradio_client.Client(url, verbose=False)
    with ThreadPoolExecutor(2) as pool:
        par = list(pool.map(lambda ck: _call(ck[0], **ck[1]), [(client, settings[0]), (other, settings[1])]))
    demo.dgq_engine.clear_results()  # recompute alone, nothing shared with the parallel runs
    for kw, p in zip(settings, par):
        alone = _call(client, **kw)
        assert not any(c["cached"] for c in alone[8]["columns"].values())
        for a, b in zip(p[:3], alone[:3]):
            assert np.array_equal(_pixels(a), _pixels(b)), kw

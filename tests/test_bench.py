"""`python -m dgq bench`: every measurement runs and the report has the figures and targets.

Timings are not asserted (the machine is shared); sizes are tiny: a random pipeline of the embedded
architecture, 2 steps, 2 calibration prompts, and the embedded UNet standing in for SD v1.4's.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dgq import bench as B
from dgq.cli import main


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dgq.tiny.models import build_pipeline

    d = tmp_path_factory.mktemp("bench") / "model"
    build_pipeline(seed=0).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def figures(model_dir):
    import dgq

    pipe = dgq.load_pipeline(str(model_dir), device="cpu")
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    return B.bench_pipeline(pipe, prompts, calib_steps=2, steps=2, repeats=1, weight_search="minmax")


def test_pipeline_figures(figures):
    d, calib = figures
    for name in ("fp", "baseline", "dgq"):
        assert d["end_to_end_s"][name] > 0 and d["per_step_s"][name] > 0
        assert d["per_step_s"][name] < d["end_to_end_s"][name]
    assert set(d["ratios"]) == {"dgq_over_fp_step", "baseline_over_fp_step", "dgq_over_fp_e2e",
                                "baseline_over_fp_e2e"}
    assert set(d["switch"]) == {"A8->A6", "W8->W4"}
    for sw in d["switch"].values():
        assert sw["prepare_s"] > 0
        assert sw["first_minus_repeat_s"] == pytest.approx(sw["first_s"] - sw["repeat_s"])
        assert sw["plans_s"] >= 0
        assert sw["switch_s"] == pytest.approx(sw["prepare_s"] + sw["plans_s"])
    assert d["calibration"] == {"seconds": d["calibration"]["seconds"], "prompts": 2, "steps": 2}
    assert len(calib.sites) > 0


def test_unet_timer_counts_each_call(model_dir):
    from dgq.tiny.models import make_unet

    unet = make_unet().eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    with B.unet_timer(unet, "cpu") as times, torch.no_grad():
        for _ in range(3):
            unet(x, 10, encoder_hidden_states=ctx)
    assert len(times) == 3 and all(t > 0 for t in times)
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=ctx)
    assert len(times) == 3  # hooks removed


def test_unet_step_fp_vs_dgq():
    """The SD v1.4 code path on the embedded UNet (SD's 860 M random weights are for the CLI)."""
    from dgq.tiny.models import make_unet

    torch.manual_seed(0)
    r = B.bench_unet_step(make_unet(), batch=2, repeats=1, w_bits=4, a_bits=6)
    assert r["fp_s"] > 0 and r["dgq_s"] > 0 and r["dgq_over_fp"] == pytest.approx(r["dgq_s"] / r["fp_s"])
    assert r["latent"] == 16 and r["batch"] == 2 and r["calibration_call_s"] > 0


def test_memory_in_fresh_processes(model_dir, figures):
    _, calib = figures
    m = B.bench_memory(str(model_dir), "cpu", None, 2, calib, threads=1)
    assert m["fp_only"]["kind"] == "fp" and m["all_variants"]["kind"] == "all"
    assert 100 < m["fp_only"]["peak_rss_mb"] < 20000
    assert m["ratio"] == pytest.approx(m["all_variants"]["peak_rss_mb"] / m["fp_only"]["peak_rss_mb"])
    assert m["ratio"] >= 0.9  # each child reports its own high-water mark, not its parent's


def test_report_table_and_cli_json(model_dir, figures, capsys):
    d, _ = figures
    report = {"meta": {"model": "m", "weights": "random", "torch": torch.__version__, "threads": 1, "cpu": "x",
                       "quick": True, "gpu": None},
              "embedded": {"cpu": d}, "memory": {"cpu": {"fp_only": {"peak_rss_mb": 1000.0},
                                                         "all_variants": {"peak_rss_mb": 1100.0}, "ratio": 1.1}},
              "sd_unet_step": {}}
    md = B.render_markdown(report)
    assert "| embedded DGQ/FP per step | cpu |" in md and "≤ 1.25×" in md
    assert "| peak RSS ratio (three variants / FP only) | cpu | 1.10× (+100 MB) | ≤ 1.3× | yes |" in md
    assert "bit switch W8->W4" in md and "≤ 0.5 s" in md and "(at 64×25)" in md
    capsys.readouterr()
    rc = main(["bench", "--model", str(model_dir), "--device", "cpu", "--no-sd", "--no-memory", "--steps", "2",
               "--repeats", "1", "--calib-prompts", "2", "--calib-steps", "2", "--weight-search", "minmax",
               "--json", "--threads", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["embedded"]) == {"cpu"} and out["meta"]["weights"] == "trained"
    assert out["embedded"]["cpu"]["calibration"]["prompts"] == 2


def test_bad_bits_is_one_line(capsys):
    assert main(["bench", "--bits", "8-8", "--no-sd", "--no-memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--bits" in err[0]

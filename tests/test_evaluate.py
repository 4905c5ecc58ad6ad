"""`python -m dgq eval`: end to end, resume, sharding, offline CLIP/FID paths, unavailable metrics.

A randomly initialised pipeline of the embedded architecture is saved to a temp folder and loaded
by path; 3 prompts, 3 steps, batch 2 (so 2 batches per setting), min/max weight search.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgq.cli import build_parser, main
from dgq.eval.cli import resolve_options
from dgq.eval.plan import Plan, selected_metrics
from dgq.eval.settings import SETTING_GROUPS, parse_setting, parse_settings
from dgq.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle on the left", "a small blue square at the top",
           "a green triangle above a yellow diamond"]
SETTINGS = "fp,dgq:W8A8:K4"


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """One thread (so in-process and subprocess runs compute bit-identically), offline, temp cache."""
    old_threads = torch.get_num_threads()
    old_env = {k: os.environ.get(k) for k in ("DGQ_CACHE", "HF_HUB_OFFLINE")}
    torch.set_num_threads(1)
    os.environ["DGQ_CACHE"] = str(tmp_path_factory.mktemp("dgq-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    torch.set_num_threads(old_threads)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dgq.tiny.models import build_pipeline

    d = tmp_path_factory.mktemp("eval-inputs")
    build_pipeline(seed=0).save_pretrained(str(d / "model"))
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "calib.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    return d


def eval_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(inputs / "model"), "--prompts-file", str(inputs / "prompts.txt"),
            "--calib-prompts-file", str(inputs / "calib.txt"), "--settings", SETTINGS, "--steps", "3",
            "--batch-size", "2", "--weight-search", "minmax", "--metrics", "align,domain-fid,psnr,ssim,clip,fid",
            "--domain-fid-refs", "50", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def single_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-single") / "run"
    assert main(eval_args(inputs, out)) == 0
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _metrics_without_timing(doc: dict) -> list[dict]:
    return [{k: v for k, v in r["metrics"].items() if not k.startswith("latency")} for r in doc["settings"]]


def _images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


# ----------------------------------------------------------------------------- parsing
def test_setting_syntax_and_slugs():
    s = parse_setting("DGQ:w4a6:k8:nolog:axis=channel")
    assert s.spec == "dgq:W4A6:K8:axis=channel:nolog" and s.slug == "dgq-w4a6-k8-axis-channel-nolog"
    assert s.config.log_quant is False and s.config.axis.value == "channel" and s.config.groups == 8
    assert parse_setting("dgq").spec == "dgq:W8A8:K16"
    assert parse_setting("tfmq:W8A6").config.label() == "TFMQ-DM W8A6"
    assert parse_setting("qdiff:W4A8").slug == "qdiff-w4a8"
    d = parse_setting("dgq:W4A6:nogroups:nostart:static:notime:batchscale").config
    assert (d.use_groups, d.start_token, d.dynamic_scale, d.time_aware, d.scale_scope.value) == (
        False, False, False, False, "batch")
    # canonical specs parse back to the same config
    for spec in SETTING_GROUPS["table2"] + SETTING_GROUPS["ablation"][1:]:
        s = parse_setting(spec)
        assert parse_setting(s.spec) == s
    assert len(parse_settings("table2")) == 17
    for bad, match in (("nope", "unknown method"), ("dgq:W1A8", "w_bits"), ("tfmq:W8A3", "a_bits"), ("tfmq:K8", "dgq only"),
                       ("fp:W8A8", "fp takes"), ("dgq:W8A8:K5", "groups"), ("dgq:fast", "unknown part"),
                       ("dgq:axis=diag", "axis")):
        with pytest.raises(ValueError, match=match):
            parse_setting(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_settings("dgq:W8A8,dgq:w8a8:k16")


def test_prompt_files_and_plan(tmp_path):
    (tmp_path / "coco.csv").write_text('file_name,text\nA.jpg,"a cat, on a mat"\nB.jpg,a dog\n')
    assert read_prompts(tmp_path / "coco.csv") == ["a cat, on a mat", "a dog"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nbanana\tFood\napple\tFood\n")
    assert read_prompts(tmp_path / "parti.tsv") == ["banana", "apple"]
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="prompt-column"):
        read_prompts(tmp_path / "x.csv")
    assert read_prompts(tmp_path / "x.csv", column="B") == ["2"]
    plan = Plan(("p0", "p1", "p2"), images_per_prompt=3, seed=42, batch_size=4)
    assert plan.n == 9 and plan.prompt(5) == "p1" and plan.seed_of(5) == 47
    assert plan.batches() == [(0, 4), (4, 8), (8, 9)]
    assert plan.shard(0, 2) == [(0, 4), (8, 9)] and plan.shard(1, 2) == [(4, 8)]


def test_presets_and_overrides(tmp_path):
    p = build_parser()
    o = resolve_options(p.parse_args(["eval", "--out", str(tmp_path), "--preset", "coco"]))
    assert (o.steps, o.guidance, o.metric_size, o.clip_limit, o.images_per_prompt, o.batch_size) == (
        25, 7.5, 256, 3000, 1, 5)
    o = resolve_options(p.parse_args(["eval", "--out", str(tmp_path), "--preset", "parti", "--clip-limit", "30"]))
    assert (o.images_per_prompt, o.clip_limit, o.metric_size) == (3, 30, 0)
    assert selected_metrics(o.metrics, embedded=False) == ["clip", "psnr", "ssim"]
    assert selected_metrics("auto", embedded=True) == ["align", "domain-fid", "clip", "psnr", "ssim"]
    assert selected_metrics("auto", embedded=False) == ["clip", "fid", "psnr", "ssim"]


# ----------------------------------------------------------------------------- end to end
def test_end_to_end_writes_images_and_tables(single_run):
    out = single_run
    for slug in ("fp", "dgq-w8a8-k4"):
        assert sorted(p.name for p in (out / slug).glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
        man = json.loads((out / slug / "manifest.json").read_text())
        assert man["status"] == "complete" and man["n_images"] == 3
    doc = _results(out)
    assert doc["complete"] and [r["setting"] for r in doc["settings"]] == ["fp", "dgq:W8A8:K4"]
    fp, q = (r["metrics"] for r in doc["settings"])
    for m in (fp, q):
        assert isinstance(m["align_all"], float) and 0 <= m["align_all"] <= 1 and m["align"]["n"] == 3
        assert isinstance(m["domain_fid"], float) and m["domain_fid"] >= 0
        assert isinstance(m["latency_s"], float) and m["latency_s"] > 0
        # no CLIP / Inception weights on this machine: reported, never a number
        assert m["clip_score"].startswith("unavailable: ") and "--clip-weights" in m["clip_score"]
        assert m["fid"].startswith("unavailable: ") and "--inception-weights" in m["fid"]
    assert fp["psnr"] is None and fp["ssim"] is None  # the reference itself
    assert isinstance(q["psnr"], float) and 0 < q["ssim"] <= 1
    assert q["bops"] < fp["bops"] and q["size_mb"] < fp["size_mb"]
    assert fp["bops"] / q["bops"] == pytest.approx(16.0)  # (32·32)/(8·8)
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("setting,label,w_bits,a_bits")
    md = (out / "results.md").read_text()
    assert "| DGQ W8A8 K=4 | 8/8 |" in md and "n/a [1]" in md and "[1] unavailable:" in md
    # same seeds: FP image i equals a direct generation with seed 42 + i
    from PIL import Image

    import dgq

    pipe = dgq.load_pipeline(doc["plan"]["model"], device="cpu")
    g = dgq.Studio(pipe).generate(PROMPTS[2], seed=44, steps=3)
    assert np.array_equal(np.asarray(g.image), np.asarray(Image.open(out / "fp" / "00002.png")))


def test_resume_redoes_only_missing_work(inputs, single_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    before = _images(out)
    for f in ("results.json", "results.csv", "results.md"):
        (out / f).unlink()
    (out / "dgq-w8a8-k4" / "00002.png").unlink()
    log_fp = (out / "fp" / "log.rank0.jsonl").read_text()
    n_dgq = len((out / "dgq-w8a8-k4" / "log.rank0.jsonl").read_text().splitlines())
    assert main(eval_args(inputs, out)) == 0
    assert (out / "fp" / "log.rank0.jsonl").read_text() == log_fp  # nothing regenerated for FP
    new = (out / "dgq-w8a8-k4" / "log.rank0.jsonl").read_text().splitlines()[n_dgq:]
    assert [json.loads(line)["start"] for line in new] == [2]  # only the batch holding image 2
    assert _images(out) == before
    assert _metrics_without_timing(_results(out)) == _metrics_without_timing(_results(single_run))


def test_a_model_changed_in_place_is_regenerated_not_resumed(inputs, tmp_path):
    """Same model path, new weights: the FP setting (which has no calibration checksum) and the
    quantized one are both made again."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(inputs / "model", model)
    out = tmp_path / "run"
    args = eval_args(inputs, out, "--settings", "fp", "--metrics", "psnr")
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 0
    log_fp = (out / "fp" / "log.rank0.jsonl").read_text()
    assert main(args) == 0 and (out / "fp" / "log.rank0.jsonl").read_text() == log_fp  # unchanged: resumed
    f = model / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["conv_out.bias"] = sd["conv_out.bias"] + 0.5
    save_file(sd, str(f))
    assert main(args) == 0
    assert len((out / "fp" / "log.rank0.jsonl").read_text().splitlines()) == 2 * len(log_fp.splitlines())


def test_sharded_run_equals_single_process(inputs, single_run, tmp_path):
    out = tmp_path / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "dgq", *eval_args(inputs, out, "--poll-interval", "0.5")],
                              cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-2000:]
    assert json.loads(outs[1][0].strip().splitlines()[-1])["rank"] == 1
    assert {json.loads(line)["rank"] for line in (out / "fp" / "log.rank1.jsonl").read_text().splitlines()} == {1}
    assert _images(out) == _images(single_run)  # bit for bit
    assert _metrics_without_timing(_results(out)) == _metrics_without_timing(_results(single_run))


def test_clip_and_fid_code_paths_offline(single_run, tmp_path):
    """Random-weight open_clip / Inception (hidden test flags) through --score-only; a reference given
    as .npz stats and as a folder of images."""
    from dgq.metrics import save_stats

    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    args = ["eval", "--out", str(out), "--score-only", "--metrics", "clip,fid", "--clip-model", "ViT-S-32",
            "--clip-random-init", "--inception-random-init", "--metric-size", "32", "--clip-limit", "2",
            "--no-progress"]
    assert main([*args, "--fid-ref-stats", str(tmp_path / "ref.npz")]) == 0
    doc = _results(out)
    for r in doc["settings"]:
        m = r["metrics"]
        assert isinstance(m["clip_score"], float) and -1 <= m["clip_score"] <= 1 and m["clip_n"] == 2
        assert isinstance(m["fid"], float) and m["fid_n"] == 3
    assert "RANDOM" in doc["notes"]["WARNING"] and "align_all" not in doc["settings"][0]["metrics"]
    fid_only = [a if a != "clip,fid" else "fid" for a in args]  # the CLIP network is the slow one to build
    assert main([*fid_only, "--fid-ref-stats", str(single_run / "fp")]) == 0
    assert all(isinstance(r["metrics"]["fid"], float) for r in _results(out)["settings"])
    # reference data missing: unavailable, never a number
    assert main([*fid_only, "--fid-ref-stats", str(tmp_path / "missing.npz")]) == 0
    assert all(r["metrics"]["fid"].startswith("unavailable: ") for r in _results(out)["settings"])


def test_missing_evaluator_and_images_are_unavailable(single_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    (out / "dgq-w8a8-k4" / "00001.png").unlink()
    assert main(["eval", "--out", str(out), "--score-only", "--metrics", "align,psnr", "--evaluator",
                 str(tmp_path / "none"), "--no-progress"]) == 0
    fp, q = (r["metrics"] for r in _results(out)["settings"])
    assert fp["align_all"].startswith("unavailable: ") and "evaluator" in fp["align_all"]
    assert q["align_all"].startswith("unavailable: 1 of 3 images missing") and q["psnr"] == q["align_all"]
    assert not _results(out)["complete"]


def test_bad_input_is_one_line(inputs, tmp_path, capsys):
    cases = [
        eval_args(inputs, tmp_path / "a")[:-2] + ["--settings", "dgq:W1A8", "--out", str(tmp_path / "a")],
        ["eval", "--out", str(tmp_path / "b"), "--prompts-file", str(tmp_path / "missing.txt")],
        ["eval", "--out", str(tmp_path / "c"), "--preset", "imagenet"],
        ["eval", "--out", str(tmp_path / "d"), "--score-only"],
    ]
    for args in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error:"), (args, err)


def test_a_rounding_file_is_used_and_named_in_the_plan(inputs, tmp_path, capsys):
    rdir = tmp_path / "roundings"
    assert main(["reconstruct", "--model", str(inputs / "model"), "--w-bits", "3", "--iters", "2", "--samples", "4",
                 "--steps", "2", "--prompts-file", str(inputs / "calib.txt"), "--weight-search", "minmax",
                 "--out-dir", str(rdir)]) == 0
    (path,) = rdir.glob("*.safetensors")
    sha = json.loads(path.with_suffix(".json").read_text())["sha256"]

    def run(out: Path, *extra: str) -> int:
        return main(["eval", "--model", str(inputs / "model"), "--prompts-file", str(inputs / "prompts.txt"),
                     "--calib-prompts-file", str(inputs / "calib.txt"), "--settings", "fp,dgq:W3A8:K4:adaround",
                     "--steps", "2", "--batch-size", "2", "--limit", "2", "--weight-search", "minmax",
                     "--metrics", "psnr", "--no-progress", "--out", str(out), *extra])

    # looked up, nothing is stored for this model; chosen by path, it is used and the plan names it
    assert run(tmp_path / "a", "--rounding-file", str(path)) == 0
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["roundings"] == {"3": sha}
    row = _results(tmp_path / "a")["settings"][1]
    assert row["complete"] and isinstance(row["metrics"]["psnr"], float)
    # bad files are one-line errors that name the file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    shutil.copy(path.with_suffix(".json"), bad.with_suffix(".json"))
    for f, why in ((tmp_path / "nowhere.safetensors", "no rounding at"), (bad, "corrupted")):
        capsys.readouterr()
        assert run(tmp_path / "b", "--rounding-file", str(f)) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "--rounding-file" in err[0] and why in err[0], err

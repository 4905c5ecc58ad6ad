"""benchmarks/fp_agreement.py: per-image closeness to FP on what the evaluator reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgq.tiny import render as R

from benchmarks import fp_agreement as FA


def test_sign_test_is_exact_and_two_sided() -> None:
    assert FA.sign_test(0, 0) == 1.0
    assert FA.sign_test(5, 10) == 1.0
    assert FA.sign_test(0, 5) == pytest.approx(2 / 32)
    assert FA.sign_test(5, 5) == pytest.approx(2 / 32)
    assert FA.sign_test(2, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_bootstrap_interval_holds_the_mean_and_is_reproducible() -> None:
    d = np.r_[np.ones(30), np.zeros(50), -np.ones(20)]
    lo, hi = FA.bootstrap_ci(d)
    assert lo < d.mean() < hi and hi - lo < 0.4
    assert FA.bootstrap_ci(d) == (lo, hi)
    assert FA.bootstrap_ci(np.zeros(10)) == (0.0, 0.0)


def _run(tmp_path: Path, n: int = 12) -> tuple[Path, list[R.Scene]]:
    run = tmp_path / "run"
    scenes, prompts = [], []
    for i in range(n):
        scene, cap, img = R.sample(60_500_000 + i)
        scenes.append(scene)
        prompts.append(cap)
        for d in ("fp", "copy"):
            (run / d).mkdir(parents=True, exist_ok=True)
            img.save(run / d / f"{i:05d}.png")
    (run / "prompts.json").write_text(json.dumps(prompts))
    return run, scenes


def image_of(scene: R.Scene, recolour: bool):
    """The scene's render, or (`recolour`) the render of the same scene with other object colours."""
    if recolour:
        names = list(R.COLORS)
        objs = tuple(R.Obj(names[(names.index(o.color) + 3) % len(names)], o.shape, o.size, o.position)
                     for o in scene.objects)
        scene = R.Scene(objs, scene.background, scene.relation, scene.jitter)
    return R.render(scene)


def test_copies_read_as_fp_and_changed_scenes_do_not(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    run, scenes = _run(tmp_path)
    # "swap": the first 4 images show another scene (a different colour), the rest are FP's
    (run / "swap").mkdir()
    for i, scene in enumerate(scenes):
        img = image_of(scene, recolour=i < 4)
        img.save(run / "swap" / f"{i:05d}.png")
    out = tmp_path / "agree.json"
    assert FA.main(["--run", str(run), "--settings", "copy,swap", "--pair", "copy:swap", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    rows = {r["setting"]: r for r in got["settings"]}
    assert rows["copy"]["same_reading"] == 1.0 and rows["copy"]["verdict_agree"] == 1.0
    assert rows["copy"]["psnr"] == float("inf")
    assert rows["swap"]["same_reading"] <= 8 / 12 + 1e-9
    # the domain CLIP: a copy keeps every image's CLIP score; recoloured objects move it and the image
    assert rows["copy"]["clip_gap"] == pytest.approx(0, abs=1e-6)
    assert rows["copy"]["image_sim"] == pytest.approx(1, abs=1e-5)
    assert rows["copy"]["clip"] == pytest.approx(got["fp_clip"], abs=1e-6)
    assert rows["swap"]["clip_gap"] > 1e-3 and rows["swap"]["image_sim"] < 1 - 1e-3
    (pair,) = got["pairs"]
    assert pair["only_b_reads_as_fp"] == 0 and pair["only_a_reads_as_fp"] >= 4
    assert pair["clip_gap_diff"] == pytest.approx(-rows["swap"]["clip_gap"], abs=1e-6)
    lo, hi = pair["clip_gap_ci95"]
    assert lo <= pair["clip_gap_diff"] <= hi
    assert pair["same_reading_diff"] == pytest.approx(1 - rows["swap"]["same_reading"])
    assert "copy vs swap" in capsys.readouterr().out


def test_missing_images_and_bad_pairs_are_clear_errors(tmp_path: Path, capsys) -> None:
    run, _ = _run(tmp_path, n=3)
    (run / "copy" / "00001.png").unlink()
    assert FA.main(["--run", str(run), "--settings", "copy"]) == 2
    assert "1 of 3 images missing" in capsys.readouterr().err
    assert FA.main(["--run", str(run), "--settings", "fp", "--pair", "copy"]) == 2
    assert "must be A:B" in capsys.readouterr().err
    assert FA.main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "not a finished eval run" in capsys.readouterr().err


def test_the_docs_table_is_the_stored_run_and_matches_the_paper_tables() -> None:
    root = Path(__file__).resolve().parents[1]
    got = json.loads((root / "docs/results/fp-agreement.json").read_text())
    doc = (root / "docs/fp-agreement.md").read_text()
    assert FA.markdown(got["settings"], got["fp_align"], got["fp_clip"]) in doc
    assert FA.pairs_markdown(got["settings"], got["pairs"]) in doc
    # the same images as Table 2: each setting's alignment, PSNR and CLIP score equal the eval's own figures
    table2 = {s["label"]: s["metrics"] for s in json.loads((root / "docs/results/results.json").read_text())["settings"]}
    for r in got["settings"]:
        m = table2[r["label"]]
        assert r["align"] == pytest.approx(m["align_all"]) and r["psnr"] == pytest.approx(m["psnr"], abs=0.01)
        assert r["clip"] == pytest.approx(m["clip_score"], abs=1e-4)
    assert got["fp_align"] == pytest.approx(table2["FP32"]["align_all"])
    assert got["fp_clip"] == pytest.approx(table2["FP32"]["clip_score"], abs=1e-4)


def test_runs_on_other_prompts_pool_by_label(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    outs = []
    for k, n_swapped in ((0, 2), (1, 3)):
        run, scenes = _run(tmp_path / f"r{k}", n=6)
        (run / "other").mkdir()
        for i, scene in enumerate(scenes):
            image_of(scene, recolour=i < n_swapped).save(run / "other" / f"{i:05d}.png")
        outs.append(tmp_path / f"r{k}.json")
        assert FA.main(["--run", str(run), "--settings", "K=1 as is=copy,changed=other", "--pair", "copy:other",
                        "--json", str(outs[-1]), "--per-image"]) == 0
    one = json.loads(outs[0].read_text())
    assert [r["label"] for r in one["settings"]] == ["K=1 as is", "changed"]
    pooled_file = tmp_path / "pooled.json"
    assert FA.main(["--pool", *map(str, outs), "--json", str(pooled_file)]) == 0
    pooled = json.loads(pooled_file.read_text())
    rows = {r["label"]: r for r in pooled["settings"]}
    assert pooled["n"] == 12 and rows["K=1 as is"]["same_reading"] == 1.0
    parts = [json.loads(o.read_text()) for o in outs]
    want = sum(p["settings"][1]["same_reading"] * 6 for p in parts) / 12
    assert rows["changed"]["same_reading"] == pytest.approx(want)
    assert rows["changed"]["clip_gap"] == pytest.approx(sum(p["settings"][1]["clip_gap"] * 6 for p in parts) / 12)
    assert pooled["fp_clip"] == pytest.approx(sum(p["fp_clip"] for p in parts) / 2)
    (pair,) = pooled["pairs"]
    a_only = sum(p["pairs"][0]["only_a_reads_as_fp"] for p in parts)
    assert pair["a"] == "K=1 as is" and pair["only_a_reads_as_fp"] == a_only >= 5
    assert pair["sign_test_p"] == pytest.approx(FA.sign_test(a_only, a_only + pair["only_b_reads_as_fp"]))
    # the stored per-image values give the pooled pair its intervals
    for k, diff in (("same_reading_ci95", "same_reading_diff"), ("clip_gap_ci95", "clip_gap_diff")):
        lo, hi = pair[k]
        assert lo <= pair[diff] <= hi
    assert len(parts[0]["per_image"]["other"]["same"]) == 6
    assert FA.main(["--pool", str(tmp_path / "missing.json")]) == 2


def test_the_adaround_tables_are_the_stored_runs_and_the_pool_is_their_sum() -> None:
    root = Path(__file__).resolve().parents[1]
    runs = {n: json.loads((root / f"docs/results/adaround-agree-{n}.json").read_text()) for n in (200, 600, 800)}
    doc = (root / "docs/adaround.md").read_text()
    for n in (600, 800):
        assert FA.markdown(runs[n]["settings"], runs[n]["fp_align"], runs[n]["fp_clip"]) in doc
        assert FA.pairs_markdown(runs[n]["settings"], runs[n]["pairs"]) in doc
    again = FA.pool([runs[200], runs[600]])
    assert again["n"] == 800 and again["settings"] == runs[800]["settings"] and again["pairs"] == runs[800]["pairs"]
    # the W4A6 pair on 800 further prompts, and all 1,600 pooled
    third = json.loads((root / "docs/results/adaround-agree-third800.json").read_text())
    pooled = json.loads((root / "docs/results/adaround-agree-1600.json").read_text())
    for r in (third, pooled):
        assert FA.markdown(r["settings"], r["fp_align"], r["fp_clip"]) in doc
        assert FA.pairs_markdown(r["settings"], r["pairs"]) in doc
    again = FA.pool([runs[200], runs[600], third])
    assert again["n"] == 1600 and again["settings"] == pooled["settings"] and again["pairs"] == pooled["pairs"]
    assert [r["label"] for r in pooled["settings"]] == ["DGQ W4A6 K=16 nearest", "DGQ W4A6 K=16 AdaRound"]
    # the 200-prompt rows are the paper tables' images: the same align and PSNR as Table 2
    table2 = {s["label"]: s["metrics"] for s in json.loads((root / "docs/results/results.json").read_text())["settings"]}
    for r in runs[200]["settings"]:
        if r["label"].endswith(("nearest", "AdaRound")):
            m = table2[r["label"].removesuffix(" nearest")]
            assert r["align"] == pytest.approx(m["align_all"]) and r["psnr"] == pytest.approx(m["psnr"], abs=0.01)
            assert r["clip"] == pytest.approx(m["clip_score"], abs=1e-4)

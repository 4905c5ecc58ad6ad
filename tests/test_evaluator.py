"""The shapes-domain evaluator: shipped weights read fresh renders, not noise; scoring semantics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dgq.tiny import render as R
from dgq.tiny.evaluator import (
    HEADS,
    Evaluator,
    default_path,
    fresh_renders,
    load_evaluator,
    reading_diff,
    scene_labels,
    to_tensor_batch,
    train_evaluator,
)


@pytest.fixture(scope="module")
def ev() -> Evaluator:
    torch.set_num_threads(1)  # the machine's other core belongs to a training job
    return load_evaluator()


def test_shipped_weights_are_small_safetensors_and_json() -> None:
    d = default_path()
    assert (d / "evaluator.safetensors").stat().st_size < 2 * 1024 * 1024
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["heads"] == {k: list(v) for k, v in HEADS.items()}
    assert not list(d.glob("*.tmp"))


def test_fresh_renders_at_least_98_percent_per_attribute(ev: Evaluator) -> None:
    # seeds in the test range (>= 60M) but not the 2,000 the CLI reports, so this is a second fresh set
    images, prompts = fresh_renders(2000, seed_start=60_100_000)
    s = ev.score(images, prompts)
    assert s["n_unparsed"] == 0 and s["n_single"] + s["n_pair"] == 2000 and s["n_pair"] > 400
    accs = {k: v for k, v in s.items() if not k.startswith("n")}
    low = {k: v for k, v in accs.items() if k not in ("all", "single_all", "pair_all") and v < 0.98}
    assert not low, f"attributes below 98 %: {low}"


def test_uniform_noise_scores_near_chance(ev: Evaluator) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(300, 64, 64, 3), dtype=np.uint8)
    _, prompts = fresh_renders(300, seed_start=60_200_000)
    s = ev.score(noise, prompts)
    assert s["single_color"] < 0.3
    assert s["single_shape"] < 0.5
    assert s["all"] < 0.05


def test_score_two_object_prompt_and_binding(ev: Evaluator) -> None:
    scene = R.Scene((R.Obj("red", "circle"), R.Obj("blue", "square")), "white", "left of")
    img = R.render(scene)
    # the same scene phrased from the right-hand object's side parses to the same slots
    s = ev.score([img, img], ["a red circle to the left of a blue square on a white background",
                              "a blue square to the right of a red circle on a white background"])
    assert s["n_pair"] == 2 and s["n_single"] == 0
    assert s["pair_colors"] == s["pair_shapes"] == s["pair_relation"] == s["pair_background"] == 1.0
    assert s["single_color"] is None
    # swapped colours: both colours appear, but bound to the wrong objects
    s = ev.score([img], ["a blue circle to the left of a red square on a white background"])
    assert s["pair_colors"] == 0.0 and s["pair_shapes"] == 1.0
    s = ev.score([img], ["a red circle above a blue square on a white background"])
    assert s["pair_relation"] == 0.0


def test_unparsed_prompts_are_counted_not_guessed(ev: Evaluator) -> None:
    _, cap, img = R.sample(60_300_000)
    s = ev.score([img, img], ["a photo of a cat", cap])
    assert s["n"] == 2 and s["n_unparsed"] == 1
    assert s["n_single"] + s["n_pair"] == 1
    s = ev.score([img], ["a photo of a cat"])
    assert s["all"] is None and s["count"] is None


def test_predict_reads_a_single_object_scene(ev: Evaluator) -> None:
    scene = R.Scene((R.Obj("orange", "triangle", "large", "top"),), "black")
    (p,) = ev.predict(R.render(scene))
    assert p == {"count": 1, "background": "black", "relation": None,
                 "objects": [{"color": "orange", "shape": "triangle", "size": "large", "position": "top"}]}


def test_input_formats_agree(ev: Evaluator) -> None:
    imgs = [R.sample(60_400_000 + i)[2] for i in range(4)]
    arr = np.stack([R.to_array(im) for im in imgs])
    ten = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    ref = ev.predict(imgs)
    assert ev.predict(arr) == ref
    assert ev.predict(ten) == ref
    assert ev.predict([arr[i] for i in range(4)]) == ref
    assert ev.predict(arr[0]) == ref[:1]
    assert ev.features(arr).shape == (4, ev.model.fc.out_features)
    with pytest.raises(ValueError):
        to_tensor_batch(ten * 2 - 1)  # a [-1, 1] tensor must not be read as colours
    with pytest.raises(TypeError):
        to_tensor_batch(arr.astype(np.float32))


def test_scene_labels_mask_the_other_count() -> None:
    pair = scene_labels(R.Scene((R.Obj("red", "circle"), R.Obj("blue", "square")), "gray", "above"))
    assert pair["count"] == 1 and pair["color"] == -100 and pair["relation"] == HEADS["relation"].index("above")
    single = scene_labels(R.Scene((R.Obj("red", "circle", "small", "left"),)))
    assert single["count"] == 0 and single["color0"] == -100 and single["position"] == 0


def test_changed_vocabulary_is_refused(tmp_path: Path) -> None:
    shutil.copytree(default_path(), tmp_path / "ev")
    cfg_path = tmp_path / "ev" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["heads"]["color"] = list(reversed(cfg["heads"]["color"]))
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocabulary"):
        load_evaluator(tmp_path / "ev")
    with pytest.raises(FileNotFoundError):
        load_evaluator(tmp_path / "missing")


def test_train_smoke_writes_loadable_fp16_safetensors(tmp_path: Path) -> None:
    cfg = train_evaluator(tmp_path, steps=3, batch_size=8, test_n=16, max_seconds=60)
    assert cfg["training"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "evaluator.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "evaluator.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    ev = load_evaluator(tmp_path / "evaluator.safetensors")
    assert len(ev.predict(R.sample(1)[2])) == 1


def test_judge_is_score_per_image(ev: Evaluator) -> None:
    items = [R.sample(60_400_000 + i) for i in range(24)]
    imgs = [img for _, _, img in items]
    prompts = [cap for _, cap, _ in items]
    prompts[3] = "a photo of a cat"
    imgs[5] = R.sample(60_400_999)[2]  # another scene: its verdict is (most likely) a miss
    judged = ev.judge(imgs, prompts)
    s = ev.score(imgs, prompts)
    assert judged[3] is None and s["n_unparsed"] == 1
    kept = [j for j in judged if j is not None]
    for key in ("all", "count", "background"):
        assert s[key] == pytest.approx(np.mean([j[key] for j in kept]))
    singles = [j for j in kept if "single_all" in j]
    assert len(singles) == s["n_single"] and s["single_color"] == pytest.approx(np.mean([j["single_color"] for j in singles]))
    with pytest.raises(ValueError, match="images but"):
        ev.judge(imgs[:2], prompts)


def test_reading_diff_names_what_changed(ev: Evaluator) -> None:
    one = {"count": 1, "background": "black", "relation": None,
           "objects": [{"color": "red", "shape": "circle", "size": "large", "position": "left"}]}
    assert reading_diff(one, one) == []
    other = {**one, "background": "white", "objects": [{**one["objects"][0], "shape": "square"}]}
    assert reading_diff(one, other) == ["background black → white", "shape circle → square"]
    pair = {"count": 2, "background": "black", "relation": "left of",
            "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]}
    assert reading_diff(one, pair) == ["count 1 → 2"]
    swapped = {**pair, "relation": "above", "objects": [pair["objects"][0], {"color": "green", "shape": "square"}]}
    assert reading_diff(pair, swapped) == ["object 2 color blue → green", "relation left of → above"]
    # on real images: a render reads as itself, and a recoloured render does not
    scene = R.Scene((R.Obj("red", "circle", "large", "left"),), "black")
    recol = R.Scene((R.Obj("blue", "circle", "large", "left"),), "black")
    a, b = ev.predict([R.render(scene), R.render(recol)])
    assert reading_diff(a, a) == [] and reading_diff(a, b) == ["color red → blue"]

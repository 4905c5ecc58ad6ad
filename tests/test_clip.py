"""The domain CLIP: offline loading, ranking of fresh renders, the shared text tower, CLIP scores of
the embedded model through eval's scorer path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dgq.paths import TINY_DIR
from dgq.tiny import clip as TC
from dgq.tiny import train as T


@pytest.fixture(scope="module")
def scorer():
    return TC.DomainClipScorer()


def test_ranks_the_matching_caption_first_on_fresh_renders(scorer):
    assert TC.ranking_accuracy(scorer, n=200, group=50) >= 0.95


def test_paraphrased_captions_rank_well_too(scorer):
    assert TC.ranking_accuracy(scorer, n=200, group=50, paraphrased=True) >= 0.85


def test_text_tower_is_the_pipelines_frozen_text_encoder(scorer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_DIR), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    te = pipe.text_encoder.state_dict()
    clip_text = scorer.model.text_model.state_dict()
    assert te.keys() == clip_text.keys()
    assert all(torch.equal(te[k], clip_text[k]) for k in te)
    assert pipe.text_encoder.config.hidden_size == scorer.model.config.text_config.hidden_size


def test_a_changed_text_tower_is_refused(tmp_path):
    clip_dir, te_dir = tmp_path / "tiny-clip", tmp_path / "text_encoder"
    shutil.copytree(TC.CLIP_DIR, clip_dir)
    shutil.copytree(TINY_DIR / "text_encoder", te_dir)
    info = json.loads((clip_dir / TC.TEXT_TOWER_FILE).read_text())
    info["text_tower"] = "../text_encoder"
    (clip_dir / TC.TEXT_TOWER_FILE).write_text(json.dumps(info))
    TC.load_domain_clip(clip_dir)  # intact copy loads
    with open(te_dir / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match="SHA-256"):
        TC.load_domain_clip(clip_dir)
    with pytest.raises(FileNotFoundError):
        TC.load_domain_clip(tmp_path / "nowhere")


def test_full_export_is_a_standalone_clipmodel(tmp_path):
    from transformers import CLIPModel

    m = TC.load_domain_clip()
    m.save_pretrained(str(tmp_path / "full"), safe_serialization=True)
    again = TC.load_domain_clip(tmp_path / "full")
    assert isinstance(again, CLIPModel)
    x = torch.zeros(1, 3, 64, 64)
    assert torch.allclose(TC._features(m.get_image_features(pixel_values=x)), TC._features(again.get_image_features(pixel_values=x)))


def test_clip_score_of_the_embedded_model_is_a_number(scorer):
    from dgq.eval.scoring import load_domain_clip_scorer
    from dgq.tiny.render import sample

    s, msg = load_domain_clip_scorer()
    assert s is not None, msg
    _, cap, img = sample(96_500_000)
    _, other_cap, _ = sample(96_500_001)
    right = s.score([img], [cap])
    assert isinstance(right, float) and -1 <= right <= 1
    assert right > s.score([img], [other_cap]) or cap == other_cap


def test_eval_scores_the_embedded_model_with_the_domain_clip(tmp_path):
    from dgq.cli import build_parser
    from dgq.eval.cli import resolve_options
    from dgq.eval.scoring import Scorers

    opts = resolve_options(build_parser().parse_args(["eval", "--model", "tiny", "--out", str(tmp_path)]))
    clip = Scorers(opts, embedded=True).clip()
    assert isinstance(clip, TC.DomainClipScorer)
    sd = Scorers(opts, embedded=False).clip()  # SD models keep open_clip (no weights here: a reason)
    assert not isinstance(sd, TC.DomainClipScorer)


def test_a_short_training_run_saves_its_settings_and_continues(tmp_path):
    from safetensors import safe_open

    torch.set_num_threads(1)
    TC.train(tmp_path, seconds=2.0, init_text=None, n_images=32, batch=8, threads=1)
    path = tmp_path / "clip.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    assert meta["step"] >= 1 and meta["batch"] == 8 and meta["n_images"] == 32 and meta["init_text"] is None
    assert meta["config"]["projection_dim"] > 0 and "text_config" in meta["config"]
    again = tmp_path / "again"
    TC.train(again, seconds=1.0, init_text=None, n_images=32, batch=8, threads=1, init=path)
    assert (again / "clip.safetensors").is_file()
    # a deeper text tower (same width, so the same UNet fits), its first layers from a 2-layer one
    deep = tmp_path / "deep"
    TC.train(deep, seconds=1.0, init_text=T.DEFAULT_BASE, n_images=32, batch=8, threads=1, text_layers=4)
    with safe_open(str(deep / "clip.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    assert meta["config"]["text_config"]["num_hidden_layers"] == 4 and meta["device"] == "cpu"

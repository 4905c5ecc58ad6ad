"""The accelerator trainer, run for seconds on the CPU: latents, training, resume, export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import dgq
from dgq.tiny import train as T
from dgq.tiny.models import ARCHS, make_unet, same_weights


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["json"])


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "latents.safetensors"
    T.make_latents(T.DEFAULT_BASE, 24, path, "cpu", procs=1, chunk=16)
    return path


def test_latents_are_encoded_renders_with_their_caption_ids(latents):
    from safetensors.torch import load_file

    from dgq.tiny import render as R
    from dgq.tiny.tokenizer import build_clip_tokenizer

    d = load_file(str(latents))
    assert d["latents"].shape == (24, 4, 16, 16) and d["latents"].dtype == torch.float16
    caps = [R.sample(s)[1] for s in (0, 17)]
    want = build_clip_tokenizer()(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(d["input_ids"][[0, 17]].long(), want)


def test_train_resume_and_export(latents, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    T.train_size("s", latents, T.DEFAULT_BASE, out, seconds=2.0, batch=4, lr=1e-3, device="cpu", seed=0,
                 save_every=1e9, eval_n=4, eval_guidance=(3.0,))
    first = _meta(out / "s.safetensors")
    assert first["samples"] == 4 * first["step"] > 0 and first["history"] == []
    assert set(first["curve"][-1]["g3"]) >= {"single_color", "background"}  # a real score was taken
    # continuing keeps the weights it starts from and records where they came from
    start = out / "start.safetensors"
    (out / "s.safetensors").rename(start)
    T.train_size("s", latents, T.DEFAULT_BASE, out, seconds=1.0, batch=4, lr=0.0, device="cpu", seed=1,
                 save_every=1e9, eval_n=0, init=start)
    second = _meta(out / "s.safetensors")
    assert second["history"][0]["samples"] == first["samples"]
    assert second["total_samples"] == first["samples"] + second["samples"]
    with safe_open(str(start), "pt") as a, safe_open(str(out / "s.safetensors"), "pt") as b:
        k = "unet.conv_in.weight"
        assert torch.equal(a.get_tensor(k), b.get_tensor(k))  # lr 0: EMA of unchanged weights
    with pytest.raises(ValueError, match="holds size 's'"):
        T.train_size("m", latents, T.DEFAULT_BASE, out, seconds=0.1, batch=2, lr=0.0, device="cpu", seed=0,
                     save_every=1e9, eval_n=0, init=start)

    folder = tmp_path / "exported"
    T.export(out / "s.safetensors", folder, guidance=3.5)
    pipe = dgq.load_pipeline(str(folder), device="cpu")
    assert pipe.unet.config.block_out_channels == list(ARCHS["s"].block_out_channels)
    assert dgq.default_guidance(pipe) == 3.5
    info = json.loads((folder / "training.json").read_text())
    assert info["unet_samples"] == second["total_samples"] and len(info["runs"]) == 2
    assert not (tmp_path / "exported.staging").exists()


def test_heads_variant_continues_from_the_same_widths(latents, tmp_path):
    """"m8" is "m" with SD's 8 heads: the same parameter shapes, so it continues from an "m" save
    unchanged (lr 0) and exports a pipeline with 8 heads; sizes of other widths are refused."""
    assert same_weights("m", "m8") and not same_weights("s", "m8") and not same_weights("m", "mt")
    shapes = {k: v.shape for k, v in make_unet("m").state_dict().items()}
    m8 = make_unet("m8")
    assert {k: v.shape for k, v in m8.state_dict().items()} == shapes
    assert {m.heads for n, m in m8.named_modules() if n.endswith(("attn1", "attn2"))} == {8}
    kw = dict(seconds=0.5, batch=2, lr=0.0, device="cpu", seed=0, save_every=1e9, eval_n=0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    T.train_size("m", latents, T.DEFAULT_BASE, tmp_path / "a", **kw)
    T.train_size("m8", latents, T.DEFAULT_BASE, tmp_path / "b", init=tmp_path / "a" / "m.safetensors", **kw)
    with safe_open(str(tmp_path / "a" / "m.safetensors"), "pt") as a, safe_open(str(tmp_path / "b" / "m8.safetensors"), "pt") as b:
        k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        assert torch.equal(a.get_tensor(k), b.get_tensor(k))
    T.export(tmp_path / "b" / "m8.safetensors", tmp_path / "pipe", guidance=3.0)
    assert dgq.load_pipeline(str(tmp_path / "pipe"), device="cpu").unet.config.attention_head_dim == 8
    with pytest.raises(ValueError, match="do not fit 's'"):
        T.train_size("s", latents, T.DEFAULT_BASE, tmp_path / "b", init=tmp_path / "a" / "m.safetensors", **kw)


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="allowed: s, m, mt"):
        make_unet("xl")
    with pytest.raises(SystemExit):
        T.main(["train", "--sizes", "s,xl", "--out", "/nonexistent"])
    for bad in ("7.5", "a:b", "1:2"):
        with pytest.raises(SystemExit):
            T.main(["train", "--sizes", "s", "--guided", bad, "--out", "/nonexistent"])


def test_paired_unconditional_training_with_distillation_runs_and_records_itself(latents, tmp_path):
    T.train_size("s", latents, T.DEFAULT_BASE, tmp_path, seconds=1.5, batch=4, lr=1e-3, device="cpu", seed=0,
                 save_every=1e9, eval_n=2, eval_guidance=(7.5,), uncond="paired", distill_below=600,
                 t_sampling="uniform", eval_seed=80_000_000)
    meta = _meta(tmp_path / "s.safetensors")
    assert meta["step"] > 0 and meta["uncond"] == "paired" and meta["distill_below"] == 600
    assert meta["t_sampling"] == "uniform" and meta["eval_seed"] == 80_000_000
    assert "single_color" in meta["curve"][-1]["g7.5"] or "background" in meta["curve"][-1]["g7.5"]


@pytest.fixture
def losses(monkeypatch):
    """Every (prediction, target) pair the trainer's loss sees, in call order."""
    seen = []
    real = T.F.mse_loss

    def spy(pred, target):
        seen.append((pred.detach().clone(), target.detach().clone()))
        return real(pred, target)

    monkeypatch.setattr(T.F, "mse_loss", spy)
    return seen


def test_guidance_aware_training_moves_the_conditional_target_only_at_low_noise(latents, tmp_path, losses):
    """With guided=(S, E) the conditional branch's target below guided_below / 2 is
    v_u + (E/S)(v - v_u), so guidance S reproduces v_u + E(v - v_u); above guided_below it is v."""
    T.train_size("s", latents, T.DEFAULT_BASE, tmp_path, seconds=0.5, batch=6, lr=0.0, device="cpu", seed=0,
                 save_every=1e9, eval_n=0, uncond="paired", guided=(7.5, 2.0), guided_below=700,
                 t_sampling="uniform")
    assert _meta(tmp_path / "s.safetensors")["guided"] == [7.5, 2.0]
    (_, target_c), (pu, target_u) = losses[0], losses[1]
    # the unconditional branch keeps the sampled v; recover v and t-weights from the two targets
    v = target_u
    w = ((target_c - v) / ((pu + (2.0 / 7.5) * (v - pu)) - v)).flatten(1).median(1).values
    assert torch.isfinite(w).any()
    assert ((w > -1e-3) & (w < 1 + 1e-3))[torch.isfinite(w)].all()


def test_teacher_targets_damp_the_conditional_branch_and_start_from_an_exported_folder(latents, tmp_path, losses):
    """With a teacher both targets are the teacher's predictions; with guided=(S, E), below
    guided_full the conditional one is v_u + (E/S)(v_c - v_u). An exported folder serves as
    init and teacher: the student then starts equal to the teacher."""
    T.train_size("s", latents, T.DEFAULT_BASE, tmp_path, seconds=1.0, batch=4, lr=1e-3, device="cpu", seed=0,
                 save_every=1e9, eval_n=0)
    folder = tmp_path / "exported"
    T.export(tmp_path / "s.safetensors", folder)
    unet_sd, text_sd, size, history = T.load_weights(folder)
    assert size == "s" and len(history) == 1 and history[0]["samples"] == _meta(tmp_path / "s.safetensors")["samples"]
    losses.clear()  # only the student's losses below
    run = tmp_path / "student"
    run.mkdir()
    T.train_size("s", latents, T.DEFAULT_BASE, run, seconds=0.5, batch=3, lr=0.0, device="cpu", seed=0,
                 save_every=1e9, eval_n=0, uncond="paired", guided=(7.5, 2.0), guided_below=700, guided_full=600,
                 t_sampling="uniform", t_max=500, init=folder, teacher=folder, guided_weight=0.5)
    meta = _meta(run / "s.safetensors")
    assert meta["teacher"] == str(folder) and meta["guided_full"] == 600 and meta["total_samples"] > meta["samples"]
    (pc, target_c), (pu, target_u) = losses[0], losses[1]
    torch.testing.assert_close(target_u, pu, atol=1e-5, rtol=1e-5)  # student == teacher at the start
    torch.testing.assert_close(target_c, pu + (2.0 / 7.5) * (pc - pu), atol=1e-5, rtol=1e-5)
    assert (pc - pu).abs().max() > 1e-3  # the branches differ, so the check above is not vacuous
    guided_pred, guided_target = losses[2]  # guided_weight: the error of the guided prediction itself
    torch.testing.assert_close(guided_pred, pu + 7.5 * (pc - pu))
    torch.testing.assert_close(guided_target, target_u + 7.5 * (target_c - target_u))
    assert meta["guided_weight"] == 0.5
    with pytest.raises(ValueError, match="without training.json"):
        T.load_weights(tmp_path)


@pytest.mark.parametrize("kw, msg", [
    ({"uncond": "both"}, "uncond must be"),
    ({"t_sampling": "low"}, "t_sampling must be"),
    ({"distill_below": 500}, "needs uncond='paired'"),
    ({"guided": (7.5, 2.0)}, "needs uncond='paired'"),
    ({"uncond": "paired", "guided": (1.0, 2.0)}, "S > 1"),
    ({"teacher": "assets/tiny-sd"}, "teacher needs uncond='paired'"),
    ({"uncond": "paired", "guided": (7.5, 2.0), "guided_full": 800}, "guided_full must lie"),
    ({"uncond": "paired", "guided_weight": 1.0}, "guided_weight needs guided"),
])
def test_bad_training_options_are_clear_errors(latents, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        T.train_size("s", latents, T.DEFAULT_BASE, tmp_path, seconds=0.1, batch=2, lr=0.0, device="cpu",
                     seed=0, save_every=1e9, eval_n=0, **kw)


def test_frozen_text_tower_and_training_captions(latents, tmp_path):
    """--text-encoder conditions on a tower that never changes; --captions train draws SD-like captions."""
    from transformers import CLIPTextModel

    from dgq.tiny.models import make_text_encoder
    from dgq.tiny.tokenizer import build_clip_tokenizer

    tower = tmp_path / "tower"
    torch.manual_seed(3)
    make_text_encoder("s").save_pretrained(str(tower), safe_serialization=True)
    out = tmp_path / "frozen"
    out.mkdir()
    T.train_size("s", latents, T.DEFAULT_BASE, out, seconds=2.0, batch=4, lr=1e-2, device="cpu", seed=0,
                 save_every=1e9, eval_n=0, text_encoder=tower, captions="train", background_p=0.0)
    meta = _meta(out / "s.safetensors")
    assert meta["step"] > 0 and "(frozen)" in meta["text_encoder"] and "background_p 0.0" in meta["captions"]
    want = CLIPTextModel.from_pretrained(str(tower)).state_dict()
    with safe_open(str(out / "s.safetensors"), "pt") as f:
        for k, v in want.items():
            assert torch.equal(f.get_tensor(f"text.{k}").float(), v.half().float()), k
    ids = T._caption_variants(6, build_clip_tokenizer(), 0.5, 0.0, seed=0)
    assert ids.shape == (6, 4, 77)
    text = build_clip_tokenizer().batch_decode(ids.view(-1, 77).long(), skip_special_tokens=True)
    assert not any("background" in t for t in text)
    with pytest.raises(ValueError, match="captions must be"):
        T.train_size("s", latents, T.DEFAULT_BASE, out, seconds=0.1, batch=2, lr=0.0, device="cpu", seed=0,
                     save_every=1e9, eval_n=0, captions="free")


def test_cached_token_ids_equal_the_tokenizer():
    """The word-cached caption ids (a million-latent table in seconds) are the tokenizer's own."""
    import random

    from dgq.tiny.captions import scene_of, training_caption
    from dgq.tiny.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    rng = random.Random(0)
    caps = [training_caption(scene_of(s), rng, 0.5, 0.5) for s in range(300)]
    caps += ["", "  A  RED,circle.  left ", "word " * 90]  # empty, odd spacing/case/punctuation, truncated
    want = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(T.token_ids(tok, caps), want)


def test_a_deeper_frozen_tower_trains_and_exports(latents, tmp_path):
    """A frozen text tower deeper than the size's own (same width) conditions the UNet and is exported."""
    from dgq.tiny.models import make_text_encoder

    tower = tmp_path / "tower6"
    make_text_encoder("m", layers=6).save_pretrained(str(tower), safe_serialization=True)
    out = tmp_path / "deep"
    out.mkdir()
    T.train_size("m", latents, T.DEFAULT_BASE, out, seconds=1.0, batch=2, lr=1e-3, device="cpu", seed=0,
                 save_every=1e9, eval_n=0, text_encoder=tower, captions="train")
    _, _, text_sd = T._read_save(out / "m.safetensors")
    assert T.text_layers(text_sd) == 6
    folder = tmp_path / "deep-pipe"
    T.export(out / "m.safetensors", folder, guidance=3.0)
    pipe = dgq.load_pipeline(str(folder), device="cpu")
    assert pipe.text_encoder.config.num_hidden_layers == 6
    with pytest.raises(ValueError, match="no encoder.layers"):
        T.text_layers({"unet.conv_in.weight": torch.zeros(1)})

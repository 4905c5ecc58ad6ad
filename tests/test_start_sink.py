"""benchmarks/start_sink.py: the cross-attention shares add up and the pixel masks come from the image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks import start_sink as S


def test_masks_split_background_and_object_pixels():
    img = np.full((64, 64, 3), 128, np.uint8)
    img[16:48, 16:48] = (255, 0, 0)
    bg, obj = S._masks(Image.fromarray(img), 16)
    assert bg[0, 0] and not bg[8, 8] and obj[8, 8] and not obj[0, 0]
    assert not (bg & obj).any()


def test_measure_shares_sum_to_one_on_a_random_pipeline():
    from dgq.tiny.models import build_pipeline

    pipe = build_pipeline(seed=0)
    r = S.measure(pipe, ["a small red circle on the left"], steps=2, guidance=2.0)
    assert abs(r["start"] + r["words"] + r["eos"] + r["padding"] - 1.0) < 1e-3
    assert 0 <= r["p_above_0.9_on_start"] <= 1
    states = S.text_states(pipe, ["a small red circle on the left"])
    assert states["start_norm"] > 0
    table = S.table_markdown({"m": {**r, "guidance": 2.0, "text_states": states}})
    assert table.count("\n") == 2 and "| m (2) |" in table


def test_prompts_name_or_drop_the_background():
    named, unnamed = S._prompts(20, "named"), S._prompts(20, "unnamed")
    assert all(p.endswith(" background") for p in named)
    assert not any("background" in p for p in unnamed)


def test_tower_states_follow_the_stream_and_end_at_the_encoders_output():
    from dgq.tiny.models import build_pipeline

    pipe = build_pipeline(seed=0)
    prompts = ["a small red circle on the left", "a blue square"]
    rows = S.tower_states(pipe.text_encoder, pipe.tokenizer, prompts)
    layers = pipe.text_encoder.config.num_hidden_layers
    assert [r["at"] for r in rows] == ["embeddings", *(f"layer {i}" for i in range(1, layers + 1)), "final layer norm"]
    last = S.text_states(pipe, prompts)  # the encoder's output is what every cross-attention sees
    assert rows[-1]["start_norm"] == last["start_norm"] and rows[-1]["other_absmax"] == last["other_absmax"]


def test_head_logits_reproduce_the_attention_output():
    """The logits and values the diagnostic reads are the ones the layer attends with."""
    import torch

    from dgq.tiny.models import build_pipeline

    pipe = build_pipeline(seed=0)
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    logits, v = S.head_logits(attn, hidden, context)
    mixed = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    with torch.no_grad():
        want = attn(hidden, encoder_hidden_states=context)
    assert torch.allclose(attn.to_out[0](mixed), want, atol=1e-5)


def test_logit_stats_on_a_random_pipeline():
    from dgq.tiny.models import build_pipeline

    pipe = build_pipeline(seed=0)
    r = S.logit_stats(pipe, ["a small red circle on the left"], steps=2, guidance=2.0)
    assert abs(sum(r[f"top_{c}"] for c in ("start", "words", "eos", "padding")) - 1.0) < 1e-3
    assert 1 / 77 <= r["max_prob"] <= 1 and r["logit_spread"] > 0 and r["out_norm_start"] > 0
    assert r["mean_padding_positions"] == 77 - 9  # <start>, 7 words, EOS
    table = S.logits_markdown({"m": {"logits": {**r, "lead_for_half": 2.0}}})
    assert table.count("\n") == 2 and "| m |" in table and "+2.00 |" in table


def _bump(path: str, label: str, n: int) -> None:
    from pathlib import Path

    for _ in range(n):
        S.update(Path(path), label, lambda e: {"count": e.get("count", 0) + 1})


def test_concurrent_updates_keep_every_entry(tmp_path):
    """Several models measured at once each merge their entry into one file: none is lost."""
    import json
    import multiprocessing as mp

    out = tmp_path / "sink.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(out), label, 30)) for label in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert json.loads(out.read_text()) == {"a": {"count": 30}, "b": {"count": 30}, "c": {"count": 30}}
    assert [f.name for f in tmp_path.iterdir() if ".tmp" in f.name] == []


def test_doc_tables_are_the_measured_json():
    """docs/embedded-model.md shows docs/start-sink.json as it is, both tables."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = json.loads((root / "docs" / "start-sink.json").read_text())
    doc = (root / "docs" / "embedded-model.md").read_text()
    assert S.table_markdown(table) in doc
    assert S.logits_markdown(table) in doc
    assert any("logits" in r for r in table.values())

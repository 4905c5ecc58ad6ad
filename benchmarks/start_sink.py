"""Where the cross-attention mass goes: `<start>`, the caption's words, EOS and padding, on
background and object pixels, measured with `dgq.record()` on held-out prompts.

    python -m benchmarks.start_sink --model tiny --n 48 --label shipped --out docs/start-sink.json

Each prompt is generated alone (batch 1, so the recorder's maps are that prompt's), full precision,
25 PNDM steps, the model's guidance. Shares are means over pixels, heads, cross-attention layers
(each layer weighted once) and steps of the conditional branch. Background / object pixels come
from the generated image itself: pixels within 40 levels of the image's border colour are
background; at an attention resolution a pixel is background when none of its 64×64 pixels is
object, object when at least half are. "p > 0.9 on <start>" is the share of the attention
probabilities above 0.9 that belong to the `<start>` column (the peak of the paper's Fig. 4).

Results are merged into `--out` under `--label` (one JSON object per measured model), written
atomically, so the hypothesis table in docs/embedded-model.md is one file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dgq
from dgq.tiny.report import held_out_prompts


def _masks(image, res: int) -> tuple[np.ndarray, np.ndarray]:
    """(background, object) boolean masks [res, res] of one generated image."""
    arr = np.asarray(image, dtype=np.int16)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    obj = (np.abs(arr - bg).max(-1) > 40).astype(np.float32)
    frac = F.adaptive_avg_pool2d(torch.from_numpy(obj)[None, None], res)[0, 0].numpy()
    return frac == 0, frac >= 0.5


@torch.no_grad()
def text_states(pipe, prompts: list[str]) -> dict:
    """How the `<start>` state of the text encoder's last layer compares with the other tokens'
    (the keys and values every cross-attention layer sees): mean L2 norm and max |x|."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return _position_stats(pipe.text_encoder(ids.to(pipe.text_encoder.device))[0])


def _position_stats(h: torch.Tensor) -> dict:
    """Mean L2 norm and largest |x| of hidden states [B, 77, d] at `<start>` and over the rest."""
    h = h.float().cpu()
    norms = h.norm(dim=-1)
    return {"start_norm": round(float(norms[:, 0].mean()), 3), "other_norm": round(float(norms[:, 1:].mean()), 3),
            "start_absmax": round(float(h[:, 0].abs().max()), 3), "other_absmax": round(float(h[:, 1:].abs().max()), 3)}


@torch.no_grad()
def tower_states(text_encoder, tokenizer, prompts: list[str]) -> list[dict]:
    """Layer by layer through a text tower (embeddings, each layer's residual stream, the final
    layer norm's output): the `<start>` position's mean L2 norm and largest |x| against the other
    positions'. A "massive activation" at the first position, the mark of an attention sink in
    large causal transformers, shows as a `<start>` max far above the others' in the stream."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    rows = []
    for i, h in enumerate([*out.hidden_states, out.last_hidden_state]):
        name = "embeddings" if i == 0 else ("final layer norm" if i == len(out.hidden_states) else f"layer {i}")
        rows.append({"at": name, **_position_stats(h)})
    return rows


def measure(pipe, prompts: list[str], steps: int = 25, guidance: float | None = None) -> dict:
    """The shares of one model over `prompts` (image i from seed i)."""
    studio = dgq.Studio(pipe)
    acc: dict[str, list[float]] = {k: [] for k in ("start", "words", "eos", "padding", "start_bg", "start_obj",
                                                   "bg_pixels", "obj_pixels")}
    per_res: dict[int, list[float]] = {}
    hist_start = hist_rest = 0.0
    for i, prompt in enumerate(prompts):
        with dgq.record() as rec:
            g = studio.generate(prompt, seed=i, steps=steps, guidance=guidance)
        n_tok = len(rec.tokens)  # <start> … EOS
        layers = rec.attention_layers()
        mass = np.zeros(77)
        start_bg, start_obj, n_bg, n_obj = [], [], 0, 0
        for layer in layers:
            maps = rec.layer_maps(layer)  # [77, h, w]
            mass += maps.reshape(77, -1).mean(1)
            res = maps.shape[-1]
            bgm, objm = _masks(g.images[0], res)
            if bgm.any():
                start_bg.append(float(maps[0][bgm].mean()))
            if objm.any():
                start_obj.append(float(maps[0][objm].mean()))
            n_bg += int(bgm.sum())
            n_obj += int(objm.sum())
            per_res.setdefault(res, []).append(float(maps[0].mean()))
        mass /= len(layers)
        acc["start"].append(mass[0])
        acc["words"].append(mass[1:n_tok - 1].sum())
        acc["eos"].append(mass[n_tok - 1])
        acc["padding"].append(mass[n_tok:].sum())
        if start_bg:
            acc["start_bg"].append(float(np.mean(start_bg)))
        if start_obj:
            acc["start_obj"].append(float(np.mean(start_obj)))
        acc["bg_pixels"].append(n_bg)
        acc["obj_pixels"].append(n_obj)
        h = rec.histograms()
        above = h["edges"][:-1] >= 0.9
        hist_start += float(h["start"][above].sum())
        hist_rest += float(h["cross"][above].sum())
    out = {k: round(float(np.mean(v)), 4) for k, v in acc.items() if v and not k.endswith("pixels")}
    out["start_by_resolution"] = {str(r): round(float(np.mean(v)), 4) for r, v in sorted(per_res.items())}
    out["p_above_0.9_on_start"] = round(hist_start / max(hist_start + hist_rest, 1.0), 4)
    out["n_above_0.9"] = int(hist_start + hist_rest)
    out["background_pixel_share"] = round(float(np.sum(acc["bg_pixels"]) /
                                                max(np.sum(acc["bg_pixels"]) + np.sum(acc["obj_pixels"]), 1)), 3)
    return out


def _prompts(n: int, background: str) -> list[str]:
    """Held-out prompts (renderer seeds 90,000,000 + i) with the background phrase as asked."""
    out = []
    for text in held_out_prompts(n):
        bare = text.split(" on a ")[0] if text.endswith(" background") else text
        if background == "template":
            out.append(text)
        elif background == "unnamed":
            out.append(bare)
        else:
            out.append(text if text.endswith(" background") else bare + " on a gray background")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.start_sink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--label", default=None, help="key of this model in --out (default: --model)")
    p.add_argument("--note", default="", help="what this model is (kept with its numbers)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--text-only", action="store_true", help="only add the text-state figures to the --label entry")
    p.add_argument("--table", action="store_true", help="print --out as the Markdown table of docs/embedded-model.md")
    p.add_argument("--out", default="docs/start-sink.json")
    p.add_argument("--background", choices=["template", "named", "unnamed"], default="template",
                   help="the prompts' background phrase: as the template writes it (gray implicit), always "
                        "named, or never named")
    p.add_argument("--tower", default=None, help="a text-encoder folder (CLIPTextModel): print tower_states on the "
                   "--n prompts, layer by layer, and stop")
    a = p.parse_args(argv)
    if a.tower:
        from transformers import CLIPTextModel  # noqa: PLC0415

        tok = dgq.load_pipeline("tiny", device="cpu").tokenizer  # SD's tokenizer, as every tower here uses
        for row in tower_states(CLIPTextModel.from_pretrained(a.tower).eval(), tok, _prompts(a.n, a.background)):
            print(json.dumps(row))
        return
    if a.table:
        print(table_markdown(json.loads(Path(a.out).read_text())))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = dgq.load_pipeline(a.model, device="cpu")
    guidance = dgq.default_guidance(pipe) if a.guidance is None else a.guidance
    prompts = _prompts(a.n, a.background)
    out = Path(a.out)
    table = json.loads(out.read_text()) if out.exists() else {}
    if a.text_only:
        table.setdefault(a.label or a.model, {})["text_states"] = text_states(pipe, prompts)
        print(json.dumps(table[a.label or a.model]["text_states"]))
        _write(out, table)
        return
    t0 = time.time()
    res = measure(pipe, prompts, a.steps, guidance)
    res["text_states"] = text_states(pipe, prompts)
    res.update({"model": a.model, "note": a.note, "n_prompts": a.n, "background_phrase": a.background,
                "steps": a.steps, "guidance": guidance,
                "seconds": round(time.time() - t0, 1),
                "command": f"python -m benchmarks.start_sink --model {a.model} --n {a.n} --background {a.background} "
                           f"--label {a.label or a.model}"})
    print(json.dumps(res, indent=1))
    table[a.label or a.model] = res
    _write(out, table)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def table_markdown(table: dict) -> str:
    """One row per measured model: shares in %, the `<start>` state against the other tokens'."""
    head = ("| model (guidance) | `<start>` | words | EOS | padding | `<start>` on background / object pixels "
            "| p > 0.9 on `<start>` | `<start>` state norm / max abs (others) |\n|---|---|---|---|---|---|---|---|")
    rows = [head]
    for label, r in table.items():
        if "start" not in r:
            continue
        ts = r.get("text_states", {})
        state = (f"{ts['start_norm']:.2f} / {ts['start_absmax']:.2f} ({ts['other_norm']:.2f} / {ts['other_absmax']:.2f})"
                 if ts else "–")
        rows.append(f"| {label} ({r['guidance']:g}) | {100 * r['start']:.1f} % | {100 * r['words']:.1f} % | "
                    f"{100 * r['eos']:.1f} % | {100 * r['padding']:.1f} % | {_pct(r.get('start_bg'))} / "
                    f"{_pct(r.get('start_obj'))} | {100 * r['p_above_0.9_on_start']:.1f} % of {r['n_above_0.9']} "
                    f"| {state} |")
    return "\n".join(rows)


def _write(out: Path, table: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()

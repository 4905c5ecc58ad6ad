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

`--logits` adds why the mass goes there (`logit_stats`: each (head, pixel)'s first choice, how
sharp attention is, logit leads and output norms per token class) to the same entry; run it after
the shares, which start a fresh entry.

Results are merged into `--out` under `--label` (one JSON object per measured model) under a file
lock, written atomically, so several models can be measured at once and the hypothesis tables in
docs/embedded-model.md come from one file.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dgq
from dgq.eval.plan import write_json
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


def head_logits(attn, hidden: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A diffusers cross-attention's pre-softmax logits [B, heads, N, 77] and values
    [B, heads, 77, d] (no attention mask: SD's UNet uses none for the text)."""
    h = attn.heads
    q = attn.to_q(hidden).unflatten(-1, (h, -1)).transpose(1, 2)
    k = attn.to_k(context).unflatten(-1, (h, -1)).transpose(1, 2)
    v = attn.to_v(context).unflatten(-1, (h, -1)).transpose(1, 2)
    return (q @ k.transpose(-1, -2)) * attn.scale, v


@torch.no_grad()
def logit_stats(pipe, prompts: list[str], steps: int = 25, guidance: float | None = None) -> dict:
    """Why the mass goes where it goes, from the pre-softmax logits q·k/√d of the conditional
    branch (means over pixels, heads, cross-attention layers, steps and prompts):

    * `top_<class>`: the share of (head, pixel) pairs whose highest-scoring position is of that
      class (start, words, eos, padding);
    * `max_prob`: a (head, pixel)'s largest probability; `logit_spread`: the standard deviation of
      its 77 logits (how sharp its attention can be at all);
    * `logit_<class>`: the class's mean logit minus the mean padding logit;
    * `out_norm_<class>`: the norm of what one position adds to the output at probability 1
      (`to_out` applied to its value, bias left out) relative to a padding position's.

    A sink in the sense of large causal transformers is a position every query scores high
    against (a large logit lead) whose value adds little (a small output norm): a no-op target.
    (`main` adds `lead_for_half`: by how much `<start>`'s logit lead must grow, all else equal, to
    lift its measured share s to one half, log((1 − s) / s).)"""
    studio = dgq.Studio(pipe)
    classes: dict[str, list[int]] = {}  # token positions of the prompt being generated
    sums: defaultdict[str, float] = defaultdict(float)
    count = 0
    n_pad_total = 0

    def hook(module, args, kwargs):
        nonlocal count
        if not classes["padding"]:  # a prompt that fills all 77 positions has no padding to compare with
            return
        hs = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states")
        if enc is None and len(args) > 1:
            enc = args[1]
        # the conditional branch ([uncond, cond] under guidance)
        logits, v = head_logits(module, hs[-1:], enc[-1:])
        per_pos = logits.mean(dim=(0, 1, 2))  # [77]
        out_norm = F.linear(v.transpose(1, 2).flatten(2), module.to_out[0].weight).norm(dim=-1)[0]  # [77]
        pad = per_pos[classes["padding"]].mean()
        pad_norm = out_norm[classes["padding"]].mean()
        top = logits.argmax(-1).flatten()  # each (head, pixel)'s highest-scoring position
        sums["max_prob"] += float(logits.softmax(-1).amax(-1).mean())
        sums["logit_spread"] += float(logits.std(-1).mean())
        for name, idx in classes.items():
            sums[f"logit_{name}"] += float(per_pos[idx].mean() - pad)
            sums[f"top_{name}"] += float(torch.isin(top, torch.tensor(idx)).float().mean())
            sums[f"out_norm_{name}"] += float(out_norm[idx].mean() / pad_norm)
        count += 1

    cross = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in cross]
    try:
        for i, prompt in enumerate(prompts):
            n_tok = len(studio.tokens(prompt)[0])  # <start> … EOS
            classes.update(start=[0], words=list(range(1, n_tok - 1)), eos=[n_tok - 1],
                           padding=list(range(n_tok, 77)))
            n_pad_total += 77 - n_tok
            studio.generate(prompt, seed=i, steps=steps, guidance=guidance)
    finally:
        for hd in handles:
            hd.remove()
    out = {k: round(v / max(count, 1), 3) for k, v in sums.items() if k not in ("logit_padding", "out_norm_padding")}
    out["mean_padding_positions"] = round(n_pad_total / max(len(prompts), 1), 1)
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
    p.add_argument("--logits", action="store_true", help="only add logit_stats (first choices, sharpness, logit "
                   "leads over padding, output norms) to the --label entry")
    p.add_argument("--table", action="store_true", help="print --out as the Markdown tables of docs/embedded-model.md")
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
        table = json.loads(Path(a.out).read_text())
        print(table_markdown(table) + "\n\n" + logits_markdown(table))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = dgq.load_pipeline(a.model, device="cpu")
    guidance = dgq.default_guidance(pipe) if a.guidance is None else a.guidance
    prompts = _prompts(a.n, a.background)
    out, label = Path(a.out), a.label or a.model
    if a.logits:
        res = logit_stats(pipe, prompts, a.steps, guidance)
        res["command"] = (f"python -m benchmarks.start_sink --model {a.model} --n {a.n} --background {a.background} "
                          f"--label {shlex.quote(label)} --logits")

        def add_logits(entry: dict) -> dict:
            if "start" in entry:
                res["lead_for_half"] = round(float(np.log((1 - entry["start"]) / entry["start"])), 3)
            return {**entry, "logits": res}

        update(out, label, add_logits)
        print(json.dumps(res))
        return
    if a.text_only:
        states = text_states(pipe, prompts)
        update(out, label, lambda entry: {**entry, "text_states": states})
        print(json.dumps(states))
        return
    t0 = time.time()
    res = measure(pipe, prompts, a.steps, guidance)
    res["text_states"] = text_states(pipe, prompts)
    res.update({"model": a.model, "note": a.note, "n_prompts": a.n, "background_phrase": a.background,
                "steps": a.steps, "guidance": guidance,
                "seconds": round(time.time() - t0, 1),
                "command": f"python -m benchmarks.start_sink --model {a.model} --n {a.n} --background {a.background} "
                           f"--label {shlex.quote(label)}"})
    print(json.dumps(res, indent=1))
    update(out, label, lambda _entry: res)  # fresh shares: a new entry (run --logits after)


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


def logits_markdown(table: dict) -> str:
    """One row per model with `logit_stats`: first choices, sharpness, logit leads over a padding
    position and output norms relative to a padding position's."""
    rows = ["| model | first choice of a (head, pixel): `<start>` / words / EOS / padding | largest probability "
            "of a (head, pixel), mean | logit spread (std over the 77) | mean logit lead over padding: `<start>` / "
            "words / EOS | output norm vs padding: `<start>` / words / EOS | lead `<start>` would need for half "
            "the mass |\n|---|---|---|---|---|---|---|"]
    for label, r in table.items():
        g = r.get("logits")
        if not g:
            continue
        need = f"+{g['lead_for_half']:.2f}" if "lead_for_half" in g else "–"
        top = " / ".join(f"{100 * g['top_' + c]:.0f} %" for c in ("start", "words", "eos", "padding"))
        sharp = (f"{g['max_prob']:.2f} | {g['logit_spread']:.2f}" if "max_prob" in g else "– | –")
        rows.append(f"| {label} | {top} | {sharp} | {g['logit_start']:+.2f} / {g['logit_words']:+.2f} / "
                    f"{g['logit_eos']:+.2f} | "
                    f"{g['out_norm_start']:.2f} / {g['out_norm_words']:.2f} / {g['out_norm_eos']:.2f} | {need} |")
    return "\n".join(rows)


def update(out: Path, label: str, change) -> None:
    """Replace the entry `label` of the JSON table `out` by `change(old entry or {})`, under an
    exclusive lock and re-reading the file inside it, so that measurements of several models run
    at once never drop each other's entries; the write is atomic."""
    lock = out.with_name(out.name + ".lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        table = json.loads(out.read_text()) if out.exists() else {}
        table[label] = change(table.get(label, {}))
        write_json(out, table)


if __name__ == "__main__":
    main()

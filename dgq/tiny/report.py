"""Quality report of the embedded model: held-out prompts → evaluator accuracy, and a sample grid.

    python -m dgq.tiny.report --n 240 --out docs/tiny-quality.json --grid docs/img/tiny-fp-grid.png

Prompts come from renderer seeds ≥ 90,000,000, which neither training (seeds < 10^7 and the
autoencoder's 10^7–4·10^7), the evaluator (5·10^7–7·10^7) nor calibration (7·10^7) use.
Image i uses seed i; full precision, 25 PNDM steps, the model's guidance scale (`--guidance` to
choose another). `--paraphrased` generates from paraphrases of the same scenes
(`dgq.tiny.captions.paraphrased_prompts`: other words for sizes, colours, positions, backgrounds)
and scores each image against its scene's template caption, the grammar the evaluator reads.

    python -m dgq.tiny.report --n 240 --paraphrased --out docs/tiny-quality-paraphrased.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from PIL import Image, ImageDraw

HELD_OUT_SEED = 90_000_000
GRID_PROMPTS = [
    "a large red circle on the left",
    "a small blue square on the right",
    "a large yellow triangle at the top",
    "a small green diamond at the bottom",
    "a large purple square in the center",
    "a small orange circle in the middle on a black background",
    "a large pink triangle on the left on a black background",
    "a large cyan diamond on the right on a white background",
    "a large black circle in the center on a white background",
    "a red circle to the left of a blue square",
    "a yellow triangle above a purple diamond",
    "a white square to the right of a green circle",
]


def held_out_prompts(n: int, two_object_prob: float = 0.3) -> list[str]:
    from dgq.tiny.render import sample  # noqa: PLC0415

    return [sample(HELD_OUT_SEED + i, two_object_prob)[1] for i in range(n)]


def grid(images: list[Image.Image], captions: list[str], cols: int = 4, scale: int = 3) -> Image.Image:
    """Upscaled images with their captions underneath."""
    w = images[0].width * scale
    cap_h = 30
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w, rows * (w + cap_h)), "white")
    d = ImageDraw.Draw(out)
    for i, (im, c) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * (w + cap_h)
        out.paste(im.resize((w, w), Image.Resampling.NEAREST), (x, y))
        words, line, lines = c.split(), "", []
        for word in words:
            if len(line) + len(word) > 30:
                lines.append(line)
                line = word
            else:
                line = (line + " " + word).strip()
        lines.append(line)
        for j, ln in enumerate(lines[:2]):
            d.text((x + 3, y + w + 2 + 13 * j), ln, fill=(0, 0, 0))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dgq.tiny.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=240)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    p.add_argument("--out", default="docs/tiny-quality.json")
    p.add_argument("--grid", default="", help="also write a sample grid here (the README's: docs/img/tiny-fp-grid.png)")
    p.add_argument("--paraphrased", action="store_true", help="prompts in words the template never writes")
    p.add_argument("--first-seed", type=int, default=HELD_OUT_SEED, help="renderer seed of the first prompt")
    p.add_argument("--write-prompts", default=None, metavar="FILE",
                   help="only write the --n held-out prompts from --first-seed to FILE (one per line) and stop")
    a = p.parse_args(argv)
    if a.write_prompts:
        from dgq.tiny.render import sample  # noqa: PLC0415

        out = Path(a.write_prompts)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(sample(a.first_seed + i)[1] + "\n" for i in range(a.n)))
        os.replace(tmp, out)
        print(f"{a.n} prompts (renderer seeds {a.first_seed} + i) written to {out}")
        return
    from tqdm.auto import tqdm  # noqa: PLC0415

    import dgq  # noqa: PLC0415
    from dgq.tiny.evaluator import load_evaluator  # noqa: PLC0415

    pipe = dgq.load_pipeline(a.model, device="cpu")
    a.guidance = dgq.default_guidance(pipe) if a.guidance is None else a.guidance
    studio = dgq.Studio(pipe)
    ev = load_evaluator()
    if a.paraphrased:
        from dgq.tiny.captions import paraphrased_prompts  # noqa: PLC0415

        prompts, targets = paraphrased_prompts(a.first_seed, a.n)
    else:
        from dgq.tiny.render import sample  # noqa: PLC0415

        prompts = targets = [sample(a.first_seed + i)[1] for i in range(a.n)]
    images = []
    t0 = time.time()
    for i in tqdm(range(0, len(prompts), a.batch), desc="held-out prompts", unit="batch"):
        chunk = prompts[i : i + a.batch]
        g = studio.generate(chunk, seed=list(range(i, i + len(chunk))), steps=a.steps, guidance=a.guidance)
        images += g.images
    score = ev.score(images, targets)
    report = {"model": a.model, "n_prompts": len(prompts), "steps": a.steps, "guidance": a.guidance,
              "seconds": round(time.time() - t0, 1), "prompt_seeds": f"render.sample({a.first_seed} + i)",
              "paraphrased": a.paraphrased, "first_prompts": prompts[:5],
              "image_seeds": "i", "scores": score}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, a.out)
    print(json.dumps(score, indent=1))
    if a.grid:
        g = studio.generate(GRID_PROMPTS, seed=list(range(len(GRID_PROMPTS))), steps=a.steps, guidance=a.guidance)
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        grid(g.images, GRID_PROMPTS).save(a.grid)


if __name__ == "__main__":
    main()

"""Full-precision quality of a shapes-domain pipeline at several guidance scales, on tuning prompts.

    python -m benchmarks.guidance_sweep runs/modelB --scales 2,3,5 --n 100 --threads 1

Prompts come from renderer seeds 80,000,000 + i (the tuning seeds: never the held-out ones the
reports and tables use), image i from seed i, 25 PNDM steps. Each scale is scored twice by the
shapes evaluator: on the template prompts and on paraphrases of the same scenes
(`dgq.tiny.captions.paraphrased_prompts`), each image against its scene. Writes
`<folder>-sweep.json` and prints one line per scale. The scale a model declares in its
`dgq_defaults.json` is chosen from this, never from the held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TUNING_SEED = 80_000_000
KEYS = ("single_color", "single_shape", "single_position", "pair_colors", "background", "all")


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionPipeline

    from dgq.tiny.captions import paraphrased_prompts
    from dgq.tiny.evaluator import load_evaluator

    p = argparse.ArgumentParser(prog="python -m benchmarks.guidance_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--scales", default="2,3,5")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=50)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.folder, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ev = load_evaluator()
    para, tmpl = paraphrased_prompts(TUNING_SEED, a.n)
    out: dict[str, dict] = {}
    for g in [float(x) for x in a.scales.split(",") if x]:
        t0 = time.time()
        row = {}
        for name, prompts in (("template", tmpl), ("paraphrased", para)):
            images = []
            for i in range(0, a.n, a.batch):
                gens = [torch.Generator("cpu").manual_seed(i + j) for j in range(len(prompts[i:i + a.batch]))]
                images += pipe(prompts[i:i + a.batch], num_inference_steps=25, guidance_scale=g, generator=gens,
                               height=64, width=64).images
            s = ev.score(images, tmpl)
            row[name] = {k: round(s[k], 3) for k in KEYS if isinstance(s.get(k), float)}
        out[f"{g:g}"] = row
        print(a.folder, g, json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    with open(a.folder.rstrip("/") + "-sweep.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

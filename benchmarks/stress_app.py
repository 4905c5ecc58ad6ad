"""Concurrency stress test of the served app: N mixed `/generate` requests sent at once by C
clients, then each request again alone on a fresh result cache; every image must be identical.

    python -m benchmarks.stress_app --requests 200 --clients 8            # embedded model
    python -m benchmarks.stress_app --model random --requests 40          # random weights, faster

The requests mix prompts (short, long enough to be truncated, two-object), seeds, bit-widths,
group counts, baselines and ablation toggles, so concurrent generations run different variants and
tokenize with different settings at the same time. The app runs with its result cache off (every
request computes), so nothing is shared between the concurrent and the serial pass but the model.
Prints one JSON line: requests, wrong images, errors and seconds of both passes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "a large red circle on the left",
    "a small cyan diamond in the center on a black background",
    "a red circle to the left of a blue square",
    "a green triangle above a yellow diamond",
    " ".join(["a large red circle on the left"] * 15),  # > 77 tokens: the untruncated length check
    "a tiny grey square",
]


def requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, a = rng.choice([(8, 8), (8, 6), (4, 8), (4, 6)])
        out.append(dict(prompt=rng.choice(PROMPTS), seed=rng.randrange(1000), w_bits=w, a_bits=a,
                        groups=rng.choice([1, 2, 4, 8, 16]), baseline=rng.choice(["tfmq", "qdiff"]),
                        log_quant=rng.random() > 0.3, axis=rng.choice(["auto", "channel", "pixel"]), tag=i))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (embedded) or 'random' (random weights)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import gradio_client
    import numpy as np
    from PIL import Image

    from app.engine import Engine
    from app.testing import CALIB_PROMPTS, launch, random_model_folder

    if args.model == "random":
        engine = Engine(default_model=random_model_folder(), calib_prompts=CALIB_PROMPTS, calib_steps=4, cache_size=0)
    else:
        engine = Engine(default_model=args.model, cache_size=0)
    demo, url = launch(engine)
    engine.model()
    clients = [gradio_client.Client(url, verbose=False) for _ in range(args.clients)]
    reqs = requests(args.requests, args.seed)

    def call(client, r: dict):
        kw = {k: v for k, v in r.items() if k != "tag"}
        try:
            out = client.predict(steps=args.steps, guidance=engine.default_guidance(""), model="", **kw,
                                 api_name="/generate")
        except Exception as e:  # noqa: BLE001 - counted and printed
            return r["tag"], None, f"{type(e).__name__}: {e}"
        imgs = []
        for p in out[:3]:
            with Image.open(p) as im:
                imgs.append(np.asarray(im.convert("RGB")))
        return r["tag"], imgs, None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        par = list(pool.map(lambda ir: call(clients[ir[0] % args.clients], ir[1]), enumerate(reqs)))
    t_par = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [call(clients[0], r) for r in reqs]
    t_ser = time.perf_counter() - t0
    demo.close()

    wrong, errors = [], []
    for (tag, imgs, err), (_, ref, err2) in zip(par, alone):
        if err or err2:
            errors.append((tag, err or err2))
            continue
        for col, (a, b) in zip(("fp", "baseline", "dgq"), zip(imgs, ref)):
            if a.shape != b.shape or not np.array_equal(a, b):
                wrong.append({"request": tag, "column": col,
                              "max_diff": int(np.abs(a.astype(int) - b.astype(int)).max()) if a.shape == b.shape else -1})
    print(json.dumps({"model": args.model, "requests": len(reqs), "images": 3 * len(reqs), "clients": args.clients,
                      "steps": args.steps, "wrong_images": len(wrong), "errors": len(errors),
                      "concurrent_s": round(t_par, 1), "serial_s": round(t_ser, 1),
                      "wrong": wrong[:10], "error_samples": errors[:5]}))


if __name__ == "__main__":
    main()

"""Timing of the DGQ Studio app (prints figures; asserts nothing).

Targets on the embedded model with 2 CPU cores:
  * three-column comparison (FP + baseline + DGQ) at default settings   ≤ 15 s
  * a bit-slider change (two quantized columns, FP from the cache)       ≤ 10 s
  * from `python app.py` to a served page                                 ≤ 20 s

Usage:
    python -m benchmarks.bench_app                 # the embedded model ("tiny") if present
    python -m benchmarks.bench_app --model random  # a random model of the embedded architecture
    python -m benchmarks.bench_app --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _quiet(*_a, **_k):
    return None


def _model(arg: str) -> str:
    if arg == "random":
        from app.testing import random_model_folder

        return random_model_folder()
    return arg


def bench_startup(model: str, env_extra: dict[str, str], timeout: float = 120.0) -> tuple[float, float | None]:
    """Seconds from spawning `python app.py` to HTTP 200 on "/", and to the model being ready."""
    from app.testing import free_port

    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), DGQ_APP_MODEL=model,
               **env_extra)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    served = ready = None
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        served = time.perf_counter() - t0
                        break
            except OSError:
                pass
            time.sleep(0.1)
        if served is None:
            return None, None
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        t1 = time.perf_counter()
        client.predict(prompt="a large red circle on the left", seed=0, steps=1, guidance=7.5, model="",
                       w_bits=8, a_bits=8, groups=16, baseline="tfmq", api_name="/generate")
        ready = served + (time.perf_counter() - t1) if served is not None else None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return served, ready


def bench_callbacks(model: str, repeats: int, steps: int) -> dict[str, list[float]]:
    from app import constants as C
    from app.callbacks import Callbacks
    from app.engine import Engine
    from app.testing import CALIB_PROMPTS

    small = model != "tiny"
    eng = Engine(default_model=model, calib_prompts=CALIB_PROMPTS if small else None,
                 calib_steps=4 if small else None)
    cb = Callbacks(eng)
    t0 = time.perf_counter()
    eng.model()
    out: dict[str, list[float]] = {"load+calibrate": [time.perf_counter() - t0], "compare": [], "slider": [],
                                   "attention view": [], "outlier view": []}
    prompt = "a red circle to the left of a blue square"
    for i in range(repeats):
        t = time.perf_counter()
        r = cb.generate(prompt, 100 + i, steps, C.DEFAULT_GUIDANCE, "", C.DEFAULT_W, C.DEFAULT_A, C.DEFAULT_K,
                        "tfmq", progress=_quiet)
        out["compare"].append(time.perf_counter() - t)
        state = r[-1]
        t = time.perf_counter()
        r2 = cb.requantize(C.DEFAULT_W, C.DEFAULT_A + 1 - (i % 2) * 2, C.DEFAULT_K, "tfmq", True, "auto", True, True,
                           True, True, "nearest", "simulated", state, progress=_quiet)
        out["slider"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cb.attention_view(r2[-1], "all", "all", "all")
        out["attention view"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cb.outlier_view(r2[-1], None, None, True)
        out["outlier view"].append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'tiny' (default when present), 'random', or a folder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the app's default, 25)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-startup", action="store_true")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from dgq.loading import TINY_DIR

    from app import constants as C

    model = a.model or ("tiny" if (TINY_DIR / "model_index.json").exists() else "random")
    model = _model(model)
    steps = a.steps or C.DEFAULT_STEPS
    print(f"model: {model}  steps: {steps}  torch threads: {torch.get_num_threads()}  cpus: {os.cpu_count()}")
    if not a.skip_startup:
        env = {}
        if model != "tiny":
            from app.testing import CALIB_PROMPTS

            pf = Path(os.environ.get("DGQ_CACHE", "/tmp")) / "bench-calib-prompts.txt"
            pf.parent.mkdir(parents=True, exist_ok=True)
            pf.write_text("\n".join(CALIB_PROMPTS) + "\n")
            env = {"DGQ_APP_CALIB_PROMPTS": str(pf), "DGQ_APP_CALIB_STEPS": "4"}
        served, ready = bench_startup(model, env)
        if served is None:
            print("python app.py → page NOT served within 120 s")
        else:
            print(f"python app.py → page served: {served:.1f} s (target ≤ 20 s)")
        if ready is not None:
            print(f"python app.py → first 1-step generation answered: {ready:.1f} s")
    res = bench_callbacks(model, a.repeats, steps)
    targets = {"compare": 15.0, "slider": 10.0}
    for k, v in res.items():
        tgt = f" (target ≤ {targets[k]:.0f} s)" if k in targets else ""
        print(f"{k:>16}: median {statistics.median(v):6.2f} s  [{', '.join(f'{x:.2f}' for x in v)}]{tgt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

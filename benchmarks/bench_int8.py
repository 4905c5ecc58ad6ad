"""Integer execution (`execution="int8"`) against FP32 and the simulated path: speed, memory, images.

Prints, as Markdown (and JSON with --out):
  1. the CPU, whether it has VNNI, the int8 backend `auto` picks;
  2. GEMMs at SD v1.4 layer shapes: fp32 vs `torch._int_mm` vs the fp32-exact backend;
  3. SD v1.4 UNet architecture (random weights), batch 2, 64×64 latent, one step: FP32 vs
     DGQ W8A8 K=16 int8 and TFMQ W8A8 int8 (bar: int8 ≥ 2.0× faster), calibrated on that call;
  4. resident bytes of an int8-only SD v1.4 UNet (FP weights released) vs FP32 (bar ≤ 0.35×);
  5. the embedded model, 25 steps end to end: FP32 vs DGQ W8A8 int8 (bar: no slower);
  6. PSNR of int8 vs simulated images of the embedded model on N prompts (bar ≥ 40 dB).

Every ratio comes from runs interleaved in one process (the machine is shared and drifts).

    python benchmarks/bench_int8.py --threads 2 --prompts 50 --out docs/results/int8.json
    python benchmarks/bench_int8.py --no-sd --prompts 5        # minutes, the embedded model only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dgq  # noqa: E402
from dgq import int8  # noqa: E402
from dgq.int8 import core  # noqa: E402

SD_SHAPES = [(8192, 320, 320), (8192, 1280, 320), (8192, 320, 2560), (2048, 640, 640), (512, 11520, 1280),
             (8192, 2880, 320)]


def cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def rss_mb() -> float:
    """Current resident set size (after returning freed heap pages to the system)."""
    gc.collect()
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _best(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def bench_gemms(repeats: int, int_mm: bool) -> list[dict]:
    rows = []
    for m, k, n in SD_SHAPES:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        af, bf = a.float(), b.float()
        row = {"shape": f"{m}x{k} @ {k}x{n}", "fp32_ms": 1e3 * _best(lambda: af @ bf, repeats)}
        core.set_backend("fp32-exact")
        row["fp32_exact_ms"] = 1e3 * _best(lambda: core._mm(a, b), repeats)
        if int_mm:
            core.set_backend("int_mm")
            row["int_mm_ms"] = 1e3 * _best(lambda: core._mm(a, b), 1)
        core.set_backend("auto")
        rows.append(row)
        print(f"  gemm {row}", flush=True)
    return rows


def sd_memory() -> dict:
    """Resident bytes of the SD v1.4 UNet: FP32, then int8-only (W8 packed, FP weights released)."""
    from dgq.bops import build_unet  # noqa: PLC0415

    unet = build_unet("sd-v1-4", device="cpu").eval()
    dgq.quantize_(unet, weight_search="minmax")
    fp_bytes, fp_rss = int8.resident_bytes(unet), rss_mb()
    int8.release_fp_weights_(unet, 8)
    mem = {"fp32_bytes": fp_bytes, "int8_only_bytes": int8.resident_bytes(unet), "fp32_rss_mb": fp_rss,
           "int8_only_rss_mb": rss_mb()}
    mem["ratio_bytes"] = mem["int8_only_bytes"] / fp_bytes
    mem["ratio_rss"] = mem["int8_only_rss_mb"] / fp_rss
    print(f"  sd memory {mem}", flush=True)
    return mem


def bench_sd(repeats: int, batch: int, with_simulated: bool) -> dict:
    from dgq.bops import build_unet  # noqa: PLC0415
    from dgq.calibration import StatsCollector  # noqa: PLC0415
    from dgq.context import RunContext, use  # noqa: PLC0415
    from dgq.quantizer import QuantParams  # noqa: PLC0415

    t0 = time.perf_counter()
    unet = build_unet("sd-v1-4", device="cpu").eval()
    dgq.quantize_(unet, weight_search="minmax")
    fp_bytes = int8.resident_bytes(unet)
    fp_rss = rss_mb()
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)

    def call(run) -> float:
        t = time.perf_counter()
        with torch.no_grad(), use(run):
            unet(x, 981, encoder_hidden_states=text)
        return time.perf_counter() - t

    collector = StatsCollector()
    call(RunContext(collector=collector))
    calib = collector.finalize({"model": "sd-v1-4-random"})
    print(f"  sd: built and calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    variants = {"fp32": None,
                "dgq_int8": QuantParams(calib, dgq.DGQConfig(8, 8, groups=16, execution="int8")),
                "tfmq_int8": QuantParams(calib, dgq.BaselineConfig(8, 8, execution="int8"))}
    if with_simulated:
        variants["dgq_sim"] = QuantParams(calib, dgq.DGQConfig(8, 8, groups=16))
    int8.pack_(unet, 8)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, params in variants.items():  # first calls: plans, packed weights
        print(f"  sd first {name}: {call(RunContext(params=params)):.1f} s", flush=True)
    for r in range(repeats):  # interleaved
        for name, params in variants.items():
            times[name].append(call(RunContext(params=params)))
        print(f"  sd repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"batch": batch, "latent": cfg.sample_size, "seconds": med,
           "speedup_dgq_int8": med["fp32"] / med["dgq_int8"], "speedup_tfmq_int8": med["fp32"] / med["tfmq_int8"],
           "fallbacks": int8.fallbacks()}
    # int8-only: FP weights released; one more DGQ int8 call proves the model still runs
    for layer in unet.modules():
        if hasattr(layer, "_dgq_wcache"):
            layer._dgq_wcache.clear()
    int8.release_fp_weights_(unet, 8)
    out["int8_only_step_s"] = call(RunContext(params=variants["dgq_int8"]))
    out["memory"] = {"fp32_bytes": fp_bytes, "int8_only_bytes": int8.resident_bytes(unet),
                     "fp32_rss_mb": fp_rss, "int8_only_rss_mb": rss_mb()}
    out["memory"]["ratio_bytes"] = out["memory"]["int8_only_bytes"] / fp_bytes
    out["memory"]["ratio_rss"] = out["memory"]["int8_only_rss_mb"] / fp_rss
    print(f"  sd memory {out['memory']}", flush=True)
    return out


def _psnr(a, b) -> float:
    import numpy as np  # noqa: PLC0415

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def bench_embedded(steps: int, repeats: int, n_prompts: int) -> dict:
    from dgq.paths import SHAPES_EVAL_PROMPTS, SHIPPED_CALIBRATION  # noqa: PLC0415

    pipe = dgq.load_pipeline("tiny")
    studio = dgq.Studio(pipe, dgq.Calibration.load(SHIPPED_CALIBRATION))
    sim, i8 = dgq.DGQConfig(8, 8, groups=16), dgq.DGQConfig(8, 8, groups=16, execution="int8")
    prompt = "a large red circle on the left"
    variants = {"fp32": dgq.FP, "dgq_int8": i8, "dgq_sim": sim}
    for cfg in variants.values() if repeats else ():
        studio.prepare(cfg)
        studio.generate(prompt, seed=0, config=cfg, steps=2)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, cfg in variants.items():
            times[name].append(studio.generate(prompt, seed=r, config=cfg, steps=steps).seconds)
        print(f"  embedded repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    prompts = dgq.read_prompts(SHAPES_EVAL_PROMPTS)[:n_prompts]
    psnrs = []
    int8.reset_fallbacks()
    for i, p in enumerate(prompts):
        a = studio.generate(p, seed=i, config=sim, steps=steps).images[0]
        b = studio.generate(p, seed=i, config=i8, steps=steps).images[0]
        psnrs.append(_psnr(a, b))
        if (i + 1) % 10 == 0:
            print(f"  psnr {i + 1}/{len(prompts)}: min {min(psnrs):.1f} dB", flush=True)
    finite = [v for v in psnrs if v != float("inf")]
    return {"steps": steps, "seconds": med, "int8_over_fp32": med["dgq_int8"] / med["fp32"],
            "int8_over_simulated": med["dgq_int8"] / med["dgq_sim"], "n_prompts": len(prompts),
            "psnr_db": psnrs,
            "psnr_min_db": min(psnrs) if psnrs else None,
            "psnr_mean_db": statistics.mean(finite) if finite else float("inf"),
            "identical_images": len(psnrs) - len(finite), "fallbacks": int8.fallbacks()}


def render(rep: dict) -> str:
    lines = [f"CPU: {rep['cpu']} · VNNI: {rep['vnni']} · torch {rep['torch']} ({rep['capability']}) · "
             f"{rep['threads']} threads · int8 backend (auto): {rep['backend']}", "",
             "| figure | value | bar | met |", "|---|---|---|---|"]

    def row(fig, val, bar="", ok=None):
        lines.append(f"| {fig} | {val} | {bar} | {'' if ok is None else ('yes' if ok else 'NO')} |")

    def memory_rows(mem):
        row("SD v1.4 int8-only / FP32 resident (tensor bytes)",
            f"{mem['ratio_bytes']:.3f} ({mem['int8_only_bytes'] / 2**30:.2f} / {mem['fp32_bytes'] / 2**30:.2f} GiB)",
            "≤ 0.35×", mem["ratio_bytes"] <= 0.35)
        row("SD v1.4 int8-only / FP32 process RSS", f"{mem['ratio_rss']:.3f} ({mem['int8_only_rss_mb']:.0f} / "
            f"{mem['fp32_rss_mb']:.0f} MiB)")

    for g in rep.get("gemms", []):
        extra = f", int_mm {g['int_mm_ms']:.1f} ms ({g['fp32_ms'] / g['int_mm_ms']:.2f}× fp32)" if "int_mm_ms" in g else ""
        row(f"GEMM {g['shape']}", f"fp32 {g['fp32_ms']:.1f} ms, fp32-exact {g['fp32_exact_ms']:.1f} ms{extra}")
    if "sd_memory" in rep:
        mem = rep["sd_memory"]
        memory_rows(mem)
    sd = rep.get("sd")
    if sd:
        s = sd["seconds"]
        row("SD v1.4 step FP32 (s)", f"{s['fp32']:.2f}")
        row("SD v1.4 step DGQ W8A8 K=16 int8 speed-up", f"{sd['speedup_dgq_int8']:.2f}× ({s['dgq_int8']:.2f} s)", "≥ 2.0×",
            sd["speedup_dgq_int8"] >= 2.0)
        row("SD v1.4 step TFMQ W8A8 int8 speed-up", f"{sd['speedup_tfmq_int8']:.2f}× ({s['tfmq_int8']:.2f} s)", "≥ 2.0×",
            sd["speedup_tfmq_int8"] >= 2.0)
        if "dgq_sim" in s:
            row("SD v1.4 step DGQ simulated (s)", f"{s['dgq_sim']:.2f}")
        mem = sd["memory"]
        memory_rows(mem)
        row("SD v1.4 fallbacks to simulated", str(len(sd["fallbacks"])))
    emb = rep.get("embedded")
    if emb:
        s = emb["seconds"]
        if s["fp32"] == s["fp32"]:  # timed (not NaN)
            row(f"embedded {emb['steps']} steps int8 / FP32", f"{emb['int8_over_fp32']:.2f}× ({s['dgq_int8']:.2f} vs "
                f"{s['fp32']:.2f} s)", "≤ 1.0×", emb["int8_over_fp32"] <= 1.0)
            row(f"embedded {emb['steps']} steps int8 / simulated", f"{emb['int8_over_simulated']:.2f}×")
        if emb["n_prompts"]:
            row(f"PSNR int8 vs simulated, {emb['n_prompts']} prompts (min / mean dB)",
                f"{emb['psnr_min_db']:.1f} / {emb['psnr_mean_db']:.1f} ({emb['identical_images']} identical)",
                "≥ 40 dB", emb["psnr_min_db"] >= 40.0)
        row("embedded fallbacks to simulated", str(len(emb["fallbacks"])))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=50, help="prompts for the PSNR figure (0 = skip)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the embedded timing")
    ap.add_argument("--sd-repeats", type=int, default=2)
    ap.add_argument("--sd-batch", type=int, default=2)
    ap.add_argument("--sd-simulated", action="store_true", help="also time DGQ simulated on the SD UNet")
    ap.add_argument("--no-sd", action="store_true", help="skip the SD v1.4 figures (3.4 GB of random weights)")
    ap.add_argument("--sd-memory-only", action="store_true", help="SD v1.4: the memory figure only (no timing)")
    ap.add_argument("--no-embedded", action="store_true")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--int-mm-gemm", action="store_true", help="also time torch._int_mm in the GEMM table "
                    "(a generic loop on CPUs without VNNI: tens of seconds per shape)")
    ap.add_argument("--backend", default="auto", choices=list(int8.BACKENDS))
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("DGQ_CACHE", tempfile.mkdtemp(prefix="dgq-bench-int8-"))
    int8.set_backend(a.backend)
    rep = {"cpu": cpu_model(), "vnni": int8.has_vnni(), "torch": torch.__version__,
           "capability": torch.backends.cpu.get_cpu_capability(), "threads": a.threads,
           "backend": int8.backend("cpu"), "shared_machine_note": "ratios from interleaved runs in one process"}
    print(rep, flush=True)
    if not a.no_gemm:
        rep["gemms"] = bench_gemms(3, a.int_mm_gemm)
        int8.set_backend(a.backend)
    if not a.no_embedded:
        rep["embedded"] = bench_embedded(a.steps, a.repeats, a.prompts)
    if not a.no_sd and a.sd_memory_only:
        rep["sd_memory"] = sd_memory()
    elif not a.no_sd:
        rep["sd"] = bench_sd(a.sd_repeats, a.sd_batch, a.sd_simulated)
    text = render(rep)
    print(text)
    if a.out:
        out = Path(a.out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rep, indent=1, default=str))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

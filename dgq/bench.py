"""`python -m dgq bench`: what simulated quantization costs, measured in one run.

Figures (each ratio from measurements in the same process, variants interleaved so that a
background load hits all of them alike):

* per-step latency (one UNet call, CFG batch) and end-to-end latency (prompt → image) of FP, the
  TFMQ baseline and DGQ at the same W/A: the fake-quantization overhead, DGQ/FP and baseline/FP;
* bit-width switch: the work a change of A (weights cached) or W (weights to quantize) costs
  (`Studio.prepare`: every site's parameters at every timestep, the weights at the new width,
  plus the kernel plans the first generation builds), and the first generation after it minus
  the median of three repeats (one sample: noisier than the work it measures);
* calibration time with the cache disabled (64 prompts × 25 steps, as the paper);
* peak memory (RSS, and CUDA peak on a GPU) of a process serving FP only vs one serving FP, the
  baseline and DGQ, each measured in a fresh subprocess;
* one UNet step of the SD v1.4 architecture (random weights) FP vs DGQ, calibrated on that call.

The embedded model is used when present; while it is missing (it is trained separately) its
architecture with random weights stands in — latency and memory do not depend on the weights, and
the report says which was used. Targets are printed next to the figures, not asserted.

Example:
    python -m dgq bench --quick            # a few minutes on a laptop CPU
    python -m dgq bench --json --out bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

PROMPT = "a large red circle on the left"
TARGETS = {"dgq_over_fp": 1.25, "bit_switch_s": 0.5, "calibration_s": 60.0, "memory_ratio": 1.3}


# ----------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    import torch  # noqa: PLC0415

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@contextmanager
def unet_timer(unet, device) -> Iterator[list[float]]:
    """Wall time of every UNet forward inside the block (forward pre/post hooks, removed on exit)."""
    times: list[float] = []
    t0 = [0.0]

    def pre(_m, _a):
        _sync(device)
        t0[0] = time.perf_counter()

    def post(_m, _a, _o):
        _sync(device)
        times.append(time.perf_counter() - t0[0])

    handles = [unet.register_forward_pre_hook(pre), unet.register_forward_hook(post)]
    try:
        yield times
    finally:
        for h in handles:
            h.remove()


def peak_rss_mb() -> float:
    """Peak resident set size of this process image in MB.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss: exec keeps the parent's high-water mark
    there (subprocess forks a copy of a parent that already holds torch), so a child would report
    at least the parent's size. Elsewhere ru_maxrss (bytes on macOS, KB otherwise).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e6 if sys.platform == "darwin" else r * 1024 / 1e6


def load_embedded(model: str, device: str | None, dtype: str | None):
    """(pipeline, weights note). Falls back to the embedded architecture with random weights when
    the embedded model is not on disk yet (only for the embedded model; other models must load)."""
    from dgq.loading import ModelLoadError, is_embedded, load_pipeline  # noqa: PLC0415

    try:
        return load_pipeline(model, device=device, dtype=dtype), "trained"
    except ModelLoadError as e:
        if not is_embedded(model):
            raise
        import torch  # noqa: PLC0415

        from dgq.loading import default_device  # noqa: PLC0415
        from dgq.tiny.models import build_pipeline  # noqa: PLC0415

        log.warning("embedded model not available (%s); timing its architecture with random weights", e)
        dev = device or default_device()
        dt = {"fp16": torch.float16, "fp32": torch.float32}.get(dtype or "", None)
        dt = dt or (torch.float16 if dev.startswith("cuda") else torch.float32)
        pipe = build_pipeline(seed=0).to(dev)
        if dt != torch.float32:
            pipe = pipe.to(dtype=dt)
        pipe.dgq_model_id = "tiny-random-weights"
        return pipe, "random (assets/tiny-sd missing: architecture only)"


def _variants(w: int, a: int, execution: str = "simulated"):
    import dgq  # noqa: PLC0415

    return {"fp": dgq.FP, "baseline": dgq.BaselineConfig(w, a, "tfmq", execution=execution),
            "dgq": dgq.DGQConfig(w, a, groups=16, execution=execution)}


# ----------------------------------------------------------------------------- measurements
def bench_pipeline(pipe, prompts: list[str], calib_steps: int = 25, steps: int = 25, repeats: int = 3,
                   w_bits: int = 8, a_bits: int = 8, weight_search: str = "mse",
                   execution: str = "simulated") -> tuple[dict[str, Any], Any]:
    """Calibration (of `prompts`, cache off), per-step and end-to-end latency of FP/baseline/DGQ,
    and the bit-switch cost. Returns (figures, the calibration)."""
    import dgq  # noqa: PLC0415

    device = pipe.unet.device
    _sync(device)
    t0 = time.perf_counter()
    calib = dgq.calibrate(pipe, prompts, steps=calib_steps, cache=False, progress=False)
    _sync(device)
    calib_s = time.perf_counter() - t0
    studio = dgq.Studio(pipe, calib, weight_search=weight_search)
    # as the app does once a model is loaded (app/engine.py): long-lived objects out of the cyclic
    # GC's reach, so a full collection (~0.5 s over ~600k objects) does not land in a timing
    gc.collect()
    gc.freeze()
    variants = _variants(w_bits, a_bits, execution)
    first = {}
    for name, cfg in variants.items():  # warm-up: fills the weight cache and the parameter cache
        first[name] = studio.generate(PROMPT, seed=0, config=cfg, steps=steps).seconds
    e2e: dict[str, list[float]] = {k: [] for k in variants}
    step: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, cfg in variants.items():
            with unet_timer(pipe.unet, device) as times:
                e2e[name].append(studio.generate(PROMPT, seed=r, config=cfg, steps=steps).seconds)
            step[name].extend(times)
    med = {k: statistics.median(v) for k, v in e2e.items()}
    med_step = {k: statistics.median(v) for k, v in step.items()}

    def switch(cfg) -> dict[str, float]:
        """The switch's work, measured directly: `prepare` (parameters of every site and timestep,
        weights at the new width) plus the per-input kernel plans the first generation builds.
        First-minus-repeat of whole generations is reported too, but one sample of a 1-2 s run
        moves by ±0.5 s on a shared CPU, more than the work itself."""
        from dgq import quantizer as Q  # noqa: PLC0415

        prep = studio.prepare(cfg)
        plan_s = [0.0]
        real_plan = Q._plan

        def timed_plan(*a, **k):
            t = time.perf_counter()
            out = real_plan(*a, **k)
            plan_s[0] += time.perf_counter() - t
            return out

        Q._plan = timed_plan
        try:
            cold = studio.generate(PROMPT, seed=0, config=cfg, steps=steps).seconds
        finally:
            Q._plan = real_plan
        warm = statistics.median(studio.generate(PROMPT, seed=0, config=cfg, steps=steps).seconds
                                 for _ in range(max(3, repeats)))
        return {"prepare_s": prep, "plans_s": plan_s[0], "first_s": cold, "repeat_s": warm,
                "first_minus_repeat_s": cold - warm, "switch_s": prep + plan_s[0]}

    a2 = 6 if a_bits != 6 else 8
    w2 = 4 if w_bits != 4 else 8
    sw_a = switch(dgq.DGQConfig(w_bits, a2, groups=16))  # weights at w_bits are cached
    from dgq import primitives as P  # noqa: PLC0415
    from dgq import weight_ranges as WR  # noqa: PLC0415
    from dgq.modules import quantized_layers  # noqa: PLC0415

    layers = quantized_layers(pipe.unet)
    stored = all((w2, weight_search) in layer._dgq_wranges for layer in layers.values())
    sw_w = switch(dgq.DGQConfig(w2, a_bits, groups=16))  # weights must be quantized at w2 bits
    # what the same switch costs where no stored ranges exist (a model's first use of this width)
    _sync(device)
    t0 = time.perf_counter()
    for layer in layers.values():
        P.quantize_weight(layer.weight, w2, weight_search)
    _sync(device)
    sw_w.update(ranges_stored=stored, search_s=time.perf_counter() - t0, stored_entries=WR.entry_count(layers))
    return {
        "device": str(device), "dtype": str(pipe.unet.dtype).replace("torch.", ""), "steps": steps,
        "repeats": repeats, "w_bits": w_bits, "a_bits": a_bits, "weight_search": weight_search,
        "calibration": {"seconds": calib_s, "prompts": len(prompts), "steps": calib_steps},
        "first_generation_s": first,
        "end_to_end_s": med, "per_step_s": med_step,
        "ratios": {"dgq_over_fp_step": med_step["dgq"] / med_step["fp"],
                   "baseline_over_fp_step": med_step["baseline"] / med_step["fp"],
                   "dgq_over_fp_e2e": med["dgq"] / med["fp"], "baseline_over_fp_e2e": med["baseline"] / med["fp"]},
        "switch": {f"A{a_bits}->A{a2}": sw_a, f"W{w_bits}->W{w2}": sw_w},
    }, calib


def bench_unet_step(unet, batch: int = 2, repeats: int = 2, w_bits: int = 8, a_bits: int = 8, groups: int = 16,
                    text_len: int = 77, timestep: int = 981, execution: str = "simulated") -> dict[str, Any]:
    """One UNet call FP vs DGQ on random inputs, DGQ calibrated on that same call (min/max weights).

    `batch` 2 is one classifier-free-guidance step of one image.
    """
    import torch  # noqa: PLC0415

    import dgq  # noqa: PLC0415
    from dgq.calibration import StatsCollector  # noqa: PLC0415
    from dgq.context import RunContext, use  # noqa: PLC0415
    from dgq.quantizer import QuantParams  # noqa: PLC0415

    device, dtype = unet.device, unet.dtype
    unet.eval()
    dgq.quantize_(unet, weight_search="minmax")
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device, dtype)
    ctx = torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g).to(device, dtype)

    def call(run: RunContext) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), use(run):
            unet(x, timestep, encoder_hidden_states=ctx)
        _sync(device)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    collector = StatsCollector()
    call(RunContext(collector=collector))
    calib = collector.finalize({"model": "random-weights"})
    calib_s = time.perf_counter() - t0
    params = QuantParams(calib, dgq.DGQConfig(w_bits, a_bits, groups=groups, execution=execution), device=device)
    fp_first = call(RunContext())
    dgq_first = call(RunContext(params=params))  # includes quantizing every weight once
    fp, dq = [], []
    for _ in range(repeats):  # interleaved
        fp.append(call(RunContext()))
        dq.append(call(RunContext(params=params)))
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "latent": cfg.sample_size, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "calibration_call_s": calib_s, "fp_first_s": fp_first, "dgq_first_s": dgq_first,
            "fp_s": statistics.median(fp), "dgq_s": statistics.median(dq),
            "dgq_over_fp": statistics.median(dq) / statistics.median(fp), "w_bits": w_bits, "a_bits": a_bits,
            "groups": groups, "repeats": repeats}


def child_memory(kind: str, model: str, device: str | None, dtype: str | None, steps: int, calib_path: str | None,
                 w_bits: int = 8, a_bits: int = 8) -> dict[str, Any]:
    """Run in a fresh process: load, generate with FP only (`kind="fp"`) or with all three variants
    (`kind="all"`, calibration from `calib_path`), and report the process's peak memory."""
    import torch  # noqa: PLC0415

    import dgq  # noqa: PLC0415
    from dgq.calibration import Calibration  # noqa: PLC0415

    pipe, weights = load_embedded(model, device, dtype)
    dev = pipe.unet.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if kind == "fp":
        studio = dgq.Studio(pipe, None)
        studio.generate(PROMPT, seed=0, steps=steps)
    else:
        studio = dgq.Studio(pipe, Calibration.load(calib_path))
        for cfg in _variants(w_bits, a_bits).values():
            studio.generate(PROMPT, seed=0, config=cfg, steps=steps)
    out = {"kind": kind, "peak_rss_mb": peak_rss_mb(), "weights": weights}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 1e6
    return out


def bench_memory(model: str, device: str | None, dtype: str | None, steps: int, calib, w_bits: int = 8,
                 a_bits: int = 8, threads: int | None = None) -> dict[str, Any]:
    """Peak memory of FP-only vs all-variants processes (each a fresh `python -m dgq bench --child`,
    both run at once)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as td:
        cpath = Path(td) / "calibration"
        calib.save(cpath)
        procs = {}
        for kind in ("fp", "all"):  # concurrently: each reports its own high-water mark
            cmd = [sys.executable, "-m", "dgq", "bench", "--child", kind, "--model", model, "--steps", str(steps),
                   "--calib-file", str(cpath), "--bits", f"{w_bits}/{a_bits}"]
            if device:
                cmd += ["--device", device]
            if dtype:
                cmd += ["--dtype", dtype]
            if threads:
                cmd += ["--threads", str(threads)]
            procs[kind] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        res = {}
        for kind, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {kind} failed: {stderr.strip().splitlines()[-1:]}")
            res[kind] = json.loads(stdout.strip().splitlines()[-1])
    out = {"fp_only": res["fp"], "all_variants": res["all"],
           "ratio": res["all"]["peak_rss_mb"] / res["fp"]["peak_rss_mb"]}
    if "cuda_peak_mb" in res["fp"]:
        out["cuda_ratio"] = res["all"]["cuda_peak_mb"] / res["fp"]["cuda_peak_mb"]
    return out


# ----------------------------------------------------------------------------- report
def _ok(value: float, target: float) -> str:
    return "yes" if value <= target else "no"


def rows_of(report: dict[str, Any]) -> list[dict[str, str]]:
    """Flatten a report to (figure, device, value, target, met) rows for the Markdown table."""
    rows: list[dict[str, str]] = []

    def add(fig: str, dev: str, val: str, target: str = "", ok: str = "") -> None:
        rows.append({"figure": fig, "device": dev, "value": val, "target": target, "met": ok})

    for dev, d in report.get("embedded", {}).items():
        wa = f"W{d['w_bits']}A{d['a_bits']}"
        for name in ("fp", "baseline", "dgq"):
            label = {"fp": "FP", "baseline": f"TFMQ {wa}", "dgq": f"DGQ {wa} K=16"}[name]
            add(f"embedded per-step latency, {label}", dev, f"{d['per_step_s'][name] * 1e3:.2f} ms")
        for name in ("fp", "baseline", "dgq"):
            label = {"fp": "FP", "baseline": f"TFMQ {wa}", "dgq": f"DGQ {wa} K=16"}[name]
            add(f"embedded end-to-end ({d['steps']} steps), {label}", dev, f"{d['end_to_end_s'][name]:.3f} s")
        r = d["ratios"]
        t = TARGETS["dgq_over_fp"]
        add("embedded DGQ/FP per step", dev, f"{r['dgq_over_fp_step']:.2f}×", f"≤ {t}×", _ok(r["dgq_over_fp_step"], t))
        add("embedded DGQ/FP end to end", dev, f"{r['dgq_over_fp_e2e']:.2f}×", f"≤ {t}×", _ok(r["dgq_over_fp_e2e"], t))
        add("embedded baseline/FP per step", dev, f"{r['baseline_over_fp_step']:.2f}×")
        for k, sw in d["switch"].items():
            t = TARGETS["bit_switch_s"]
            if "prepare_s" in sw:
                add(f"bit switch {k}: first generation − median repeat (one sample, noisy)", dev,
                    f"{sw['first_minus_repeat_s']:+.3f} s")
                label = f"bit switch {k}: work (prepare {sw['prepare_s']:.3f} s + kernel plans {sw['plans_s']:.3f} s)"
            else:
                label = f"bit switch {k} (first − repeat)"
            if "search_s" in sw:
                label += ", weight ranges " + ("loaded from disk" if sw["ranges_stored"] else "searched")
            add(label, dev, f"{sw['switch_s']:.3f} s", f"≤ {t} s", _ok(sw["switch_s"], t))
            if "search_s" in sw:
                add(f"bit switch {k}: weight-range search alone, where none is stored (first use of a width)",
                    dev, f"{sw['search_s']:.3f} s")
        c = d["calibration"]
        t = TARGETS["calibration_s"]
        full = c["prompts"] >= 64 and c["steps"] >= 25
        add(f"calibration, no cache ({c['prompts']} prompts × {c['steps']} steps)", dev, f"{c['seconds']:.1f} s",
            f"≤ {t:.0f} s" + ("" if full else " (at 64×25)"), _ok(c["seconds"], t) if full else "")
    for dev, m in report.get("memory", {}).items():
        add("peak RSS, FP only", dev, f"{m['fp_only']['peak_rss_mb']:.0f} MB")
        add("peak RSS, FP + TFMQ + DGQ", dev, f"{m['all_variants']['peak_rss_mb']:.0f} MB")
        t = TARGETS["memory_ratio"]
        extra = m["all_variants"]["peak_rss_mb"] - m["fp_only"]["peak_rss_mb"]
        add("peak RSS ratio (three variants / FP only)", dev, f"{m['ratio']:.2f}× ({extra:+.0f} MB)", f"≤ {t}×",
            _ok(m["ratio"], t))
        if "cuda_ratio" in m:
            add("CUDA peak, FP only", dev, f"{m['fp_only']['cuda_peak_mb']:.0f} MB")
            add("CUDA peak, FP + TFMQ + DGQ", dev, f"{m['all_variants']['cuda_peak_mb']:.0f} MB")
            add("CUDA peak ratio", dev, f"{m['cuda_ratio']:.2f}×", f"≤ {t}×", _ok(m["cuda_ratio"], t))
    for dev, s in report.get("sd_unet_step", {}).items():
        lab = f"SD v1.4 UNet step (batch {s['batch']}, {s['latent']}² latent)"
        add(f"{lab}, FP", dev, f"{s['fp_s']:.3f} s")
        add(f"{lab}, DGQ W{s['w_bits']}A{s['a_bits']} K={s['groups']}", dev, f"{s['dgq_s']:.3f} s")
        t = TARGETS["dgq_over_fp"]
        add("SD v1.4 DGQ/FP per step", dev, f"{s['dgq_over_fp']:.2f}×", f"≤ {t}×", _ok(s["dgq_over_fp"], t))
        add("SD v1.4 first DGQ call (quantizes every weight)", dev, f"{s['dgq_first_s']:.2f} s")
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    title = f"{meta['model']}, weights: {meta['weights']}" if meta.get("weights") else "SD v1.4 architecture only"
    lines = [f"# DGQ benchmarks ({title})", "",
             f"torch {meta['torch']}, {meta['threads']} CPU threads, {meta['cpu']}" +
             (f", {meta['gpu']}" if meta.get("gpu") else "") + (" — quick run" if meta["quick"] else ""), "",
             "| figure | device | value | target | met |", "|---|---|---|---|---|"]
    for r in rows_of(report):
        lines.append(f"| {r['figure']} | {r['device']} | {r['value']} | {r['target']} | {r['met']} |")
    lines += ["", "Simulated (fake) quantization: integer kernels would be faster; these figures measure the "
              "overhead of simulating them. Ratios come from interleaved runs in one process."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command
def _parse_bits(text: str) -> tuple[int, int]:
    try:
        w, a = (int(v) for v in text.lower().replace("w", "").replace("a", "/").strip("/").split("/"))
    except ValueError:
        raise ValueError(f"--bits {text!r}: expected W/A such as 8/8") from None
    return w, a


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    w, a = _parse_bits(args.bits)
    quick = args.quick
    steps = args.steps or (10 if quick else 25)
    repeats = args.repeats or (1 if quick else 3)
    calib_prompts = args.calib_prompts or (16 if quick else 64)
    calib_steps = args.calib_steps or (10 if quick else 25)
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, Any] = {"meta": {
        "model": args.model, "quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "targets": TARGETS, "weights": None}, "embedded": {}, "memory": {}, "sd_unet_step": {}}
    import dgq  # noqa: PLC0415
    from dgq.studio import default_calibration_prompts  # noqa: PLC0415

    try:
        prompts = default_calibration_prompts(args.model, n=calib_prompts)
    except FileNotFoundError:  # no SD prompt list on disk: timing barely depends on the words
        prompts = default_calibration_prompts("tiny", n=calib_prompts)
    prompts = (prompts * (calib_prompts // len(prompts) + 1))[:calib_prompts]
    for dev in devices:
        if not (args.no_embedded and args.no_memory):
            pipe, weights = load_embedded(args.model, dev, args.dtype)
            report["meta"]["weights"] = weights
            calib = None
            if not args.no_embedded:
                report["embedded"][dev], calib = bench_pipeline(pipe, prompts, calib_steps, steps, repeats, w, a,
                                                                args.weight_search, args.execution)
            if not args.no_memory:
                if calib is None:
                    calib = dgq.calibrate(pipe, prompts, steps=calib_steps, cache=False, progress=False)
                report["memory"][dev] = bench_memory(args.model, dev, args.dtype, steps, calib, w, a, args.threads)
            del pipe, calib
        if not args.no_sd:
            from dgq.bops import build_unet  # noqa: PLC0415

            dt = {"fp16": torch.float16, "fp32": torch.float32}.get(args.dtype or "", torch.float32)
            torch.manual_seed(0)
            unet = build_unet("sd-v1-4", device=dev, dtype=dt)
            report["sd_unet_step"][dev] = bench_unet_step(unet, batch=args.sd_batch or (1 if quick else 2),
                                                          repeats=1 if quick else 2, w_bits=w, a_bits=a,
                                                          execution=args.execution)
            del unet
    return report


def cmd_bench(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        w, a = _parse_bits(args.bits)
        print(json.dumps(child_memory(args.child, args.model, args.device, args.dtype, args.steps or 10,
                                      args.calib_file, w, a)))
        return 0
    report = run_bench(args)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text if args.json else render_markdown(report), end="" if not args.json else "\n")
    return 0


def add_parser(sub) -> None:
    """Register ``bench`` on the ``python -m dgq`` subparsers."""
    from dgq.cli_common import add_model_args as _add_model_args  # noqa: PLC0415

    p = sub.add_parser("bench", help="latency, bit-switch, calibration and memory benchmarks",
                       description="FP vs baseline vs DGQ on the embedded model, plus one SD v1.4 UNet step "
                                   "with random weights; GPU figures too when CUDA is available.")
    _add_model_args(p)
    p.add_argument("--quick", action="store_true", help="fewer steps, prompts and repeats (minutes on a CPU)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--bits", default="8/8", help="W/A of the baseline and DGQ (default 8/8)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 25; quick 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3; quick 1)")
    p.add_argument("--calib-prompts", type=int, default=None, help="calibration prompts (default 64; quick 16)")
    p.add_argument("--calib-steps", type=int, default=None, help="calibration steps (default 25; quick 10)")
    p.add_argument("--weight-search", default="mse", choices=["mse", "minmax"])
    p.add_argument("--execution", default="simulated", choices=["simulated", "int8"],
                   help="quantized variants run simulated (fp32 fake quantization) or on integer GEMMs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--sd-batch", type=int, default=None, help="SD UNet batch (default 2 = one CFG step; quick 1)")
    p.add_argument("--no-sd", action="store_true", help="skip the SD v1.4 UNet step (3.4 GB of random weights)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded-model latency figures")
    p.add_argument("--child", default=None, choices=["fp", "all"], help=argparse.SUPPRESS)
    p.add_argument("--calib-file", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

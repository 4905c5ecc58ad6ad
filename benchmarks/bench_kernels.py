"""Fused CPU kernels vs PyTorch's eager ops on maps of growing size, at a given thread count.

Why: below `kernels.SINGLE_THREAD_MAX` elements the fused kernels always run; above it they
used to give way to PyTorch's multi-threaded eager ops whenever more than one thread was
allowed, because the first kernels were serial. Built with OpenMP they split a map over the
same threads, so whether they should take SD-scale maps too is a measurement, made here:

* act   – per-channel fake-quant of a [B, C, H, W] activation (a conv input, SD v1.4 sizes);
* probs – dynamic log2 quantization of softmax probabilities [B·heads, Nq, Nk] in place,
          `<start>` column skipped (SD v1.4's self-attention at 64×64 latents is 16×4096×4096).

Each size is timed alternately with both paths (median of `--repeats`), in one process, and the
ratio eager / kernel is printed (> 1: the kernel is faster).

    python benchmarks/bench_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-elements", type=int, default=1 << 27, help="largest map (elements)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from dgq import kernels
    from dgq.quantizer import ActQuant, ProbQuant, apply_act, apply_prob

    if kernels.library() is None:
        raise SystemExit("the fused kernels are not built here (no C compiler?): nothing to compare")
    print(f"threads {torch.get_num_threads()}, OpenMP build: {kernels.parallel_build()}")
    rows: list[dict] = []
    print(f"{'map':<6} {'shape':<22} {'elements':>11} {'eager ms':>9} {'kernel ms':>10} {'eager/kernel':>13}")
    g = torch.Generator().manual_seed(0)
    real = kernels.usable

    def always(t: torch.Tensor) -> bool:  # the kernels take every CPU fp32 map, whatever its size
        return t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad

    def never(t: torch.Tensor) -> bool:
        return False

    cases = []
    for c, hw in ((320, 32), (320, 64), (640, 64), (1280, 32), (640, 128), (1280, 64)):
        cases.append(("act", (2, c, hw, hw)))
    for n in (256, 1024, 2048, 4096):
        cases.append(("probs", (16, n, n)))
    cases.append(("probs", (16, 4096, 77)))
    for kind, shape in cases:
        numel = 1
        for s in shape:
            numel *= s
        if numel > a.max_elements:
            continue
        if kind == "act":
            x = torch.randn(shape, generator=g)
            scale = torch.rand(shape[1], generator=g) * 0.05 + 0.01
            q = ActQuant(8, "channel", scale, torch.zeros(shape[1]))

            def run(x=x, q=q):
                apply_act(x, q, "conv")
        else:
            base = torch.softmax(torch.randn(shape, generator=g), dim=-1)
            work = base.clone()
            q = ProbQuant(bits=8, log=True, start_fp=True, dynamic=True, scope="sample")

            def run(work=work, base=base, q=q):
                work.copy_(base)
                apply_prob(work.view(2, -1, *work.shape[1:]), q, inplace=True)  # [B=2, heads, Nq, Nk]
        times: dict[str, list[float]] = {}
        for path in ("eager", "kernel", "eager", "kernel"):
            kernels.usable = never if path == "eager" else always
            kernels._LAYOUTS.clear()
            if kind == "act":
                q._by_input.clear()
            run()  # warm-up (plans, page faults)
            times.setdefault(path, []).extend(_time(run, a.repeats))
        e, k = statistics.median(times["eager"]), statistics.median(times["kernel"])
        print(f"{kind:<6} {str(tuple(shape)):<22} {numel:>11,} {1e3 * e:>9.2f} {1e3 * k:>10.2f} {e / k:>12.2f}×",
              flush=True)
        rows.append({"map": kind, "shape": list(shape), "eager_ms": 1e3 * e, "kernel_ms": 1e3 * k})
    kernels.usable = real
    return rows


if __name__ == "__main__":
    main()

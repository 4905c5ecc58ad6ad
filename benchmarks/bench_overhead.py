"""Where DGQ's per-step overhead goes, measured in one process on the embedded model.

Runs blocks of UNet calls (the 25 timesteps of one generation, CFG batch 2) for each variant in
turn, so that a machine whose speed drifts hits every variant alike, and prints the median and
the best block per variant with its ratio to FP, and the median of each block's ratio to the FP
block run just before it (paired: the figure least moved by drift):

* fp         – PyTorch's fused attention, no quantization (what `python -m dgq bench` calls FP);
* w16a16     – the explicit-softmax attention path alone (probabilities materialised, nothing
               quantized): the price of being able to quantize the softmax output;
* dgq        – DGQ W8A8 K=16 with the fused CPU kernels (`dgq/kernels.py`);
* dgq_eager  – the same with the eager PyTorch ops (what a machine without a C compiler runs);
* tfmq       – the TFMQ baseline at W8A8.

    python benchmarks/bench_overhead.py --blocks 10 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10, help="blocks per variant (the first is a warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import dgq
    from dgq import kernels
    from dgq.context import RunContext, use
    from dgq.quantizer import QuantParams
    from dgq.studio import SHIPPED_CALIBRATION

    pipe = dgq.load_pipeline("tiny")
    calib = dgq.Calibration.load(SHIPPED_CALIBRATION)
    dgq.Studio(pipe, calib)  # installs the quantizable layers and the attention processor
    unet = pipe.unet
    ids = pipe.tokenizer(["a large red circle on the left", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
    pipe.scheduler.set_timesteps(25)
    steps = [int(t) for t in pipe.scheduler.timesteps][:25]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    lib = kernels.library()
    dgq_cfg = dgq.DGQConfig(8, 8, groups=16)
    variants = [("fp", None, True), ("w16a16", QuantParams(calib, dgq.DGQConfig(16, 16, groups=16)), True),
                ("dgq", QuantParams(calib, dgq_cfg), True), ("dgq_eager", QuantParams(calib, dgq_cfg), False),
                ("tfmq", QuantParams(calib, dgq.BaselineConfig(8, 8, "tfmq")), True)]
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for block in range(args.blocks):
        for name, params, fused in variants:
            # plans are made on a variant's first call and kept: a variant made without the
            # kernels stays on the eager ops
            kernels._lib = lib if fused else None
            t0 = time.perf_counter()
            for t in steps:
                with torch.no_grad(), use(RunContext(params=params)):
                    unet(x, t, encoder_hidden_states=ctx)
            if block > 0:
                times[name].append((time.perf_counter() - t0) / len(steps))
    kernels._lib = lib
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # each variant's block over the FP block just before it: the machine's speed drifts over a
    # run, and neighbouring blocks see the same speed, so the median of these paired ratios is
    # the steadiest figure
    paired = {k: statistics.median(a / b for a, b in zip(v, times["fp"])) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused kernels: {lib is not None}")
    print(f"{'variant':10s} {'median ms':>10s} {'× FP':>7s} {'best ms':>9s} {'× FP':>7s} {'paired × FP':>12s}")
    for k in times:
        print(f"{k:10s} {med[k] * 1e3:10.1f} {med[k] / med['fp']:7.3f} {best[k] * 1e3:9.1f} {best[k] / best['fp']:7.3f}"
              f" {paired[k]:12.3f}")


if __name__ == "__main__":
    main()

"""Q-Diffusion's activation step sizes, learned by block reconstruction (LSQ), for `qdiff-paper`.

Q-Diffusion (Li et al., ICCV 2023; dgq-method.md §E) does not stop at calibrated activation
ranges: after the weights' AdaRound stage it initialises one per-tensor range per layer input for
all timesteps, refines it with EMA running statistics, and then learns each step size Δ with the
straight-through estimator (LSQ), block by block, against the FP block output:

    x̂ = Δ·(clamp(⌊x/Δ⌉ + z, 0, 2^b − 1) − z),   ∂⌊u⌉/∂u := 1,   loss = Σ|unit_q(x_q) − unit_fp(x_fp)|^p

with z fixed from the initial range, Adam on Δ and cosine decay, inputs x_q from the
network whose weights (AdaRound) and earlier units' activations (learned Δ) are already
quantized, targets from FP (BRECQ's `asym=True`). Units are those of `dgq.reconstruction`.

Initial ranges (`running_ranges`, `ActReconSettings(init="ema")`, the default): as Q-Diffusion's
`--running_stat` SD run, every quantizer — layer inputs (per half where split), Q, K, V and
probabilities (z = 0) — is first MSE-searched (80 candidates, L2.4) on 16 random UNet inputs,
then its range follows an EMA with momentum 0.95 of the min/max of shuffled batches of 8 drawn
from all the calibration runs' UNet inputs (3,200 on the embedded model); the network runs with
its AdaRound weights and its activations quantized at the current ranges, as theirs does.
`init="steps"` keeps this project's earlier shortcut (the mean over the calibrated steps of each
step's min/max; the light `qdiff`'s MSE ranges for the attention quantizers).

What `dgq` does differently, and why:
* The EMA ranges keep zero inside (as every uniform range in `dgq`); Q-Diffusion's raw EMA
  min/max need not (its inputs after SiLU or softmax contain zero or come close to it anyway).
* Learned: the inputs of every quantized conv/linear (the up-blocks' shortcut concatenation
  with one Δ per half, `dgq.split`) and, as Q-Diffusion does, every attention module's Q, K, V
  (one Δ and z each) and probabilities (uniform, z = 0, one Δ), from the initial ranges
  above. While a unit learns, its attention modules run `LSQAttnProcessor`:
  the same explicit softmax as `dgq.attention`, with the step sizes as parameters
  (`ActReconSettings(attention=False)` learns the layer inputs only).
* Iterations: 100 per unit by default at lr 2e-3 (the authors: 5,000 at 4e-4 on a GPU), for CPU time.
* A unit whose learned step sizes do not lower its output error keeps the initial ones.

A result depends on the weights, the weight rounding, W and A bits, the calibration and these
settings; it is stored like a rounding (`dgq.act_ranges`, `dgq.stored`) under
`$DGQ_CACHE/act-recon/` and, for the embedded model, shipped beside its calibration.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from dgq import primitives as P
from dgq.act_ranges import ATTENTION_SITES, ActRanges, ActReconSettings, file_stem, find, folders, identity
from dgq.attention import DGQAttnProcessor, attention_names
from dgq.calibration import ALL, Calibration
from dgq.split import half_ranges, split_labels

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- ranges
def initial_range(calib: Calibration, site: str, bits: int, split: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from the mean over calibrated steps of each step's min/max: shape [1], or
    [2] (one per half) for a split input."""
    rows = [calib.t_index(t) for t in calib.t_keys if t != ALL]
    if split:
        lo, hi = half_ranges(calib.tensors[f"{site}|ch_min"][rows], calib.tensors[f"{site}|ch_max"][rows], split)
        return P.uniform_qparams(lo.mean(0), hi.mean(0), bits)
    lo = calib.tensors[f"{site}|tmin"][rows].float().mean().clamp(max=0)
    hi = calib.tensors[f"{site}|tmax"][rows].float().mean().clamp(min=0)
    s, z = P.uniform_qparams(lo, hi, bits)
    return s.reshape(1), z.reshape(1)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize whose gradient reaches `scale` (LSQ; rounding passed straight through)."""
    if scale.numel() > 1:  # per input channel: [C] → broadcast over dim 1
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale, zero = scale.view(shape), zero.view(shape)
    s = scale.clamp_min(P.EPS)
    q = torch.clamp(_round_ste(x / s) + zero, 0, 2**bits - 1)
    return (q - zero) * s


def initial_attention(calib: Calibration, w_bits: int, a_bits: int, modules: list[str]) -> dict[str, list[torch.Tensor]]:
    """The light `qdiff`'s ranges of every attention module's Q, K, V (MSE over all steps: scale,
    zero of shape [1]) and probabilities (uniform, z = 0: step, 0), keyed `<module>.<site>`."""
    from dgq.config import BaselineConfig  # noqa: PLC0415
    from dgq.quantizer import QuantParams  # noqa: PLC0415

    light = QuantParams(calib, BaselineConfig(w_bits, a_bits, style="qdiff"))
    t = light.key_for(0.0)
    out: dict[str, list[torch.Tensor]] = {}
    for m in modules:
        for site in ATTENTION_SITES[:3]:
            q = light.act(f"{m}.{site}", t)
            out[f"{m}.{site}"] = [q.scale.float().reshape(1).clone(), q.zero.float().reshape(1).clone()]
        out[f"{m}.p"] = [torch.tensor([float(light.prob(f"{m}.p", t).scale)]), torch.zeros(1)]
    return out


class LSQAttnProcessor(DGQAttnProcessor):
    """`DGQAttnProcessor` whose Q, K, V and probabilities are fake-quantized with step sizes that
    take gradients (`lsq_fake_quant`), read from `ranges[f"{name}.{site}"]` on every call: what
    `qdiff-paper` runs at generation (uniform per-tensor Q/K/V, uniform probabilities with z = 0,
    `<start>` quantized too), made differentiable in the step sizes."""

    def __init__(self, name: str, cross: bool, ranges: dict[str, list[torch.Tensor]], bits: int,
                 observe: Callable[[str, torch.Tensor], None] | None = None) -> None:
        super().__init__(name, cross)
        self.ranges, self.bits, self.observe = ranges, bits, observe

    def _q(self, x: torch.Tensor, site: str) -> torch.Tensor:
        key = f"{self.name}.{site}"
        if self.observe is not None:  # running statistics: may move the range before it is used
            self.observe(key, x)
        return lsq_fake_quant(x, *self.ranges[key], self.bits)

    def _attend(self, attn, q, k, v, mask):
        q, k, v = (self._q(x.float(), site) for x, site in ((q, "q"), (k, "k"), (v, "v")))
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        if mask is not None:
            scores = scores + mask.float()
        probs = self._q(torch.softmax(scores, -1), "p")
        return torch.matmul(probs, v)


class _Inputs:
    """Forward pre-hooks that quantize the inputs of wrapped layers with the current step sizes
    (while the quantized layers run their original forward: no `dgq` context is active), and
    `LSQAttnProcessor`s swapped onto attention modules. A split input holds two step sizes, spread
    over its channels by `labels` on every call."""

    def __init__(self, layers: dict[str, nn.Module], ranges: dict[str, list[torch.Tensor]], bits: int,
                 labels: dict[str, torch.Tensor], attention: dict[str, nn.Module] | None = None) -> None:
        self.layers, self.ranges, self.bits, self.labels = layers, ranges, bits, labels
        self.attention = attention or {}
        self.observe: Callable[[str, torch.Tensor], None] | None = None  # sees each input before it is quantized

    def per_channel(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.ranges[name]
        lab = self.labels.get(name)
        return (s[lab], z[lab]) if lab is not None else (s, z)

    @contextmanager
    def on(self, names: list[str]) -> Iterator[None]:
        def hook_for(name: str) -> Callable[..., Any]:
            def hook(_m, args):
                if self.observe is not None:
                    self.observe(name, args[0])
                return (lsq_fake_quant(args[0], *self.per_channel(name), self.bits), *args[1:])
            return hook

        handles = [self.layers[n].register_forward_pre_hook(hook_for(n)) for n in names if n in self.layers]
        swapped = []
        for n in names:
            if n in self.attention:
                mod = self.attention[n]
                swapped.append((mod, mod.processor))
                mod.set_processor(LSQAttnProcessor(n, bool(getattr(mod, "is_cross_attention", False)),
                                                   self.ranges, self.bits, self.observe))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for mod, proc in swapped:
                mod.set_processor(proc)


EMA_MOMENTUM = 0.95  # Q-Diffusion's `act_range_momentum`
INIT_SAMPLES = 16  # its initialisation pass: 16 random calibration samples
EMA_BATCH = 8  # its running-statistics batch


def _parts(x: torch.Tensor, split: int | None) -> list[torch.Tensor]:
    """`x` whole, or its two halves along dim 1 for a split input (one range each)."""
    x = x.detach()
    return [x[:, :split], x[:, split:]] if split else [x]


def _extremes(x: torch.Tensor, split: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `x`: shape [1], or [2] (one per half of dim 1) for a split input."""
    parts = [part.float() for part in _parts(x, split)]
    return torch.stack([part.amin() for part in parts]), torch.stack([part.amax() for part in parts])


def _mse_range(x: torch.Tensor, split: int | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' 80-candidate L2.4 clipping search (`primitives.mse_search`), per tensor or per half."""
    found = [P.mse_search(part, bits) for part in _parts(x, split)]
    return torch.stack([f[0] for f in found]).reshape(-1), torch.stack([f[1] for f in found]).reshape(-1)


def running_ranges(unet: nn.Module, hooks: _Inputs, weights: dict[str, torch.Tensor], data: dict[str, torch.Tensor],
                   splits: dict[str, int], gen: torch.Generator) -> int:
    """Q-Diffusion's activation initialisation (`--running_stat`), written into `hooks.ranges` for
    every quantizer `hooks` runs (its layers' inputs and its attention modules' Q, K, V and
    probabilities); returns the number of EMA batches.

    1. One pass over 16 random rows of `data`: each quantizer takes the MSE-searched range of its
       own input (its quantizer's `init_quantization_scale`) and quantizes with it; the raw min/max
       seed the running statistics.
    2. Passes over shuffled batches of 8 of all rows: each quantizer first moves its min/max by an
       EMA with momentum 0.95 (`act_momentum_update`), then quantizes with the range they give.

    The network runs with `weights` (the AdaRound weights) and its activations quantized, as
    Q-Diffusion's does after its weight stage; split inputs keep one range per half."""
    from dgq.reconstruction import run_unet  # noqa: PLC0415

    n = data["sample"].shape[0]
    params = {f"{k}.weight": v for k, v in weights.items()}
    stats: dict[str, list[torch.Tensor]] = {}
    bits, state = hooks.bits, {"init": True}

    def set_range(site: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        hooks.ranges[site] = list(P.uniform_qparams(lo.clamp(max=0), hi.clamp(min=0), bits))

    def observe(site: str, x: torch.Tensor) -> None:
        split = splits.get(site)
        lo, hi = _extremes(x, split)
        if state["init"]:
            stats[site] = [lo, hi]
            set_range(site, *_mse_range(x, split, bits))
            return
        st = stats.setdefault(site, [lo, hi])
        st[0] = EMA_MOMENTUM * st[0] + (1 - EMA_MOMENTUM) * lo
        st[1] = EMA_MOMENTUM * st[1] + (1 - EMA_MOMENTUM) * hi
        set_range(site, *st)

    hooks.observe = observe
    try:
        with torch.no_grad(), hooks.on(list(hooks.layers) + list(hooks.attention)):
            run_unet(unet, params, data, torch.randperm(n, generator=gen)[:INIT_SAMPLES])
            state["init"] = False
            order = torch.randperm(n, generator=gen)
            batches = n // EMA_BATCH
            for i in range(batches):
                run_unet(unet, params, data, order[i * EMA_BATCH:(i + 1) * EMA_BATCH])
    finally:
        hooks.observe = None
    return batches


def learn(studio, w_bits: int, a_bits: int, settings: ActReconSettings | None = None,
          report: Callable[[str], None] | None = None, data: dict[str, torch.Tensor] | None = None,
          threads: int | None = 1, prompts: list[str] | None = None) -> ActRanges:
    """Learn Q-Diffusion's step sizes for the Studio's model at (W, A) (see the module doc). The
    Studio's calibration gives the initial ranges; its AdaRound rounding at W must be stored.

    Args:
        studio: a calibrated `dgq.Studio`.
        w_bits / a_bits: weight bits 2..8 (AdaRound), activation bits 4..8.
        settings: iterations, batch, samples, lr, loss exponent (`ActReconSettings()`).
        report: called with one line per unit (error with the initial and the learned sizes).
        data: UNet inputs from `dgq.reconstruction.sample_inputs` (made here if None).
        threads: torch intra-op threads while it runs (default 1, see `reconstruction.torch_threads`).
        prompts: the prompts of the sampling runs (default: the 64 calibration prompts).

    Example:
        >>> ranges = learn(studio, 4, 6, ActReconSettings(iters=100))
    """
    from dgq import reconstruction as R  # noqa: PLC0415
    from dgq.split import split_points  # noqa: PLC0415
    from dgq.studio import default_calibration_prompts  # noqa: PLC0415

    settings = settings or ActReconSettings()
    say = report or (lambda line: log.info("%s", line))
    if not 2 <= w_bits <= 8 or not 4 <= a_bits <= 8:
        raise ValueError(f"W{w_bits}A{a_bits}: learned step sizes need 2 <= W <= 8 and 4 <= A <= 8")
    if studio.calibration is None:
        raise RuntimeError("learning step sizes needs a calibrated Studio: dgq.Studio(pipe, dgq.calibrate(pipe))")
    if not studio.load_rounding(w_bits):
        raise RuntimeError(f"no AdaRound rounding at W{w_bits} is stored: run "
                           f"`python -m dgq reconstruct --model {studio.model_id} --w-bits {w_bits}` first")
    with R.torch_threads(threads):
        t0 = time.perf_counter()
        calib, unet = studio.calibration, studio.pipe.unet
        layers = dict(studio._qlayers)
        prompts = list(prompts) if prompts is not None else default_calibration_prompts(studio.model_id)
        setup = identity(studio, w_bits, a_bits, settings, prompts)
        splits = split_points(unet)
        ranges = {n: [t.clone() for t in initial_range(calib, n, a_bits, splits.get(n))] for n in layers}
        qweights = {n: m.quantized_weight(w_bits, "adaround").detach() for n, m in layers.items()}
        if data is None:
            data = sample(studio, settings, prompts, say, threads=None)
        ema_data = {k.removeprefix("ema|"): v for k, v in data.items() if k.startswith("ema|")}
        data = {k: v for k, v in data.items() if k not in ("total", "seconds") and not k.startswith("ema|")}
        quantized_splits = {n: k for n, k in splits.items() if n in layers}
        labels = {n: split_labels(calib.sites[n].channels, k) for n, k in quantized_splits.items()}
        plan = R.units(unet, layers)
        attention: dict[str, nn.Module] = {}
        if settings.attention:  # the attention modules inside the units (SD's are all in transformer blocks)
            attention = {a: unet.get_submodule(a) for a in attention_names(unet)
                         if any(a.startswith(u.name + ".") for u in plan)}
            ranges.update(initial_attention(calib, w_bits, a_bits, list(attention)))
        hooks = _Inputs(layers, ranges, a_bits, labels, attention)
        running: dict[str, Any] = {}
        if settings.init == "ema":
            t1 = time.perf_counter()
            ema_data = ema_data or data  # inputs from a caller's own sampling: the learning set
            batches = running_ranges(unet, hooks, qweights, ema_data, quantized_splits,
                                     torch.Generator().manual_seed(settings.seed + 7919 + 100 * w_bits + a_bits))
            running = {"samples": int(ema_data["sample"].shape[0]), "batches": batches,
                       "seconds": round(time.perf_counter() - t1, 1)}
            say(f"W{w_bits}A{a_bits}: initial ranges by Q-Diffusion's running statistics: MSE on {INIT_SAMPLES} "
                f"samples, then EMA ({EMA_MOMENTUM}) over {batches} batches of {EMA_BATCH} "
                f"({running['samples']} UNet inputs), {running['seconds']:.0f}s")
        gen = torch.Generator().manual_seed(settings.seed + 100 * w_bits + a_bits)
        say(f"W{w_bits}A{a_bits}: {len(plan)} units, {settings.iters} iterations each, batch {settings.batch_size}, "
            f"{data['sample'].shape[0]} samples; Q, K, V and probabilities "
            f"{f'of {len(attention)} attention modules learned too' if attention else 'not learned'}")
        done: list[str] = []
        rows = []
        for i, unit in enumerate(plan):
            t1 = time.perf_counter()
            mods = unit.layers + [a for a in attention if a.startswith(unit.name + ".")]
            sites = unit.layers + [f"{a}.{x}" for a in mods if a in attention for x in ATTENTION_SITES]
            _, _, target = R.capture(unet, unit, data, None, with_output=True)
            with hooks.on(done):
                args, kwargs, _ = R.capture(unet, unit, data, qweights, with_output=False)
            near = {ln: qweights[ln] for ln in unit.layers}
            with hooks.on(mods):
                before = R._mse(unit, args, kwargs, target, near)
            start = {x: [t.clone() for t in ranges[x]] for x in sites}
            _learn_unit(unit, hooks, near, args, kwargs, target, settings, gen, mods, sites)
            with hooks.on(mods):
                after = R._mse(unit, args, kwargs, target, near)
            kept = not after < before
            if kept:
                for x in sites:
                    ranges[x] = start[x]
            done += mods
            rows.append({"unit": unit.name, "mse_initial": before, "mse_learned": after, "kept_initial": kept,
                         "seconds": round(time.perf_counter() - t1, 2)})
            say(f"[{i + 1:2d}/{len(plan)}] {unit.name:55s} MSE initial {before:.4e} -> learned {after:.4e} "
                f"({(after / before - 1) * 100 if before > 0 else 0.0:+.1f} %){' KEPT INITIAL' if kept else ''}, "
                f"{rows[-1]['seconds']:.1f}s")
        seconds = round(time.perf_counter() - t0, 1)
        extra = f" and of {len(attention)} attention modules' Q, K, V and probabilities" if attention else ""
        say(f"learned the step sizes of {len(layers)} layer inputs{extra} at W{w_bits}A{a_bits} in {seconds:.0f}s")
        learned = {n: tuple(t.detach().cpu() for t in hooks.per_channel(n)) for n in layers}
        learned.update((x, tuple(t.detach().cpu() for t in r)) for x, r in ranges.items() if x not in layers)
        meta = dict(setup, settings=settings.to_dict(), units=rows, seconds=seconds, sites=sorted(learned),
                    splits=splits, running_stat=running, created=round(time.time(), 3))
        return ActRanges(w_bits, a_bits, learned, meta)


def sample(studio, settings: ActReconSettings, prompts: list[str] | None = None,
           report: Callable[[str], None] | None = None, threads: int | None = 1) -> dict[str, torch.Tensor]:
    """UNet inputs for `learn` (`settings.samples` of them, seeded), to share between widths; with
    `init="ema"` also `settings.ema_samples` for the running statistics (keys `ema|<name>`), drawn
    from the same sampling runs."""
    from dgq import reconstruction as R  # noqa: PLC0415
    from dgq.adaround import ReconSettings  # noqa: PLC0415
    from dgq.loading import default_guidance  # noqa: PLC0415
    from dgq.studio import default_calibration_prompts  # noqa: PLC0415

    prompts = list(prompts) if prompts is not None else default_calibration_prompts(studio.model_id)
    guidance = default_guidance(studio.pipe) if settings.guidance is None else settings.guidance
    (report or (lambda line: log.info("%s", line)))(
        f"sampling {len(prompts)} calibration prompts x {settings.steps} steps for UNet inputs")
    recon = ReconSettings(samples=settings.samples, steps=settings.steps, guidance=settings.guidance, seed=settings.seed)
    with R.torch_threads(threads):
        t0 = time.perf_counter()
        every = R.unet_inputs(studio.pipe, prompts, recon.steps, guidance, seed=recon.seed)
    out = R.pick_inputs(every, recon.samples, recon.seed)  # the rows `sample_inputs` draws for AdaRound
    if settings.init == "ema":
        out.update((f"ema|{k}", v) for k, v in R.pick_inputs(every, settings.ema_samples, recon.seed + 1).items())
    out["total"] = torch.tensor(every["sample"].shape[0])
    out["seconds"] = torch.tensor(round(time.perf_counter() - t0, 1))
    return out


def _learn_unit(unit, hooks: _Inputs, weights: dict[str, torch.Tensor], args, kwargs, target: torch.Tensor,
                settings: ActReconSettings, gen: torch.Generator, mods: list[str], sites: list[str]) -> None:
    """Adam (cosine-decayed) on the step sizes of `sites` (the unit's layer inputs and attention
    quantizers; `mods`: its layers and attention modules), in place in `hooks.ranges`."""
    from dgq.reconstruction import _rel, _take  # noqa: PLC0415

    n = target.shape[0]
    device = next(unit.module.parameters()).device
    deltas = {x: nn.Parameter(hooks.ranges[x][0].clone().to(device)) for x in sites}
    for x in sites:
        hooks.ranges[x][0] = deltas[x]
    # layer inputs: one absolute lr (Q-Diffusion's); attention quantizers: an lr relative to each
    # step (their steps span 1e-4 (probabilities at 6 bits) to 1e-1, where one absolute lr
    # either overshoots the smallest or never moves the largest)
    groups = [{"params": [deltas[x] for x in sites if x in unit.layers], "lr": settings.lr}]
    groups += [{"params": [deltas[x]], "lr": settings.attn_lr * float(deltas[x].detach().abs().max())}
               for x in sites if x not in unit.layers]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.iters, eta_min=0.0)
    params = {_rel(unit, k): v for k, v in weights.items()}
    flags = [q.requires_grad for q in unit.module.parameters()]
    unit.module.requires_grad_(False)
    try:
        with torch.enable_grad(), hooks.on(mods):
            for _ in range(settings.iters):
                idx = torch.randint(0, n, (settings.batch_size,), generator=gen)
                out = functional_call(unit.module, params, _take(args, idx, n, device), _take(kwargs, idx, n, device))
                err = (out.float() - target[idx].to(device)).abs().pow(settings.p)
                loss = err.sum(1).mean() if err.dim() > 1 else err.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(min=P.EPS)
    finally:
        for q, f in zip(unit.module.parameters(), flags):
            q.requires_grad_(f)
        for x in sites:
            hooks.ranges[x][0] = deltas[x].detach().cpu()


def learn_cached(studio, w_bits: int, a_bits: int, settings: ActReconSettings | None = None,
                 folder: str | Path | None = None, force: bool = False, report: Callable[[str], None] | None = None,
                 threads: int | None = 1, prompts: list[str] | None = None,
                 data: dict[str, torch.Tensor] | None = None) -> tuple[ActRanges, Path, bool]:
    """The stored result at (W, A) for these settings and prompts, learned and written atomically
    (default `$DGQ_CACHE/act-recon/`) when none is stored, it is stale or corrupted.

    Returns:
        (ranges, path of the safetensors file, learned_now).
    """
    from dgq.studio import default_calibration_prompts  # noqa: PLC0415

    settings = settings or ActReconSettings()
    say = report or (lambda line: log.info("%s", line))
    prompts = list(prompts) if prompts is not None else default_calibration_prompts(studio.model_id)
    folder = Path(folder) if folder is not None else folders(studio.model_id)[0]
    if not force and studio.load_rounding(w_bits):
        want = identity(studio, w_bits, a_bits, settings, prompts)
        key = want["key"]
        p = folder / file_stem(want["weights"], w_bits, a_bits, key)
        hit = find(studio, w_bits, a_bits, settings, [folder] + folders(studio.model_id)[1:], key)
        if hit is not None:
            say(f"W{w_bits}A{a_bits}: stored step sizes {hit[1]} are valid; not learned again")
            return hit[0], hit[1], False
        if p.with_suffix(".json").exists() or p.with_suffix(".safetensors").exists():
            say(f"W{w_bits}A{a_bits}: stored step sizes at {p} not used (stale or corrupted); learning them again")
    r = learn(studio, w_bits, a_bits, settings, say, data=data, threads=threads, prompts=prompts)
    path = r.save(folder / file_stem(r.meta["weights"], w_bits, a_bits, r.meta["key"]))
    say(f"W{w_bits}A{a_bits}: step sizes written to {path}")
    return r, path, True

__all__ = ["ActRanges", "ActReconSettings", "LSQAttnProcessor", "learn", "learn_cached", "lsq_fake_quant", "initial_range",
           "initial_attention", "running_ranges"]

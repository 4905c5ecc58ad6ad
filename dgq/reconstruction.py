"""BRECQ block reconstruction of the weights' rounding (AdaRound), as the paper's SD rows use.

Units are the UNet's `ResnetBlock2D` and `BasicTransformerBlock` modules; every other quantized
layer (proj_in/out, the time-embedding MLP, down/up-sample convs) is a unit on its own. In the
UNet's execution order, each unit learns the rounding of all its layers at once, minimising

    ‖unit_q(x_q) − unit_fp(x_fp)‖² + λ·Σ(1 − |2h(α) − 1|^β)     (λ = 0.01, β 20 → 2 after 20 %)

where x_q is the unit's input in the network whose weights are already quantized — the units
before it with their learned rounding, the rest rounded to nearest — and x_fp its input in the FP
network (BRECQ's `asym=True`, dgq-method.md §A.3). The inputs come from UNet calls sampled over
every step and both CFG halves of the 64 calibration prompts' FP sampling runs.

Activations stay in FP while the rounding is learned (weights-only reconstruction). That is what
the authors' weight stage does (their weight-only checkpoint is shared by the baselines and DGQ,
§A.3) and what lets one stored rounding serve every activation bit-width and method: a rounding
tuned under one A-bit setting would be tied to it.

Unit outputs are scored before and after: if the learned rounding does not lower a unit's output
MSE on the captured samples against round-to-nearest, that unit keeps nearest rounding (printed),
so the stored result is never worse than nearest on the data it was learned from.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dgq import adaround as AR
from dgq import primitives as P

log = logging.getLogger(__name__)

BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock")
CAPTURE_BATCH = 64


@dataclass
class Unit:
    name: str
    module: nn.Module
    layers: list[str]  # full names of the wrapped layers it holds


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: as set), restored afterwards.

    Why: a unit's tensors are small (a batch of 8 through one block), so each op's parallel region
    costs more in thread hand-offs than it saves, and on a busy machine a descheduled worker stalls
    every op: one Adam step of a 192×192 linear took 2.3 ms on 1 thread and 51–79 ms on 2 on the
    shared 2-core machine. The setting is process-wide, so reconstruct outside a serving process."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the UNet call is not needed."""


def units(unet: nn.Module, layers: dict[str, nn.Module]) -> list[Unit]:
    """Reconstruction units (blocks, then lone layers) in the order a UNet call runs them."""
    blocks = [(n, m) for n, m in unet.named_modules() if type(m).__name__ in BLOCK_TYPES]
    out: list[Unit] = []
    taken: set[str] = set()
    for n, m in blocks:
        inner = [ln for ln in layers if ln.startswith(n + ".")]
        if inner:
            out.append(Unit(n, m, inner))
            taken.update(inner)
    out += [Unit(ln, layers[ln], [ln]) for ln in layers if ln not in taken]
    order: dict[str, int] = {}

    def seen(name: str) -> Callable[..., None]:
        def hook(_m, _a) -> None:
            order.setdefault(name, len(order))
        return hook

    handles = [u.module.register_forward_pre_hook(seen(u.name)) for u in out]
    try:
        p = next(unet.parameters())
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, size, size, device=p.device, dtype=p.dtype),
                 torch.tensor([1], device=p.device),
                 encoder_hidden_states=torch.zeros(1, 1, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    unused = [u.name for u in out if u.name not in order]
    if unused:
        raise RuntimeError(f"reconstruction units never called by the UNet: {unused[:3]}")
    return sorted(out, key=lambda u: order[u.name])


def unet_inputs(pipe, prompts: Sequence[str], steps: int, guidance: float, batch_size: int = 8,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Every UNet call's inputs over FP sampling runs of `prompts`, one row per sample (CFG halves
    apart): {"sample": [N, C, H, W], "timestep": [N], "encoder_hidden_states": [N, T, D]} on CPU."""
    from dgq.studio import _pipeline_view  # noqa: PLC0415 - studio imports this module lazily

    rows: dict[str, list[torch.Tensor]] = {"sample": [], "timestep": [], "encoder_hidden_states": []}

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        e = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        t = torch.as_tensor(t).reshape(-1).float().cpu()
        rows["sample"].append(x.detach().float().cpu())
        rows["timestep"].append(t.expand(x.shape[0]).clone() if t.numel() == 1 else t)
        rows["encoder_hidden_states"].append(e.detach().float().cpu())

    view = _pipeline_view(pipe)
    gen = torch.Generator("cpu").manual_seed(seed)
    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(prompts), batch_size):
            view(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                 output_type="latent")
    finally:
        handle.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def _take(obj: Any, idx: torch.Tensor, n: int, device) -> Any:
    """Rows `idx` of every tensor in `obj` whose first dimension is the sample count `n`."""
    if torch.is_tensor(obj):
        return obj[idx].to(device) if obj.dim() and obj.shape[0] == n else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_take(o, idx, n, device) for o in obj)
    if isinstance(obj, list):
        return [_take(o, idx, n, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, idx, n, device) for k, v in obj.items()}
    return obj


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts) if first.dim() else first
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    return first


def _detach(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture(unet: nn.Module, unit: Unit, data: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None,
            with_output: bool) -> tuple[tuple, dict, torch.Tensor | None]:
    """The unit's (args, kwargs) — and its output, if asked — over every sample of `data`, with
    the UNet's layer weights replaced by `weights` (None = FP); each UNet call stops at the unit."""
    n = data["sample"].shape[0]
    got: list[tuple[tuple, dict]] = []
    outs: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        got.append(_detach((args, kwargs)))
        if not with_output:
            raise _Stop

    def post(_m, _args, _kwargs, out):
        outs.append(out.detach().cpu())
        raise _Stop

    handles = [unit.module.register_forward_pre_hook(pre, with_kwargs=True)]
    if with_output:
        handles.append(unit.module.register_forward_hook(post, with_kwargs=True))
    params = {f"{k}.weight": v for k, v in (weights or {}).items()}
    try:
        for i in range(0, n, CAPTURE_BATCH):
            before = len(got)
            try:
                run_unet(unet, params, data, slice(i, i + CAPTURE_BATCH))
            except _Stop:
                pass
            if len(got) != before + 1:
                raise RuntimeError(f"unit {unit.name} was called {len(got) - before} times in one UNet call")
    finally:
        for h in handles:
            h.remove()
    args, kwargs = _cat([g[0] for g in got]), _cat([g[1] for g in got])
    return args, kwargs, (torch.cat(outs) if with_output else None)


def run_unet(unet: nn.Module, params: dict[str, torch.Tensor], data: dict[str, torch.Tensor], rows) -> torch.Tensor:
    """The UNet's output on `rows` (a slice or index tensor) of `unet_inputs`-style `data`, with
    the parameters in `params` (`<layer>.weight` → tensor) replacing its own."""
    p = next(unet.parameters())
    x = data["sample"][rows].to(p.device, p.dtype)
    t = data["timestep"][rows].to(p.device)
    e = data["encoder_hidden_states"][rows].to(p.device, p.dtype)
    return functional_call(unet, params, (x, t), {"encoder_hidden_states": e, "return_dict": False})[0]


def _rel(unit: Unit, layer: str) -> str:
    return "weight" if layer == unit.name else layer[len(unit.name) + 1:] + ".weight"


Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]  # (weights by layer, sample idx) -> out


def _runner(unit: Unit, args, kwargs, n: int, fixed: dict[str, torch.Tensor] | None = None) -> Forward:
    """The unit's forward on samples `idx` with the given layer weights (and `fixed` ones for
    quantized layers inside it that it does not learn: TIAR's `time_emb_proj`)."""
    device = next(unit.module.parameters()).device
    base = {_rel(unit, k): v for k, v in (fixed or {}).items()}

    def run(weights: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        params = dict(base, **{_rel(unit, k): v for k, v in weights.items()})
        return functional_call(unit.module, params, _take(args, idx, n, device), _take(kwargs, idx, n, device))
    return run


@torch.no_grad()
def _mse(unit: Unit, args, kwargs, target: torch.Tensor, weights: dict[str, torch.Tensor],
         forward: Forward | None = None) -> float:
    """Mean squared error of the unit's output with `weights` against `target`, over all samples."""
    n, total = target.shape[0], 0.0
    run = forward or _runner(unit, args, kwargs, n)
    for i in range(0, n, CAPTURE_BATCH):
        idx = torch.arange(i, min(n, i + CAPTURE_BATCH))
        total += float((run(weights, idx).float().cpu() - target[idx]).pow(2).sum())
    return total / target.numel()


def learn_unit(unit: Unit, layers: dict[str, nn.Module], ranges: dict[str, tuple[torch.Tensor, torch.Tensor]],
               bits: int, args, kwargs, target: torch.Tensor, settings: AR.ReconSettings,
               gen: torch.Generator, forward: Forward | None = None) -> dict[str, torch.Tensor]:
    """AdaRound on one unit: the learned masks (name → bool [out, rest]) of its layers.
    `forward` replaces the unit's own (`_runner`), e.g. for TIAR's temporal block."""
    n = target.shape[0]
    device = next(unit.module.parameters()).device
    run = forward or _runner(unit, args, kwargs, n)
    w = {ln: layers[ln].weight.detach() for ln in unit.layers}
    alphas = {ln: nn.Parameter(AR.init_alpha(w[ln], ranges[ln][0]).to(device)) for ln in unit.layers}
    opt = torch.optim.Adam(list(alphas.values()), lr=settings.lr)
    flags = [q.requires_grad for q in unit.module.parameters()]
    unit.module.requires_grad_(False)
    try:
        with torch.enable_grad():
            for it in range(settings.iters):
                idx = torch.randint(0, n, (settings.batch_size,), generator=gen)
                soft = {ln: AR.soft_weight(w[ln], *ranges[ln], alphas[ln], bits).to(w[ln].dtype) for ln in unit.layers}
                out = run(soft, idx)
                err = (out.float() - target[idx].to(device)).pow(2)
                loss = err.sum(1).mean() if err.dim() > 1 else err.mean()  # BRECQ's lp_loss(p=2)
                if it >= settings.warmup * settings.iters and settings.reg_weight > 0:
                    beta = AR.beta_at(it, settings.iters, settings.warmup, settings.beta_start, settings.beta_end)
                    loss = loss + settings.reg_weight * sum(AR.round_reg(a, beta) for a in alphas.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for q, f in zip(unit.module.parameters(), flags):
            q.requires_grad_(f)
    return {ln: (alphas[ln].detach() >= 0).cpu() for ln in unit.layers}


def temporal_layers(layers: dict[str, nn.Module]) -> list[str]:
    """TFMQ-DM's temporal information block: the time-embedding MLP and every `time_emb_proj`."""
    return ([n for n in ("time_embedding.linear_1", "time_embedding.linear_2") if n in layers]
            + [n for n in layers if n.endswith(".time_emb_proj")])


def temporal_forward(unet: nn.Module, names: list[str], t_emb: torch.Tensor) -> Forward:
    """The temporal block as one function of the sinusoidal timestep features `t_emb` [T, D]:
    every `time_emb_proj` output (after the ResNet's SiLU) concatenated, [T, Σ out]. Only the
    SD layout (linear, act, linear; no conditioning projection) is supported."""
    te = unet.time_embedding
    if getattr(te, "cond_proj", None) is not None or getattr(te, "post_act", None) is not None:
        raise NotImplementedError("TIAR supports the SD time embedding (linear, act, linear) only")
    mods = dict(unet.named_modules())
    projs = [n for n in names if n.endswith(".time_emb_proj")]
    l1, l2 = "time_embedding.linear_1", "time_embedding.linear_2"

    def run(weights: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        h = F.linear(t_emb[idx], weights.get(l1, te.linear_1.weight), te.linear_1.bias)
        h = te.act(h) if te.act is not None else h
        h = F.linear(h, weights.get(l2, te.linear_2.weight), te.linear_2.bias)
        outs = [F.linear(mods[p.rsplit(".", 1)[0]].nonlinearity(h), weights.get(p, mods[p].weight), mods[p].bias)
                for p in projs]
        return torch.cat(outs, 1)
    return run


def _learn_temporal(unet: nn.Module, layers: dict[str, nn.Module], ranges, bits: int, qweights: dict[str, torch.Tensor],
                    masks: dict[str, torch.Tensor], data: dict[str, torch.Tensor], settings: AR.ReconSettings,
                    gen: torch.Generator) -> dict[str, Any]:
    """TIAR: AdaRound on the temporal block against its FP outputs at every timestep of the
    calibration samples (its input, the timestep, is the same in the FP and the quantized network).
    Updates `masks`/`qweights` in place (unless nearest was better) and returns the report row."""
    t1 = time.perf_counter()
    names = temporal_layers(layers)
    p = next(unet.parameters())
    steps = torch.unique(data["timestep"]).to(p.device)
    t_emb = unet.time_proj(steps).to(p.dtype)
    run = temporal_forward(unet, names, t_emb)
    unit = Unit("temporal information block", unet.time_embedding, names)
    with torch.no_grad():
        target = run({}, torch.arange(len(steps))).cpu()
    row = _learn_and_keep(unit, layers, ranges, bits, qweights, masks, target, settings, gen, run, t1)
    return dict(row, timesteps=len(steps))


def _learn_and_keep(unit: Unit, layers: dict[str, nn.Module], ranges, bits: int, qweights: dict[str, torch.Tensor],
                    masks: dict[str, torch.Tensor], target: torch.Tensor, settings: AR.ReconSettings,
                    gen: torch.Generator, run: Forward, t1: float) -> dict[str, Any]:
    """Learn one unit's rounding, keep it in `masks`/`qweights` only if it lowers the unit's
    output MSE against nearest (the guarantee on the printed figure), and return the report row."""
    near = {ln: qweights[ln] for ln in unit.layers}
    before = _mse(unit, None, None, target, near, run)
    learned = learn_unit(unit, layers, ranges, bits, None, None, target, settings, gen, forward=run)
    new = {ln: _dequant(layers[ln], learned[ln], *ranges[ln], bits) for ln in unit.layers}
    after = _mse(unit, None, None, target, new, run)
    kept = after >= before
    if not kept:
        for ln in unit.layers:
            masks[ln], qweights[ln] = learned[ln], new[ln]
    flipped = sum(int((learned[ln] != AR.nearest_mask(layers[ln].weight, ranges[ln][0]).cpu()).sum())
                  for ln in unit.layers)
    return {"unit": unit.name, "layers": len(unit.layers), "weights": sum(layers[ln].weight.numel() for ln in unit.layers),
            "mse_nearest": before, "mse_learned": after, "flipped": flipped, "kept_nearest": kept,
            "seconds": round(time.perf_counter() - t1, 2)}


def _report(head: str, r: dict[str, Any]) -> str:
    """One unit's printed line: its errors with nearest and learned rounding, and what flipped."""
    change = (r["mse_learned"] / r["mse_nearest"] - 1) * 100 if r["mse_nearest"] > 0 else 0.0
    return (f"{head} MSE nearest {r['mse_nearest']:.4e} -> learned {r['mse_learned']:.4e} ({change:+.1f} %)"
            f"{' KEPT NEAREST' if r['kept_nearest'] else ''}, {r['flipped']}/{r['weights']} flipped, {r['seconds']:.1f}s")


def _dequant(layer: nn.Module, mask: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    codes = AR.mask_codes(layer.weight, s, z, mask, bits)
    return P.dequantize_weight(codes, s.to(codes.device), z.to(codes.device)).to(layer.weight.dtype)


def _setup(pipe, settings: AR.ReconSettings, prompts: Sequence[str] | None, weight_search: str) -> dict[str, Any]:
    """Model id, prompts, guidance, fingerprint and the settings key of a reconstruction."""
    from dgq.calibration import prompts_hash  # noqa: PLC0415
    from dgq.loading import default_guidance  # noqa: PLC0415
    from dgq.modules import quantize_  # noqa: PLC0415
    from dgq.studio import default_calibration_prompts, weights_fingerprint  # noqa: PLC0415

    quantize_(pipe.unet, weight_search=weight_search)
    model = str(getattr(pipe, "dgq_model_id", "unknown"))
    prompts = list(prompts) if prompts is not None else default_calibration_prompts(model)
    if not prompts:
        raise ValueError("reconstruction needs at least one calibration prompt")
    guidance = default_guidance(pipe) if settings.guidance is None else settings.guidance
    psha = prompts_hash(prompts)
    return {"model": model, "prompts": prompts, "guidance": guidance, "prompts_sha": psha,
            "weights": weights_fingerprint(pipe.unet), "key": AR.settings_key(settings, guidance, psha, weight_search)}


def sample_inputs(pipe, settings: AR.ReconSettings, prompts: Sequence[str], guidance: float) -> dict[str, torch.Tensor]:
    """`settings.samples` UNet inputs drawn at random (seeded) from every call of the FP sampling runs."""
    t0 = time.perf_counter()
    data = unet_inputs(pipe, prompts, settings.steps, guidance, seed=settings.seed)
    out = pick_inputs(data, settings.samples, settings.seed)
    out["total"] = torch.tensor(data["sample"].shape[0])
    out["seconds"] = torch.tensor(round(time.perf_counter() - t0, 1))
    return out


def pick_inputs(data: dict[str, torch.Tensor], n: int, seed: int) -> dict[str, torch.Tensor]:
    """`n` rows of `unet_inputs`' output drawn at random (seeded), kept in their original order."""
    total = data["sample"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=gen)[:min(n, total)].sort().values
    return {k: v[pick] for k, v in data.items()}


def reconstruct(pipe, bits: int, settings: AR.ReconSettings | None = None, prompts: Sequence[str] | None = None,
                weight_search: str = "mse", report: Callable[[str], None] | None = None,
                data: dict[str, torch.Tensor] | None = None, threads: int | None = 1) -> AR.Rounding:
    """Learn the rounding of every quantized layer of `pipe.unet` at `bits` (see the module doc).

    Args:
        pipe: a pipeline from `dgq.load_pipeline` (its UNet is wrapped by `quantize_` if needed).
        bits: weight bits, 2..8.
        settings: iterations, batch, samples, … (`ReconSettings()` by default).
        prompts: calibration prompts (default: the 64 of `dgq.calibrate`).
        report: called with one line per unit (errors before/after) and per stage.
        data: UNet inputs from `sample_inputs` (made here if None; pass them to share one
            sampling run between bit-widths).
        threads: torch intra-op threads while it runs (default 1, see `torch_threads`; None = as set).

    Returns:
        a `Rounding`; `meta["units"]` lists each unit's output MSE with nearest and learned rounding.

    Example:
        >>> r = reconstruct(pipe, 4, ReconSettings(iters=200))
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} out of range; allowed: 2..8")
    with torch_threads(threads):
        return _reconstruct(pipe, bits, settings or AR.ReconSettings(), prompts, weight_search,
                            report or (lambda line: log.info("%s", line)), data)


def _reconstruct(pipe, bits: int, settings: AR.ReconSettings, prompts: Sequence[str] | None, weight_search: str,
                 say: Callable[[str], None], data: dict[str, torch.Tensor] | None) -> AR.Rounding:
    from dgq.modules import quantized_layers  # noqa: PLC0415

    t0, c0 = time.perf_counter(), time.process_time()
    setup = _setup(pipe, settings, prompts, weight_search)
    unet = pipe.unet
    layers = quantized_layers(unet)

    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ln, layer in layers.items():
        layer.quantized_weight(bits)  # the searched (or stored) per-channel range
        ranges[ln] = tuple(t.to(layer.weight.device) for t in layer._dgq_wranges[(bits, weight_search)])
    masks = {ln: AR.nearest_mask(layer.weight, ranges[ln][0]).cpu() for ln, layer in layers.items()}
    qweights = {ln: _dequant(layer, masks[ln], *ranges[ln], bits) for ln, layer in layers.items()}

    plan = units(unet, layers)
    if data is None:
        say(f"sampling {len(setup['prompts'])} prompts x {settings.steps} steps (guidance {setup['guidance']}) "
            "for UNet inputs")
        data = sample_inputs(pipe, settings, setup["prompts"], setup["guidance"])
    data_seconds = float(data["seconds"]) if "seconds" in data else None
    total = int(data.get("total", data["sample"].shape[0]))
    data = {k: v for k, v in data.items() if k not in ("total", "seconds")}
    gen = torch.Generator().manual_seed(settings.seed + bits)
    say(f"{data['sample'].shape[0]} of {total} UNet inputs drawn; {len(plan)} units, {settings.iters} iterations "
        f"each, batch {settings.batch_size}, W{bits}")
    rows = []
    if settings.tiar:  # TFMQ-DM: the temporal block first, as one unit; the blocks then keep its rounding
        rows.append(_learn_temporal(unet, layers, ranges, bits, qweights, masks, data, settings, gen))
        r = rows[-1]
        say(_report(f"[TIAR] {r['unit']} ({r['layers']} layers, {r['timesteps']} timesteps)", r))
        tib = set(temporal_layers(layers))
        plan = [u for u in (Unit(u.name, u.module, [ln for ln in u.layers if ln not in tib]) for u in plan) if u.layers]
    for i, unit in enumerate(plan):
        t1 = time.perf_counter()
        _, _, target = capture(unet, unit, data, None, with_output=True)
        args, kwargs, _ = capture(unet, unit, data, qweights, with_output=False)
        fixed = {ln: qweights[ln] for ln in layers if ln.startswith(unit.name + ".") and ln not in unit.layers}
        run = _runner(unit, args, kwargs, target.shape[0], fixed)
        rows.append(_learn_and_keep(unit, layers, ranges, bits, qweights, masks, target, settings, gen, run, t1))
        say(_report(f"[{i + 1:2d}/{len(plan)}] {unit.name:55s}", rows[-1]))
    seconds = round(time.perf_counter() - t0, 1)
    meta = {"model": setup["model"], "weights": setup["weights"], "settings": settings.to_dict(),
            "settings_key": setup["key"], "guidance": setup["guidance"], "prompts_sha": setup["prompts_sha"],
            "n_prompts": len(setup["prompts"]), "units": rows, "seconds": seconds,
            "cpu_seconds": round(time.process_time() - c0, 1), "sampling_seconds": data_seconds,
            "torch_threads": torch.get_num_threads(), "created": AR.now()}
    say(f"reconstructed {len(plan)} units at W{bits} in {seconds:.0f}s")
    return AR.Rounding(bits, weight_search, {ln: (masks[ln], ranges[ln][0].cpu(), ranges[ln][1].cpu()) for ln in layers},
                       meta)


def default_folder() -> Path:
    from dgq.paths import cache_dir  # noqa: PLC0415

    return cache_dir() / "adaround"


def reconstruct_cached(pipe, bits: Sequence[int], settings: AR.ReconSettings | None = None,
                       prompts: Sequence[str] | None = None, weight_search: str = "mse",
                       folder: str | Path | None = None, force: bool = False,
                       report: Callable[[str], None] | None = None,
                       threads: int | None = 1) -> list[tuple[AR.Rounding, Path, bool]]:
    """The stored rounding of each of `bits` for these weights and settings, learned (and
    written atomically to `folder`, default `$DGQ_CACHE/adaround/`) when none is stored or the
    stored one is stale or corrupted. Widths that need learning share one sampling run.

    Returns:
        one (rounding, path, learned_now) per width.

    Example:
        >>> [(r, path, built)] = reconstruct_cached(pipe, [4])
    """
    settings = settings or AR.ReconSettings()
    say = report or (lambda line: log.info("%s", line))
    setup = _setup(pipe, settings, prompts, weight_search)
    folder = Path(folder) if folder is not None else default_folder()
    look = [folder] + ([AR.SHIPPED_DIR] if _embedded(setup["model"]) and folder != AR.SHIPPED_DIR else [])
    from dgq.modules import quantized_layers  # noqa: PLC0415

    layers = quantized_layers(pipe.unet)
    out: list[tuple[AR.Rounding, Path, bool] | None] = []
    for b in bits:
        found = None
        for d in ([] if force else look):
            p = d / AR.file_stem(setup["weights"], b, setup["key"])
            try:
                r = AR.Rounding.load(p, {"weights": setup["weights"], "bits": b, "settings_key": setup["key"]}, layers)
                found = (r, p.with_suffix(".safetensors"), False)
                say(f"W{b}: stored rounding {p.with_suffix('.safetensors')} is valid; not learned again")
                break
            except AR.RoundingMismatch as e:
                if p.with_suffix(".json").exists() or p.with_suffix(".safetensors").exists():
                    say(f"W{b}: stored rounding at {p} not used ({e}); learning it again")
        out.append(found)
    data = None
    for i, b in enumerate(bits):
        if out[i] is not None:
            continue
        if data is None:
            say(f"sampling {len(setup['prompts'])} prompts x {settings.steps} steps (guidance {setup['guidance']}) "
                "for UNet inputs")
            with torch_threads(threads):
                data = sample_inputs(pipe, settings, setup["prompts"], setup["guidance"])
        r = reconstruct(pipe, b, settings, setup["prompts"], weight_search, say, data, threads)
        path = r.save(folder / AR.file_stem(setup["weights"], b, setup["key"]))
        say(f"W{b}: rounding written to {path}")
        out[i] = (r, path, True)
    return [o for o in out if o is not None]


def _embedded(model: str) -> bool:
    from dgq.loading import is_embedded  # noqa: PLC0415

    return is_embedded(model)

"""`python -m dgq …`: calibrate, generate, bops (and eval/bench, see their modules).

Every command has --help, shows progress bars on long work, and on bad input exits with status 2
and a one-line message (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dgq import bench
from dgq import eval as evaluation
from dgq.act_ranges import INITS
from dgq.cli_common import CliError
from dgq.cli_common import add_model_args as _add_model_args
from dgq.cli_common import save_png as _save_png

log = logging.getLogger("dgq")

# The subcommands defined in their own modules: name -> the function that adds its parser.
# Imported like any module, so one that fails to import stops `python -m dgq` with its error
# instead of its command silently going missing.
MODULE_COMMANDS: dict[str, Callable[[Any], None]] = {
    "eval": evaluation.add_parser,
    "bench": bench.add_parser,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise CliError(f"{self.prog}: {message} (see --help)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=["fp", "qdiff", "tfmq", "dgq", "qdiff-paper", "tfmq-paper"])
    p.add_argument("--w-bits", type=int, default=8, help="weight bits 2..8 (default 8; ignored for fp)")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits 4..8, 16 = off (default 8; ignored for fp)")
    p.add_argument("--groups", type=int, default=16, help="DGQ groups K in {1,2,4,8,16} (default 16)")
    p.add_argument("--no-groups", action="store_true", help="DGQ: per-tensor activations (ablation)")
    p.add_argument("--axis", default="auto", choices=["auto", "channel", "pixel"], help="DGQ grouping axis rule")
    p.add_argument("--no-log", action="store_true", help="DGQ: uniform instead of log2 probabilities")
    p.add_argument("--no-start-token", action="store_true", help="DGQ: quantize the <start> column too")
    p.add_argument("--static-scale", action="store_true", help="DGQ: calibrated instead of dynamic log scale")
    p.add_argument("--scale-scope", default="sample", choices=["sample", "batch"], help="DGQ: dynamic max per prompt or per batch")
    p.add_argument("--no-time-aware", action="store_true", help="DGQ: one parameter set for all timesteps")
    p.add_argument("--weight-rounding", default="nearest", choices=["nearest", "adaround", "adaround-tiar"],
                   help="weights rounded to nearest, or with the AdaRound rounding `reconstruct` stored "
                        "(adaround-tiar: the one made with --tiar; default nearest)")
    p.add_argument("--rounding-file", default=None, metavar="PATH",
                   help="with --weight-rounding adaround[-tiar]: this stored rounding (a `reconstruct` .safetensors) "
                        "instead of the one looked up, which prefers default settings")
    p.add_argument("--execution", default="simulated", choices=["simulated", "int8"],
                   help="simulated = fake quantization in fp32; int8 = integer GEMMs on the codes (W<=8, A=8; "
                        "same images up to fp32 rounding, see docs/int8.md)")


def config_from_args(a: argparse.Namespace):
    from dgq.config import make_config  # noqa: PLC0415

    opts: dict[str, Any] = {}
    if a.method == "dgq":
        opts = dict(groups=a.groups, use_groups=not a.no_groups, axis=a.axis, log_quant=not a.no_log,
                    start_token=not a.no_start_token, dynamic_scale=not a.static_scale,
                    scale_scope=a.scale_scope, time_aware=not a.no_time_aware)
    rounding = getattr(a, "weight_rounding", "nearest")
    return make_config(a.method, w_bits=a.w_bits, a_bits=a.a_bits, weight_rounding=rounding,
                       execution=getattr(a, "execution", "simulated"), **opts)


def _set_cache(a: argparse.Namespace) -> None:
    if getattr(a, "cache_dir", None):
        os.environ["DGQ_CACHE"] = a.cache_dir


def _load(a: argparse.Namespace):
    from dgq.loading import load_pipeline  # noqa: PLC0415

    return load_pipeline(a.model, device=a.device, dtype=a.dtype)


def cmd_calibrate(a: argparse.Namespace) -> int:
    from dgq.studio import calibrate, read_prompts  # noqa: PLC0415

    _set_cache(a)
    prompts = read_prompts(a.prompts_file) if a.prompts_file else None
    pipe = _load(a)
    calib = calibrate(pipe, prompts, steps=a.steps, guidance=a.guidance, batch_size=a.batch_size)
    out = {"model": a.model, "sites": len(calib.sites), "timesteps": len(calib.t_keys) - 1,
           "seconds": calib.meta.get("seconds")}
    if a.weight_bits:
        from dgq.studio import Studio  # noqa: PLC0415

        try:
            bits = sorted({int(b) for b in a.weight_bits.split(",") if b.strip()})
        except ValueError as e:
            raise CliError(f"calibrate: --weight-bits {a.weight_bits!r} is not a comma-separated list of integers") from e
        studio = Studio(pipe, calib)
        try:
            out["weight_search_seconds"] = round(studio.search_weight_ranges(bits), 2)
        except ValueError as e:
            raise CliError(f"calibrate: {e}") from e
        out["weight_ranges"] = str(studio._ranges_file)
    print(json.dumps(out))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from dgq.config import FPConfig  # noqa: PLC0415
    from dgq.studio import Studio, calibrate, read_prompts  # noqa: PLC0415

    _set_cache(a)
    if (a.prompt is None) == (a.prompts_file is None):
        raise CliError("generate: give exactly one of --prompt (with --out) or --prompts-file (with --out-dir)")
    if a.prompt is not None and not a.out:
        raise CliError("generate: --prompt needs --out img.png")
    if a.prompts_file is not None and not a.out_dir:
        raise CliError("generate: --prompts-file needs --out-dir D")
    if a.prompt is not None and not a.prompt.strip():
        raise CliError("generate: the prompt is empty")
    config = config_from_args(a)
    prompts = [a.prompt] if a.prompt is not None else read_prompts(a.prompts_file)
    pipe = _load(a)
    calib = None
    if not isinstance(config, FPConfig):  # the calibration `calibrate` makes with the same options
        calib_prompts = read_prompts(a.calib_prompts_file) if a.calib_prompts_file else None
        calib = calibrate(pipe, calib_prompts, steps=a.calib_steps, guidance=a.calib_guidance,
                          batch_size=a.calib_batch_size)
    studio = Studio(pipe, calib)
    if getattr(a, "rounding_file", None):
        try:
            bits, name = studio.use_rounding_file(a.rounding_file)
        except ValueError as e:
            raise CliError(f"generate: --rounding-file: {e}") from None
        if not isinstance(config, FPConfig) and (bits, name) != (config.w_bits, config.weight_rounding):
            raise CliError(f"generate: --rounding-file holds the {name} rounding at W{bits}, but the config asks for "
                           f"{config.weight_rounding} at W{config.w_bits}")
    if a.prompt is not None:
        g = studio.generate(a.prompt, seed=a.seed, config=config, steps=a.steps, guidance=a.guidance)
        if g.truncated:
            log.warning("the prompt is longer than 77 tokens and was truncated")
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _save_png(g.image, out)
        print(json.dumps({"out": str(out), "seconds": round(g.seconds, 3), "config": config.to_dict()}))
        return 0
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(tqdm(prompts, desc=f"generating ({config.label()})", unit="img")):
        g = studio.generate(p, seed=a.seed + i, config=config, steps=a.steps, guidance=a.guidance)
        _save_png(g.image, d / f"{i:04d}.png")
    settings = {"model": a.model, "config": config.to_dict(), "seed": a.seed, "seed_rule": "seed + prompt index",
                "steps": a.steps, "guidance": g.guidance, "prompts": prompts}
    tmp = d / "settings.json.tmp"
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, d / "settings.json")
    print(json.dumps({"out_dir": str(d), "images": len(prompts)}))
    return 0


def cmd_reconstruct(a: argparse.Namespace) -> int:
    from dgq.adaround import ReconSettings  # noqa: PLC0415
    from dgq.reconstruction import reconstruct_cached  # noqa: PLC0415
    from dgq.studio import read_prompts  # noqa: PLC0415

    _set_cache(a)
    try:
        bits = [int(b) for b in a.w_bits.split(",") if b.strip()]
    except ValueError as e:
        raise CliError(f"reconstruct: --w-bits {a.w_bits!r} is not a comma-separated list of integers") from e
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise CliError(f"reconstruct: --w-bits {a.w_bits!r}; allowed: 2..8, e.g. 4 or 4,8")
    given = {k: getattr(a, k) for k in ("iters", "batch_size", "samples", "lr", "steps", "guidance", "seed")}
    try:
        settings = ReconSettings(**{k: v for k, v in given.items() if v is not None}, tiar=a.tiar)
    except ValueError as e:
        raise CliError(f"reconstruct: {e}") from e
    prompts = read_prompts(a.prompts_file) if a.prompts_file else None
    pipe = _load(a)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if a.method not in ("weights", "qdiff-paper"):
        raise CliError(f"reconstruct: --method {a.method!r}; allowed: weights, qdiff-paper")
    a_bits = _bit_list(a.a_bits, "--a-bits", 4) if a.method == "qdiff-paper" else []
    if a.method == "qdiff-paper" and a.tiar:
        raise CliError("reconstruct: --tiar makes TFMQ-DM's weights; Q-Diffusion's step sizes are learned on plain AdaRound")
    if a.method == "qdiff-paper" and not a_bits:
        raise CliError("reconstruct: --method qdiff-paper needs --a-bits (e.g. 6 or 6,8)")
    if a_bits:  # checked before any learning starts
        from dgq import act_recon  # noqa: PLC0415

        act = {k: getattr(a, f"act_{k}") for k in ("iters", "lr", "ema_samples") if getattr(a, f"act_{k}") is not None}
        try:
            act_settings = act_recon.ActReconSettings(**act, attention=not a.act_skip_attention, init=a.act_init,
                                                      **{k: v for k, v in given.items()
                                                                if k in ("batch_size", "samples", "steps", "guidance",
                                                                         "seed") and v is not None})
        except ValueError as e:
            raise CliError(f"reconstruct: {e}") from e
    done = reconstruct_cached(pipe, bits, settings, prompts, weight_search=a.weight_search, folder=a.out_dir,
                              force=a.force and a.method == "weights", report=say, threads=a.threads)
    rows = [{"w_bits": r.bits, "path": str(path), "learned_now": built, "seconds": r.meta.get("seconds"),
             "units": len(r.meta.get("units", [])),
             "units_lower_mse": sum(not u["kept_nearest"] for u in r.meta.get("units", []))}
            for r, path, built in done]
    if a_bits:  # Q-Diffusion's step sizes, learned on top of the AdaRound weights just made or loaded
        from dgq.studio import Studio, calibrate  # noqa: PLC0415

        studio = Studio(pipe, calibrate(pipe))
        data = None  # one sampling run shared by every (W, A) that needs learning
        for w in bits:
            for ab in a_bits:
                if data is None and (a.force or act_recon.find(studio, w, ab, act_settings) is None):
                    data = act_recon.sample(studio, act_settings, report=say, threads=a.threads)
                r, path, built = act_recon.learn_cached(studio, w, ab, act_settings, folder=a.act_out_dir,
                                                        force=a.force, report=say, threads=a.threads, data=data)
                units = r.meta.get("units", [])
                rows.append({"w_bits": w, "a_bits": ab, "method": "qdiff-paper", "path": str(path), "learned_now": built,
                             "seconds": r.meta.get("seconds"), "units": len(units),
                             "units_lower_mse": sum(not u["kept_initial"] for u in units)})
    print(json.dumps(rows))
    return 0


def _bit_list(text: str | None, flag: str, lo: int) -> list[int]:
    try:
        bits = [int(b) for b in (text or "").split(",") if b.strip()]
    except ValueError as e:
        raise CliError(f"reconstruct: {flag} {text!r} is not a comma-separated list of integers") from e
    if any(not lo <= b <= 8 for b in bits):
        raise CliError(f"reconstruct: {flag} {text!r}; allowed: {lo}..8")
    return bits


def cmd_bops(a: argparse.Namespace) -> int:
    from dgq.bops import bops, build_unet, count_macs, to_meta  # noqa: PLC0415

    if (a.arch is None) == (a.model is None):
        raise CliError("bops: give exactly one of --arch or --model")
    for name, v, lo in (("--w-bits", a.w_bits, 2), ("--a-bits", a.a_bits, 4)):
        if not (lo <= v <= 8 or v in (16, 32)):
            raise CliError(f"bops: {name}={v} out of range; allowed {lo}..8, 16 or 32")
    if a.arch is not None:
        unet = build_unet(a.arch)
    else:
        from dgq.loading import load_pipeline  # noqa: PLC0415

        unet = to_meta(load_pipeline(a.model, device="cpu").unet)
    r = bops(count_macs(unet), a.w_bits, a.a_bits)
    d = r.to_dict()
    d["tbops"] = round(r.bops / 1e12, 3)
    if a.json:
        print(json.dumps(d))
    else:
        print(f"params {r.params / 1e6:.2f} M | MACs {r.macs / 1e9:.2f} G (attention {r.attention_macs / 1e9:.2f} G) | "
              f"W{a.w_bits}A{a.a_bits}: {r.bops / 1e12:.1f} TBOPs | size {r.size_mb:.1f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dgq", description="DGQ Studio: quantize SD-1.x UNets with DGQ and baselines.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("calibrate", help="collect bit-width-independent statistics (cached)")
    _add_model_args(c)
    c.add_argument("--prompts-file", default=None, help="one prompt per line (default: 64 built-in prompts)")
    c.add_argument("--steps", type=int, default=25)
    c.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's; 7.5 for SD)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--weight-bits", default="", help="also search the weight ranges at these widths now "
                   "(e.g. 2,3,4,5,6,7,8) and keep them in the cache, so switching to them skips the search")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("reconstruct", help="learn the weights' AdaRound rounding by BRECQ block reconstruction (stored)")
    _add_model_args(r)
    r.add_argument("--w-bits", required=True, help="weight bits, one or a comma-separated list (e.g. 4 or 4,8)")
    # defaults (None here) are ReconSettings' (dgq/adaround.py), the one place they are set
    r.add_argument("--iters", type=int, default=None, help="Adam steps per block (default 200; the authors: 20000)")
    r.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8, as the authors)")
    r.add_argument("--samples", type=int, default=None, help="UNet inputs drawn from the calibration runs (default 128)")
    r.add_argument("--lr", type=float, default=None, help="Adam learning rate on the rounding variables (default 3e-3)")
    r.add_argument("--steps", type=int, default=None, help="sampler steps of the calibration runs (default 25)")
    r.add_argument("--guidance", type=float, default=None, help="CFG scale of the calibration runs (default: the model's)")
    r.add_argument("--seed", type=int, default=None, help="sample choice and batch order (default 0)")
    r.add_argument("--prompts-file", default=None, help="calibration prompts (default: the 64 of `calibrate`)")
    r.add_argument("--weight-search", default="mse", choices=["mse", "minmax"], help="weight range search (default mse)")
    r.add_argument("--out-dir", default=None, help="where to store the rounding (default: $DGQ_CACHE/adaround)")
    r.add_argument("--force", action="store_true", help="learn again even if a valid stored rounding exists")
    r.add_argument("--threads", type=int, default=1, help="torch threads while it runs (default 1: the blocks' "
                   "tensors are small, so more threads mostly add hand-off costs)")
    r.add_argument("--tiar", action="store_true", help="TFMQ-DM's temporal-information-aware reconstruction: the "
                   "time-embedding MLP and every time_emb_proj learned first as one unit (the tfmq-paper weights)")
    r.add_argument("--method", default="weights", help="weights (AdaRound only, default) or qdiff-paper: also learn "
                   "Q-Diffusion's activation step sizes (LSQ) at --a-bits on top of the AdaRound weights")
    r.add_argument("--a-bits", default=None, help="with --method qdiff-paper: activation bits, e.g. 6 or 6,8")
    r.add_argument("--act-iters", type=int, default=None, help="Adam steps per block for the step sizes (default 100; "
                   "Q-Diffusion: 5000)")
    r.add_argument("--act-lr", type=float, default=None, help="Adam learning rate on the step sizes (default 2e-3; "
                   "Q-Diffusion: 4e-4)")
    r.add_argument("--act-skip-attention", action="store_true", help="learn the layer inputs' step sizes only (Q, K, V "
                   "and the probabilities keep the light qdiff's MSE ranges; Q-Diffusion learns them too)")
    r.add_argument("--act-init", choices=INITS, default="ema", help="where the step sizes start: ema "
                   "(default; Q-Diffusion's running statistics: MSE on 16 samples, then an EMA of batch min/max over "
                   "the calibration runs) or steps (the mean over calibrated steps of each step's min/max)")
    r.add_argument("--act-ema-samples", type=int, default=None, help="UNet inputs the running statistics go over "
                   "(default 3200: all of the embedded model's 64 prompts x 25 steps x 2; fewer on a CPU for SD v1.4)")
    r.add_argument("--act-out-dir", default=None, help="where to store the step sizes (default: $DGQ_CACHE/act-recon)")
    r.set_defaults(func=cmd_reconstruct)

    g = sub.add_parser("generate", help="generate images with one method")
    _add_model_args(g)
    _add_quant_args(g)
    g.add_argument("--prompt", default=None)
    g.add_argument("--out", default=None, help="PNG path (with --prompt)")
    g.add_argument("--prompts-file", default=None, help="one prompt per line; writes D/0000.png … and D/settings.json")
    g.add_argument("--out-dir", default=None)
    g.add_argument("--seed", type=int, default=0, help="seed (batch mode: seed + prompt index)")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's; 7.5 for SD)")
    g.add_argument("--calib-steps", type=int, default=25, help="steps of the calibration to use (default 25)")
    g.add_argument("--calib-prompts-file", default=None,
                   help="prompts of the calibration to use (as `calibrate --prompts-file`; default: 64 built-in)")
    g.add_argument("--calib-guidance", type=float, default=None,
                   help="CFG scale of the calibration to use (as `calibrate --guidance`; default: the model's)")
    g.add_argument("--calib-batch-size", type=int, default=8,
                   help="batch size of the calibration to use (as `calibrate --batch-size`; default 8)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bops", help="BOPs, MACs, parameters and size (no weights needed for --arch)")
    b.add_argument("--arch", default=None, choices=["sd-v1-4"])
    b.add_argument("--model", default=None)
    b.add_argument("--w-bits", type=int, default=32)
    b.add_argument("--a-bits", type=int, default=32)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bops)

    for name, add_parser in MODULE_COMMANDS.items():
        add_parser(sub)
        if name not in sub.choices:
            raise RuntimeError(f"{add_parser.__module__}.add_parser did not register the {name!r} subcommand")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not a.verbose:  # library deprecation chatter is not the user's business; --verbose shows it
        import warnings  # noqa: PLC0415

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    from dgq.calibration import CalibrationMismatch  # noqa: PLC0415
    from dgq.loading import ModelLoadError  # noqa: PLC0415

    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except (CliError, ModelLoadError, CalibrationMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

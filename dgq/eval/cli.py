"""`python -m dgq eval`: the subcommand's options, presets applied, and the call into `run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from dgq.cli_common import add_model_args as _add_model_args
from dgq.eval.plan import Options, rank_from_env
from dgq.eval.run import run
from dgq.eval.settings import BUILTIN, DEFAULT_SEED, DEFAULT_SETTINGS, METRIC_NAMES, PRESETS, SETTING_GROUPS

log = logging.getLogger(__name__)

def resolve_options(args: argparse.Namespace) -> Options:
    preset = PRESETS.get(args.preset, {}) if args.preset else {}

    def pick(name: str):
        v = getattr(args, name)
        return v if v is not None else preset.get(name, BUILTIN.get(name))

    rank, world, _ = rank_from_env()
    opts = Options(
        out=Path(args.out), model=args.model, device=args.device, dtype=args.dtype, prompts_file=args.prompts_file,
        prompt_column=args.prompt_column, limit=args.limit, preset=args.preset, settings=args.settings,
        steps=pick("steps"), guidance=pick("guidance"), seed=args.seed, batch_size=pick("batch_size"),
        images_per_prompt=pick("images_per_prompt"), calib_prompts_file=args.calib_prompts_file,
        calib_steps=args.calib_steps, calib_guidance=args.calib_guidance, calib_batch_size=args.calib_batch_size,
        calib_cache=not args.no_calib_cache, weight_search=args.weight_search,
        rounding_files=tuple(args.rounding_file or ()),
        metrics=pick("metrics"), metric_size=pick("metric_size"), clip_model=args.clip_model,
        clip_pretrained=None if args.clip_pretrained in ("", "none") else args.clip_pretrained,
        clip_weights=args.clip_weights, clip_limit=pick("clip_limit"), clip_random_init=args.clip_random_init,
        inception_weights=args.inception_weights, inception_random_init=args.inception_random_init,
        fid_ref_stats=args.fid_ref_stats, domain_fid_refs=args.domain_fid_refs, evaluator=args.evaluator,
        rank=args.rank if args.rank is not None else rank,
        world_size=args.world_size if args.world_size is not None else world,
        wait_timeout=args.wait_timeout, poll_interval=args.poll_interval, score_only=args.score_only,
        no_score=args.no_score, progress=not args.no_progress)
    opts.check()
    return opts




def cmd_eval(args: argparse.Namespace) -> int:
    opts = resolve_options(args)
    if args.cache_dir:
        os.environ["DGQ_CACHE"] = args.cache_dir
    doc = run(opts)
    if doc is not None:
        print((opts.out / "results.md").read_text(encoding="utf-8"), end="")
    elif opts.rank != 0:
        print(json.dumps({"rank": opts.rank, "status": "done", "out": str(opts.out)}))
    return 0


def add_parser(sub) -> None:
    """Register ``eval`` on the ``python -m dgq`` subparsers."""
    p = sub.add_parser("eval", help="generate for several settings and score them (results.json/.csv/.md)",
                       description="Generate images for every setting and score them. Settings: "
                                   "method[:WxAy][:Kn][:flag...], e.g. fp,tfmq:W8A8,dgq:W4A6:K16:nolog "
                                   f"(groups: {', '.join(SETTING_GROUPS)}). See docs/evaluation.md.")
    _add_model_args(p)
    p.add_argument("--prompts-file", default=None, help="one prompt per line, or a CSV/TSV with a caption column")
    p.add_argument("--prompt-column", default=None, help="CSV/TSV column holding the prompts")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="paper protocol (dgq-method.md §F.4)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma-separated settings (default {DEFAULT_SETTINGS})")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the preset's 7.5, else the model's: "
                   "dgq_defaults.json in its folder, 7.5 for SD)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"image i uses seed+i (default {DEFAULT_SEED})")
    p.add_argument("--batch-size", type=int, default=None, help="images per generation call (default 4; "
                   "coco 5, parti 3); keep it fixed for a run: it is part of the fingerprint")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default 1 (parti: 3)")
    p.add_argument("--calib-prompts-file", default=None, help="calibration prompts (default: 64 built-in)")
    p.add_argument("--calib-steps", type=int, default=None, help="calibration steps (default: --steps)")
    p.add_argument("--calib-guidance", type=float, default=None, help="calibration CFG scale (default: --guidance)")
    p.add_argument("--calib-batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--no-calib-cache", action="store_true", help="do not use the $DGQ_CACHE calibration cache")
    p.add_argument("--weight-search", default="mse", choices=["mse", "minmax"],
                   help="weight clipping search (mse = the authors'; minmax is faster)")
    p.add_argument("--rounding-file", action="append", default=None, metavar="PATH",
                   help="use this stored learned rounding (a `reconstruct` .safetensors) for its bit-width instead "
                        "of the one looked up, which prefers default settings; repeatable (docs/adaround.md)")
    p.add_argument("--metrics", default=None, help="auto (default), none, or a list of "
                   f"{','.join(METRIC_NAMES)}; BOPs, size and latency are always reported")
    p.add_argument("--metric-size", type=int, default=None, help="resize images to N px for CLIP/FID "
                   "(0 = native; coco: 256)")
    p.add_argument("--clip-model", default="ViT-g-14")
    p.add_argument("--clip-pretrained", default="laion2b_s34b_b88k", help="open_clip pretrained tag (local cache)")
    p.add_argument("--clip-weights", default=None, help="open_clip checkpoint file (instead of the tag's cache)")
    p.add_argument("--clip-limit", type=int, default=None, help="CLIP on the first N images (0 = all; presets 3000)")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--fid-ref-stats", default=None, help="reference .npz (mu, sigma) or a folder of images")
    p.add_argument("--domain-fid-refs", type=int, default=2000, help="renders for the domain FID (default 2000)")
    p.add_argument("--evaluator", default=None, help="shapes evaluator folder (default assets/evaluator)")
    p.add_argument("--rank", type=int, default=None, help="this process's shard (default $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of shards (default $WORLD_SIZE or 1)")
    p.add_argument("--wait-timeout", type=float, default=0.0, help="rank 0: give up waiting for the other "
                   "ranks after S seconds (default 0 = wait until they finish)")
    p.add_argument("--score-only", action="store_true", help="rescore the images already in --out")
    p.add_argument("--no-score", action="store_true", help="generate only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # testing only: random-weight scoring networks exercise the CLIP/FID code paths offline
    p.add_argument("--clip-random-init", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inception-random-init", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--poll-interval", type=float, default=5.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)

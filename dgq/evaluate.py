"""`python -m dgq eval`: generate images for several settings and score them (Table 2 style).

One run = one prompt list × several settings (FP, baselines, DGQ and its ablations). For every
setting the images are written to ``D/<setting-slug>/<index:05d>.png`` and then scored:

* alignment — the shapes evaluator's per-attribute accuracy (`dgq.tiny.evaluator`), embedded model;
* CLIP score — open_clip cosine similarity (not ×100), SD models;
* fidelity — domain FID against fresh renders (embedded model) or Inception FID against reference
  statistics (SD models); PSNR / SSIM against the FP images of the same seeds;
* cost — BOPs and model size (`dgq.bops`), latency per image (from the generation log).

A metric that cannot be computed here (weights or reference data missing) is the string
``"unavailable: <why>"``, never a number. Image ``i`` is made from prompt ``i // images_per_prompt``
with seed ``seed + i``, in fixed batches ``[k·B, (k+1)·B)``; a batch is the unit of work, of
resumption and of sharding, so results do not depend on how the work was split.

Layout of the output folder ``D``::

    plan.json, prompts.json          what is generated (rank 0 writes them)
    calibration.{safetensors,json}   the calibration every setting of this run uses
    <slug>/00000.png …               images (written atomically)
    <slug>/log.rank<r>.jsonl         one line per finished batch: fingerprint, seconds, device
    <slug>/manifest.json             the setting, its fingerprint, completeness and metrics
    .ranks/done.<r>.json             "rank r has finished its share" (the file barrier)
    results.json / .csv / .md        rewritten after each scored setting

Resuming: a batch whose images all exist and whose log line carries the current fingerprint (model
and a hash of its weights, steps, guidance, dtype, device type, config, calibration checksum,
prompts, seeds) is skipped; anything else is regenerated. Sharding: with ``RANK``/``WORLD_SIZE`` in
the environment (``torchrun``, ``accelerate launch --multi_gpu``) rank ``r`` takes the batches ``k``
with ``k % WORLD_SIZE == r``; rank 0 then waits until every planned image is on disk and scores. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dgq.cli import CliError, _add_model_args, _save_png
from dgq.config import FP, BaselineConfig, FPConfig, QuantConfig, make_config

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
UNAVAILABLE = "unavailable: "  # same convention as dgq.metrics (imported lazily there)
METRIC_NAMES = ("align", "domain-fid", "clip", "fid", "psnr", "ssim")
SHAPES_METRICS = ("align", "domain-fid", "psnr", "ssim")
SD_METRICS = ("clip", "fid", "psnr", "ssim")
DEFAULT_SETTINGS = "fp,tfmq:W8A8,dgq:W8A8:K16"
DEFAULT_SEED = 42  # the authors' seed_everything(42); here image i gets seed 42 + i

#: Paper protocols (dgq-method.md §F.4). Explicit flags override every value.
PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(steps=25, guidance=7.5, images_per_prompt=1, batch_size=5, metric_size=256, clip_limit=3000,
                 resolution=512, metrics="clip,fid,psnr,ssim"),
    "parti": dict(steps=25, guidance=7.5, images_per_prompt=3, batch_size=3, metric_size=0, clip_limit=3000,
                  resolution=512, metrics="clip,psnr,ssim"),
}
BUILTIN = dict(steps=25, guidance=None, images_per_prompt=1, batch_size=4, metric_size=0, clip_limit=0,
               metrics="auto")

#: Named groups usable inside --settings.
SETTING_GROUPS: dict[str, list[str]] = {
    "table2": ["fp"] + [f"{m}:W{w}A{a}" + (f":K{k}" if m == "dgq" else "")
                        for w, a in ((8, 8), (8, 6), (4, 8), (4, 6))
                        for m, k in (("qdiff", 0), ("tfmq", 0), ("dgq", 8), ("dgq", 16))],
    "ablation": ["fp", "dgq:W4A6:K16", "dgq:W4A6:K16:nogroups", "dgq:W4A6:K16:axis=channel",
                 "dgq:W4A6:K16:axis=pixel", "dgq:W4A6:K16:nolog", "dgq:W4A6:K16:nostart", "dgq:W4A6:K16:static",
                 "dgq:W4A6:K16:notime"],
}
_METHODS = {"fp": "fp", "fp32": "fp", "qdiff": "qdiff", "q-diff": "qdiff", "tfmq": "tfmq", "dgq": "dgq"}
#: DGQ ablation flags → DGQConfig field and value, in canonical order.
_FLAGS: dict[str, tuple[str, Any]] = {
    "nogroups": ("use_groups", False),
    "nolog": ("log_quant", False),
    "nostart": ("start_token", False),
    "static": ("dynamic_scale", False),
    "notime": ("time_aware", False),
    "batchscale": ("scale_scope", "batch"),
}


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One row of the results: a config and its canonical spec (``dgq:W4A6:K16:nolog``)."""

    spec: str
    config: QuantConfig

    @property
    def slug(self) -> str:
        """Folder name: the spec lower-cased with ``:``/``=`` turned into ``-``."""
        return re.sub(r"[:=]", "-", self.spec.lower())

    @property
    def is_fp(self) -> bool:
        return isinstance(self.config, FPConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.spec, "slug": self.slug, "label": self.config.label(), "config": self.config.to_dict(),
                "w_bits": self.config.w_bits, "a_bits": self.config.a_bits}


def canonical_spec(config: QuantConfig) -> str:
    """The spec `parse_setting` maps back to `config` (used for slugs and fingerprints)."""
    if isinstance(config, FPConfig):
        return "fp"
    if isinstance(config, BaselineConfig):
        return f"{config.style.value}:W{config.w_bits}A{config.a_bits}"
    parts = [f"dgq:W{config.w_bits}A{config.a_bits}:K{config.groups}"]
    if not config.use_groups:
        parts.append("nogroups")
    if config.axis.value != "auto":
        parts.append(f"axis={config.axis.value}")
    parts += [name for name, (fld, val) in _FLAGS.items() if name != "nogroups" and
              (getattr(config, fld) == val or getattr(getattr(config, fld), "value", None) == val)]
    return ":".join(parts)


def parse_setting(text: str) -> Setting:
    """``method[:WxAy][:Kn][:flag…]`` → `Setting`. Case-insensitive; W8A8 and K16 are the defaults.

    method: fp, qdiff, tfmq, dgq. Flags (DGQ only): nogroups, axis=auto|channel|pixel, nolog,
    nostart, static, notime, batchscale.

    Example:
        >>> parse_setting("dgq:W4A6:K8:nolog").config.label()
        'DGQ W4A6 K=8 no-log'
    """
    raw = text.strip()
    tokens = [t.strip().lower() for t in raw.split(":")]
    method = _METHODS.get(tokens[0])
    if method is None:
        raise ValueError(f"setting {raw!r}: unknown method {tokens[0]!r}; allowed: fp, qdiff, tfmq, dgq")
    w = a = None
    opts: dict[str, Any] = {}
    for tok in tokens[1:]:
        if m := re.fullmatch(r"w(\d+)a(\d+)", tok):
            if w is not None:
                raise ValueError(f"setting {raw!r}: bit-widths given twice")
            w, a = int(m.group(1)), int(m.group(2))
        elif m := re.fullmatch(r"k(\d+)", tok):
            opts["groups"] = int(m.group(1))
        elif tok.startswith("axis="):
            opts["axis"] = tok.split("=", 1)[1]
        elif tok in _FLAGS:
            fld, val = _FLAGS[tok]
            opts[fld] = val
        else:
            raise ValueError(f"setting {raw!r}: unknown part {tok!r}; expected WxAy, Kn or one of "
                             f"{', '.join(['axis=…', *_FLAGS])}")
    if method == "fp":
        if w is not None or opts:
            raise ValueError(f"setting {raw!r}: fp takes no bit-widths or options")
        return Setting("fp", FP)
    if method != "dgq" and opts:
        raise ValueError(f"setting {raw!r}: groups and flags apply to dgq only")
    try:
        config = make_config(method, w_bits=8 if w is None else w, a_bits=8 if a is None else a, **opts)
    except ValueError as e:
        raise ValueError(f"setting {raw!r}: {e}") from None
    return Setting(canonical_spec(config), config)


def parse_settings(text: str) -> list[Setting]:
    """Comma-separated `parse_setting` specs; the names in `SETTING_GROUPS` expand in place."""
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            items.extend(SETTING_GROUPS.get(part.lower(), [part]))
    if not items:
        raise ValueError("--settings is empty; e.g. fp,tfmq:W8A8,dgq:W4A6:K16")
    out: list[Setting] = []
    for item in items:
        s = parse_setting(item)
        if any(o.spec == s.spec for o in out):
            raise ValueError(f"setting {s.spec} is listed twice in --settings")
        out.append(s)
    return out


# ----------------------------------------------------------------------------- prompts and plan
_PROMPT_COLUMNS = ("caption", "text", "prompt", "captions", "prompts")


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a text file (one per line), a CSV or a TSV.

    CSV/TSV: the column `column`, else the first of caption/text/prompt (any case); a TSV without
    such a column gives its first column (PartiPrompts' ``Prompt``). MS-COCO 30K files from BK-SDM
    (``metadata.csv`` with ``file_name,text``) and PartiPrompts.tsv work as they are.
    """
    from dgq.studio import read_prompts  # noqa: PLC0415

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    if p.suffix.lower() not in (".csv", ".tsv"):
        if column is not None:
            raise ValueError(f"--prompt-column needs a .csv or .tsv file, got {p.name}")
        return read_prompts(p)
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(p.read_text(encoding="utf-8-sig")), delimiter=delim)
    header = next(reader, None)
    if not header:
        raise ValueError(f"prompts file {p} is empty")
    lower = [h.strip().lower() for h in header]
    if column is not None:
        if column.lower() not in lower:
            raise ValueError(f"{p.name} has no column {column!r}; columns: {header}")
        idx = lower.index(column.lower())
    else:
        idx = next((lower.index(c) for c in _PROMPT_COLUMNS if c in lower), 0 if delim == "\t" else -1)
        if idx < 0:
            raise ValueError(f"{p.name}: no caption column among {header}; pass --prompt-column NAME")
    prompts = [row[idx].strip() for row in reader if len(row) > idx and row[idx].strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompts in column {header[idx]!r}")
    return prompts


@dataclass(frozen=True)
class Plan:
    """Which image has which prompt and seed, and the fixed batches that make them."""

    prompts: tuple[str, ...]
    images_per_prompt: int = 1
    seed: int = DEFAULT_SEED
    batch_size: int = 4

    @property
    def n(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    def prompt(self, i: int) -> str:
        return self.prompts[i // self.images_per_prompt]

    def seed_of(self, i: int) -> int:
        return self.seed + i

    def batches(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]

    def shard(self, rank: int, world: int) -> list[tuple[int, int]]:
        """Rank `rank`'s batches: those with index ≡ rank (mod world)."""
        return [b for k, b in enumerate(self.batches()) if k % world == rank]

    def image_prompts(self) -> list[str]:
        return [self.prompt(i) for i in range(self.n)]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def setting_fingerprint(plan_info: dict[str, Any], setting: Setting) -> str:
    """Everything besides prompts and seeds that changes a setting's images."""
    keys = ("model", "weights", "steps", "guidance", "dtype", "device_type", "weight_search", "scheduler",
            "resolution", "batch_size")
    d = {k: plan_info.get(k) for k in keys}
    d["config"] = setting.config.to_dict()
    if not setting.is_fp:
        d["calibration"] = (plan_info.get("calibration") or {}).get("sha256")
    return _sha(d)


def batch_fingerprint(setting_fp: str, plan: Plan, start: int, end: int) -> str:
    return _sha([setting_fp, [plan.prompt(i) for i in range(start, end)], [plan.seed_of(i) for i in range(start, end)]])


# ----------------------------------------------------------------------------- small io helpers
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def image_path(out: Path, setting: Setting, i: int) -> Path:
    return out / setting.slug / f"{i:05d}.png"


def read_log(sdir: Path) -> dict[int, list[dict[str, Any]]]:
    """Batch records of every rank's log in `sdir`, by batch start (a torn last line is skipped)."""
    recs: dict[int, list[dict[str, Any]]] = {}
    for p in sorted(sdir.glob("log.rank*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                recs.setdefault(int(r["start"]), []).append(r)
            except (ValueError, KeyError, TypeError):
                continue
    return recs


def _image_ok(path: Path, resolution: int | None) -> bool:
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as im:
            return resolution is None or im.size == (resolution, resolution)
    except (OSError, ValueError):
        return False


def done_batches(out: Path, setting: Setting, plan: Plan, setting_fp: str, batches: Sequence[tuple[int, int]],
                 resolution: int | None) -> set[int]:
    """Starts of the batches whose images exist and whose log line carries the current fingerprint."""
    recs = read_log(out / setting.slug)
    done = set()
    for s, e in batches:
        fp = batch_fingerprint(setting_fp, plan, s, e)
        if not any(r.get("fp") == fp and r.get("end") == e for r in recs.get(s, ())):
            continue
        if all(_image_ok(image_path(out, setting, i), resolution) for i in range(s, e)):
            done.add(s)
    return done


# ----------------------------------------------------------------------------- options
@dataclass
class Options:
    """Resolved options of one `eval` run (the CLI flags after the preset is applied)."""

    out: Path
    model: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    prompts_file: str | None = None
    prompt_column: str | None = None
    limit: int | None = None
    preset: str | None = None
    settings: str = DEFAULT_SETTINGS
    steps: int = 25
    guidance: float | None = None  # None: the model's default (`dgq.default_guidance`)
    seed: int = DEFAULT_SEED
    batch_size: int = 4
    images_per_prompt: int = 1
    calib_prompts_file: str | None = None
    calib_steps: int | None = None
    calib_cache: bool = True
    weight_search: str = "mse"
    metrics: str = "auto"
    metric_size: int = 0
    clip_model: str = "ViT-g-14"
    clip_pretrained: str | None = "laion2b_s34b_b88k"
    clip_weights: str | None = None
    clip_limit: int = 0
    clip_random_init: bool = False
    inception_weights: str | None = None
    inception_random_init: bool = False
    fid_ref_stats: str | None = None
    domain_fid_refs: int = 2000
    evaluator: str | None = None
    rank: int = 0
    world_size: int = 1
    wait_timeout: float = 0.0
    poll_interval: float = 5.0
    score_only: bool = False
    no_score: bool = False
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "batch_size", "images_per_prompt", "domain_fid_refs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit={self.limit} must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.score_only and self.no_score:
            raise ValueError("--score-only and --no-score exclude each other")
        if self.weight_search not in ("mse", "minmax"):
            raise ValueError(f"--weight-search={self.weight_search!r}; allowed: mse, minmax")
        if self.metric_size < 0 or self.clip_limit < 0:
            raise ValueError("--metric-size and --clip-limit must be >= 0 (0 = off / all)")


def selected_metrics(text: str, embedded: bool) -> list[str]:
    """``auto`` → shapes metrics for the embedded model, SD metrics otherwise; else a comma list."""
    if text.strip().lower() == "auto":
        return list(SHAPES_METRICS if embedded else SD_METRICS)
    if text.strip().lower() == "none":
        return []
    names = [t.strip().lower().replace("_", "-") for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METRIC_NAMES]
    if bad:
        raise ValueError(f"--metrics: unknown {bad}; allowed: auto, none or a list of {', '.join(METRIC_NAMES)}")
    return list(dict.fromkeys(names))


def rank_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate environment variables."""
    def env(*names: str, default: int) -> int:
        for n in names:
            v = os.environ.get(n)
            if v not in (None, ""):
                return int(v)
        return default

    world = env("WORLD_SIZE", default=1)
    rank = env("RANK", default=0)
    local = env("LOCAL_RANK", default=rank)
    return rank, world, local


# ----------------------------------------------------------------------------- generation
def _calibration(pipe, opts: Options, out: Path):
    """The run's calibration: D/calibration if it matches, else rank 0 makes it (others wait)."""
    import dgq  # noqa: PLC0415
    from dgq.calibration import Calibration, CalibrationMismatch, prompts_hash  # noqa: PLC0415
    from dgq.studio import default_calibration_prompts, resolution_of  # noqa: PLC0415

    model_id = str(getattr(pipe, "dgq_model_id", "unknown"))
    if opts.calib_prompts_file:
        prompts = load_prompts(opts.calib_prompts_file)
    else:
        try:
            prompts = default_calibration_prompts(model_id)
        except FileNotFoundError as e:
            raise CliError(f"no default calibration prompts for this model ({e}); pass --calib-prompts-file") from None
    steps = opts.calib_steps or opts.steps
    expect = {"model": model_id, "prompts_sha": prompts_hash(prompts), "n_prompts": len(prompts), "steps": steps,
              "guidance": opts.guidance, "scheduler": pipe.scheduler.__class__.__name__,
              "resolution": resolution_of(pipe)}
    path = out / "calibration"
    try:
        return Calibration.load(path, expect=expect)
    except CalibrationMismatch as e:
        if path.with_suffix(".json").exists() and opts.rank == 0:
            log.warning("calibration in %s not used (%s); recalibrating", out, e)
    if opts.rank == 0:
        calib = dgq.calibrate(pipe, prompts, steps=steps, guidance=opts.guidance,
                              cache=opts.calib_cache, progress=opts.progress)
        calib.save(path)
        return Calibration.load(path, expect=expect)  # meta now carries the checksum
    t0 = time.monotonic()
    while True:  # file barrier: rank 0 writes it atomically
        time.sleep(opts.poll_interval)
        try:
            return Calibration.load(path, expect=expect)
        except CalibrationMismatch:
            if opts.wait_timeout and time.monotonic() - t0 > opts.wait_timeout:
                raise CliError(f"rank {opts.rank}: no calibration from rank 0 in {out} after "
                               f"{opts.wait_timeout:.0f} s") from None


def _plan_info(opts: Options, pipe, plan: Plan, settings: list[Setting], calib, prompts_sha: str) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from dgq.studio import resolution_of, weights_fingerprint  # noqa: PLC0415

    dev = next(pipe.unet.parameters()).device
    # a model retrained or edited in place keeps its name: without this an FP setting (no
    # calibration checksum) would resume from the old weights' images
    weights = "-".join(weights_fingerprint(m) for m in (pipe.unet, pipe.text_encoder, pipe.vae))
    info: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "model": str(getattr(pipe, "dgq_model_id", opts.model)),
        "model_arg": opts.model,
        "weights": weights,
        "preset": opts.preset,
        "prompts_file": opts.prompts_file,
        "prompts_sha": prompts_sha,
        "n_prompts": len(plan.prompts),
        "images_per_prompt": plan.images_per_prompt,
        "n_images": plan.n,
        "seed": plan.seed,
        "seed_rule": "image i: seed + i, prompt i // images_per_prompt",
        "batch_size": plan.batch_size,
        "steps": opts.steps,
        "guidance": opts.guidance,
        "scheduler": pipe.scheduler.__class__.__name__,
        "resolution": resolution_of(pipe),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "device_type": dev.type,
        "weight_search": opts.weight_search,
        "torch": torch.__version__,
        "calibration": None,
        "settings": [s.to_dict() for s in settings],
    }
    if calib is not None:
        m = calib.meta
        info["calibration"] = {k: m.get(k) for k in ("steps", "guidance", "n_prompts", "prompts_sha", "sha256",
                                                     "seconds")}
    return info


def _generate(studio, out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any], opts: Options) -> int:
    """This rank's share of every setting; returns the number of batches generated."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    mine = plan.shard(opts.rank, opts.world_size)
    made = 0
    for setting in settings:
        sdir = out / setting.slug
        sdir.mkdir(parents=True, exist_ok=True)
        sfp = setting_fingerprint(info, setting)
        if opts.rank == 0:
            _write_json(sdir / "manifest.json", {**setting.to_dict(), "fingerprint": sfp, "n_images": plan.n,
                                                 "status": "generating"})
        done = done_batches(out, setting, plan, sfp, mine, info["resolution"])
        todo = [b for b in mine if b[0] not in done]
        n_mine = sum(e - s for s, e in mine)
        tag = f" [rank {opts.rank}/{opts.world_size}]" if opts.world_size > 1 else ""
        bar = tqdm(total=n_mine, initial=n_mine - sum(e - s for s, e in todo), unit="img",
                   desc=f"{setting.spec}{tag}", disable=not opts.progress)
        log_path = sdir / f"log.rank{opts.rank}.jsonl"
        first = True
        for s, e in todo:
            g = studio.generate([plan.prompt(i) for i in range(s, e)], seed=[plan.seed_of(i) for i in range(s, e)],
                                config=setting.config, steps=opts.steps, guidance=opts.guidance)
            for k, img in enumerate(g.images):
                _save_png(img, image_path(out, setting, s + k))
            rec = {"start": s, "end": e, "fp": batch_fingerprint(sfp, plan, s, e), "seconds": round(g.seconds, 4),
                   "first": first, "rank": opts.rank, "device": info["device_type"], "time": round(time.time(), 2)}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            first = False
            made += 1
            bar.update(e - s)
        bar.close()
    return made


def _marker(out: Path, rank: int) -> Path:
    return out / ".ranks" / f"done.{rank}.json"


def _missing_images(out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any],
                    known: dict[str, set[int]] | None = None) -> dict[str, int]:
    """Images not yet done per setting; `known` (setting → done batch starts) spares re-checking
    batches found done by an earlier poll."""
    known = {} if known is None else known
    missing = {}
    for setting in settings:
        sfp = setting_fingerprint(info, setting)
        done = known.setdefault(setting.spec, set())
        todo = [b for b in plan.batches() if b[0] not in done]
        done |= done_batches(out, setting, plan, sfp, todo, info["resolution"])
        n = sum(e - s for s, e in todo if s not in done)
        if n:
            missing[setting.spec] = n
    return missing


def _wait_for_ranks(out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any], opts: Options,
                    plan_fp: str, started: float) -> None:
    """Rank 0's file barrier: wait until every planned image is on disk with a current log line.

    Gives up when every other rank has left a marker for this plan (or a failure marker written
    during this run) while images are still missing, or after `opts.wait_timeout` seconds.
    """
    t0 = time.monotonic()
    known: dict[str, set[int]] = {}
    while True:
        missing = _missing_images(out, settings, plan, info, known)
        if not missing:
            return
        if opts.world_size == 1:
            raise CliError(f"images still missing after generation: {missing}")
        markers = []
        for r in range(1, opts.world_size):
            try:
                markers.append(json.loads(_marker(out, r).read_text()))
            except (OSError, ValueError):
                markers.append(None)
        failed = [m for m in markers if m is not None and m.get("status") == "failed"
                  and m.get("time", 0) >= started - 60]
        if failed:
            raise CliError(f"rank(s) {[m['rank'] for m in failed]} failed ({failed[0].get('error')}); "
                           f"images missing {missing}; run the same command again to fill them in")
        if all(m is not None and m.get("plan") == plan_fp for m in markers):
            failed = [m["rank"] for m in markers if m.get("status") != "done"]
            raise CliError(f"ranks finished ({'failed: ' + str(failed) if failed else 'all done'}) but images are "
                           f"missing {missing}; run the same command again to fill them in")
        if opts.wait_timeout and time.monotonic() - t0 > opts.wait_timeout:
            raise CliError(f"waited {opts.wait_timeout:.0f} s for the other ranks; still missing {missing}; "
                           "run again (finished batches are kept)")
        time.sleep(opts.poll_interval)


# ----------------------------------------------------------------------------- scoring
def _load_images(paths: Sequence[Path], size: int = 0, chunk: int = 64) -> Iterator[list[np.ndarray]]:
    """uint8 RGB arrays in chunks; `size` > 0 resizes (PIL bicubic, as BK-SDM's ``change_img_size``)."""
    from PIL import Image  # noqa: PLC0415

    for i in range(0, len(paths), chunk):
        batch = []
        for p in paths[i:i + chunk]:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size and im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                batch.append(np.asarray(im, dtype=np.uint8))
        yield batch


class Scorers:
    """Scoring networks, each loaded once on first use; a failed load is remembered as its reason."""

    def __init__(self, opts: Options, device: str = "cpu") -> None:
        self.opts, self.device = opts, device
        self._cache: dict[str, Any] = {}
        self.notes: dict[str, str] = {}

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def evaluator(self):
        def build():
            from dgq.tiny.evaluator import load_evaluator  # noqa: PLC0415

            try:
                ev = load_evaluator(self.opts.evaluator)
            except (FileNotFoundError, ValueError) as e:
                return f"{UNAVAILABLE}the shapes evaluator could not be loaded ({e})"
            self.notes["evaluator"] = f"shapes evaluator from {self.opts.evaluator or 'assets/evaluator'}"
            return ev
        return self._get("evaluator", build)

    def clip(self):
        def build():
            from dgq.metrics import ClipScorer  # noqa: PLC0415

            o = self.opts
            if not o.clip_random_init and o.clip_pretrained is None and o.clip_weights is None:
                return f"{UNAVAILABLE}no CLIP weights: pass --clip-weights FILE or a --clip-pretrained tag"
            scorer, msg = ClipScorer.try_load(o.clip_model, None if o.clip_random_init else o.clip_pretrained,
                                              weights_path=None if o.clip_random_init else o.clip_weights,
                                              device=self.device)
            if scorer is None:
                return msg
            self.notes["clip"] = msg
            return scorer
        return self._get("clip", build)

    def fid(self):
        def build():
            from dgq.metrics import FidScorer  # noqa: PLC0415

            o = self.opts
            scorer, msg = FidScorer.try_load(None if o.inception_random_init else o.inception_weights,
                                             random_init=o.inception_random_init, device=self.device)
            if scorer is None:
                return msg
            self.notes["fid"] = msg
            return scorer
        return self._get("fid", build)

    def fid_reference(self):
        """(mu, sigma) of the reference set: a pytorch-fid .npz, or a folder of images (resized)."""
        def build():
            from dgq.metrics import feature_stats, load_stats  # noqa: PLC0415

            ref = self.opts.fid_ref_stats
            if not ref:
                return (f"{UNAVAILABLE}no FID reference: pass --fid-ref-stats real_im256.npz (pytorch-fid stats "
                        "of the reference images) or a folder of reference images")
            p = Path(ref)
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                if len(files) < 2:
                    return f"{UNAVAILABLE}FID reference folder {p} holds fewer than 2 images"
                scorer = self.fid()
                if isinstance(scorer, str):
                    return scorer
                feats = np.concatenate([scorer.features(b) for b in _load_images(files, self.opts.metric_size)])
                self.notes["fid_reference"] = f"{len(files)} images in {p}"
                return feature_stats(feats)
            if not p.is_file():
                return f"{UNAVAILABLE}FID reference statistics {p} not found"
            try:
                stats = load_stats(p)
            except (OSError, ValueError) as e:
                return f"{UNAVAILABLE}could not read FID reference statistics {p}: {e}"
            self.notes["fid_reference"] = str(p)
            return stats
        return self._get("fid_reference", build)


def _finite(v: float) -> float | str:
    """JSON has no infinity: identical images (PSNR = inf) are written as the string "inf"."""
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def score_setting(out: Path, setting: Setting, plan: Plan, info: dict[str, Any], metrics: list[str],
                  scorers: Scorers, fp_setting: Setting | None, macs=None, metric_size: int = 0,
                  clip_limit: int = 0, domain_fid_refs: int = 2000) -> dict[str, Any]:
    """Metrics of one setting, recomputed from the image files."""
    import torch  # noqa: PLC0415

    from dgq import metrics as M  # noqa: PLC0415
    from dgq.tiny.evaluator import to_tensor_batch  # noqa: PLC0415

    n = plan.n
    paths = [image_path(out, setting, i) for i in range(n)]
    missing = sum(not p.is_file() for p in paths)
    row: dict[str, Any] = {**setting.to_dict(), "n_images": n - missing, "complete": missing == 0}
    m: dict[str, Any] = {}
    prompts = plan.image_prompts()
    if missing:
        why = f"{UNAVAILABLE}{missing} of {n} images missing (run the command again without --score-only)"
        for name in metrics:
            m[_metric_key(name)] = why
    else:
        if "align" in metrics or "domain-fid" in metrics:
            ev = scorers.evaluator()
            if isinstance(ev, str):
                x = None
            else:
                x = torch.cat([to_tensor_batch(b) for b in _load_images(paths)])
            if "align" in metrics:
                if x is None:
                    m["align_all"] = ev
                else:
                    sc = ev.score(x, prompts)
                    if sc["n"] == sc["n_unparsed"]:
                        m["align_all"] = f"{UNAVAILABLE}no prompt is in the shapes grammar"
                    else:
                        m["align_all"] = sc["all"]
                        m["align"] = sc
            if "domain-fid" in metrics:
                if x is None:
                    m["domain_fid"] = ev
                elif n < 2:
                    m["domain_fid"] = f"{UNAVAILABLE}FID needs at least 2 images"
                else:
                    m["domain_fid"] = M.domain_fid(x, n_ref=domain_fid_refs, evaluator=ev)
                    m["domain_fid_n"] = n
        if "clip" in metrics:
            scorer = scorers.clip()
            if isinstance(scorer, str):
                m["clip_score"] = scorer
            else:
                k = min(n, clip_limit) if clip_limit else n
                sims, off = [], 0
                for b in _load_images(paths[:k], metric_size):
                    sims.append(scorer.similarities(b, prompts[off:off + len(b)]))
                    off += len(b)
                m["clip_score"] = float(np.mean(np.concatenate(sims)))
                m["clip_n"] = k
        if "fid" in metrics:
            scorer, ref = scorers.fid(), None
            if not isinstance(scorer, str):
                ref = scorers.fid_reference()
            if isinstance(scorer, str) or isinstance(ref, str):
                m["fid"] = scorer if isinstance(scorer, str) else ref
            elif n < 2:
                m["fid"] = f"{UNAVAILABLE}FID needs at least 2 images"
            else:
                feats = np.concatenate([scorer.features(b) for b in _load_images(paths, metric_size)])
                m["fid"] = M.fid_from_features(feats, mu2=ref[0], sigma2=ref[1])
                m["fid_n"] = n
        for name, fn in (("psnr", M.psnr), ("ssim", M.ssim)):
            if name not in metrics:
                continue
            if fp_setting is None:
                m[name] = f"{UNAVAILABLE}add fp to --settings: {name.upper()} compares with the FP images"
            elif setting.is_fp:
                m[name] = None  # the reference itself
            else:
                ref_paths = [image_path(out, fp_setting, i) for i in range(n)]
                if not all(p.is_file() for p in ref_paths):
                    m[name] = f"{UNAVAILABLE}FP images missing"
                else:
                    vals = [fn(a, b, reduction="none") for a, b in zip(_load_images(paths), _load_images(ref_paths))]
                    m[name] = _finite(float(np.mean(np.concatenate(vals))))
    if macs is not None:
        from dgq.bops import bops  # noqa: PLC0415

        r = bops(macs, setting.config.w_bits, setting.config.a_bits)
        m["bops"] = r.bops
        m["size_mb"] = r.size_mb
    m.update(_latency(out, setting, plan, info))
    row["metrics"] = m
    return row


def _metric_key(name: str) -> str:
    return {"align": "align_all", "domain-fid": "domain_fid", "clip": "clip_score"}.get(name, name)


def _latency(out: Path, setting: Setting, plan: Plan, info: dict[str, Any]) -> dict[str, Any]:
    """Seconds per image from the log lines of the current batches (a process's first batch, which
    also fills the weight cache, is left out when others exist)."""
    sfp = setting_fingerprint(info, setting)
    recs = read_log(out / setting.slug)
    chosen = []
    for s, e in plan.batches():
        fp = batch_fingerprint(sfp, plan, s, e)
        cur = [r for r in recs.get(s, ()) if r.get("fp") == fp]
        if cur:
            chosen.append(max(cur, key=lambda r: r.get("time", 0)))
    if not chosen:
        return {"latency_s": f"{UNAVAILABLE}no generation log for these images"}
    steady = [r for r in chosen if not r.get("first")] or chosen
    secs = sum(r["seconds"] for r in steady)
    imgs = sum(r["end"] - r["start"] for r in steady)
    devices = sorted({str(r.get("device")) for r in steady})
    return {"latency_s": secs / imgs, "latency_batches": len(steady), "latency_device": ",".join(devices)}


# ----------------------------------------------------------------------------- reports
_TABLE_COLS = [  # (metric key, header, format)
    ("align_all", "align ↑", "{:.3f}"),
    ("domain_fid", "domain FID ↓", "{:.2f}"),
    ("clip_score", "CLIP ↑", "{:.4f}"),
    ("fid", "FID ↓", "{:.2f}"),
    ("psnr", "PSNR ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("bops", "BOPs", None),
    ("size_mb", "size MB", "{:.2f}"),
    ("latency_s", "s/img", "{:.3f}"),
]


def _si(v: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: row[k] for k in ("setting", "label", "w_bits", "a_bits", "n_images", "complete")}
    for k, v in row["metrics"].items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}_{kk}"] = vv
        else:
            flat[k] = v
    return flat


def write_results(out: Path, info: dict[str, Any], rows: list[dict[str, Any]], notes: dict[str, str],
                  metrics: list[str], complete: bool) -> None:
    """results.json, results.csv and results.md (each written atomically)."""
    doc = {"version": RESULTS_VERSION, "complete": complete, "plan": {k: v for k, v in info.items() if k != "settings"},
           "metrics": metrics, "notes": notes, "settings": rows}
    _write_json(out / "results.json", doc)
    flats = [_flat_row(r) for r in rows]
    cols: list[str] = []
    for f in flats:
        cols += [k for k in f if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for f in flats:
        w.writerow({k: ("" if f.get(k) is None else f.get(k)) for k in cols})
    _write_text(out / "results.csv", buf.getvalue())
    _write_text(out / "results.md", render_markdown(info, rows, notes, complete))


def render_markdown(info: dict[str, Any], rows: list[dict[str, Any]], notes: dict[str, str], complete: bool) -> str:
    present = [c for c in _TABLE_COLS if any(c[0] in r["metrics"] for r in rows)]
    reasons: list[str] = []

    def cell(v: Any, fmt: str | None, key: str) -> str:
        if v is None:
            return "ref" if key in ("psnr", "ssim") else "—"
        if isinstance(v, str):
            if v.startswith(UNAVAILABLE):
                if v not in reasons:
                    reasons.append(v)
                return f"n/a [{reasons.index(v) + 1}]"
            return v
        return _si(v) if fmt is None else fmt.format(v)

    lines = [f"# DGQ evaluation: {info.get('model')}", "",
             f"{info.get('n_images')} images ({info.get('n_prompts')} prompts × {info.get('images_per_prompt')}), "
             f"{info.get('steps')} steps, guidance {info.get('guidance')}, {info.get('resolution')} px, "
             f"{info.get('scheduler')}, seeds {info.get('seed')}+i, batch {info.get('batch_size')}, "
             f"{info.get('dtype')} on {info.get('device_type')}" + (f", preset {info['preset']}" if info.get("preset")
                                                                    else ""), ""]
    if not complete:
        lines += ["**Partial results** (the run has not finished every setting).", ""]
    head = ["setting", "W/A"] + [h for _, h, _ in present]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        wa = "32/32" if r["w_bits"] == 32 else f"{r['w_bits']}/{r['a_bits']}"
        cells = [r["label"], wa] + [cell(r["metrics"].get(k), fmt, k) for k, _, fmt in present]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for i, why in enumerate(reasons, 1):
        lines.append(f"[{i}] {why}")
    if reasons:
        lines.append("")
    for k, v in notes.items():
        lines.append(f"- {k}: {v}")
    lines.append("- PSNR/SSIM against the FP images of the same seeds; FIDs are biased upward at small sample counts "
                 "(compare only at equal numbers of images); s/img excludes each process's first batch.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command
def _resolve(args: argparse.Namespace) -> Options:
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
        calib_steps=args.calib_steps, calib_cache=not args.no_calib_cache, weight_search=args.weight_search,
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


def run(opts: Options) -> dict[str, Any] | None:
    """Generate (this rank's share), then on rank 0 wait for the others and score.

    Returns the results document on rank 0 (None on other ranks or with ``no_score``).
    """
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    (out / ".ranks").mkdir(exist_ok=True)
    marker = _marker(out, opts.rank)
    marker.unlink(missing_ok=True)
    if opts.score_only:
        return _score_only(opts)
    started = time.time()
    try:
        return _run(opts, started)
    except BaseException as e:
        if not marker.exists():  # tell rank 0 not to wait for this rank
            _write_json(marker, {"rank": opts.rank, "world_size": opts.world_size, "plan": None, "status": "failed",
                                 "error": f"{type(e).__name__}: {e}"[:500], "time": time.time()})
        raise


def _run(opts: Options, started: float) -> dict[str, Any] | None:
    out = opts.out
    marker = _marker(out, opts.rank)
    settings = parse_settings(opts.settings)
    if not opts.prompts_file:
        raise CliError("eval: --prompts-file is required (or --score-only to rescore a finished run)")
    prompts = load_prompts(opts.prompts_file, opts.prompt_column)
    if opts.limit:
        prompts = prompts[:opts.limit]
    plan = Plan(tuple(prompts), opts.images_per_prompt, opts.seed, opts.batch_size)
    metrics = selected_metrics(opts.metrics, _is_embedded(opts.model))
    from dgq.loading import load_pipeline  # noqa: PLC0415
    from dgq.studio import Studio, resolution_of  # noqa: PLC0415

    device = opts.device
    if opts.world_size > 1:
        import torch  # noqa: PLC0415

        _, _, local = rank_from_env()
        if (device in (None, "cuda")) and torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
    pipe = load_pipeline(opts.model, device=device, dtype=opts.dtype)
    if opts.guidance is None:
        from dgq.loading import default_guidance  # noqa: PLC0415

        opts = replace(opts, guidance=default_guidance(pipe))
    if opts.preset:
        want = PRESETS[opts.preset]["resolution"]
        if resolution_of(pipe) != want or pipe.scheduler.__class__.__name__ != "PNDMScheduler":
            log.warning("preset %s expects %d px and PNDM/PLMS; this model gives %d px with %s: numbers will not "
                        "be comparable with the paper's", opts.preset, want, resolution_of(pipe),
                        pipe.scheduler.__class__.__name__)
    calib = None if all(s.is_fp for s in settings) else _calibration(pipe, opts, out)
    info = _plan_info(opts, pipe, plan, settings, calib, _sha(list(prompts)))
    plan_fp = _sha({k: v for k, v in info.items() if k not in ("preset", "model_arg", "prompts_file")})
    if opts.rank == 0:
        _write_json(out / "prompts.json", list(prompts))
        _write_json(out / "plan.json", {**info, "metrics": metrics, "fingerprint": plan_fp})
    studio = Studio(pipe, calib, weight_search=opts.weight_search, max_batch=max(16, opts.batch_size),
                    max_steps=max(200, opts.steps))
    status = "failed"
    try:
        made = _generate(studio, out, settings, plan, info, opts)
        status = "done"
    finally:
        _write_json(marker, {"rank": opts.rank, "world_size": opts.world_size, "plan": plan_fp, "status": status,
                             "time": time.time()})
    log.info("rank %d generated %d batches", opts.rank, made)
    if opts.rank != 0 or opts.no_score:
        return None
    _wait_for_ranks(out, settings, plan, info, opts, plan_fp, started)
    from dgq.bops import count_macs, to_meta  # noqa: PLC0415

    return _score(out, settings, plan, info, metrics, opts, count_macs(to_meta(pipe.unet)))


def _is_embedded(model: str) -> bool:
    from dgq.loading import is_embedded  # noqa: PLC0415

    return is_embedded(model)


def _score(out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any], metrics: list[str], opts: Options,
           macs=None) -> dict[str, Any]:
    """Score every setting from its files; results are rewritten after each one."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    device = info.get("device_type", "cpu") if opts.device is None else opts.device
    scorers = Scorers(opts, device="cuda" if str(device).startswith("cuda") else "cpu")
    fp_setting = next((s for s in settings if s.is_fp), None)
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    if opts.metric_size:
        notes["metric_size"] = f"images resized to {opts.metric_size} px (bicubic) for CLIP and FID"
    if opts.clip_random_init or opts.inception_random_init:
        notes["WARNING"] = "scoring networks with RANDOM weights (tests only): CLIP/FID numbers are meaningless"
    for setting in tqdm(settings, desc="scoring", unit="setting", disable=not opts.progress):
        row = score_setting(out, setting, plan, info, metrics, scorers, fp_setting, macs, opts.metric_size,
                            opts.clip_limit, opts.domain_fid_refs)
        rows.append(row)
        man_path = out / setting.slug / "manifest.json"
        man = {**setting.to_dict(), "fingerprint": setting_fingerprint(info, setting), "n_images": plan.n,
               "status": "complete" if row["complete"] else "incomplete", "metrics": row["metrics"]}
        man_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(man_path, man)
        notes.update(scorers.notes)
        write_results(out, info, rows, notes, metrics, complete=False)
    complete = all(r["complete"] for r in rows)
    write_results(out, info, rows, notes, metrics, complete=complete)
    return json.loads((out / "results.json").read_text())


def _score_only(opts: Options) -> dict[str, Any] | None:
    """Rescore the images of a previous run (plan.json + prompts.json in the output folder)."""
    if opts.rank != 0:
        return None
    out = opts.out
    try:
        info = json.loads((out / "plan.json").read_text())
        prompts = json.loads((out / "prompts.json").read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"--score-only: {out} holds no finished plan (plan.json/prompts.json): {e}") from None
    settings = [parse_setting(s["setting"]) for s in info["settings"]]
    if opts.settings != DEFAULT_SETTINGS:  # a subset of the run's settings
        wanted = {s.spec for s in parse_settings(opts.settings)}
        settings = [s for s in settings if s.spec in wanted]
    plan = Plan(tuple(prompts), info["images_per_prompt"], info["seed"], info["batch_size"])
    metrics = selected_metrics(opts.metrics, _is_embedded(info.get("model_arg") or info["model"]))
    macs = None
    try:
        import torch  # noqa: PLC0415
        from diffusers import UNet2DConditionModel  # noqa: PLC0415

        from dgq.bops import count_macs  # noqa: PLC0415
        from dgq.loading import resolve_model  # noqa: PLC0415

        cfg = UNet2DConditionModel.load_config(resolve_model(info["model"]), subfolder="unet")
        with torch.device("meta"):
            macs = count_macs(UNet2DConditionModel.from_config(cfg))
    except Exception as e:  # noqa: BLE001 - BOPs are optional when rescoring
        log.warning("BOPs not computed (model config unavailable: %s)", e)
    return _score(out, settings, plan, info, metrics, opts, macs)


def cmd_eval(args: argparse.Namespace) -> int:
    opts = _resolve(args)
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
    p.add_argument("--no-calib-cache", action="store_true", help="do not use the $DGQ_CACHE calibration cache")
    p.add_argument("--weight-search", default="mse", choices=["mse", "minmax"],
                   help="weight clipping search (mse = the authors'; minmax is faster)")
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


if __name__ == "__main__":  # pragma: no cover
    from dgq.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))

"""What a run generates (`Plan`: prompts, seeds, fixed batches), its options (`Options`), the
fingerprints that decide what resumes, the run folder's small files and the shard of this rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dgq.config import learns_step_sizes
from dgq.eval.settings import DEFAULT_SEED, DEFAULT_SETTINGS, METRIC_NAMES, SD_METRICS, SHAPES_METRICS, Setting

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- prompts and plan
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


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def setting_fingerprint(plan_info: dict[str, Any], setting: Setting) -> str:
    """Everything besides prompts and seeds that changes a setting's images."""
    keys = ("model", "weights", "steps", "guidance", "dtype", "device_type", "weight_search", "scheduler",
            "resolution", "batch_size")
    d = {k: plan_info.get(k) for k in keys}
    d["config"] = setting.config.to_dict()
    if not setting.is_fp:
        d["calibration"] = (plan_info.get("calibration") or {}).get("sha256")
        if setting.config.weight_rounding != "nearest":  # which learned rounding made the images
            key = rounding_key(setting.config.w_bits, setting.config.weight_rounding)
            d["rounding"] = (plan_info.get("roundings") or {}).get(key)
        if learns_step_sizes(setting.config):  # and which step sizes
            d["act_ranges"] = (plan_info.get("act_ranges") or {}).get(f"W{setting.config.w_bits}A{setting.config.a_bits}")
    return digest(d)


def rounding_key(w_bits: int, rounding: str) -> str:
    """Key of a learned rounding in a plan's "roundings": "4" (AdaRound, as before TIAR) or "4-tiar"."""
    return str(w_bits) if rounding == "adaround" else f"{w_bits}-{rounding.removeprefix('adaround-')}"


def batch_fingerprint(setting_fp: str, plan: Plan, start: int, end: int) -> str:
    return digest([setting_fp, [plan.prompt(i) for i in range(start, end)], [plan.seed_of(i) for i in range(start, end)]])


# ----------------------------------------------------------------------------- small io helpers
def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def image_file(folder: Path, i: int) -> Path:
    """Image `i` of a setting's folder (the one naming rule for every reader of eval runs)."""
    return folder / f"{i:05d}.png"


def image_path(out: Path, setting: Setting, i: int) -> Path:
    return image_file(out / setting.slug, i)


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
    calib_guidance: float | None = None  # None: the generation guidance
    calib_batch_size: int = 8
    calib_cache: bool = True
    weight_search: str = "mse"
    rounding_files: tuple[str, ...] = ()  # learned roundings chosen by path (`Studio.use_rounding_file`)
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

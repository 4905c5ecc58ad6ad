"""Where dgq finds its shipped files and keeps its caches: one leaf module (standard library only).

Why one place: the embedded model, its calibration, the evaluator and the prompt lists live in the
repository's `assets/` folder, and several modules need them; resolving the folder here, from
this file's location and never from the working directory, means `import dgq` finds them from
any folder. Being a leaf (no dgq imports) lets any module, the kernels included, import it
without closing an import circle.

Assets: `$DGQ_ASSETS` if set, else `<checkout>/assets` — the checkout this package lives in, which
is also where an editable install (`pip install -e .`, what `make app` does) keeps it. A
non-editable install (`pip install .`, a wheel) holds the code only: set `DGQ_ASSETS` to an
`assets/` folder before importing dgq, or load models by folder or Hub id. The folder is read
once, at import.

Caches: `$DGQ_CACHE` or `~/.cache/dgq`, read at each call so `--cache-dir` and tests can redirect
it after import.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    """The shipped files' folder: `$DGQ_ASSETS`, else `<checkout>/assets`."""
    env = os.environ.get("DGQ_ASSETS")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "assets"


def cache_dir() -> Path:
    """The cache root: `$DGQ_CACHE`, else `~/.cache/dgq` (calibrations, weight ranges, compiled kernels)."""
    return Path(os.environ.get("DGQ_CACHE", Path.home() / ".cache" / "dgq"))


ASSETS = assets_dir()
TINY_DIR = ASSETS / "tiny-sd"  # the embedded model (a diffusers pipeline folder)
TINY_CLIP_DIR = ASSETS / "tiny-clip"  # its domain CLIP (image tower; the text tower is TINY_DIR/text_encoder)
SHIPPED_CALIBRATION = ASSETS / "tiny-sd-calibration" / "calibration"  # its calibration (.json + .safetensors)
SHIPPED_WEIGHT_RANGES = ASSETS / "tiny-sd-calibration" / "weight_ranges.safetensors"
EVALUATOR_DIR = ASSETS / "evaluator"  # the embedded model's shapes evaluator
SD_PROMPTS_FILE = ASSETS / "prompts" / "calibration_sd.txt"  # COCO-style calibration captions
SHAPES_EVAL_PROMPTS = ASSETS / "prompts" / "shapes_eval_240.txt"  # held-out prompts of the paper tables

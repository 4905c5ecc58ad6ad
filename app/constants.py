"""Constants of the DGQ Studio app: models, examples, ranges, server caps, env overrides.

Every number a user can send is bounded here, and the callbacks re-check them server-side (the
API can send values the sliders never would).

Environment variables (all optional):

* ``DGQ_APP_MODEL`` — the default model ("tiny" = the embedded model; a folder or Hub id).
* ``DGQ_APP_MODELS`` — comma-separated Hub ids users may choose besides the default and "tiny"
  (default: CompVis/stable-diffusion-v1-4).
* ``DGQ_APP_ALLOW_LOCAL`` — "1" lets users name local diffusers folders (default: off, so a public
  server never loads a path a visitor types).
* ``DGQ_APP_DELETE_CACHE`` — "FREQ,AGE" seconds for Gradio's temp-file clean-up (default 3600,3600).
* ``DGQ_APP_MAX_STEPS`` — server cap on sampler steps (default 50).
* ``DGQ_APP_CONCURRENCY`` — generations running at once (default 2; they share one model copy).
* ``DGQ_APP_QUEUE`` — queued requests beyond which new ones are refused (default 16).
* ``DGQ_APP_CACHE`` — results kept in memory for instant slider moves and views (default 48).
* ``DGQ_APP_PRELOAD`` — "1" (default) loads the default model in a background thread at start.
* ``DGQ_APP_CALIB_PROMPTS`` / ``DGQ_APP_CALIB_STEPS`` — calibration prompts file and steps
  (default: the library's own choice; the embedded model ships its calibration).
* ``DGQ_CLIP_MODEL`` / ``DGQ_CLIP_PRETRAINED`` / ``DGQ_CLIP_WEIGHTS`` — the open_clip model used
  for the CLIP score of SD models (local weights only; never downloaded).
* ``DGQ_APP_GPU_DURATION`` — seconds requested per call from ZeroGPU (default 120).
"""

from __future__ import annotations

import os

from dgq.config import A_BITS, GROUP_CHOICES, W_BITS


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


TITLE = "DGQ Studio"
EMBEDDED = "tiny"
SD14 = "CompVis/stable-diffusion-v1-4"
DEFAULT_MODEL = os.environ.get("DGQ_APP_MODEL", EMBEDDED)
HUB_MODELS = tuple(m.strip() for m in os.environ.get("DGQ_APP_MODELS", SD14).split(",") if m.strip())
ALLOW_LOCAL = os.environ.get("DGQ_APP_ALLOW_LOCAL", "0") == "1"
MODEL_CHOICES = list(dict.fromkeys([DEFAULT_MODEL, EMBEDDED, *HUB_MODELS]))

DOMAIN_EXAMPLES = [
    "a large red circle on the left",
    "a small cyan diamond in the center on a black background",
    "a red circle to the left of a blue square",
    "a green triangle above a yellow diamond",
]
TEASER_EXAMPLES = [  # the DGQ paper's teaser prompts (SD v1.4)
    "A smiling teddy bear",
    "A sports car running on Mars",
    "A basket full of apples",
    "A mountain with snow-capped peaks rising high into the sky.",
]
DEFAULT_PROMPT = DOMAIN_EXAMPLES[0]

# ranges (the library validates them again)
W_MIN, W_MAX = W_BITS.start, W_BITS.stop - 1  # 2..8
A_MIN, A_MAX = A_BITS.start, A_BITS.stop - 1  # 4..8
GROUPS = list(GROUP_CHOICES)  # 1, 2, 4, 8, 16
BASELINES = {"tfmq": "TFMQ-DM (per-timestep ranges)", "qdiff": "Q-Diffusion (one range for all steps)",
             # as their papers run them (docs/paper-baselines.md): offered where the learned parts are stored
             "tfmq-paper": "TFMQ-DM, paper recipe (AdaRound with TIAR, split shortcut)",
             "qdiff-paper": "Q-Diffusion, paper recipe (AdaRound, learned step sizes, split shortcut)"}
AXES = ["auto", "channel", "pixel"]
ROUNDINGS = ["nearest", "adaround"]  # weight rounding: round to nearest, or learned by BRECQ/AdaRound
EXECUTIONS = ["simulated", "int8"]  # fake quantization in fp32, or integer GEMMs (A = 8 only)
DEFAULT_W, DEFAULT_A, DEFAULT_K = 8, 6, 16
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
MAX_STEPS = max(1, _env_int("DGQ_APP_MAX_STEPS", 50))
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000  # longer inputs are refused before tokenizing
MAX_BATCH = 1  # one image per column per request (the server cap; the API has no batch input)

# serving
CONCURRENCY = max(1, _env_int("DGQ_APP_CONCURRENCY", 2))
QUEUE_SIZE = max(1, _env_int("DGQ_APP_QUEUE", 16))
RESULT_CACHE = max(0, _env_int("DGQ_APP_CACHE", 48))
MAX_MODELS = 2  # pipelines kept in memory at once (the default model is never evicted)
PRELOAD = os.environ.get("DGQ_APP_PRELOAD", "1") != "0"
GPU_DURATION = _env_int("DGQ_APP_GPU_DURATION", 120)


def _delete_cache() -> tuple[int, int]:
    raw = os.environ.get("DGQ_APP_DELETE_CACHE", "3600,3600").split(",")
    try:
        freq, age = (int(x) for x in raw)
    except ValueError:
        freq, age = 3600, 3600
    return max(60, freq), max(60, age)


DELETE_CACHE = _delete_cache()  # Gradio's temp files (images served to clients) older than AGE s go every FREQ s
CALIB_PROMPTS_FILE = os.environ.get("DGQ_APP_CALIB_PROMPTS") or None
CALIB_STEPS = _env_int("DGQ_APP_CALIB_STEPS", 25)
CLIP_MODEL = os.environ.get("DGQ_CLIP_MODEL", "ViT-g-14")
CLIP_PRETRAINED = os.environ.get("DGQ_CLIP_PRETRAINED", "laion2b_s34b_b88k")
CLIP_WEIGHTS = os.environ.get("DGQ_CLIP_WEIGHTS") or None

# display
DISPLAY_MIN = 256  # small images are upscaled (nearest) to at least this many pixels
OUTLIER_SNAPSHOTS = 6  # UNet calls at which layer inputs are recorded for the Outliers tab
MAX_TOKENS_SHOWN = 16  # per-token maps drawn in the Attention tab
ALL = "all"

INTRO = (
    "Full precision, a baseline post-training quantizer and **DGQ** (distribution-aware group "
    "quantization, ICLR 2025) on the same prompt and seed. By default quantization is *simulated* "
    "(fake quantization in float, not faster than FP); *execution = int8* (A = 8) runs the "
    "quantized layers on integer GEMMs, whose latency is measured. The BOPs and weight-memory "
    "figures are the analytic estimate for integer hardware."
)

"""Loading pipelines: the embedded model, a local diffusers folder, or a Hub id.

Every failure becomes one `ModelLoadError` that names the model and how to supply it, so the CLI
and the app can show one line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dgq.paths import ASSETS, TINY_DIR  # noqa: F401 - ASSETS: re-exported for older imports

log = logging.getLogger(__name__)

ALIASES = {
    "tiny": str(TINY_DIR),
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


SD_GUIDANCE = 7.5  # Stable Diffusion's customary classifier-free guidance scale
DEFAULTS_FILE = "dgq_defaults.json"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with the reason and what to do about it.

    `str(e)` is the full message for the person running the code (it may name local paths);
    `e.public` says the same without server paths or library internals, for a remote user of the
    app (a Space must not tell a visitor which of its folders exist)."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or "the model could not be loaded on this server"


# Weight files that only a pickle loader reads: never loaded (arbitrary code on unpickling).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def canonical_model(model: str) -> str:
    """One name per model: "tiny" for the embedded model however its folder is spelled, the real
    path (symlinks, `..` and `~` resolved) for another local folder, else the id unchanged.
    Calibration caches are keyed on it, so one folder is calibrated once."""
    source = resolve_model(model)
    local = Path(source).expanduser()
    if local.exists():
        real = local.resolve()
        return "tiny" if real == TINY_DIR.resolve() else str(real)
    return model


def pickle_only_components(folder: Path) -> list[str]:
    """Sub-folders of a diffusers folder whose weights exist only as pickles (no .safetensors)."""
    bad = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        if any(f.suffix in PICKLE_SUFFIXES for f in files) and not any(f.suffix == ".safetensors" for f in files):
            bad.append(sub.name)
    return bad


def resolve_model(model: str) -> str:
    return ALIASES.get(model, model)


def is_embedded(model: str) -> bool:
    return Path(resolve_model(model)).resolve() == TINY_DIR.resolve()


def model_defaults(model: str) -> dict[str, float]:
    """Generation defaults a model folder declares in `dgq_defaults.json` (empty for Hub ids).

    Why: the best classifier-free guidance scale is a property of the model. SD v1.x is used at
    7.5; the embedded model follows its prompts best at a lower scale (its README says how this
    was measured), and calibration must use the scale generation will use, because attention and
    activation ranges depend on it. Only `guidance` is read today.
    """
    import json  # noqa: PLC0415

    path = Path(resolve_model(model)).expanduser() / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        g = float(raw["guidance"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is not valid: expected JSON with a numeric 'guidance' ({e})") from e
    if not 0.0 <= g <= 30.0:
        raise ModelLoadError(f"{path}: guidance {g} is out of range 0..30")
    return {"guidance": g}


def default_guidance(pipe) -> float:
    """The guidance scale to use when the caller gives none: the model's declared one, else 7.5."""
    return float(getattr(pipe, "dgq_defaults", {}).get("guidance", SD_GUIDANCE))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str = "tiny", device: str | None = None, dtype: torch.dtype | str | None = None):
    """Load a Stable Diffusion 1.x pipeline.

    Args:
        model (`str`): "tiny" (the embedded model), an alias ("sd-v1-4"), a local diffusers folder,
            or a Hub id such as "CompVis/stable-diffusion-v1-4".
        device (`str`, *optional*): "cpu" or "cuda"; defaults to CUDA when available.
        dtype (*optional*): torch.float32 (default on CPU) or torch.float16 (default on CUDA).

    Returns:
        a `StableDiffusionPipeline` with `pipe.dgq_model_id` set to the resolved id and
        `pipe.dgq_defaults` to the folder's generation defaults (see `model_defaults`).

    Raises:
        ModelLoadError: the model is missing or unreachable; the message says how to supply it.

    Example:
        >>> pipe = dgq.load_pipeline("tiny")
    """
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 - heavy import

    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    source = resolve_model(model)
    local = Path(source).expanduser()
    defaults = model_defaults(model)
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    not_local = "the model is not a diffusers pipeline folder this server can load"
    if looks_local and not local.exists():
        raise ModelLoadError(f"model folder {local} does not exist: pass a diffusers folder (with model_index.json) or a Hub id",
                             public=not_local)
    if local.exists():
        if not (local / "model_index.json").exists():
            raise ModelLoadError(f"{local} is not a diffusers pipeline folder (no model_index.json)", public=not_local)
        pickles = pickle_only_components(local)
        if pickles:
            raise ModelLoadError(
                f"{local}: {', '.join(pickles)} hold(s) pickle weights only (.bin/.ckpt); pickles are never loaded. "
                "Convert the folder to safetensors: load it once in a trusted session and call "
                "pipe.save_pretrained(folder, safe_serialization=True)",
                public="the model's weights are pickles, which this server never loads; it needs .safetensors weights")
        kwargs = {"local_files_only": True}
        source = str(local.resolve())
    else:
        kwargs = {}
    from diffusers.utils import logging as dlog  # noqa: PLC0415

    level = dlog.get_verbosity()
    # Loader chatter (the embedded model's deliberate AutoencoderTiny, "couldn't connect to the Hub,
    # trying the cache") would precede our one-line error; real failures raise ModelLoadError below.
    dlog.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one clear error
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (f"cannot load model {model!r} ({source}): {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
                "Supply it as a local diffusers folder (--model /path/to/folder), pre-download it into the "
                "Hugging Face cache (huggingface-cli download ...) and set HF_HUB_OFFLINE=1, "
                "or use --model tiny (the embedded model)")
        if offline:
            hint += "; HF_HUB_OFFLINE=1 is set, so only the local cache was searched"
        public = (f"the model could not be loaded ({type(e).__name__}); only SD-1.x diffusers pipelines with "
                  "safetensors weights available to the server load")
        raise ModelLoadError(hint, public=public) from e
    finally:
        dlog.set_verbosity(level)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.dgq_model_id = model if model in ALIASES else canonical_model(source)
    pipe.dgq_defaults = defaults
    return pipe

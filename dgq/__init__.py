"""DGQ Studio: Distribution-aware Group Quantization of Stable-Diffusion-style UNets.

Importing `dgq` touches no GPU, network or file; the heavy pieces load on first use.

Example:
    >>> import dgq
    >>> pipe = dgq.load_pipeline("tiny")
    >>> studio = dgq.Studio(pipe, dgq.calibrate(pipe))
    >>> img = studio.generate("a large red circle on the left", seed=0,
    ...                       config=dgq.DGQConfig(w_bits=4, a_bits=6)).image
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FP": "dgq.config",
    "FPConfig": "dgq.config",
    "BaselineConfig": "dgq.config",
    "DGQConfig": "dgq.config",
    "Axis": "dgq.config",
    "BaselineStyle": "dgq.config",
    "ScaleScope": "dgq.config",
    "make_config": "dgq.config",
    "config_from_dict": "dgq.config",
    "load_pipeline": "dgq.loading",
    "canonical_model": "dgq.loading",
    "cache_dir": "dgq.paths",
    "ModelLoadError": "dgq.loading",
    "model_defaults": "dgq.loading",
    "default_guidance": "dgq.loading",
    "calibrate": "dgq.studio",
    "Studio": "dgq.studio",
    "Generation": "dgq.studio",
    "read_prompts": "dgq.prompts",
    "random_seed": "dgq.studio",
    "Calibration": "dgq.calibration",
    "CalibrationMismatch": "dgq.calibration",
    "quantize_": "dgq.modules",
    "dequantize_": "dgq.modules",
    "record": "dgq.tracing",
    "Recorder": "dgq.recorder",
    "Perturbation": "dgq.context",
    "bops": "dgq.bops",
    "count_macs": "dgq.bops",
    "build_unet": "dgq.bops",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dgq' has no attribute {name!r}")

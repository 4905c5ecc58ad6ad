"""The baselines (paper Table 2 rows): per-tensor activations and uniform probabilities.

Q-Diffusion: one MSE-searched range for all timesteps; TFMQ-DM: the EMA min/max of each
calibrated timestep. Both keep zero-point 0 for the probabilities and quantize `<start>` too.
"""

from __future__ import annotations

from typing import Any

from dgq import primitives as P
from dgq.config import BaselineConfig, BaselineStyle, ScaleScope
from dgq.methods import register
from dgq.methods.base import MethodRules, ProbQuant


@register(BaselineConfig)
class BaselineRules(MethodRules):
    def needs_calibration(self, config: BaselineConfig) -> bool:
        return True

    def single_set(self, config: BaselineConfig) -> bool:
        return config.style is BaselineStyle.QDIFF

    def static_mse_range(self, config: BaselineConfig) -> bool:
        return config.style is BaselineStyle.QDIFF

    def prob(self, config: BaselineConfig, calib: Any, site: str, t_key: int, bits: int) -> ProbQuant:
        hist = calib.get(site, "hist", t_key) + calib.get(site, "hist0", t_key)
        s = P.uniform_prob_scale(hist, float(calib.get(site, "pmax", t_key)), bits, self.single_set(config))
        return ProbQuant(bits, log=False, start_fp=False, dynamic=False, scope=ScaleScope.BATCH, scale=s)

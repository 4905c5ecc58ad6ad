"""DGQ (Ryu et al., ICLR 2025): K groups along the axis the spread metric D_d picks, per timestep;
base-2 log probabilities with a dynamic, prompt-specific scale; `<start>` kept in full precision.
Every component can be switched off on its own (`DGQConfig`), which is what the ablations read here.
"""

from __future__ import annotations

from typing import Any

from dgq import primitives as P
from dgq.config import Axis, DGQConfig
from dgq.methods import register
from dgq.methods.base import MethodRules, ProbQuant


@register(DGQConfig)
class DGQRules(MethodRules):
    def needs_calibration(self, config: DGQConfig) -> bool:
        return True

    def single_set(self, config: DGQConfig) -> bool:
        return not config.time_aware

    def start_fp(self, config: DGQConfig, info: Any) -> bool:
        return config.start_token and info.kind == "k" and info.cross

    def groups(self, config: DGQConfig) -> int:
        return config.effective_groups

    def axis(self, config: DGQConfig) -> Axis:
        return config.axis

    def prob(self, config: DGQConfig, calib: Any, site: str, t_key: int, bits: int) -> ProbQuant:
        start_fp = config.start_token and calib.sites[site].cross
        scope = config.scale_scope
        if config.dynamic_scale:
            return ProbQuant(bits, config.log_quant, start_fp, True, scope)
        hist_rest, hist0 = calib.get(site, "hist", t_key), calib.get(site, "hist0", t_key)
        hist = hist_rest if start_fp else hist_rest + hist0
        if config.log_quant:
            s = P.static_log_scale(hist, bits)
        else:
            top = calib.get(site, "pmax_rest" if start_fp else "pmax", t_key)
            s = P.uniform_prob_scale(hist, float(top), bits, mse=False)
        return ProbQuant(bits, config.log_quant, start_fp, False, scope, s)

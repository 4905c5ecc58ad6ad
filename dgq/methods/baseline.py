"""The baselines (paper Table 2 rows): per-tensor activations and uniform probabilities.

Q-Diffusion: one MSE-searched range for all timesteps; TFMQ-DM: the EMA min/max of each
calibrated timestep. Both keep zero-point 0 for the probabilities and quantize `<start>` too.

As their papers run them (`qdiff-paper`, `tfmq-paper`; the config sets AdaRound weights): the
up-blocks' shortcut concatenation gets one range per half (`dgq.split`: per step for TFMQ-DM,
learned for Q-Diffusion), and Q-Diffusion's layer-input ranges are the step sizes learned by
block reconstruction (`dgq.act_recon`): the layer inputs', and (unless learned without them) Q,
K, V's and the probabilities' step sizes, one for all steps.
"""

from __future__ import annotations

from typing import Any

from dgq import primitives as P
from dgq.config import BaselineConfig, ScaleScope, learns_step_sizes
from dgq.methods import register
from dgq.methods.base import MethodInputs, MethodRules, ProbQuant
from dgq.split import half_ranges, split_labels


@register(BaselineConfig)
class BaselineRules(MethodRules):
    def needs_calibration(self, config: BaselineConfig) -> bool:
        return True

    def single_set(self, config: BaselineConfig) -> bool:
        return config.style.one_range

    def static_mse_range(self, config: BaselineConfig) -> bool:
        return config.style.one_range

    def acts_depend_on_weights(self, config: BaselineConfig) -> bool:
        return learns_step_sizes(config)

    def fixed_act(self, config: BaselineConfig, calib: Any, site: str, t_keys: list[int], bits: int,
                  inputs: MethodInputs) -> dict[int, tuple[str, Any, Any, Any]] | None:
        split = inputs.splits.get(site) if config.style.paper else None
        if learns_step_sizes(config):
            learned = _learned(config, bits, inputs)
            if site not in learned.sites:
                return None  # Q, K, V learned without them: the light Q-Diffusion's MSE range
            s, z = learned.sites[site]
            if s.numel() == 1:
                return {t: ("tensor", s.reshape(()), z.reshape(()), None) for t in t_keys}
            lab = split_labels(s.numel(), split) if split else None
            return {t: ("channel", s, z, lab) for t in t_keys}
        if split is None:
            return None
        info = calib.sites[site]
        rows = [calib.t_index(t) for t in t_keys]
        lo, hi = half_ranges(calib.tensors[f"{site}|ch_min"][rows], calib.tensors[f"{site}|ch_max"][rows], split)
        s, z = P.uniform_qparams(lo, hi, bits)  # [T, 2]
        lab = split_labels(info.channels, split)
        return {t: ("channel", s[i][lab], z[i][lab], lab) for i, t in enumerate(t_keys)}

    def fixed_prob(self, config: BaselineConfig, site: str, bits: int, inputs: MethodInputs) -> ProbQuant | None:
        if not learns_step_sizes(config):
            return None
        learned = _learned(config, bits, inputs)
        if site not in learned.sites:
            return None  # learned without the attention quantizers: the light rule below
        s, _ = learned.sites[site]  # uniform, zero-point 0 (Q-Diffusion's softmax quantizer)
        return ProbQuant(bits, log=False, start_fp=False, dynamic=False, scope=ScaleScope.BATCH, scale=float(s.reshape(())))

    def prob(self, config: BaselineConfig, calib: Any, site: str, t_key: int, bits: int) -> ProbQuant:
        hist = calib.get(site, "hist", t_key) + calib.get(site, "hist0", t_key)
        s = P.uniform_prob_scale(hist, float(calib.get(site, "pmax", t_key)), bits, self.single_set(config))
        return ProbQuant(bits, log=False, start_fp=False, dynamic=False, scope=ScaleScope.BATCH, scale=s)


def _learned(config: BaselineConfig, bits: int, inputs: MethodInputs) -> Any:
    """The learned step sizes (`dgq.act_recon.ActRanges`) handed over for this config's (W, A)."""
    learned = inputs.act_ranges
    if learned is None or (learned.w_bits, learned.a_bits) != (config.w_bits, bits):
        raise RuntimeError(f"{config.label()}: no learned step sizes at W{config.w_bits}A{bits} are loaded")
    return learned

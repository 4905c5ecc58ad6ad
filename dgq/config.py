"""Quantization configs: frozen dataclasses that name a variant (FP, baseline PTQ, DGQ).

A config says *what* to simulate; the calibration statistics say *how* (ranges, groups). The
same calibration serves every config, so a config is cheap to build and to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, ClassVar

CONFIG_VERSION = 1
GROUP_CHOICES = (1, 2, 4, 8, 16)
W_BITS = range(2, 9)
A_BITS = range(4, 9)
OFF = 16  # bit-width meaning "not quantized"
EXECUTIONS = ("simulated", "int8")  # fake-quant fp32 arithmetic, or integer GEMMs (dgq.int8)
WEIGHT_ROUNDINGS = ("nearest", "adaround", "adaround-tiar")  # nearest, or learned by dgq.reconstruction (-tiar: with TFMQ-DM's TIAR)


class Axis(str, Enum):
    """Grouping axis rule: the spread metric D_d picks per (layer, timestep), or forced."""

    AUTO = "auto"
    CHANNEL = "channel"
    PIXEL = "pixel"


class BaselineStyle(str, Enum):
    """The paper's two comparison rows (Table 2)."""

    QDIFF = "qdiff"  # per-tensor, one MSE-calibrated set for all timesteps
    TFMQ = "tfmq"  # per-tensor, one min/max set per timestep
    # as their papers run them (dgq.act_recon, dgq.split): AdaRound weights, the up-blocks'
    # shortcut concatenation split in two ranges; Q-Diffusion's step sizes learned (LSQ)
    QDIFF_PAPER = "qdiff-paper"
    TFMQ_PAPER = "tfmq-paper"

    @property
    def paper(self) -> bool:
        """The paper recipe (AdaRound weights, shortcut split, and for Q-Diffusion LSQ step sizes)."""
        return self in (BaselineStyle.QDIFF_PAPER, BaselineStyle.TFMQ_PAPER)

    @property
    def one_range(self) -> bool:
        """One activation range for all timesteps (Q-Diffusion) instead of one per timestep (TFMQ-DM)."""
        return self in (BaselineStyle.QDIFF, BaselineStyle.QDIFF_PAPER)


class ScaleScope(str, Enum):
    """Over what the dynamic log scale's max is taken."""

    SAMPLE = "sample"  # per prompt (the paper's "prompt-specific" scale)
    BATCH = "batch"  # whole batched tensor, CFG halves included (the authors' code)


def _check_execution(cfg: Any) -> None:
    if cfg.execution not in EXECUTIONS:
        raise ValueError(f"execution={cfg.execution!r}; allowed: {list(EXECUTIONS)}")
    if cfg.execution == "int8" and (cfg.w_bits > 8 or cfg.a_bits != 8):
        raise ValueError(f"execution='int8' needs w_bits <= 8 and a_bits = 8 (got W{cfg.w_bits}A{cfg.a_bits})")


def _drop_default_execution(d: dict[str, Any]) -> dict[str, Any]:
    """The simulated default is left out, so dicts (and the fingerprints, cache keys and result
    files built from them) of every config that existed before `execution` stay as they were.
    The same holds for `weight_rounding`'s "nearest" default."""
    if d.get("execution") == "simulated":
        del d["execution"]
    if d.get("weight_rounding") == "nearest":
        del d["weight_rounding"]
    return d


def _check_rounding(cfg: Any) -> None:
    if cfg.weight_rounding not in WEIGHT_ROUNDINGS:
        raise ValueError(f"weight_rounding={cfg.weight_rounding!r}; allowed: {list(WEIGHT_ROUNDINGS)}")
    if cfg.weight_rounding != "nearest" and cfg.execution == "int8":
        raise ValueError(f"weight_rounding={cfg.weight_rounding!r} runs simulated only (the int8 path packs nearest-rounded codes)")


def rounding_label(rounding: str) -> str:
    """The label suffix of a weight rounding ("" for nearest)."""
    return {"adaround": " AdaRound", "adaround-tiar": " AdaRound+TIAR"}.get(rounding, "")


def _check_bits(name: str, value: int, allowed: range) -> None:
    if not isinstance(value, int) or (value not in allowed and value != OFF):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed.start}..{allowed.stop - 1} or {OFF} (off)")


@dataclass(frozen=True)
class FPConfig:
    """Full precision: the wrapped modules behave exactly like the original ones."""

    method: ClassVar[str] = "fp"
    w_bits: ClassVar[int] = 32
    a_bits: ClassVar[int] = 32

    def label(self) -> str:
        return "FP32"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "fp", "version": CONFIG_VERSION}


@dataclass(frozen=True)
class BaselineConfig:
    """Baseline PTQ sharing DGQ's weights: per-tensor activations, uniform attention probabilities.

    Args:
        w_bits (`int`, defaults to 8): weight bits, per output channel, MSE-searched clipping.
        a_bits (`int`, defaults to 8): activation bits (also Q, K, V and probabilities).
        style (`str`, defaults to `"tfmq"`): `"tfmq"` = per-timestep min/max ranges,
            `"qdiff"` = one MSE-calibrated range for all timesteps; `"qdiff-paper"` /
            `"tfmq-paper"` = the same methods as their papers run them: AdaRound weights (always:
            `weight_rounding` is set to `"adaround"`, for TFMQ-DM `"adaround-tiar"`), the up-blocks' shortcut concatenation
            quantized with one range per half (`dgq.split`), and for Q-Diffusion the activation
            step sizes learned by block reconstruction (LSQ, `dgq.act_recon`).
        execution (`str`, defaults to `"simulated"`): `"simulated"` = fake quantization in fp32;
            `"int8"` = integer GEMMs on the codes (`dgq.int8`; W <= 8, A = 8), same results up to
            fp32 rounding.
        weight_rounding (`str`, defaults to `"nearest"`): `"adaround"` = the rounding learned by
            BRECQ block reconstruction (`python -m dgq reconstruct`; the paper's SD recipe);
            `"adaround-tiar"` = the same with TFMQ-DM's temporal information block reconstructed
            as one unit first (`python -m dgq reconstruct --tiar`).
    """

    w_bits: int = 8
    a_bits: int = 8
    style: BaselineStyle = BaselineStyle.TFMQ
    execution: str = "simulated"
    weight_rounding: str = "nearest"
    method: ClassVar[str] = "baseline"

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits, W_BITS)
        _check_bits("a_bits", self.a_bits, A_BITS)
        try:
            object.__setattr__(self, "style", BaselineStyle(self.style))
        except ValueError:
            raise ValueError(f"style={self.style!r}; allowed: {[s.value for s in BaselineStyle]}") from None
        if self.style.paper:  # the papers' recipe rounds weights with AdaRound (TFMQ-DM: with TIAR), never to nearest
            object.__setattr__(self, "weight_rounding", "adaround" if self.style.one_range else "adaround-tiar")
        _check_execution(self)
        _check_rounding(self)

    def label(self) -> str:
        name = "Q-Diffusion" if self.style.one_range else "TFMQ-DM"
        if self.style.paper:
            return f"{name} (paper recipe) W{self.w_bits}A{self.a_bits}"
        return (f"{name} W{self.w_bits}A{self.a_bits}" + rounding_label(self.weight_rounding)
                + (" int8" if self.execution == "int8" else ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(method=self.style.value, style=self.style.value, version=CONFIG_VERSION)
        return _drop_default_execution(d)


@dataclass(frozen=True)
class DGQConfig:
    """DGQ: outlier-preserving group quantization + attention-aware quantization + time-aware sets.

    Args:
        w_bits (`int`, defaults to 8): weight bits (shared with the baselines).
        a_bits (`int`, defaults to 8): activation and attention-probability bits.
        groups (`int`, defaults to 16): K, the number of K-means groups (1, 2, 4, 8, 16).
        use_groups (`bool`, defaults to True): off = per-tensor activations (the ablation).
        axis (`str`, defaults to `"auto"`): grouping axis rule (`auto` = argmax of D_d).
        log_quant (`bool`, defaults to True): base-2 log quantizer for the probabilities
            (off = uniform, as the baselines).
        start_token (`bool`, defaults to True): keep the `<start>` column (and key row) of
            cross-attention in full precision and out of the scale.
        dynamic_scale (`bool`, defaults to True): log scale from the current tensor's max;
            off = a calibrated per-timestep scale (best of the 0.999/0.9999/0.99999 quantiles).
        scale_scope (`str`, defaults to `"sample"`): dynamic max per prompt or per batch.
        time_aware (`bool`, defaults to True): one parameter set per calibrated timestep
            (off = one set for all timesteps).
        execution (`str`, defaults to `"simulated"`): see `BaselineConfig`.
        weight_rounding (`str`, defaults to `"nearest"`): see `BaselineConfig`.
    """

    w_bits: int = 8
    a_bits: int = 8
    groups: int = 16
    use_groups: bool = True
    axis: Axis = Axis.AUTO
    log_quant: bool = True
    start_token: bool = True
    dynamic_scale: bool = True
    scale_scope: ScaleScope = ScaleScope.SAMPLE
    time_aware: bool = True
    execution: str = "simulated"
    weight_rounding: str = "nearest"
    method: ClassVar[str] = "dgq"

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits, W_BITS)
        _check_bits("a_bits", self.a_bits, A_BITS)
        if self.groups not in GROUP_CHOICES:
            raise ValueError(f"groups={self.groups!r}; allowed: {list(GROUP_CHOICES)}")
        for name, enum in (("axis", Axis), ("scale_scope", ScaleScope)):
            try:
                object.__setattr__(self, name, enum(getattr(self, name)))
            except ValueError:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {[e.value for e in enum]}") from None
        _check_execution(self)
        _check_rounding(self)

    @property
    def effective_groups(self) -> int:
        return self.groups if self.use_groups else 1

    def label(self) -> str:
        off = [n for n, v in (("groups", self.use_groups), ("log", self.log_quant), ("start", self.start_token),
                              ("dynamic", self.dynamic_scale), ("time", self.time_aware)) if not v]
        extra = (" axis=" + self.axis.value) if self.axis is not Axis.AUTO else ""
        extra += (" no-" + ",no-".join(off)) if off else ""
        extra += rounding_label(self.weight_rounding)
        extra += " int8" if self.execution == "int8" else ""
        return f"DGQ W{self.w_bits}A{self.a_bits} K={self.effective_groups}{extra}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(axis=self.axis.value, scale_scope=self.scale_scope.value, method="dgq", version=CONFIG_VERSION)
        return _drop_default_execution(d)


QuantConfig = FPConfig | BaselineConfig | DGQConfig
FP = FPConfig()


def learns_step_sizes(config: Any) -> bool:
    """Whether `config` runs on learned activation step sizes (`qdiff-paper`, `dgq.act_recon`),
    which are stored per (W, A) and tied to the weights' rounding and the calibration."""
    return isinstance(config, BaselineConfig) and config.style is BaselineStyle.QDIFF_PAPER


# Method names (CLI, app, eval settings, saved dicts) -> (config type, fixed fields). A new method
# adds its config class above, one line here, and its rules module in `dgq.methods`.
METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "fp": (FPConfig, {}),
    "qdiff": (BaselineConfig, {"style": BaselineStyle.QDIFF}),
    "tfmq": (BaselineConfig, {"style": BaselineStyle.TFMQ}),
    "qdiff-paper": (BaselineConfig, {"style": BaselineStyle.QDIFF_PAPER}),
    "tfmq-paper": (BaselineConfig, {"style": BaselineStyle.TFMQ_PAPER}),
    "dgq": (DGQConfig, {}),
}
_LEGACY_NAMES = {"baseline": "tfmq"}  # dicts written before the baselines had their own names


def _build(method: Any, fields: dict[str, Any]) -> QuantConfig:
    name = _LEGACY_NAMES.get(method, method)
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    cls, fixed = METHODS[name]
    if cls is FPConfig:
        return FP
    if "style" in fields and "style" in fixed:  # a saved baseline dict names its style twice
        fixed = {}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"method {name!r} takes no option(s) {', '.join(unknown)}")
    return cls(**{**fields, **fixed})


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Inverse of `to_dict` (validates everything again)."""
    d = dict(d)
    version = d.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ValueError(f"config version {version} is not supported (expected {CONFIG_VERSION})")
    return _build(d.pop("method", None), d)


def make_config(method: str, w_bits: int = 8, a_bits: int = 8, execution: str = "simulated",
                weight_rounding: str = "nearest", **dgq_options: Any) -> QuantConfig:
    """Build a config from a method name as used by the CLI and the app (`execution` and
    `weight_rounding` are ignored for FP, which has nothing to quantize)."""
    return _build(method, dict(w_bits=w_bits, a_bits=a_bits, execution=execution, weight_rounding=weight_rounding,
                               **dgq_options))

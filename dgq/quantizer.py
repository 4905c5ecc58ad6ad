"""From (calibration, config) to the quantizer of every site, and applying it to a tensor.

`QuantParams` is the only place that knows how each method reads the statistics:

| site | FP | qdiff | tfmq | DGQ |
|---|---|---|---|---|
| layer input, Q, K, V | — | per-tensor, MSE over all steps | per-tensor EMA min/max per step | K groups on the D_d axis per step |
| 2-D input (time MLP) | — | per-tensor MSE | per-tensor per step | per-tensor per step |
| probabilities | — | uniform z=0, MSE | uniform z=0, max per step | log2, dynamic max, `<start>` FP |

Derived parameters are cached per (site, timestep); building them costs a division per group,
which is why a bit-width change never recalibrates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from dgq import primitives as P
from dgq.calibration import ALL, Calibration
from dgq.config import OFF, Axis, BaselineConfig, BaselineStyle, DGQConfig, QuantConfig, ScaleScope


@dataclass(frozen=True)
class ActQuant:
    """How one site's input is quantized at one timestep."""

    bits: int
    mode: str  # "tensor" | "channel" | "pixel"
    scale: torch.Tensor
    zero: torch.Tensor
    start_fp: bool = False  # cross-attention key: row 0 (<start>) kept in FP
    labels: torch.Tensor | None = None  # group id per index (for display)
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def prepared(self, device: torch.device, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """(scale, 1/scale, lowest code − z, highest code − z), shaped to broadcast against an
        input viewed as `shape` and placed on `device`; built once per (device, shape).

        ``s·(clamp(round(x/s) + z, 0, 2^b−1) − z) = s·clamp(round(x·(1/s)), −z, 2^b−1−z)``: four
        elementwise ops per call instead of seven."""
        key = (device, shape)
        hit = self._on_device.get(key)
        if hit is None:
            s, z = self.scale.float(), self.zero.float()
            hit = tuple(t.view(shape).to(device) for t in (s, 1.0 / s, -z, (2**self.bits - 1) - z))
            self._on_device[key] = hit
        return hit


@dataclass(frozen=True)
class ProbQuant:
    """How one attention module's softmax output is quantized."""

    bits: int
    log: bool
    start_fp: bool
    dynamic: bool
    scope: str  # "sample" | "batch"
    scale: float | None = None  # static scale (log: s; uniform: step)


class QuantParams:
    """Parameters of one config over one calibration; safe to share between threads."""

    def __init__(self, calibration: Calibration, config: QuantConfig) -> None:
        if isinstance(config, (BaselineConfig, DGQConfig)) and calibration is None:
            raise ValueError("quantized configs need a calibration: call dgq.calibrate(pipe, ...) first")
        self.calib = calibration
        self.config = config
        self.w_bits = config.w_bits
        self.a_bits = config.a_bits
        self._act: dict[tuple[str, int], ActQuant | None] = {}
        self._prob: dict[tuple[str, int], ProbQuant | None] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ timesteps
    @property
    def single_set(self) -> bool:
        c = self.config
        return (isinstance(c, BaselineConfig) and c.style is BaselineStyle.QDIFF) or (
            isinstance(c, DGQConfig) and not c.time_aware)

    def key_for(self, t: float) -> int:
        return ALL if self.single_set else self.calib.nearest_t(t)

    # ------------------------------------------------------------------ activations
    def act(self, site: str, t_key: int) -> ActQuant | None:
        key = (site, t_key)
        if key not in self._act:
            with self._lock:
                if key not in self._act:
                    self._act[key] = self._build_act(site, t_key)
        return self._act[key]

    def _build_act(self, site: str, t_key: int) -> ActQuant | None:
        bits = self.a_bits
        if bits >= OFF:
            return None
        calib, cfg = self.calib, self.config
        if site not in calib.sites:
            raise KeyError(f"site {site!r} was not seen during calibration; recalibrate this model")
        info = calib.sites[site]
        start_fp = isinstance(cfg, DGQConfig) and cfg.start_token and info.kind == "k" and info.cross
        sfx = "_x0" if start_fp else ""
        if isinstance(cfg, BaselineConfig) and cfg.style is BaselineStyle.QDIFF:
            lo, hi = P.mse_search(calib.tensors[f"{site}|sample"], bits)
            s, z = P.uniform_qparams(lo, hi, bits)
            return ActQuant(bits, "tensor", s, z)
        k = cfg.effective_groups if isinstance(cfg, DGQConfig) else 1
        if k == 1 or info.kind not in ("conv", "linear", "q", "k", "v"):
            lo, hi = calib.get(site, "ema_min" + sfx, t_key), calib.get(site, "ema_max" + sfx, t_key)
            s, z = P.uniform_qparams(lo, hi, bits)
            return ActQuant(bits, "tensor", s, z, start_fp)
        variant = "x0" if start_fp else "full"
        axis = cfg.axis.value if cfg.axis is not Axis.AUTO else calib.chosen_axis(site, t_key, variant)
        labels, glo, ghi = calib.groups(site, t_key, axis, k, variant)
        gs, gz = P.uniform_qparams(glo, ghi, bits)
        s, z = gs[labels], gz[labels]
        if start_fp and axis == "pixel":  # token 0 is not quantized: give it a neutral slot
            s = torch.cat([torch.ones(1), s])
            z = torch.cat([torch.zeros(1), z])
            labels = torch.cat([torch.full((1,), -1, dtype=labels.dtype), labels])
        return ActQuant(bits, axis, s, z, start_fp, labels)

    # ------------------------------------------------------------------ probabilities
    def prob(self, site: str, t_key: int) -> ProbQuant | None:
        key = (site, t_key)
        if key not in self._prob:
            with self._lock:
                if key not in self._prob:
                    self._prob[key] = self._build_prob(site, t_key)
        return self._prob[key]

    def _build_prob(self, site: str, t_key: int) -> ProbQuant | None:
        bits, cfg, calib = self.a_bits, self.config, self.calib
        if bits >= OFF:
            return None
        if site not in calib.sites:
            raise KeyError(f"attention {site!r} was not seen during calibration; recalibrate this model")
        cross = calib.sites[site].cross
        hist_rest, hist0 = calib.get(site, "hist", t_key), calib.get(site, "hist0", t_key)
        if isinstance(cfg, BaselineConfig):
            mse = cfg.style is BaselineStyle.QDIFF
            s = P.uniform_prob_scale(hist_rest + hist0, float(calib.get(site, "pmax", t_key)), bits, mse)
            return ProbQuant(bits, log=False, start_fp=False, dynamic=False, scope="batch", scale=s)
        assert isinstance(cfg, DGQConfig)
        start_fp = cfg.start_token and cross
        scope = cfg.scale_scope.value
        if cfg.dynamic_scale:
            return ProbQuant(bits, cfg.log_quant, start_fp, True, scope)
        hist = hist_rest if start_fp else hist_rest + hist0
        if cfg.log_quant:
            s = P.static_log_scale(hist, bits)
        else:
            top = calib.get(site, "pmax_rest" if start_fp else "pmax", t_key)
            s = P.uniform_prob_scale(hist, float(top), bits, mse=False)
        return ProbQuant(bits, cfg.log_quant, start_fp, False, scope, s)


# ----------------------------------------------------------------------------- application
def _shape(kind: str, mode: str, x: torch.Tensor) -> tuple[int, ...]:
    """Broadcast shape of a site's per-index parameters."""
    if mode == "tensor":
        return ()
    if kind == "conv":  # [B, C, H, W]
        return (1, -1, 1, 1) if mode == "channel" else (1, 1, *x.shape[2:])
    if kind in ("linear", "cols"):  # [B, N, C]; im2col columns [B, C·k·k, L] use pixel = last
        if kind == "cols":
            return (1, 1, -1)
        return (1, 1, -1) if mode == "channel" else (1, -1, 1)
    # q/k/v: [B, heads, T, d]
    return (1, 1, 1, -1) if mode == "channel" else (1, 1, -1, 1)


def fake_quant_prepared(x: torch.Tensor, q: ActQuant, kind: str) -> torch.Tensor:
    """Quantize-dequantize with the precomputed parameters (fp32 arithmetic, x's dtype out)."""
    s, inv, lo, hi = q.prepared(x.device, _shape(kind, q.mode, x))
    xf = x.float()
    return torch.round(xf * inv).clamp_(lo, hi).mul_(s).to(x.dtype)


def apply_act(x: torch.Tensor, q: ActQuant, kind: str) -> torch.Tensor:
    """Fake-quantize a site's input (fp32 arithmetic, result in x's dtype)."""
    n = q.scale.numel()
    if q.mode == "pixel":
        want = x.shape[2] * x.shape[3] if kind == "conv" else x.shape[-2]
        if n != want:
            raise RuntimeError(
                f"pixel groups were calibrated for {n} positions but this input has {want}: "
                "the resolution differs from the calibration's; recalibrate at this resolution")
    out = fake_quant_prepared(x, q, kind)
    if q.start_fp:
        out[:, :, 0] = x[:, :, 0]
    return out


def apply_prob(p: torch.Tensor, q: ProbQuant) -> torch.Tensor:
    """Quantize softmax probabilities [B, heads, Nq, Nk] (fp32 in, fp32 out)."""
    rest = p[..., 1:] if q.start_fp else p
    if q.dynamic:
        if q.scope == "sample":
            top = rest.amax(dim=(1, 2, 3), keepdim=True)
        else:
            top = rest.amax()
        scale = top if q.log else top / (2**q.bits - 1)
    else:
        scale = torch.tensor(q.scale, device=p.device)
    if q.log:
        qrest = P.log_fake_quant(rest, scale, q.bits)
    else:
        qrest = P.fake_quant(rest, scale, torch.zeros((), device=p.device), q.bits)
    if q.start_fp:
        return torch.cat([p[..., :1], qrest], dim=-1)
    return qrest

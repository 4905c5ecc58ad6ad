"""From (calibration, config) to the quantizer of every site, and applying it to a tensor.

`QuantParams` holds the mechanics every method shares and asks the rules each method registers
(`dgq.methods`, one module per method) where they differ; what the built-in methods read:

| site | FP | qdiff | tfmq | DGQ |
|---|---|---|---|---|
| layer input, Q, K, V | — | per-tensor, MSE over all steps | per-tensor EMA min/max per step | K groups on the D_d axis per step |
| 2-D input (time MLP) | — | per-tensor MSE | per-tensor per step | per-tensor per step |
| probabilities | — | uniform z=0, MSE | uniform z=0, max per step | log2, dynamic max, `<start>` FP |

(`qdiff-paper` replaces the layer inputs', Q/K/V and probability ranges with step sizes learned by
block reconstruction, `dgq.act_recon`.)

Derived parameters are cached per (site, timestep); building them costs a division per group,
which is why a bit-width change never recalibrates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from dgq import kernels
from dgq import primitives as P
from dgq.calibration import ALL, Calibration
from dgq.config import OFF, Axis, QuantConfig, ScaleScope
from dgq.methods import MethodInputs, ProbQuant, rules_for


@dataclass(frozen=True)
class ActQuant:
    """How one site's input is quantized at one timestep."""

    bits: int
    mode: str  # "tensor" | "channel" | "pixel"
    scale: torch.Tensor
    zero: torch.Tensor
    start_fp: bool = False  # cross-attention key: row 0 (<start>) kept in FP
    labels: torch.Tensor | None = None  # group id per index (for display)
    derived: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)
    _by_input: dict = field(default_factory=dict, repr=False, compare=False)  # input key → (params, kernel plan)

    def prepared(self, device: torch.device, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """(scale, 1/scale, lowest code − z, highest code − z), shaped to broadcast against an
        input viewed as `shape` and placed on `device`; built once per (device, shape).

        ``s·(clamp(round(x/s) + z, 0, 2^b−1) − z) = s·clamp(round(x·(1/s)), −z, 2^b−1−z)``: four
        elementwise ops per call instead of seven. `QuantParams` fills `derived` for a whole site
        at once (all timesteps in one op), so a bit-width change costs no per-step tensor maths."""
        key = (device, shape)
        hit = self._on_device.get(key)
        if hit is None:
            parts = self.derived if self.derived is not None else derive(self.scale, self.zero, self.bits)
            hit = tuple(t.view(shape).to(device) for t in parts)
            self._on_device[key] = hit
        return hit


def derive(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """(s, 1/s, −z, 2^b−1−z) in fp32 for any stack of scales/zero-points (elementwise)."""
    s, z = scale.float(), zero.float()
    return s, 1.0 / s, -z, (2**bits - 1) - z


class QuantParams:
    """Parameters of one config over one calibration; safe to share between threads."""

    def __init__(self, calibration: Calibration, config: QuantConfig, tables: tuple | None = None,
                 device: torch.device | str = "cpu", inputs: MethodInputs | None = None) -> None:
        """`tables` shares the built activation/probability parameters of a config that differs
        only in `w_bits` (they do not depend on it); `device` is where the model runs (parameters
        are moved there once per site, already shaped for the layer's input); `inputs`: what
        some methods need besides the calibration (split inputs, learned ranges)."""
        self.rules = rules_for(config)
        if self.rules.needs_calibration(config) and calibration is None:
            raise ValueError("quantized configs need a calibration: call dgq.calibrate(pipe, ...) first")
        self.calib = calibration
        self.config = config
        self.w_bits = config.w_bits
        self.a_bits = config.a_bits
        self.device = torch.device(device)
        self.inputs = inputs or MethodInputs()
        self._act: dict[tuple[str, int], ActQuant | None] = {}
        self._prob: dict[tuple[str, int], ProbQuant | None] = {}
        self._lock = threading.Lock()
        if tables is not None:
            self._act, self._prob, self._lock = tables

    @property
    def tables(self) -> tuple:
        return self._act, self._prob, self._lock

    # ------------------------------------------------------------------ timesteps
    @property
    def single_set(self) -> bool:
        return self.rules.single_set(self.config)

    def key_for(self, t: float) -> int:
        return ALL if self.single_set else self.calib.nearest_t(t)

    # ------------------------------------------------------------------ activations
    def act(self, site: str, t_key: int) -> ActQuant | None:
        key = (site, t_key)
        try:
            return self._act[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._act:
                self._act.update(self._build_site(site))
                if key not in self._act:  # a timestep key outside this config's set
                    self._act[key] = self._build_act(site, t_key)
        return self._act[key]

    def build_all(self) -> "QuantParams":
        """Build every site's parameters for every timestep now rather than on first use (what
        a bit-width change costs; `Studio.prepare` calls it)."""
        keys = self._site_keys()
        for site, info in self.calib.sites.items():
            if info.kind == "p":
                for t in keys:
                    self.prob(site, t)
            else:
                self.act(site, keys[0])
        return self

    def _site_keys(self) -> list[int]:
        return [ALL] if self.single_set else [t for t in self.calib.t_keys if t != ALL]

    def _build_site(self, site: str) -> dict[tuple[str, int], ActQuant | None]:
        """Every timestep of one site in a few stacked tensor ops (what makes a bit switch cheap:
        the statistics and K-means labels are bit-width independent, only the scales change)."""
        bits, calib, cfg = self.a_bits, self.calib, self.config
        keys = self._site_keys()
        if bits >= OFF:
            return {(site, t): None for t in keys}
        if site not in calib.sites:
            raise KeyError(f"site {site!r} was not seen during calibration; recalibrate this model")
        info, rules = calib.sites[site], self.rules
        fixed = self._fixed(site, keys)
        if fixed is not None:
            return fixed
        if rules.static_mse_range(cfg):
            return {(site, t): self._build_act(site, t) for t in keys}
        start_fp = rules.start_fp(cfg, info)
        k = rules.groups(cfg)
        if k == 1 or info.kind not in ("conv", "linear", "q", "k", "v"):
            sfx = "_x0" if start_fp else ""
            rows = [calib.t_index(t) for t in keys]
            lo = calib.tensors[f"{site}|ema_min{sfx}"][rows]
            hi = calib.tensors[f"{site}|ema_max{sfx}"][rows]
            s, z = P.uniform_qparams(lo, hi, bits)
            return {(site, t): q for t, q in zip(keys, self._stacked(info, "tensor", s, z, None, start_fp))}
        variant = "x0" if start_fp else "full"
        by_axis: dict[str, list[int]] = {}
        rule = rules.axis(cfg)
        for t in keys:
            axis = rule.value if rule is not Axis.AUTO else calib.chosen_axis(site, t, variant)
            by_axis.setdefault(axis, []).append(t)
        out: dict[tuple[str, int], ActQuant | None] = {}
        for axis, ts in by_axis.items():
            parts = [calib.groups(site, t, axis, k, variant) for t in ts]
            labels = torch.stack([p[0] for p in parts])  # [T, N]
            gs, gz = P.uniform_qparams(torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts]), bits)
            s, z = gs.gather(1, labels), gz.gather(1, labels)  # [T, N]
            if start_fp and axis == "pixel":  # token 0 is not quantized: give it a neutral slot
                s = torch.cat([torch.ones(len(ts), 1), s], 1)
                z = torch.cat([torch.zeros(len(ts), 1), z], 1)
                labels = torch.cat([torch.full((len(ts), 1), -1, dtype=labels.dtype), labels], 1)
            out.update(((site, t), q) for t, q in zip(ts, self._stacked(info, axis, s, z, labels, start_fp)))
        return out

    def _fixed(self, site: str, keys: list[int]) -> dict[tuple[str, int], ActQuant | None] | None:
        """The parameters the method sets itself for this site (`MethodRules.fixed_act`), if any."""
        got = self.rules.fixed_act(self.config, self.calib, site, keys, self.a_bits, self.inputs)
        if got is None:
            return None
        info = self.calib.sites[site]
        out: dict[tuple[str, int], ActQuant | None] = {}
        for mode in {m for m, *_ in got.values()}:
            ts = [t for t in keys if got[t][0] == mode]
            s = torch.stack([torch.as_tensor(got[t][1]).float() for t in ts])
            z = torch.stack([torch.as_tensor(got[t][2]).float() for t in ts])
            labels = torch.stack([got[t][3] for t in ts]) if got[ts[0]][3] is not None else None
            out.update(((site, t), q) for t, q in zip(ts, self._stacked(info, mode, s, z, labels, False)))
        return out

    def _stacked(self, info, mode: str, s: torch.Tensor, z: torch.Tensor, labels: torch.Tensor | None,
                 start_fp: bool) -> list[ActQuant]:
        """One `ActQuant` per row of stacked [T, N] (or [T]) scales, with the applied form
        (s, 1/s, −z, 2^b−1−z) moved to the device and shaped for the site's input in one go."""
        bits, n = self.a_bits, s.shape[0]
        shape = _site_shape(info, mode)
        parts = [x.to(self.device).reshape(n, *shape) for x in derive(s, z, bits)]
        lab = labels.unbind(0) if labels is not None else (None,) * n
        out = []
        for si, zi, li, *row in zip(s.unbind(0), z.unbind(0), lab, *(x.unbind(0) for x in parts)):
            q = ActQuant(bits, mode, si, zi, start_fp, li, derived=tuple(row))
            q._on_device[(self.device, shape)] = q.derived
            out.append(q)
        return out

    def _build_act(self, site: str, t_key: int) -> ActQuant | None:
        """One (site, timestep); the reference the stacked `_build_site` must equal (tested)."""
        bits = self.a_bits
        if bits >= OFF:
            return None
        calib, cfg = self.calib, self.config
        if site not in calib.sites:
            raise KeyError(f"site {site!r} was not seen during calibration; recalibrate this model")
        info, rules = calib.sites[site], self.rules
        fixed = self._fixed(site, [t_key])
        if fixed is not None:
            return fixed[(site, t_key)]
        start_fp = rules.start_fp(cfg, info)
        sfx = "_x0" if start_fp else ""
        if rules.static_mse_range(cfg):
            lo, hi = P.mse_search(calib.tensors[f"{site}|sample"], bits)
            s, z = P.uniform_qparams(lo, hi, bits)
            return ActQuant(bits, "tensor", s, z)
        k = rules.groups(cfg)
        if k == 1 or info.kind not in ("conv", "linear", "q", "k", "v"):
            lo, hi = calib.get(site, "ema_min" + sfx, t_key), calib.get(site, "ema_max" + sfx, t_key)
            s, z = P.uniform_qparams(lo, hi, bits)
            return ActQuant(bits, "tensor", s, z, start_fp)
        variant = "x0" if start_fp else "full"
        rule = rules.axis(cfg)
        axis = rule.value if rule is not Axis.AUTO else calib.chosen_axis(site, t_key, variant)
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
        bits, calib = self.a_bits, self.calib
        if bits >= OFF:
            return None
        if site not in calib.sites:
            raise KeyError(f"attention {site!r} was not seen during calibration; recalibrate this model")
        fixed = self.rules.fixed_prob(self.config, site, bits, self.inputs)
        return fixed if fixed is not None else self.rules.prob(self.config, calib, site, t_key, bits)


# ----------------------------------------------------------------------------- application
def _shape(kind: str, mode: str, spatial: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Broadcast shape of a site's per-index parameters (`spatial`: H, W of a conv input)."""
    if mode == "tensor":
        return ()
    if kind == "conv":  # [B, C, H, W]
        return (1, -1, 1, 1) if mode == "channel" else (1, 1, *spatial)
    if kind in ("linear", "cols"):  # [B, N, C]; im2col columns [B, C·k·k, L] use pixel = last
        if kind == "cols":
            return (1, 1, -1)
        return (1, 1, -1) if mode == "channel" else (1, -1, 1)
    # q/k/v: [B, heads, T, d]
    return (1, 1, 1, -1) if mode == "channel" else (1, 1, -1, 1)


def _site_shape(info, mode: str) -> tuple[int, ...]:
    """The broadcast shape `apply_act` will ask for at this site (unfolded convs use "cols")."""
    kind = "cols" if info.kind == "conv" and mode == "pixel" and info.needs_unfold() else info.kind
    return _shape(kind, mode, tuple(info.pixel_shape))


def fake_quant_prepared(x: torch.Tensor, q: ActQuant, kind: str, keep_first: bool = False,
                        slot: object = None) -> torch.Tensor:
    """Quantize-dequantize with the precomputed parameters (fp32 arithmetic, x's dtype out);
    `keep_first` leaves index 0 of dim 2 (attention's token 0) unquantized. With a `slot` (a
    caller that consumes the result before it quantizes again, e.g. a layer's own input) the
    fused kernels write into that slot's reusable buffer (`kernels.out_buffer`).

    On CPU in fp32 this is one pass of the fused kernel (`dgq.kernels`), bit-identical to the
    eager ops below. Attention's q/k/v — [B, heads, T, d] views of contiguous [B, T, heads, d]
    tensors — come back contiguous in [B, heads, T, d] order from the kernel (the copy the
    attention matmuls would otherwise make is folded into the quantizer's pass). Eager: multiply
    by 1/s into one fresh buffer, then round, clamp and rescale in place (a fresh buffer per op
    costs page faults that outweigh the arithmetic; `clamp_` with tensor bounds is 3–5× slower
    than `maximum` + `minimum` on CPU when the bounds broadcast over inner axes). Everything that
    depends only on the input's shape is worked out once and kept on `q` (one dict lookup per
    call): these tensors are small, so per-call Python work is a large share of the cost."""
    key = (kind, x.shape, x.stride(), x.dtype, x.device, torch.get_num_threads(), keep_first)
    plan = q._by_input.get(key)
    if plan is None:
        plan = q._by_input[key] = _plan(x, q, kind, key, keep_first)
    params, fused, _ = plan
    if fused is not None and not x.requires_grad:
        call, args, heads = fused
        y = kernels.out_buffer(slot, x.shape) if slot is not None else torch.empty(x.shape, dtype=torch.float32)
        call(x.data_ptr(), y.data_ptr(), args)
        if heads:
            return y  # token 0 kept by the kernel
    else:
        s, inv, lo, hi = params
        y = x.float().mul_(inv) if x.dtype != torch.float32 else torch.mul(x, inv)
        y.round_()
        torch.maximum(y, lo, out=y)
        torch.minimum(y, hi, out=y)
        y.mul_(s)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
    if keep_first:
        y[:, :, 0] = x[:, :, 0]
    return y


def _plan(x: torch.Tensor, q: ActQuant, kind: str, key: tuple, keep_first: bool = False) -> tuple:
    """(parameters shaped for x, kernel call or None, the call's constants) for inputs like x
    (`dgq.kernels.plan` decides whether and how the fused kernels take them). Cheap: it runs once
    per (site, timestep) after a bit-width change."""
    shp = _shape(kind, q.mode, tuple(x.shape[2:]))
    params = q.prepared(x.device, shp)
    fused, args = kernels.plan(x, params, shp, q.mode, kind, key, keep_first)
    return params, fused, args


def apply_act(x: torch.Tensor, q: ActQuant, kind: str, slot: object = None) -> torch.Tensor:
    """Fake-quantize a site's input (fp32 arithmetic, result in x's dtype); `slot`: see
    `fake_quant_prepared`."""
    if q.mode == "pixel":
        n = q.scale.numel()
        want = x.shape[2] * x.shape[3] if kind == "conv" else x.shape[-2]
        if n != want:
            raise RuntimeError(
                f"pixel groups were calibrated for {n} positions but this input has {want}: "
                "the resolution differs from the calibration's; recalibrate at this resolution")
    return fake_quant_prepared(x, q, kind, keep_first=q.start_fp, slot=slot)


def apply_prob(p: torch.Tensor, q: ProbQuant, inplace: bool = False) -> torch.Tensor:
    """Quantize softmax probabilities [B, heads, Nq, Nk] (fp32 in, fp32 out; `inplace=True` lets
    the log quantizer overwrite `p`, which the attention processor no longer needs). With
    `<start>` in FP the scale comes from the other keys and column 0 is put back after quantizing
    the whole tensor in place (no concatenation)."""
    if q.log and q.dynamic and inplace:
            # one fused call on CPU (max, then quantize; bit-identical), the <start> column skipped
        done = kernels.log_quant_dynamic_(p, q.bits, q.scope is ScaleScope.SAMPLE, q.start_fp)
        if done is not None:
            return done
    rest = p[..., 1:] if q.start_fp else p
    if q.dynamic:
        if q.scope is ScaleScope.SAMPLE:
            top = rest.amax(dim=(1, 2, 3), keepdim=True)
        else:
            top = rest.amax()
        scale = top if q.log else top / (2**q.bits - 1)
    else:
        scale = torch.tensor(q.scale, device=p.device)
    if q.log and inplace:
            # one fused pass on CPU (bit-identical); the <start> column is skipped, not restored
        done = kernels.log_quant_(p, scale, q.bits, clamp=not q.dynamic, skip_first=q.start_fp)
        if done is not None:
            return done
    col0 = p[..., :1].clone() if q.start_fp else None
    if q.log:
        # a dynamic scale is the max of the quantized part: nothing lies above it (the <start>
        # column may, but it is put back below), so the clamp onto code 0 has nothing to do
        out = P.log_fake_quant(p, scale, q.bits, inplace=inplace, at_most_scale=q.dynamic)
    else:
        out = P.fake_quant(p, scale, torch.zeros((), device=p.device), q.bits)
    if col0 is not None:
        out[..., :1] = col0
    return out

"""Gradio callbacks: check inputs, call the engine, format what the UI shows.

Every callback turns library errors (ValueError, KeyError, `dgq.ModelLoadError`, …) into
`gr.Error` with the library's one-line message — a user never sees a stack trace and the server
keeps serving. Per-user data is the small, picklable dict kept in `gr.State`:
``{"request": {...}, "baseline": config dict, "dgq": config dict}``.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any, Callable

import gradio as gr
import numpy as np

import dgq
from dgq.bops import si
from dgq.config import learns_step_sizes

from app import constants as C
from app import plots
from app.engine import Engine, Request, Result
from app.gpu import gpu
from app.inputs import as_bool, as_choice, as_float, as_int, as_text, input_error
from app.models import ModelPolicy

log = logging.getLogger(__name__)

COLUMNS = ("fp", "baseline", "dgq")


def user_errors(fn: Callable) -> Callable:
    """Turn every exception into a `gr.Error` with a one-line message (no stack trace).

    Shown to the user: our own input errors, a model's public load error and the library's
    config validation (ValueError: "w_bits=9 is out of range; allowed: …"). Anything else is
    logged with its traceback and reported as an internal error with a reference, never with
    its message (which may name server paths or internals)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except dgq.ModelLoadError as e:
            raise gr.Error(e.public, print_exception=False) from None
        except ValueError as e:
            raise gr.Error(str(e).splitlines()[0][:500], print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the app must keep serving
            ref = uuid.uuid4().hex[:8]
            log.exception("unexpected error in %s (reference %s)", fn.__name__, ref)
            raise gr.Error(f"internal error ({type(e).__name__}, reference {ref}); the server log has the details",
                           print_exception=False) from None

    return wrapper


# ----------------------------------------------------------------------------- input checks
def make_request(prompt: Any, seed: Any, steps: Any, guidance: Any, model: Any, policy: ModelPolicy) -> Request:
    """Validate the FP-defining inputs (server-side caps included); `model` through the policy."""
    prompt = as_text("prompt", prompt, C.MAX_PROMPT_CHARS)
    return Request(policy.resolve(model), prompt.strip(), as_int("seed", seed, 0, C.MAX_SEED),
                   as_int("steps", steps, 1, C.MAX_STEPS), as_float("guidance", guidance, 0.0, C.MAX_GUIDANCE))


def make_configs(w_bits: Any, a_bits: Any, groups: Any, baseline: Any, use_groups: Any = True, axis: Any = "auto",
                 log_quant: Any = True, start_token: Any = True, dynamic_scale: Any = True,
                 time_aware: Any = True, weight_rounding: Any = "nearest",
                 execution: Any = "simulated") -> tuple[Any, Any]:
    """(baseline config, DGQ config) from the quantization controls, validated. Weight rounding
    and execution apply to both columns (the baselines share DGQ's weights)."""
    w = as_int("w_bits", w_bits, C.W_MIN, C.W_MAX)
    a = as_int("a_bits", a_bits, C.A_MIN, C.A_MAX)
    k = as_choice("groups", groups, C.GROUPS)
    baseline = as_choice("baseline", baseline, list(C.BASELINES))
    axis = as_choice("axis", axis, C.AXES)
    flags = {name: as_bool(name, v) for name, v in (
        ("use_groups", use_groups), ("log_quant", log_quant), ("start_token", start_token),
        ("dynamic_scale", dynamic_scale), ("time_aware", time_aware))}
    rounding = as_choice("weight_rounding", weight_rounding, C.ROUNDINGS)
    execution = as_choice("execution", execution, C.EXECUTIONS)
    if execution == "int8" and a != 8:
        raise input_error("execution", f"int8 runs integer GEMMs on 8-bit activations, not a_bits={a}",
                          "simulated, or int8 with a_bits = 8")
    if execution == "int8" and rounding == "adaround":
        raise input_error("execution", "int8 packs round-to-nearest weight codes, not the learned rounding",
                          "simulated with adaround, or int8 with nearest")
    opts = dict(execution=execution, weight_rounding=rounding)
    if baseline.endswith("-paper") and execution == "int8":
        raise input_error("execution", f"{C.BASELINES[baseline]} uses learned (AdaRound) weights, which run simulated",
                          "simulated, or int8 with the tfmq or qdiff baseline")
    return (dgq.make_config(baseline, w, a, **opts),
            dgq.make_config("dgq", w, a, groups=k, axis=axis, **opts, **flags))


def check_rounding(studio: Any, config: Any) -> None:
    """A learned rounding (and, for Q-Diffusion's paper recipe, learned step sizes) is offered
    where one is stored for the model's weights at that W (and A)."""
    name, w, a = config.weight_rounding, config.w_bits, config.a_bits
    style = getattr(config, "style", None)
    field = "baseline" if style is not None and style.paper else "weight_rounding"
    if name != "nearest" and not studio.has_rounding(w, name):
        have = [b for b in range(C.W_MIN, C.W_MAX + 1) if studio.has_rounding(b, name)]
        where = f"this model has one at W{', W'.join(map(str, have))}" if have else "this model has none"
        tiar = " --tiar" if name == "adaround-tiar" else ""
        raise input_error(field, f"no learned {name} weight rounding at w_bits={w}; {where}",
                          f"another setting, or W where `python -m dgq reconstruct --w-bits W{tiar}` has been run")
    if learns_step_sizes(config) and not studio.has_act_ranges(w, a):
        raise input_error("baseline", f"no learned Q-Diffusion step sizes at W{w}A{a} for this model",
                          "another baseline or bit-width, or run `python -m dgq reconstruct --method qdiff-paper "
                          f"--w-bits {w} --a-bits {a}`")


# ----------------------------------------------------------------------------- formatting
def _fmt_align(m: dict[str, Any]) -> str:
    a = m["alignment"]
    if isinstance(a, str):
        return a
    if m["alignment_metric"] == "evaluator":
        detail = dict(m["alignment_detail"])
        clip = detail.pop("clip_score", None)
        parts = [f"{k.split('_', 1)[-1]} {'✓' if v >= 0.5 else '✗'}" for k, v in detail.items()
                 if not k.endswith("_all")]
        clip_part = f"; domain CLIP {clip:.3f}" if clip is not None else ""
        return f"{a:.2f} (evaluator; {', '.join(parts)}{clip_part})"
    return f"{a:.3f} (CLIP cosine)"


def column_markdown(m: dict[str, Any], cached: bool, fp_bops: float) -> str:
    lat = f"{m['latency_s']:.2f} s" + (" (cached)" if cached else "")
    if m["psnr_db"] is None:
        psnr, ssim = "reference", "reference"
    else:
        psnr = m["psnr_db"] if isinstance(m["psnr_db"], str) else f"{m['psnr_db']:.2f} dB"
        ssim = f"{m['ssim']:.4f}"
    ratio = fp_bops / m["bops"] if m["bops"] else 1.0
    rows = [("latency", lat), ("PSNR vs FP", psnr), ("SSIM vs FP", ssim), ("alignment", _fmt_align(m))]
    read = m.get("fp_reading")
    if read is not None:
        rows.append(("evaluator vs FP", read if isinstance(read, str) else
                     "same scene ✓" if not read else "✗ " + "; ".join(read[:3]) + (" …" if len(read) > 3 else "")))
    rows += [("BOPs", si(m["bops"], "BOPs") + (f" (÷{ratio:.0f})" if ratio > 1.5 else "")),
             ("weight memory", f"{m['weight_mb']:.3g} MB")]
    return f"**{m['label']}**\n\n| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


# ----------------------------------------------------------------------------- callbacks
class Callbacks:
    """The app's event handlers bound to one `Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- generation ---------------------------------------------------------------
    def _load(self, model: str, progress) -> Any:
        if self.engine.cached_model(model) is None:
            progress(0.0, desc=f"loading and calibrating {model} (first use only)…")

            def calib(done: int, total: int) -> None:
                progress((done, total), desc="calibrating (first use only)", unit="steps")

            return self.engine.model(model, progress=calib)
        return self.engine.model(model)

    def _run(self, req: Request, configs: list[tuple[str, Any]], progress) -> dict[str, tuple[Result, bool]]:
        todo = [name for name, cfg in configs if self.engine.cached(req, cfg) is None]
        total = max(1, len(todo) * (req.steps + 1))  # PNDM makes steps + 1 UNet calls; the bar is clamped
        done = [0]
        out = {}
        for name, cfg in configs:
            label = cfg.label()

            def step(i: int, n: int, label: str = label) -> None:
                done[0] += 1
                progress((min(done[0], total), total), desc=f"{label}: step {i}/{n}", unit="steps")

            out[name] = self.engine.result(req, cfg, progress=step)
        return out

    def _columns(self, req: Request, results: dict[str, tuple[Result, bool]]):
        lm = self.engine.model(req.model)
        fp = results["fp"][0] if "fp" in results else self.engine.result(req, dgq.FP)[0]
        fp_bops = lm.bops(dgq.FP).bops
        cols = {}
        for name, (res, hit) in results.items():
            m = self.engine.metrics(res, fp)
            cols[name] = (plots.upscale(res.image, C.DISPLAY_MIN), column_markdown(m, hit, fp_bops), dict(m, cached=hit))
        return cols, fp

    def _payload(self, req: Request, cols: dict, truncated: bool, tokens: list[str]) -> dict[str, Any]:
        return {"request": req.to_dict(), "truncated": truncated, "tokens": tokens,
                "resolution": self.engine.model(req.model).resolution,
                "columns": {name: c[2] for name, c in cols.items()}}

    @staticmethod
    def _notice(truncated: bool, tokens: list[str]) -> str:
        if not truncated:
            return ""
        seen = " ".join(t for t in tokens[1:-1])
        return (f"⚠️ **The prompt is longer than CLIP's 77 tokens and was truncated.** The model saw only: "
                f"“{seen[:300]}{'…' if len(seen) > 300 else ''}”")

    def generate(self, prompt: str, seed: float, steps: float, guidance: float, model: str, w_bits: float,
                 a_bits: float, groups: float, baseline: str, use_groups: bool = True, axis: str = "auto",
                 log_quant: bool = True, start_token: bool = True, dynamic_scale: bool = True,
                 time_aware: bool = True, weight_rounding: str = "nearest", execution: str = "simulated",
                 state: dict | None = None, progress=gr.Progress()):
        """FP, baseline and DGQ images from one seed, with latency, fidelity, alignment and BOPs.

        Returns: FP image, baseline image, DGQ image, three metric tables (markdown), the FP/DGQ wipe
        pair, a notice (prompt truncation), all metrics as JSON, and the new session state.
        """
        req = make_request(prompt, seed, steps, guidance, model, self.engine.policy)
        base_cfg, dgq_cfg = make_configs(w_bits, a_bits, groups, baseline, use_groups, axis, log_quant, start_token,
                                         dynamic_scale, time_aware, weight_rounding, execution)
        lm = self._load(req.model, progress)
        check_rounding(lm.studio, dgq_cfg)
        check_rounding(lm.studio, base_cfg)
        tokens, truncated = lm.studio.tokens(req.prompt)
        if truncated:
            gr.Warning("The prompt is longer than 77 tokens: it was truncated (see the notice).")
        results = self._run(req, [("fp", dgq.FP), ("baseline", base_cfg), ("dgq", dgq_cfg)], progress)
        truncated = truncated or any(r.truncated for r, _ in results.values())
        cols, _ = self._columns(req, results)
        state = {"request": req.to_dict(), "baseline": base_cfg.to_dict(), "dgq": dgq_cfg.to_dict()}
        payload = self._payload(req, cols, truncated, tokens)
        return (cols["fp"][0], cols["baseline"][0], cols["dgq"][0], cols["fp"][1], cols["baseline"][1],
                cols["dgq"][1], (cols["fp"][0], cols["dgq"][0]), self._notice(truncated, tokens), payload, state)

    def requantize(self, w_bits: float, a_bits: float, groups: float, baseline: str, use_groups: bool, axis: str,
                   log_quant: bool, start_token: bool, dynamic_scale: bool, time_aware: bool,
                   weight_rounding: str, execution: str, state: dict | None, progress=gr.Progress()):
        """A quantization control moved: redo the two quantized columns of the last request only
        (the FP image comes from the cache; nothing is recalibrated)."""
        if not state or "request" not in state:
            log.info("requantize: nothing generated yet in this session; skipped")
            return (gr.skip(),) * 7
        log.info("requantize: W%s A%s K=%s %s", w_bits, a_bits, groups, baseline)
        req = Request.from_dict(state["request"])
        base_cfg, dgq_cfg = make_configs(w_bits, a_bits, groups, baseline, use_groups, axis, log_quant, start_token,
                                         dynamic_scale, time_aware, weight_rounding, execution)
        studio = self._load(req.model, progress).studio
        check_rounding(studio, dgq_cfg)
        check_rounding(studio, base_cfg)
        results = self._run(req, [("baseline", base_cfg), ("dgq", dgq_cfg)], progress)
        fp_res, fp_hit = self.engine.result(req, dgq.FP)
        results_all = {"fp": (fp_res, fp_hit), **results}
        cols, _ = self._columns(req, results_all)
        tokens, truncated = self.engine.model(req.model).studio.tokens(req.prompt)
        state = {"request": req.to_dict(), "baseline": base_cfg.to_dict(), "dgq": dgq_cfg.to_dict()}
        payload = self._payload(req, cols, truncated, tokens)
        return (cols["baseline"][0], cols["dgq"][0], cols["baseline"][1], cols["dgq"][1],
                (cols["fp"][0], cols["dgq"][0]), payload, state)

    def example(self, prompt: str, model: str, seed: float, steps: float, guidance: float, w_bits: float,
                a_bits: float, groups: float, baseline: str, use_groups: bool = True, axis: str = "auto",
                log_quant: bool = True, start_token: bool = True, dynamic_scale: bool = True,
                time_aware: bool = True, weight_rounding: str = "nearest", execution: str = "simulated"):
        """Cached examples: `generate` in the examples' input order, without progress or state
        (`example_state` sets the state: Gradio's example cache does not keep `gr.State`)."""
        return self.generate(prompt, seed, steps, guidance, model, w_bits, a_bits, groups, baseline, use_groups,
                             axis, log_quant, start_token, dynamic_scale, time_aware, weight_rounding, execution,
                             progress=lambda *a, **k: None)[:-1]

    def example_state(self, row: list) -> dict[str, Any]:
        """The session state of a cached example (Gradio does not cache `gr.State` outputs), so
        the bit sliders and the views work on it; `row` is in the examples' input order."""
        prompt, model, seed, steps, guidance, w, a, k, baseline, *flags = row
        req = make_request(prompt, seed, steps, guidance, model, self.engine.policy)
        base_cfg, dgq_cfg = make_configs(w, a, k, baseline, *flags)
        return {"request": req.to_dict(), "baseline": base_cfg.to_dict(), "dgq": dgq_cfg.to_dict()}

    # ---- views --------------------------------------------------------------------
    def _state_results(self, state: dict | None) -> tuple[Request, dict[str, Result]]:
        if not state or "request" not in state:
            raise gr.Error("Generate an image first: the views show the last generation.", print_exception=False)
        req = Request.from_dict(state["request"])
        cfgs = {"fp": dgq.FP, "baseline": dgq.config_from_dict(state["baseline"]),
                "dgq": dgq.config_from_dict(state["dgq"])}
        return req, {n: self.engine.result(req, c)[0] for n, c in cfgs.items()}  # recomputed if evicted

    def attention_view(self, state: dict | None, resolution: str, layer: str, timestep: str):
        """Per-token cross-attention maps of FP and both quantized variants, token mass,
        probability histograms and per-step maxima."""
        if not state:
            return (gr.skip(),) * 8
        req, res = self._state_results(state)
        recs = {r.label: r.recorder for r in res.values()}
        images = [r.image for r in res.values()]
        labels = list(recs)
        fp_rec = res["fp"].recorder
        tokens = list(fp_rec.tokens)
        res_choices = [("all (upsampled)", C.ALL)] + [(f"{r}×{r}", str(r)) for r in fp_rec.resolutions()]
        t_choices = [("all steps", C.ALL)] + [(f"t={t}", str(t)) for t in fp_rec.timesteps()]
        layer_choices = [("all layers", C.ALL)] + [(n, n) for n in fp_rec.attention_layers()]
        resolution = resolution if resolution in [v for _, v in res_choices] else C.ALL
        timestep = timestep if timestep in [v for _, v in t_choices] else C.ALL
        layer = layer if layer in [v for _, v in layer_choices] else C.ALL
        r_sel = None if resolution == C.ALL else int(resolution)
        t_sel = None if timestep == C.ALL else int(timestep)
        l_sel = None if layer == C.ALL else layer
        notes = []
        try:
            for rec in recs.values():
                rec.token_mass(resolution=r_sel, t=t_sel)
        except KeyError:
            notes.append(f"no maps at {r_sel}×{r_sel} for t={t_sel}: showing all resolutions and steps")
            r_sel, t_sel, resolution, timestep = None, None, C.ALL, C.ALL
        if l_sel is not None:
            notes.append("a single layer is summed over all steps (the resolution and timestep selectors apply to the "
                         "token-mass chart only)")
        masses = {lab: rec.token_mass(resolution=r_sel, t=t_sel) for lab, rec in recs.items()}
        gallery = []
        for j, tok in enumerate(tokens[: C.MAX_TOKENS_SHOWN]):
            name = "★ <start>" if j == 0 else tok
            for lab, rec, img in zip(labels, recs.values(), images):
                amap = rec.cross_attention(j, resolution=r_sel, t=t_sel, layer=l_sel)
                gallery.append((plots.token_map(img, amap, star=(j == 0)),
                                f"{name} · {lab} · {100 * float(masses[lab][j]):.1f}% of the mass"))
        if len(tokens) > C.MAX_TOKENS_SHOWN:
            notes.append(f"showing the first {C.MAX_TOKENS_SHOWN} of {len(tokens)} tokens")
        share = " · ".join(f"{lab}: **{100 * float(m[0]):.0f}%**" for lab, m in masses.items())
        n_tok = len(tokens)
        pad = " · ".join(f"{lab}: {100 * float(m[n_tok:].sum()):.0f}%" for lab, m in masses.items())
        first = next(iter(masses.values()))
        j_top = int(np.argmax(first))
        top = "`<start>`" if j_top == 0 else (f"`{tokens[j_top]}`" if j_top < n_tok else "a padding position")
        info = (f"Tokens: {' '.join('`' + t + '`' for t in tokens[: C.MAX_TOKENS_SHOWN])}\n\n"
                f"Share of cross-attention on `<start>` (index 0, kept in full precision by DGQ), measured on "
                f"these images: {share}; on the padding after the end token: {pad}. The token with the largest "
                f"share in the {next(iter(masses))} column is {top}.")
        if notes:
            info += "\n\n" + "; ".join(notes) + "."
        return (gallery, plots.token_mass_figure(tokens, masses),
                plots.histogram_figure({lab: rec.histograms() for lab, rec in recs.items()}),
                plots.step_max_figure({lab: rec.step_max() for lab, rec in recs.items()}),
                gr.Dropdown(choices=res_choices, value=resolution), gr.Dropdown(choices=layer_choices, value=layer),
                gr.Dropdown(choices=t_choices, value=timestep), info)

    def outlier_view(self, state: dict | None, layer: str | None, step: str | None, log_scale: bool):
        """Per-pixel / per-channel max |x| of one layer input at one step, its D_channel vs D_pixel,
        the axis DGQ picks and its groups."""
        if not state:
            return (gr.skip(),) * 5
        req, res = self._state_results(state)
        rec = res["fp"].recorder
        names = rec.layer_names()
        calls = rec.call_indices()
        if not names or not calls:
            raise gr.Error("No layer statistics were recorded for this generation.", print_exception=False)
        t_of = {c: rec.outliers(names[0], c)["t"] for c in calls}
        step_choices = [(f"step {c} (t={t_of[c]})", str(c)) for c in calls]
        c = int(step) if step in [v for _, v in step_choices] else calls[len(calls) // 2]
        points = []
        for n in names:
            o = rec.outliers(n, c)
            points.append((n, o["D_channel"], o["D_pixel"], o["axis"]))
        if layer not in names:
            layer = max(points, key=lambda p: max(p[1], p[2] or 0.0))[0]
        info = rec.outliers(layer, c)
        lm = self.engine.model(req.model)
        dgq_cfg = dgq.config_from_dict(state["dgq"])
        try:
            groups = lm.studio.groups(layer, float(info["t"]), dgq_cfg)
        except KeyError:
            groups = None
        fig = plots.outlier_figure(info, groups, bool(log_scale))
        spread = plots.spread_figure(points, layer)
        d_px = "—" if info["D_pixel"] is None else f"{info['D_pixel']:.3g}"
        md = [f"**{layer}** ({info['kind']}) at step {c}, t={info['t']} — this prompt: "
              f"D_channel = {info['D_channel']:.3g}, D_pixel = {d_px} → the rule picks **{info['axis']}**."]
        if groups is not None:
            if groups.get("D_channel") is not None:
                md.append(f"Calibration (t={groups['t']}): D_channel = {groups['D_channel']:.3g}, "
                          f"D_pixel = {groups['D_pixel']:.3g} → auto axis **{groups['auto_axis']}**.")
            md.append(f"{dgq_cfg.label()} groups this input along **{groups['axis']}** into K = {groups['k']} "
                      f"group(s){' (coloured above)' if groups['labels'] is not None else ''}.")
        return (fig, spread, "\n\n".join(md), gr.Dropdown(choices=names, value=layer),
                gr.Dropdown(choices=step_choices, value=str(c)))

    def outlier_drop(self, state: dict | None, k: float, progress=gr.Progress()):
        """Fig. 4(a): zero the top-k |x| of every layer input vs k random entries (FP model)."""
        if not state or "request" not in state:
            raise gr.Error("Generate an image first: the demo perturbs the last generation's FP run.",
                           print_exception=False)
        k = as_int("k", k, 1, 64)
        req = Request.from_dict(state["request"])
        self._load(req.model, progress)
        fp, _ = self.engine.result(req, dgq.FP)
        total = 2 * req.steps
        done = [0]

        def step(i: int, n: int) -> None:
            done[0] += 1
            progress((min(done[0], total), total), desc="outlier-drop demo", unit="steps")

        from dgq.metrics import psnr, ssim  # noqa: PLC0415

        outs = []
        for mode in ("outlier", "random"):
            r, _ = self.engine.result(req, dgq.FP, perturbation=(k, mode), progress=step)
            p = psnr(r.image, fp.image)
            p_s = "identical" if p == float("inf") else f"{p:.1f} dB"
            outs.append((plots.upscale(r.image, C.DISPLAY_MIN), f"{p_s}, SSIM {ssim(r.image, fp.image):.3f}"))
        md = (f"Zeroing the **{k} largest |x|** of every layer input vs **{k} random entries**, same seed "
              f"(FP model, prompt “{req.prompt}”). PSNR vs FP — outliers dropped: {outs[0][1]}; "
              f"random entries dropped: {outs[1][1]}. Expected: dropping outliers breaks the image, "
              f"dropping random entries barely changes it.")
        return plots.upscale(fp.image, C.DISPLAY_MIN), outs[0][0], outs[1][0], md

    # ---- small helpers ---------------------------------------------------------
    def model_status(self, model: str) -> str:
        try:
            m = self.engine.policy.resolve(model)
        except gr.Error as e:
            return f"❌ {e.message}"
        return self.engine.status(m)

    def model_guidance(self, model: str):
        """The guidance slider's value for a newly chosen model (unchanged for a refused name)."""
        try:
            return self.engine.default_guidance(self.engine.policy.resolve(model))
        except gr.Error:
            return gr.skip()

    def status_tick(self, model: str):
        """Poll the model's status while it loads in the background, then stop the timer."""
        try:
            m = self.engine.policy.resolve(model)
        except gr.Error as e:
            return f"❌ {e.message}", gr.Timer(active=False)
        return self.engine.status(m), gr.Timer(active=m in self.engine.loading)

    @staticmethod
    def random_seed() -> int:
        return dgq.random_seed()


def wrap(cb: Callbacks) -> dict[str, Callable]:
    """The callbacks as Gradio should call them: errors → gr.Error, GPU work under spaces.GPU."""
    heavy = {"generate", "requantize", "example", "attention_view", "outlier_view", "outlier_drop"}
    out = {}
    for name in ("generate", "requantize", "example", "attention_view", "outlier_view", "outlier_drop",
                 "model_status", "model_guidance", "status_tick", "random_seed", "example_state"):
        fn = user_errors(getattr(cb, name))
        out[name] = gpu(fn) if name in heavy else fn
    return out

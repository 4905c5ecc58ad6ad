"""The Blocks layout and its events. `build_demo()` returns the app; `app.py` exposes it as `demo`."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gradio as gr

import dgq

from app import constants as C
from app.callbacks import Callbacks, wrap
from app.engine import Engine, model_fingerprint
from app.inputs import checkbox, float_slider, int_number, int_slider, model_dropdown, radio, textbox

log = logging.getLogger(__name__)

THEME = gr.themes.Soft(primary_hue="indigo")
CSS = """
.dgq-metrics table {font-size: 0.85em}
.dgq-notice:empty {display: none}
"""


def _local_folder(model: str) -> Path | None:
    """The folder of a local model (the embedded one included), if it exists."""
    from dgq.loading import resolve_model  # noqa: PLC0415 - a path lookup, nothing is loaded

    p = Path(resolve_model(model)).expanduser()
    return p if (p / "model_index.json").exists() else None


class StudioBlocks(gr.Blocks):
    """`gr.Blocks` whose events say which inputs they take when a call sends too few or too many
    values (Gradio's own check raises a bare ValueError, which a client receives as no message, and
    ignores extra values)."""

    def validate_inputs(self, block_fn, inputs: list) -> None:  # type: ignore[override]
        wanted = [getattr(b, "label", None) or type(b).__name__ for b in block_fn.inputs]
        if len(inputs) != len(wanted):
            name = block_fn.api_name or block_fn.name or "this event"
            raise gr.Error(f"{name}: received {len(inputs)} input values; allowed: exactly {len(wanted)} "
                           f"({', '.join(map(str, wanted))})", print_exception=False)


@contextmanager
def _examples_cache(folder: Path) -> Iterator[None]:
    """Cached examples go to the app's cache folder ($DGQ_CACHE/app, never the checkout), in a
    folder named after the model's weights, so a retrained model never shows stale cached images
    (Gradio reads GRADIO_EXAMPLES_CACHE when Examples is built)."""
    old = os.environ.get("GRADIO_EXAMPLES_CACHE")
    base = Path(old) if old else dgq.cache_dir() / "app" / "cached_examples"
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(base / f"dgq-{model_fingerprint(folder)}")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GRADIO_EXAMPLES_CACHE", None)
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = old


def build_demo(engine: Engine | None = None, preload: bool | None = None, cache_examples: bool | None = None) -> gr.Blocks:
    """The DGQ Studio app.

    Args:
        engine: the backend (default: a new `Engine` for `DGQ_APP_MODEL`).
        preload: load the default model in a background thread now (default: `DGQ_APP_PRELOAD`).
        cache_examples: cache the domain examples lazily (default: only when the embedded model
            exists and is the default model).
    """
    engine = engine or Engine()
    cb = Callbacks(engine)
    fn = wrap(cb)
    folder = _local_folder(engine.default_model)
    if cache_examples is None:
        cache_examples = folder is not None and engine.default_model == C.EMBEDDED
    g0 = engine.default_guidance(engine.default_model)
    default_name = engine.policy.display(engine.default_model)

    with StudioBlocks(title=C.TITLE, delete_cache=C.DELETE_CACHE) as demo:
        state = gr.State(None)
        gr.Markdown(f"# {C.TITLE}\n{C.INTRO}")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = textbox("prompt", C.MAX_PROMPT_CHARS, label="Prompt", value=C.DEFAULT_PROMPT, lines=2,
                                 max_lines=6, placeholder="a red circle to the left of a blue square", elem_id="prompt")
                with gr.Row():
                    seed = int_number("seed", 0, C.MAX_SEED, label="Seed", value=0, elem_id="seed", scale=3)
                    seed_btn = gr.Button("🎲 Random seed", scale=1, size="sm", elem_id="random-seed")
                with gr.Row():
                    steps = int_slider("steps", 1, C.MAX_STEPS, value=C.DEFAULT_STEPS, label="Steps", elem_id="steps")
                    guidance = float_slider("guidance", 0.0, C.MAX_GUIDANCE, value=g0, step=0.5, label="Guidance",
                                            elem_id="guidance", info="the model's own scale by default (SD: 7.5)")
                local = "; or a local diffusers folder" if engine.policy.allow_local else ""
                model = model_dropdown(engine.policy.choices(), value=default_name, label="Model", elem_id="model",
                                    info=f"'tiny' = the embedded 64×64 shapes model; or a listed SD-1.x model{local}")
                model_md = gr.Markdown(engine.status(engine.default_model), elem_id="model-status")
            with gr.Column(scale=2):
                w_bits = int_slider("w_bits", C.W_MIN, C.W_MAX, value=C.DEFAULT_W, label="W bits (weights)",
                                    elem_id="w-bits")
                a_bits = int_slider("a_bits", C.A_MIN, C.A_MAX, value=C.DEFAULT_A,
                                    label="A bits (activations & attention)", elem_id="a-bits")
                groups = radio("groups", C.GROUPS, value=C.DEFAULT_K, label="DGQ groups K", elem_id="groups")
                baseline = radio("baseline", [(v, k) for k, v in C.BASELINES.items()], value="tfmq", label="Baseline",
                                 elem_id="baseline")
                with gr.Accordion("DGQ components (ablations)", open=False):
                    use_groups = checkbox("use_groups", True, label="outlier-preserving groups",
                                          info="off = one per-tensor range (K=1)")
                    axis = radio("axis", C.AXES, value="auto", label="grouping axis",
                                 info="auto = per layer and timestep, whichever of D_channel / D_pixel is larger")
                    log_quant = checkbox("log_quant", True, label="log2 quantizer for attention probabilities")
                    start_token = checkbox("start_token", True, label="<start> token kept in full precision")
                    dynamic_scale = checkbox("dynamic_scale", True, label="dynamic (prompt-specific) attention scale")
                    time_aware = checkbox("time_aware", True, label="time-aware parameters (one set per timestep)")
                with gr.Row():
                    weight_rounding = radio("weight_rounding", C.ROUNDINGS, value="nearest", label="weight rounding",
                                            elem_id="weight-rounding",
                                            info="adaround = rounding learned by BRECQ block reconstruction (the "
                                                 "paper's SD recipe), where `dgq reconstruct` stored one for this W")
                    execution = radio("execution", C.EXECUTIONS, value="simulated", label="execution",
                                      elem_id="execution",
                                      info="int8 = integer GEMMs on the codes (A = 8): each layer equals the "
                                           "simulated one up to fp32 rounding; faster only where the CPU has VNNI "
                                           "(or on CUDA)")
        gen_btn = gr.Button("Generate FP · baseline · DGQ", variant="primary", elem_id="generate")
        notice = gr.Markdown("", label="notice", elem_id="notice", elem_classes="dgq-notice")

        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row(equal_height=True):
                    with gr.Column():
                        fp_img = gr.Image(label="FP image", type="pil", format="png", interactive=False, elem_id="img-fp")
                        fp_md = gr.Markdown(label="FP metrics", elem_classes="dgq-metrics", elem_id="md-fp")
                    with gr.Column():
                        base_img = gr.Image(label="baseline image", type="pil", format="png", interactive=False,
                                            elem_id="img-baseline")
                        base_md = gr.Markdown(label="baseline metrics", elem_classes="dgq-metrics", elem_id="md-baseline")
                    with gr.Column():
                        dgq_img = gr.Image(label="DGQ image", type="pil", format="png", interactive=False, elem_id="img-dgq")
                        dgq_md = gr.Markdown(label="DGQ metrics", elem_classes="dgq-metrics", elem_id="md-dgq")
                wipe = gr.ImageSlider(label="wipe FP vs DGQ", type="pil", format="png", interactive=False,
                                      elem_id="wipe", max_height=520)
                with gr.Accordion("All metrics (JSON)", open=False):
                    metrics = gr.JSON(label="metrics", elem_id="metrics")
                outputs = [fp_img, base_img, dgq_img, fp_md, base_md, dgq_md, wipe, notice, metrics, state]
                ex_inputs = [prompt, model, seed, steps, guidance, w_bits, a_bits, groups, baseline, use_groups, axis,
                             log_quant, start_token, dynamic_scale, time_aware, weight_rounding, execution]
                toggles = [True, "auto", True, True, True, True, "nearest", "simulated"]
                domain = [[p, default_name, 0, C.DEFAULT_STEPS, g0, C.DEFAULT_W, C.DEFAULT_A,
                           C.DEFAULT_K, "tfmq", *toggles] for p in C.DOMAIN_EXAMPLES]
                domain_label = "Shapes-domain prompts (embedded model)"
                cached_examples = None
                if cache_examples and folder is not None:
                    with _examples_cache(folder):
                        cached_examples = gr.Examples(domain, ex_inputs, outputs[:-1], fn=fn["example"], cache_examples=True,
                                                      cache_mode="lazy", label=domain_label, visible_columns=[0])
                else:
                    gr.Examples(domain, ex_inputs, cache_examples=False, label=domain_label, visible_columns=[0])
                teaser = [[p, C.SD14, 0, 25, 7.5, w, a, 16, "tfmq", *toggles]
                          for p, (w, a) in zip(C.TEASER_EXAMPLES, [(8, 8), (8, 8), (4, 6), (4, 6)])]
                gr.Examples(teaser, ex_inputs, cache_examples=False, visible_columns=[0],
                            label="The paper's teaser prompts (SD v1.4: W8A8 and W4A6)")

            with gr.Tab("Attention", id="attention"):
                gr.Markdown("Cross-attention of each token, averaged over heads and layers, over each variant's "
                            "image; ★ marks `<start>`. The share of the mass each token takes is measured on the images "
                            "shown, below.")
                with gr.Row():
                    att_res = gr.Dropdown([("all (upsampled)", C.ALL)], value=C.ALL, label="Resolution",
                                          elem_id="att-res")
                    att_layer = gr.Dropdown([("all layers", C.ALL)], value=C.ALL, label="Layer", elem_id="att-layer")
                    att_t = gr.Dropdown([("all steps", C.ALL)], value=C.ALL, label="Timestep", elem_id="att-t")
                att_info = gr.Markdown(elem_id="att-info")
                att_gallery = gr.Gallery(label="Per-token maps — one row per token: FP | baseline | DGQ", columns=3,
                                         height="auto",
                                         format="png", elem_id="att-gallery", object_fit="contain")
                att_mass = gr.Plot(label="Attention mass per token", format="png", elem_id="att-mass")
                att_hist = gr.Plot(label="Probability histograms (log count)", format="png", elem_id="att-hist")
                att_max = gr.Plot(label="Per-step maximum", format="png", elem_id="att-max")

            with gr.Tab("Outliers", id="outliers"):
                gr.Markdown("Max |x| of one quantized layer's input in the FP run: per pixel (H×W) and per channel. "
                            "DGQ groups along the axis with the larger spread D and keeps outliers in their own groups.")
                with gr.Row():
                    out_layer = gr.Dropdown([], label="Layer", elem_id="out-layer", allow_custom_value=True)
                    out_step = gr.Dropdown([], label="Step", elem_id="out-step", allow_custom_value=True)
                    out_log = gr.Checkbox(True, label="log scale", elem_id="out-log")
                out_info = gr.Markdown(elem_id="out-info")
                out_fig = gr.Plot(label="Per-pixel / per-channel max |x|", format="png", elem_id="out-fig")
                out_spread = gr.Plot(label="D_channel vs D_pixel (all layers, this step)", format="png",
                                     elem_id="out-spread")
                with gr.Accordion("Outlier-drop demo (paper Fig. 4a)", open=True):
                    with gr.Row():
                        drop_k = int_slider("k", 1, 64, value=1, label="k entries zeroed per layer input",
                                            elem_id="drop-k")
                        drop_btn = gr.Button("Run outlier-drop demo", elem_id="drop-run")
                    with gr.Row():
                        drop_fp = gr.Image(label="FP", type="pil", format="png", interactive=False)
                        drop_out = gr.Image(label="top-k |x| zeroed", type="pil", format="png", interactive=False)
                        drop_rand = gr.Image(label="k random entries zeroed", type="pil", format="png",
                                             interactive=False)
                    drop_md = gr.Markdown()

        quant_inputs = [w_bits, a_bits, groups, baseline, use_groups, axis, log_quant, start_token, dynamic_scale,
                        time_aware, weight_rounding, execution]
        gen_inputs = [prompt, seed, steps, guidance, model, *quant_inputs, state]
        att_io = dict(inputs=[state, att_res, att_layer, att_t],
                      outputs=[att_gallery, att_mass, att_hist, att_max, att_res, att_layer, att_t, att_info])
        out_io = dict(inputs=[state, out_layer, out_step, out_log],
                      outputs=[out_fig, out_spread, out_info, out_layer, out_step])
        gpu_opts = dict(concurrency_id="gpu", concurrency_limit=C.CONCURRENCY)
        view_opts = dict(api_visibility="private", concurrency_id="views", concurrency_limit=4,
                         show_progress="minimal")

        gen = gr.on([gen_btn.click, prompt.submit], fn["generate"], gen_inputs, outputs, api_name="generate",
                    api_description="FP, baseline and DGQ images from one seed with their metrics", **gpu_opts)
        gen.then(fn["model_status"], model, model_md, queue=False, api_visibility="private")
        gen.success(fn["attention_view"], **att_io, **view_opts)
        gen.success(fn["outlier_view"], **out_io, **view_opts)

        requant = gr.on([w_bits.release, a_bits.release, groups.input, baseline.input, use_groups.input, axis.input,
                         log_quant.input, start_token.input, dynamic_scale.input, time_aware.input,
                         weight_rounding.input, execution.input],
                        fn["requantize"], [*quant_inputs, state],
                        [base_img, dgq_img, base_md, dgq_md, wipe, metrics, state],
                        api_visibility="private", trigger_mode="always_last", **gpu_opts)
        requant.success(fn["attention_view"], **att_io, **view_opts)
        requant.success(fn["outlier_view"], **out_io, **view_opts)

        if cached_examples is not None:  # a cached example shows images without running `generate`
            picked = cached_examples.dataset.click(lambda sel: fn["example_state"](domain[sel[0]]),
                                                   cached_examples.dataset, state, api_visibility="private")
            picked.success(fn["attention_view"], **att_io, **view_opts)
            picked.success(fn["outlier_view"], **out_io, **view_opts)

        gr.on([att_res.input, att_layer.input, att_t.input], fn["attention_view"], **att_io, **view_opts)
        gr.on([out_layer.input, out_step.input, out_log.input], fn["outlier_view"], **out_io, **view_opts)
        drop_btn.click(fn["outlier_drop"], [state, drop_k], [drop_fp, drop_out, drop_rand, drop_md],
                       api_visibility="private", **gpu_opts)
        seed_btn.click(fn["random_seed"], None, seed, queue=False, api_visibility="private")
        model.change(fn["model_status"], model, model_md, queue=False, api_visibility="private")
        model.change(fn["model_guidance"], model, guidance, queue=False, api_visibility="private")
        status_timer = gr.Timer(1.5, active=False)
        demo.load(fn["status_tick"], model, [model_md, status_timer], queue=False, api_visibility="private")
        status_timer.tick(fn["status_tick"], model, [model_md, status_timer], queue=False, api_visibility="private")

    demo.queue(max_size=C.QUEUE_SIZE, default_concurrency_limit=C.CONCURRENCY)
    demo.dgq_engine = engine  # for tests and benchmarks
    if C.PRELOAD if preload is None else preload:
        engine.preload(wait_for=lambda: bool(getattr(demo, "is_running", False)))
    return demo

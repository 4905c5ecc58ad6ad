"""`calibrate` and `Studio`: the two entry points a user needs after `load_pipeline`.

`Studio` owns nothing but references: the pipeline's modules are shared by every variant, each
generation builds a light pipeline view with its own scheduler (schedulers are stateful), and
the variant travels in a context variable — so concurrent generations with different settings
give exactly what each gives alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from dgq.calibration import Calibration, CalibrationMismatch, StatsCollector, prompts_hash
from dgq.config import FP, FPConfig, QuantConfig, learns_step_sizes
from dgq.context import Perturbation, RunContext, pending_recorder, use
from dgq.fingerprint import weights_fingerprint
from dgq.loading import SD_GUIDANCE, default_guidance, is_embedded
from dgq.methods import MethodInputs, rules_for
from dgq.modules import quantize_, quantized_layers
from dgq.paths import SD_PROMPTS_FILE, SHIPPED_CALIBRATION, SHIPPED_WEIGHT_RANGES, cache_dir
from dgq.prompts import read_prompts
from dgq.quantizer import QuantParams
from dgq.recorder import Recorder, token_names
from dgq.split import split_points

log = logging.getLogger(__name__)

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = SD_GUIDANCE  # when neither the caller nor the model folder gives one
MAX_TOKENS = 77


def default_calibration_prompts(model: str, n: int = 64) -> list[str]:
    """64 prompts as the paper: domain captions for the embedded model, COCO-style captions else."""
    if is_embedded(model):
        from dgq.tiny.render import sample  # noqa: PLC0415

        return [sample(70_000_000 + i)[1] for i in range(n)]
    return read_prompts(SD_PROMPTS_FILE)[:n]


def resolution_of(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


_TOKENIZERS = threading.local()


def thread_tokenizer(tok):
    """This thread's own copy of `tok`.

    Why: a fast tokenizer keeps its padding/truncation settings in the shared Rust object and
    sets them on every call, so two threads calling it with different settings (the pipeline's
    `padding="max_length"` and an untruncated length check) can encode one prompt with the
    other's settings — a 12-token encoding makes a different image. One copy per thread (built
    once, ~0.2 s) removes the shared state instead of serialising every call behind a lock."""
    copies = getattr(_TOKENIZERS, "copies", None)
    if copies is None:
        copies = _TOKENIZERS.copies = {}
    hit = copies.get(id(tok))
    if hit is not None and hit[0]() is tok:
        return hit[1]
    own = copy.deepcopy(tok)
    copies[id(tok)] = (weakref.ref(tok), own)
    return own


def _pipeline_view(pipe):
    """A pipeline sharing `pipe`'s modules with a fresh scheduler and this thread's tokenizer
    (no weights are copied)."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    comps = {**pipe.components, "scheduler": sched}
    if comps.get("tokenizer") is not None:
        comps["tokenizer"] = thread_tokenizer(comps["tokenizer"])
    view = pipe.__class__(**comps, requires_safety_checker=False) if "safety_checker" in comps else pipe.__class__(**comps)
    view.set_progress_bar_config(disable=True)
    return view


def _calibration_key(pipe, prompts: Sequence[str], steps: int, guidance: float, batch_size: int = 8,
                     seed: int = 0) -> dict[str, Any]:
    """Everything the statistics depend on: a cache made with any other value is not used.
    (Batch size matters: the TFMQ baseline's ranges are an EMA over calibration batches.)"""
    return {
        "model": str(getattr(pipe, "dgq_model_id", None) or pipe.config.get("_name_or_path", "unknown")),
        "weights": weights_fingerprint(pipe.unet),
        "prompts_sha": prompts_hash(prompts),
        "n_prompts": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "scheduler": pipe.scheduler.__class__.__name__,
        "resolution": resolution_of(pipe),
        "batch_size": batch_size,
        "seed": seed,
    }


def calibration_cache_name(key: dict[str, Any]) -> str:
    """File stem of a calibration in the cache folder: readable parts plus a hash of the whole
    key, so calibrations that differ in any setting (guidance, batch size, …) never share a file."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{Path(str(key['model'])).name}-{key['steps']}-{key['scheduler']}-{key['resolution']}-{digest}"


def calibrate(
    pipe,
    prompts: Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    cache: bool | str | Path = True,
    progress: bool | Callable[[int, int], None] = True,
    stats_network: QuantConfig | None = None,
) -> Calibration:
    """Run the FP pipeline over `prompts` once and keep bit-width-independent statistics.

    Cached as safetensors + JSON (model, prompts hash, steps, guidance, scheduler, resolution,
    format version, checksum); a stale, mismatched or corrupted cache is rebuilt, never used.

    Args:
        pipe: a pipeline from `load_pipeline`.
        prompts: calibration prompts (default: 64, as the paper).
        steps / guidance: sampler steps and CFG scale of the calibration runs (25 / the model's
            default, `dgq.default_guidance(pipe)`: 7.5 for SD, lower for the embedded model).
        batch_size: prompts per pipeline call (8, as the authors).
        cache: True = the default cache folder ($DGQ_CACHE or ~/.cache/dgq), a folder, or False.
        progress: show a progress bar (True) or call `progress(done, total)`.
        stats_network: None (default) = statistics of the FP network, valid for every bit-width.
            A quantized config = the authors' way (dgq-method.md §H-9): statistics of the network
            quantized by that config — its weights (and rounding), its activations through the
            config's quantizers built from the FP calibration (e.g. `BaselineConfig(4, 6)`: A-bit
            per-tensor per step) — so they hold for that config's bit-widths only (docs/adaround.md).

    Example:
        >>> calib = dgq.calibrate(pipe)           # seconds on the embedded model, then cached
    """
    model = getattr(pipe, "dgq_model_id", "unknown")
    guidance = default_guidance(pipe) if guidance is None else guidance
    prompts = list(prompts) if prompts is not None else default_calibration_prompts(model)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    key = _calibration_key(pipe, prompts, steps, guidance, batch_size, seed)
    quantized_stats = stats_network is not None and not isinstance(stats_network, FPConfig)
    if quantized_stats:
        key["stats_network"] = stats_network.to_dict()
    quantize_(pipe.unet)
    paths: list[Path] = []
    if cache:
        folder = cache_dir() if cache is True else Path(cache)
        paths = [folder / calibration_cache_name(key)]
        if is_embedded(model) and not quantized_stats:
            paths.insert(0, SHIPPED_CALIBRATION)
        for p in paths:
            try:
                calib = Calibration.load(p, expect=key)
                log.info("calibration loaded from %s", p)
                return calib
            except CalibrationMismatch as e:
                if p.with_suffix(".json").exists() or p.with_suffix(".safetensors").exists():
                    later = " (trying the next cache)" if p != paths[-1] else "; recalibrating"
                    log.warning("calibration at %s not used (%s)%s", p, e, later)
    provisional = None
    if quantized_stats:  # the network to observe: quantized as `stats_network` with FP-calibrated ranges
        fp_calib = calibrate(pipe, prompts, steps, guidance, batch_size, seed, cache, progress)
        provisional = Studio(pipe, fp_calib).params(stats_network)
    t0 = time.time()
    collector = StatsCollector(seed=seed)
    view = _pipeline_view(pipe)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    view.scheduler.set_timesteps(steps)  # PNDM runs steps + 1 UNet calls: count what will be called
    total = len(batches) * len(view.scheduler.timesteps)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=total, desc="calibrating", unit="step")
    done = 0

    def on_step(_pipe, _i, _t, kw):
        nonlocal done
        done += 1
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(done, total)
        return kw

    gen = torch.Generator("cpu").manual_seed(seed)
    with use(RunContext(collector=collector, params=provisional)):
        for batch in batches:
            view(list(batch), num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                 output_type="latent", callback_on_step_end=on_step)
    if bar is not None:
        bar.close()
    calib = collector.finalize(dict(key, seconds=round(time.time() - t0, 2)))
    log.info("calibrated %d sites over %d timesteps in %.1fs", len(calib.sites), len(calib.t_keys) - 1, time.time() - t0)
    if paths:
        target = paths[-1]
        try:
            calib.save(target)
        except OSError as e:
            log.warning("could not write the calibration cache %s: %s", target, e)
    return calib


@dataclass
class Generation:
    """One generated batch and how it was made."""

    images: list  # PIL images
    config: QuantConfig
    seed: int
    steps: int
    guidance: float
    seconds: float
    prompts: list[str]
    truncated: bool = False
    recorder: Recorder | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self):
        return self.images[0]


class Studio:
    """FP, baselines and DGQ over one loaded pipeline.

    Example:
        >>> pipe = dgq.load_pipeline("tiny")
        >>> studio = dgq.Studio(pipe, dgq.calibrate(pipe))
        >>> fp = studio.generate("a large red circle on the left", seed=0)
        >>> q = studio.generate("a large red circle on the left", seed=0,
        ...                     config=dgq.DGQConfig(w_bits=4, a_bits=6, groups=16))
    """

    def __init__(self, pipe, calibration: Calibration | None = None, weight_search: str = "mse",
                 max_steps: int = 200, max_batch: int = 16, range_cache: bool | str | Path = True) -> None:
        self.pipe = pipe
        self.calibration = calibration
        self.max_steps, self.max_batch = max_steps, max_batch
        self.layers = quantize_(pipe.unet, weight_search=weight_search)
        self._qlayers = quantized_layers(pipe.unet)
        self._params: OrderedDict[QuantConfig, QuantParams] = OrderedDict()
        self._lock = threading.Lock()
        self._ranges_file: Path | None = None
        self._ranges_saved = 0
        self._ranges_lock = threading.Lock()
        self._roundings: dict[tuple[int, str], Any] = {}  # (W bits, rounding name) -> installed rounding (dgq.adaround)
        self._act_ranges: dict[tuple[int, int], Any] = {}  # (W, A) -> learned step sizes (dgq.act_recon)
        self._splits: dict[str, int] | None = None
        self._rounding_lock = threading.Lock()
        if range_cache:
            self._load_weight_ranges(range_cache)

    def rounding_folders(self) -> list[Path]:
        """Where learned roundings are looked for: the cache's `adaround/` folder, then (embedded
        model) the shipped files next to its calibration."""
        from dgq import adaround as AR  # noqa: PLC0415

        return AR.rounding_folders(self.model_id)

    def has_rounding(self, bits: int, name: str = "adaround") -> bool:
        """Whether a learned rounding `name` ("adaround" | "adaround-tiar") for these weights at
        `bits` is loaded or stored (reads JSON sidecars only): what decides whether it is offered."""
        from dgq import adaround as AR  # noqa: PLC0415

        if (bits, name) in self._roundings:
            return True
        return bool(AR.candidates(self.rounding_folders(), weights_fingerprint(self.pipe.unet), bits, name=name,
                                  search=AR.layers_search(self._qlayers)))

    def load_rounding(self, bits: int, name: str = "adaround") -> bool:
        """Install the stored learned rounding `name` at `bits` on the layers (once; well under a
        second on the embedded model); False when none is stored for these weights."""
        from dgq import adaround as AR  # noqa: PLC0415

        with self._rounding_lock:
            if (bits, name) in self._roundings:
                return True
            r = AR.load_best(self.rounding_folders(), weights_fingerprint(self.pipe.unet), bits, self._qlayers,
                             name=name)
            if r is None:
                return False
            AR.install(self._qlayers, r)
            self._roundings[(bits, name)] = r
            return True

    def use_rounding_file(self, path: str | Path) -> tuple[int, str]:
        """Install the learned rounding stored at `path` (a `.safetensors`/`.json` pair written by
        `dgq reconstruct`) for its bit-width and kind, in place of the one `load_rounding` would
        look up; returns (bits, name). Why: lookup prefers roundings made with the default
        settings (the shipped ones), so one learned with other settings is used only when asked
        for by path. Raises ValueError when the file is missing, corrupted or made for other
        weights or layers."""
        from dgq import adaround as AR  # noqa: PLC0415

        try:
            r = AR.Rounding.load(path, {"weights": weights_fingerprint(self.pipe.unet)}, self._qlayers)
        except AR.RoundingMismatch as e:
            raise ValueError(f"rounding file {path}: {e}") from None
        search = AR.layers_search(self._qlayers)
        if r.search != search:
            raise ValueError(f"rounding file {path} was learned on {r.search}-searched weight ranges, these layers "
                             f"use {search} (pass the matching weight search)")
        name = AR.rounding_name(r.meta)
        with self._rounding_lock:
            AR.install(self._qlayers, r)
            self._roundings[(r.bits, name)] = r
        return r.bits, name

    def rounding(self, bits: int, name: str = "adaround") -> Any:
        """The installed learned rounding (`dgq.adaround.Rounding`), or None before `load_rounding`."""
        return self._roundings.get((bits, name))

    def _load_weight_ranges(self, range_cache: bool | str | Path) -> None:
        """Searched weight ranges from earlier sessions (`dgq.weight_ranges`): the shipped file of
        the embedded model, then this model's file in the cache, which later searches update."""
        from dgq import weight_ranges as WR  # noqa: PLC0415

        key = weights_fingerprint(self.pipe.unet)
        folder = cache_dir() / "weight-ranges" if range_cache is True else Path(range_cache)
        self._ranges_file = folder / f"{key}.safetensors"
        if is_embedded(self.model_id):
            WR.load_into(self._qlayers, SHIPPED_WEIGHT_RANGES, key)
        problems: list[str] = []
        WR.load_into(self._qlayers, self._ranges_file, key, problems)
        self._ranges_key = key
        # an invalid cache file is rewritten now from what is held (the shipped ranges) or on the next search
        self._ranges_saved = -1 if problems else WR.entry_count(self._qlayers)
        if problems:
            self._save_weight_ranges()

    def search_weight_ranges(self, bits: Sequence[int]) -> float:
        """Search (or load) every layer's weight range at each of `bits` now and keep them on disk,
        so later changes to those widths skip the search; returns the seconds it took."""
        t0 = time.perf_counter()
        for b in bits:
            if not 2 <= int(b) <= 8:
                raise ValueError(f"weight bits {b!r} out of range; allowed: 2..8")
            for layer in self._qlayers.values():
                layer.quantized_weight(int(b))
        self._save_weight_ranges()
        return time.perf_counter() - t0

    def _save_weight_ranges(self) -> None:
        """Keep newly searched weight ranges for the next session (atomic; failures only logged)."""
        if self._ranges_file is None:
            return
        from dgq import weight_ranges as WR  # noqa: PLC0415

        with self._ranges_lock:
            n = WR.entry_count(self._qlayers)
            if n > self._ranges_saved:
                try:
                    WR.save(self._qlayers, self._ranges_file, self._ranges_key)
                    self._ranges_saved = n
                except OSError as e:
                    log.warning("could not write the weight-range cache %s: %s", self._ranges_file, e)

    @property
    def resolution(self) -> int:
        return resolution_of(self.pipe)

    @property
    def model_id(self) -> str:
        return str(getattr(self.pipe, "dgq_model_id", "unknown"))

    def params(self, config: QuantConfig) -> QuantParams | None:
        """The (cached) quantizer parameters of `config`; None for FP."""
        if isinstance(config, FPConfig):
            return None
        if self.calibration is None:
            raise RuntimeError("this Studio has no calibration: pass dgq.calibrate(pipe) to quantize")
        rounding = config.weight_rounding
        if rounding != "nearest" and config.w_bits < 16 and not self.load_rounding(config.w_bits, rounding):
            tiar = " --tiar" if rounding == "adaround-tiar" else ""
            raise RuntimeError(f"no {rounding} rounding at W{config.w_bits} is stored for this model: run "
                               f"`python -m dgq reconstruct --model {self.model_id} --w-bits {config.w_bits}{tiar}`")
        with self._lock:
            p = self._params.get(config)
            if p is None:
                inputs = self._method_inputs(config)
                # activation parameters depend neither on the weight bits nor on their rounding
                # (unless the method learned them with the quantized weights): reuse them
                def acts(c):
                    return c if rules_for(c).acts_depend_on_weights(c) else replace(c, w_bits=8, weight_rounding="nearest")
                same_acts = next((q for c, q in self._params.items() if acts(c) == acts(config)), None)
                p = QuantParams(self.calibration, config, tables=same_acts.tables if same_acts else None,
                                device=self.pipe.unet.device, inputs=inputs)
                self._params[config] = p
                while len(self._params) > 32:
                    self._params.popitem(last=False)
            else:
                self._params.move_to_end(config)
        return p

    def _method_inputs(self, config: QuantConfig) -> MethodInputs:
        """Split inputs (paper-recipe baselines) and the learned step sizes `qdiff-paper` needs."""
        style = getattr(config, "style", None)
        if style is None or not style.paper:
            return MethodInputs()
        if self._splits is None:
            self._splits = split_points(self.pipe.unet)
        ranges = None
        if learns_step_sizes(config) and config.a_bits < 16:
            ranges = self.act_ranges(config.w_bits, config.a_bits)
            if ranges is None:
                raise RuntimeError(
                    f"no learned Q-Diffusion step sizes at W{config.w_bits}A{config.a_bits} are stored for this model: "
                    f"run `python -m dgq reconstruct --model {self.model_id} --method qdiff-paper "
                    f"--w-bits {config.w_bits} --a-bits {config.a_bits}`")
        return MethodInputs(splits=self._splits, act_ranges=ranges)

    def act_ranges(self, w_bits: int, a_bits: int):
        """The stored learned step sizes (`dgq.act_ranges`) for these weights, rounding and
        calibration at (W, A), loaded once; None when none is stored."""
        from dgq import act_ranges  # noqa: PLC0415

        key = (w_bits, a_bits)
        if key not in self._act_ranges:
            hit = act_ranges.find(self, w_bits, a_bits)
            if hit is None:
                return None
            self._act_ranges[key] = hit[0]
        return self._act_ranges[key]

    def has_act_ranges(self, w_bits: int, a_bits: int) -> bool:
        """Whether `qdiff-paper` can run at (W, A): learned step sizes stored (reads sidecars)."""
        try:
            return self.calibration is not None and self.act_ranges(w_bits, a_bits) is not None
        except RuntimeError:
            return False

    def prepare(self, config: QuantConfig) -> float:
        """Build what `config` needs before its first generation (all quantizer parameters, the
        weights at its bit-width) and return the seconds it took: the cost of a bit switch."""
        t0 = time.perf_counter()
        params = self.params(config)
        if params is not None:
            params.build_all()
            if config.w_bits < 16:
                for layer in self._qlayers.values():
                    layer.quantized_weight(config.w_bits, config.weight_rounding)
        seconds = time.perf_counter() - t0
        self._save_weight_ranges()
        return seconds

    def tokens(self, prompt: str) -> tuple[list[str], bool]:
        """Token strings of `prompt` as the text encoder sees them and whether it was truncated."""
        tok = thread_tokenizer(self.pipe.tokenizer)
        ids = tok(prompt, truncation=False).input_ids
        return token_names(tok, ids[:MAX_TOKENS]), len(ids) > MAX_TOKENS

    @contextmanager
    def use(self, config: QuantConfig = FP, perturbation: Perturbation | None = None,
            recorder: Recorder | None = None) -> Iterator[RunContext]:
        """Run `config` in every call of the pipeline inside the block, the diffusers way::

            with studio.use(dgq.DGQConfig(w_bits=4, a_bits=6)):
                image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]

        The variant lives in a context variable of this thread, so other threads keep running
        their own. A plain `pipe(...)` call uses the pipeline's own scheduler and tokenizer, which
        are not meant to be shared between threads: concurrent callers use `generate`, which gives
        each call its own. The recorder is `recorder`, else the one of an enclosing `dgq.record()`.
        """
        params = self.params(config)
        ctx = RunContext(params=params, recorder=recorder or pending_recorder(), perturbation=perturbation)
        try:
            with use(ctx):
                yield ctx
        finally:
            if params is not None and config.w_bits < 16:
                self._save_weight_ranges()

    def check_inputs(self, prompts: Sequence[str], steps: int, guidance: float, seed: int) -> None:
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty: type what the image should show")
        if len(prompts) > self.max_batch:
            raise ValueError(f"batch of {len(prompts)} prompts exceeds max_batch={self.max_batch} of this Studio")
        if not isinstance(steps, int) or not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps={steps!r} is out of range; allowed: 1..{self.max_steps}")
        if not (0.0 <= float(guidance) <= 30.0):
            raise ValueError(f"guidance={guidance!r} is out of range; allowed: 0..30")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed={seed!r} must be an integer in [0, 2^63)")

    def generate(
        self,
        prompt: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        config: QuantConfig = FP,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        perturbation: Perturbation | None = None,
        recorder: Recorder | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Generate with one variant. Same inputs → same images, whatever runs concurrently.

        Args:
            prompt: one prompt or a list (one image each).
            seed: one seed for the whole batch, or one seed per prompt (then every image equals
                what a batch of one with that seed gives, up to float rounding).
            config: `dgq.FP`, a `BaselineConfig` or a `DGQConfig`.
            steps / guidance: sampler steps and classifier-free guidance scale (default: the
                model's, `dgq.default_guidance(pipe)`).
            perturbation: the outlier-drop experiment (`dgq.Perturbation(k, "outlier"|"random")`).
            recorder: a `Recorder` (or use `with dgq.record() as rec:`).
            progress: `progress(step, total)` after each denoising step.
        """
        guidance = default_guidance(self.pipe) if guidance is None else guidance
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] if isinstance(seed, int) else list(seed)
        if len(seeds) != 1 and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed or one per prompt")
        for s_ in seeds:
            self.check_inputs(prompts, steps, guidance, s_)
        self.params(config)  # a quantized config without a calibration fails here, before any work
        recorder = recorder or pending_recorder()
        truncated = any(self.tokens(p)[1] for p in prompts)
        if recorder is not None:
            recorder.tokens = self.tokens(prompts[0])[0]
            recorder.cfg = guidance > 1.0
        view = _pipeline_view(self.pipe)
        view.scheduler.set_timesteps(steps)
        n_calls = len(view.scheduler.timesteps)  # PNDM: steps + 1 UNet calls

        def on_step(_pipe, i, _t, kw):
            if progress is not None:
                progress(i + 1, n_calls)
            return kw

        gen = ([torch.Generator("cpu").manual_seed(s_) for s_ in seeds] if len(seeds) > 1
               else torch.Generator("cpu").manual_seed(seeds[0]))
        t0 = time.perf_counter()
        with self.use(config, perturbation, recorder):
            out = view(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                       negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                       height=self.resolution, width=self.resolution, callback_on_step_end=on_step)
        seconds = time.perf_counter() - t0
        return Generation(out.images, config, seeds[0] if len(seeds) == 1 else seeds, steps, guidance, seconds,
                          prompts, truncated, recorder)

    def groups(self, layer: str, timestep: float, config: QuantConfig) -> dict[str, Any]:
        """What `config` does to one site's input at `timestep`: D_channel, D_pixel, the axis it
        groups along and the group id of every index (from the calibration)."""
        if self.calibration is None:
            raise RuntimeError("no calibration: pass dgq.calibrate(pipe) to the Studio")
        cal = self.calibration
        if layer not in cal.sites:
            raise KeyError(f"{layer!r} is not a calibrated site")
        t_key = cal.nearest_t(timestep)
        info = cal.sites[layer]
        out: dict[str, Any] = {"layer": layer, "t": t_key, "kind": info.kind, "D_channel": None, "D_pixel": None,
                               "auto_axis": None, "axis": "tensor", "labels": None, "k": 1,
                               "pixel_shape": info.out_pixel_shape() if info.needs_unfold() else info.pixel_shape}
        if info.kind in ("conv", "linear", "q", "k", "v"):
            out["D_channel"], out["D_pixel"] = cal.spread(layer, t_key)
            out["auto_axis"] = cal.chosen_axis(layer, t_key)
        params = self.params(config)
        if params is not None:
            q = params.act(layer, params.key_for(timestep))
            if q is not None and q.mode != "tensor":
                out.update(axis=q.mode, labels=q.labels.numpy(), k=int(q.labels.max()) + 1)
        return out


def random_seed() -> int:
    return random.randint(0, 2**31 - 1)


def stored_rounding_identity(pipe, bits: int, name: str = "adaround") -> str | None:
    """The checksum of the learned rounding a `Studio` over `pipe` loads at `bits` (None: none
    stored), so result files made with one rounding are never taken for another's."""
    from dgq import adaround as AR  # noqa: PLC0415 - learned roundings only

    quantize_(pipe.unet)
    r = AR.load_best(AR.rounding_folders(str(getattr(pipe, "dgq_model_id", "unknown"))), weights_fingerprint(pipe.unet),
                     bits, quantized_layers(pipe.unet), name=name)
    return None if r is None else str(r.meta.get("sha256"))


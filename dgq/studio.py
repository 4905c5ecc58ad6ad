"""`calibrate` and `Studio`: the two entry points a user needs after `load_pipeline`.

`Studio` owns nothing but references: the pipeline's modules are shared by every variant, each
generation builds a light pipeline view with its own scheduler (schedulers are stateful), and
the variant travels in a context variable — so concurrent generations with different settings
give exactly what each gives alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dgq.calibration import Calibration, CalibrationMismatch, StatsCollector, prompts_hash
from dgq.config import FP, FPConfig, QuantConfig
from dgq.context import Perturbation, RunContext, use
from dgq.loading import ASSETS, SD_GUIDANCE, default_guidance, is_embedded
from dgq.modules import quantize_, quantized_layers
from dgq.quantizer import QuantParams
from dgq.recorder import Recorder, pending_recorder

log = logging.getLogger(__name__)

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = SD_GUIDANCE  # when neither the caller nor the model folder gives one
MAX_TOKENS = 77
SHIPPED_CALIBRATION = ASSETS / "tiny-sd-calibration" / "calibration"
SHIPPED_WEIGHT_RANGES = ASSETS / "tiny-sd-calibration" / "weight_ranges.safetensors"
SD_PROMPTS_FILE = ASSETS / "prompts" / "calibration_sd.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("DGQ_CACHE", Path.home() / ".cache" / "dgq"))


def default_calibration_prompts(model: str, n: int = 64) -> list[str]:
    """64 prompts as the paper: domain captions for the embedded model, COCO-style captions else."""
    if is_embedded(model):
        from dgq.tiny.render import sample  # noqa: PLC0415

        return [sample(70_000_000 + i)[1] for i in range(n)]
    return read_prompts(SD_PROMPTS_FILE)[:n]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped); a TSV's first column (PartiPrompts) is taken."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".tsv":
        lines = [ln.split("\t")[0] for ln in lines[1:]]
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def resolution_of(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _pipeline_view(pipe):
    """A pipeline sharing `pipe`'s modules with a fresh scheduler (no weights are copied)."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    comps = {**pipe.components, "scheduler": sched}
    view = pipe.__class__(**comps, requires_safety_checker=False) if "safety_checker" in comps else pipe.__class__(**comps)
    view.set_progress_bar_config(disable=True)
    return view


def weights_fingerprint(module: torch.nn.Module, per_tensor: int = 1024) -> str:
    """A short hash of a module's parameters (names, shapes, dtypes and an evenly strided sample of
    each tensor's values): a retrained or edited model under the same name never reuses another
    model's calibration, at the cost of reading ~1k values per tensor instead of all of them."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        sample = flat[::step].float().cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _calibration_key(pipe, prompts: Sequence[str], steps: int, guidance: float) -> dict[str, Any]:
    return {
        "model": str(getattr(pipe, "dgq_model_id", None) or pipe.config.get("_name_or_path", "unknown")),
        "weights": weights_fingerprint(pipe.unet),
        "prompts_sha": prompts_hash(prompts),
        "n_prompts": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "scheduler": pipe.scheduler.__class__.__name__,
        "resolution": resolution_of(pipe),
    }


def calibrate(
    pipe,
    prompts: Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    cache: bool | str | Path = True,
    progress: bool | Callable[[int, int], None] = True,
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

    Example:
        >>> calib = dgq.calibrate(pipe)           # seconds on the embedded model, then cached
    """
    model = getattr(pipe, "dgq_model_id", "unknown")
    guidance = default_guidance(pipe) if guidance is None else guidance
    prompts = list(prompts) if prompts is not None else default_calibration_prompts(model)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    key = _calibration_key(pipe, prompts, steps, guidance)
    quantize_(pipe.unet)
    paths: list[Path] = []
    if cache:
        folder = cache_dir() if cache is True else Path(cache)
        name = f"{Path(str(key['model'])).name}-{key['prompts_sha']}-{steps}-{key['scheduler']}-{key['resolution']}"
        paths = [folder / name]
        if is_embedded(model):
            paths.insert(0, SHIPPED_CALIBRATION)
        for p in paths:
            try:
                calib = Calibration.load(p, expect=key)
                log.info("calibration loaded from %s", p)
                return calib
            except CalibrationMismatch as e:
                if p.with_suffix(".json").exists():
                    log.warning("calibration at %s not used (%s); recalibrating", p, e)
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
    with use(RunContext(collector=collector)):
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
        if range_cache:
            self._load_weight_ranges(range_cache)

    def _load_weight_ranges(self, range_cache: bool | str | Path) -> None:
        """Searched weight ranges from earlier sessions (`dgq.weight_ranges`): the shipped file of
        the embedded model, then this model's file in the cache, which later searches update."""
        from dgq import weight_ranges as WR  # noqa: PLC0415

        key = weights_fingerprint(self.pipe.unet)
        folder = cache_dir() / "weight-ranges" if range_cache is True else Path(range_cache)
        self._ranges_file = folder / f"{key}.safetensors"
        if is_embedded(self.model_id):
            WR.load_into(self._qlayers, SHIPPED_WEIGHT_RANGES, key)
        WR.load_into(self._qlayers, self._ranges_file, key)
        self._ranges_saved = WR.entry_count(self._qlayers)
        self._ranges_key = key

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
        with self._lock:
            p = self._params.get(config)
            if p is None:
                # activation parameters do not depend on the weight bits: a W-only change reuses them
                same_acts = next((q for c, q in self._params.items() if replace(c, w_bits=8) == replace(config, w_bits=8)), None)
                p = QuantParams(self.calibration, config, tables=same_acts.tables if same_acts else None,
                                device=self.pipe.unet.device)
                self._params[config] = p
                while len(self._params) > 32:
                    self._params.popitem(last=False)
            else:
                self._params.move_to_end(config)
        return p

    def prepare(self, config: QuantConfig) -> float:
        """Build what `config` needs before its first generation (all quantizer parameters, the
        weights at its bit-width) and return the seconds it took: the cost of a bit switch."""
        t0 = time.perf_counter()
        params = self.params(config)
        if params is not None:
            params.build_all()
            if config.w_bits < 16:
                for layer in self._qlayers.values():
                    layer.quantized_weight(config.w_bits)
        seconds = time.perf_counter() - t0
        self._save_weight_ranges()
        return seconds

    def tokens(self, prompt: str) -> tuple[list[str], bool]:
        """Token strings of `prompt` as the text encoder sees them and whether it was truncated."""
        tok = self.pipe.tokenizer
        ids = tok(prompt, truncation=False).input_ids
        truncated = len(ids) > MAX_TOKENS
        ids = ids[:MAX_TOKENS]
        names = []
        for i in ids:
            s = tok.convert_ids_to_tokens(int(i))
            s = {"<|startoftext|>": "<start>", "<|endoftext|>": "<end>"}.get(s, s.replace("</w>", ""))
            names.append(s)
        return names, truncated

    def check_inputs(self, prompts: Sequence[str], steps: int, guidance: float, seed: int) -> None:
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty: type what the image should show")
        if len(prompts) > self.max_batch:
            raise ValueError(f"batch of {len(prompts)} prompts exceeds the server cap of {self.max_batch}")
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
        params = self.params(config)
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
        ctx = RunContext(params=params, recorder=recorder, perturbation=perturbation)
        t0 = time.perf_counter()
        with use(ctx):
            out = view(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                       negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                       height=self.resolution, width=self.resolution, callback_on_step_end=on_step)
        seconds = time.perf_counter() - t0
        if params is not None and config.w_bits < 16:
            self._save_weight_ranges()
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

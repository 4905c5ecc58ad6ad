"""The app's backend: loaded models, a result cache and the metrics — no Gradio here.

* Models load on first use (or in a background thread at start), are calibrated once
  (`dgq.calibrate` finds the embedded model's shipped calibration) and are kept: changing bits,
  groups or toggles never recalibrates.
* Results are deterministic functions of (model, prompt, seed, steps, guidance, config,
  perturbation), so one server-wide LRU serves every user: moving a bit slider finds the FP image
  in it, and a view whose result was evicted just recomputes it. Nothing per-user lives here.
* Every generation carries its own `dgq.Recorder` (explicit, never the thread's ambient one), so
  concurrent users never share recording state; the variant travels in dgq's ContextVar.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dgq

from app import constants as C
from app.models import ModelPolicy

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _settle_heap(release: bool = False) -> None:
    """Move everything alive now (libraries, the loaded models) out of the cyclic GC's reach.

    With ~600k long-lived objects a full collection takes ~0.5 s on a laptop CPU, and CPython
    runs one whenever a quarter as many new objects have survived: the parameters a bit-width
    change builds were enough to trigger it on the next generation. Frozen objects are skipped.
    `release=True` (after unloading a model) unfreezes and collects once, so the old model's
    reference cycles are freed, then freezes again."""
    if release:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class Request:
    """What fixes the FP image: the quantized variants add a config."""

    model: str
    prompt: str
    seed: int
    steps: int
    guidance: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "seed": self.seed, "steps": self.steps,
                "guidance": self.guidance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        return cls(str(d["model"]), str(d["prompt"]), int(d["seed"]), int(d["steps"]), float(d["guidance"]))


@dataclass
class Result:
    """One generated image, how it was made and what was recorded while it was."""

    request: Request
    config: Any  # a dgq config
    perturbation: tuple[int, str] | None
    image: Any  # PIL image at the model's resolution
    seconds: float
    truncated: bool
    recorder: Any | None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.config.label()


@dataclass
class LoadedModel:
    model_id: str
    studio: Any  # dgq.Studio
    macs: Any  # dgq.bops.MacCount
    load_seconds: float

    @property
    def resolution(self) -> int:
        return self.studio.resolution

    @property
    def domain(self) -> bool:
        """True for shapes-domain models (the embedded one, its snapshots, random test copies):
        64-px output, judged by the embedded evaluator instead of CLIP."""
        from dgq.tiny.evaluator import IMAGE_SIZE  # noqa: PLC0415

        return self.resolution == IMAGE_SIZE

    def bops(self, config) -> Any:
        # `dgq.bops` (the function) is shadowed by the submodule `dgq.bops` once that is imported
        # (`from dgq.bops import count_macs`), so import the function from its module.
        from dgq.bops import bops  # noqa: PLC0415
        from dgq.config import FPConfig  # noqa: PLC0415

        if isinstance(config, FPConfig):
            return bops(self.macs, 32, 32)
        return bops(self.macs, config.w_bits, config.a_bits)


def config_key(config, perturbation: tuple[int, str] | None = None) -> str:
    return json.dumps({"config": config.to_dict(), "perturbation": perturbation}, sort_keys=True)


class Engine:
    """Models, results and scorers shared by every session of one app.

    Args:
        default_model: the model loaded at start and never evicted.
        calib_prompts / calib_steps: calibration overrides (None = `dgq.calibrate`'s defaults).
        cache_size: results kept (0 disables the cache; every call then recomputes).
        max_models: pipelines kept in memory.
    """

    def __init__(self, default_model: str = C.DEFAULT_MODEL, calib_prompts: list[str] | None = None,
                 calib_steps: int | None = None, cache_size: int = C.RESULT_CACHE,
                 max_models: int = C.MAX_MODELS, policy: ModelPolicy | None = None) -> None:
        self.policy = policy or ModelPolicy(default_model, C.HUB_MODELS, C.ALLOW_LOCAL)
        self.default_model = self.policy.canonical_default()
        if calib_prompts is None and C.CALIB_PROMPTS_FILE:
            calib_prompts = dgq.read_prompts(C.CALIB_PROMPTS_FILE)
        self.calib_prompts = calib_prompts
        self.calib_steps = calib_steps if calib_steps is not None else (C.CALIB_STEPS if C.CALIB_PROMPTS_FILE else None)
        self.cache_size, self.max_models = cache_size, max_models
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._failed: dict[str, tuple[float, str]] = {}
        self._loading: set[str] = set()
        self._load_lock = threading.Lock()  # one load at a time (memory)
        self._dict_lock = threading.Lock()  # quick bookkeeping only, never held while loading
        self._results: OrderedDict[tuple, Result] = OrderedDict()
        self._results_lock = threading.Lock()
        self._inflight: dict[tuple, threading.Lock] = {}
        self._scorer_lock = threading.Lock()
        self._evaluator = _LazyScorer(_load_shapes_evaluator, self._scorer_lock)
        self._clip = _LazyScorer(_load_sd_clip, self._scorer_lock)
        self._domain_clip = _LazyScorer(_load_domain_clip, self._scorer_lock)
        self.stats = {"generated": 0, "cache_hits": 0, "calibrations": 0}

    # ------------------------------------------------------------------ models
    def normalize(self, model_id: str | None) -> str:
        """The canonical name of a model the policy already accepted ("" / None = the default).
        Callers with user input go through `self.policy.resolve` first."""
        return dgq.canonical_model(model_id) if model_id else self.default_model

    def default_guidance(self, model_id: str) -> float:
        """The model's own guidance scale (its folder's dgq_defaults.json), else SD's 7.5; loads nothing."""
        m = self.normalize(model_id)
        try:
            return float(dgq.model_defaults(m).get("guidance", C.DEFAULT_GUIDANCE))
        except dgq.ModelLoadError:
            return C.DEFAULT_GUIDANCE

    def status(self, model_id: str) -> str:
        """One line on a model's state (cheap; loads nothing)."""
        m = self.normalize(model_id)
        name = self.policy.display(m)
        if m in self._models:
            lm = self._models[m]
            return f"✅ `{name}` is loaded ({lm.resolution}×{lm.resolution} px, {len(lm.studio.layers)} quantized layers)."
        if m in self._failed:
            return f"❌ {self._failed[m][1]}"
        if m in self._loading:
            return f"⏳ `{name}` is loading and calibrating…"
        return f"`{name}` loads on the first Generate (and is calibrated once; later changes of bits never recalibrate)."

    @property
    def loading(self) -> set[str]:
        """Models being loaded right now."""
        return set(self._loading)

    def cached_model(self, model_id: str | None = None) -> LoadedModel | None:
        """The model if it is already loaded (never loads)."""
        return self._models.get(self.normalize(model_id))

    def model(self, model_id: str | None = None, progress: Progress | None = None) -> LoadedModel:
        """The loaded, calibrated model; raises `dgq.ModelLoadError` with a one-line reason that
        names no server path (the details go to the server log)."""
        m = self.normalize(model_id)
        with self._dict_lock:
            lm = self._models.get(m)
            if lm is not None:
                self._models.move_to_end(m)
                return lm
        failed = self._failed.get(m)
        if failed is not None and time.time() - failed[0] < 30:
            raise dgq.ModelLoadError(failed[1])
        with self._load_lock:  # one load at a time: a second user of the same model waits for it
            lm = self._models.get(m)
            if lm is not None:
                return lm
            self._loading.add(m)
            try:
                lm = self._load(m, progress)
            except Exception as e:  # noqa: BLE001 - every load failure becomes one public line
                log.warning("loading model %s failed: %s: %s", m, type(e).__name__, e)
                if isinstance(e, dgq.ModelLoadError):
                    reason = e.public
                elif isinstance(e, FileNotFoundError):  # e.g. no calibration prompts for this model
                    reason = "it could not be calibrated (no calibration prompts for it on this server)"
                else:
                    reason = f"an internal error ({type(e).__name__}) occurred; the server log has the details"
                msg = f"model `{self.policy.display(m)}` could not be loaded: {reason}"
                self._failed[m] = (time.time(), msg)
                raise dgq.ModelLoadError(msg, public=msg) from e
            finally:
                self._loading.discard(m)
            self._failed.pop(m, None)
            with self._dict_lock:
                self._models[m] = lm
                while len(self._models) > self.max_models:
                    victim = next((k for k in self._models if k != self.default_model and k != m), None)
                    if victim is None:
                        break
                    log.info("unloading %s to make room", victim)
                    del self._models[victim]
                    _settle_heap(release=True)
            return lm

    def _load(self, m: str, progress: Progress | None) -> LoadedModel:
        from dgq.bops import count_macs, to_meta  # noqa: PLC0415

        t0 = time.perf_counter()
        pipe = dgq.load_pipeline(m)
        kwargs: dict[str, Any] = {"progress": progress or False}
        if self.calib_prompts is not None:
            kwargs["prompts"] = self.calib_prompts
        if self.calib_steps is not None:
            kwargs["steps"] = self.calib_steps
        calib = dgq.calibrate(pipe, **kwargs)
        self.stats["calibrations"] += 1
        studio = dgq.Studio(pipe, calib, max_steps=C.MAX_STEPS, max_batch=C.MAX_BATCH)
        macs = count_macs(to_meta(pipe.unet))
        _settle_heap()
        seconds = time.perf_counter() - t0
        log.info("model %s ready in %.1fs", m, seconds)
        return LoadedModel(m, studio, macs, seconds)

    def preload(self, model_id: str | None = None, wait_for: Callable[[], bool] | None = None,
                max_wait: float = 20.0) -> threading.Thread:
        """Load (and calibrate) a model in a daemon thread; failures are kept for `status`.

        `wait_for`: start only once it returns True (e.g. the server is up, so that heavy imports
        do not slow down serving the page) or after `max_wait` seconds.
        """

        m = self.normalize(model_id)
        if self.cached_model(m) is None:
            self._loading.add(m)  # visible to status() before the thread gets the load lock

        def run() -> None:
            t0 = time.monotonic()
            while wait_for is not None and not wait_for() and time.monotonic() - t0 < max_wait:
                time.sleep(0.2)
            try:
                self.model(m)
            except Exception as e:  # noqa: BLE001 - reported through status() / the next request
                log.warning("preloading %s failed: %s", m, e)
            finally:
                self._loading.discard(m)

        t = threading.Thread(target=run, name="dgq-preload", daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------------ results
    def cached(self, req: Request, config, perturbation: tuple[int, str] | None = None) -> Result | None:
        key = (req, config_key(config, perturbation))
        with self._results_lock:
            r = self._results.get(key)
            if r is not None:
                self._results.move_to_end(key)
            return r

    def result(self, req: Request, config, perturbation: tuple[int, str] | None = None,
               progress: Progress | None = None) -> tuple[Result, bool]:
        """(result, came_from_cache). FP runs record layer inputs and attention; quantized runs
        attention only; outlier-drop runs nothing."""
        key = (req, config_key(config, perturbation))
        hit = self.cached(req, config, perturbation)
        if hit is not None:
            self.stats["cache_hits"] += 1
            return hit, True
        with self._results_lock:
            lock = self._inflight.setdefault(key, threading.Lock())
        with lock:  # the same request twice at once is computed once
            hit = self.cached(req, config, perturbation)
            if hit is not None:
                self.stats["cache_hits"] += 1
                return hit, True
            try:
                res = self._generate(req, config, perturbation, progress)
            finally:
                with self._results_lock:
                    self._inflight.pop(key, None)
            if self.cache_size > 0:
                with self._results_lock:
                    self._results[key] = res
                    while len(self._results) > self.cache_size:
                        self._results.popitem(last=False)
            return res, False

    def _generate(self, req: Request, config, perturbation, progress: Progress | None) -> Result:
        from dgq.config import FPConfig  # noqa: PLC0415

        lm = self.model(req.model)
        studio = lm.studio
        kwargs: dict[str, Any] = {}
        recorder = None
        if perturbation is not None:
            k, mode = perturbation
            kwargs["perturbation"] = dgq.Perturbation(k=k, mode=mode, seed=req.seed)
        elif isinstance(config, FPConfig):
            n_calls = req.steps + 1  # some schedulers call the UNet once more than `steps`
            snaps = sorted({round(i * (n_calls - 1) / max(1, C.OUTLIER_SNAPSHOTS - 1)) for i in range(C.OUTLIER_SNAPSHOTS)})
            recorder = dgq.Recorder(outlier_steps=snaps)
        else:
            recorder = dgq.Recorder(layers=[])
        gen = studio.generate(req.prompt, seed=req.seed, config=config, steps=req.steps, guidance=req.guidance,
                              recorder=recorder, progress=progress, **kwargs)
        self.stats["generated"] += 1
        return Result(req, config, perturbation, gen.image, gen.seconds, gen.truncated, recorder)

    def clear_results(self) -> None:
        with self._results_lock:
            self._results.clear()

    # ------------------------------------------------------------------ metrics
    def metrics(self, res: Result, fp: Result) -> dict[str, Any]:
        """Latency, PSNR/SSIM vs FP, alignment, BOPs and weight memory of one result (memoized)."""
        if res.metrics:
            return res.metrics
        from dgq.config import FPConfig  # noqa: PLC0415
        from dgq.metrics import psnr, ssim  # noqa: PLC0415

        lm = self.model(res.request.model)
        is_fp = isinstance(res.config, FPConfig) and res.perturbation is None
        b = lm.bops(res.config)
        align, detail = self.alignment(lm, res.image, res.request.prompt)
        out: dict[str, Any] = {
            "label": res.label,
            "config": res.config.to_dict(),
            "latency_s": round(res.seconds, 3),
            "psnr_db": None if is_fp else _psnr_shown(psnr(res.image, fp.image)),
            "ssim": None if is_fp else round(float(ssim(res.image, fp.image)), 4),
            "alignment": align,
            "alignment_metric": "evaluator" if lm.domain else "clip",
            "alignment_detail": detail,
            "fp_reading": None if is_fp or not lm.domain else self.fp_reading(res.image, fp.image),
            "bops": b.bops,
            "weight_mb": b.size_mb,
            "w_bits": b.w_bits,
            "a_bits": b.a_bits,
        }
        res.metrics = out
        return out

    def fp_reading(self, image, fp_image) -> list[str] | str:
        """What the shapes evaluator reads differently in `image` than in the FP image of the same
        seed ([] = the same scene), or an "unavailable: …" string saying why not."""
        from dgq.tiny.evaluator import reading_diff  # noqa: PLC0415

        ev = self._evaluator.get()
        if ev is None:
            return self._evaluator.reason
        with self._scorer_lock:
            fp_read, read = ev.predict([fp_image, image])
        return reading_diff(fp_read, read)

    def alignment(self, lm: LoadedModel, image, prompt: str) -> tuple[float | str, dict[str, Any]]:
        """Prompt alignment: the embedded evaluator's accuracy for shapes-domain models, the CLIP
        score for SD models, or an "unavailable: …" string saying why not."""
        if lm.domain:
            ev = self._evaluator.get()
            if ev is None:
                return self._evaluator.reason, {}
            with self._scorer_lock:
                s = ev.score([image], [prompt])
            if s.get("n_unparsed"):
                return ("unavailable: the prompt is outside the shapes-domain grammar the evaluator reads "
                        "(colour, shape, size, position, background)"), {}
            detail = {k: v for k, v in s.items() if v is not None and not k.startswith("n")
                      and k not in ("count", "background", "all")}
            clip = self._domain_clip.get()
            if clip is not None:
                with self._scorer_lock:
                    detail["clip_score"] = round(float(clip.score([image], [prompt])), 4)
            return float(s["all"]), detail
        clip = self._clip.get()
        if clip is None:
            return self._clip.reason, {}
        with self._scorer_lock:
            return round(float(clip.score([image], [prompt])), 4), {"model": clip.description}


class _LazyScorer:
    """A scorer loaded on first use under the engine's scorer lock; a failed load is remembered with
    its reason and not retried (each retry would cost the user a second of loading per image)."""

    def __init__(self, load: Callable[[], tuple[Any | None, str]], lock: threading.Lock) -> None:
        self._load, self._lock = load, lock
        self._tried, self._value = False, None
        self.reason = "unavailable: not loaded yet"

    def get(self) -> Any | None:
        with self._lock:
            if not self._tried:
                self._value, msg = self._load()
                self._tried = True
                if self._value is None:
                    self.reason = msg
            return self._value


def _load_shapes_evaluator() -> tuple[Any | None, str]:
    from dgq.eval.scoring import load_shapes_evaluator  # noqa: PLC0415 - loaded on first use

    return load_shapes_evaluator()


def _load_sd_clip() -> tuple[Any | None, str]:
    """The CLIP scorer of SD models."""
    from dgq.eval.scoring import load_clip  # noqa: PLC0415 - loaded on first use

    return load_clip(C.CLIP_MODEL, C.CLIP_PRETRAINED, C.CLIP_WEIGHTS)


def _load_domain_clip() -> tuple[Any | None, str]:
    """The domain CLIP of shapes-domain models."""
    from dgq.eval.scoring import load_domain_clip_scorer  # noqa: PLC0415 - loaded on first use

    return load_domain_clip_scorer()


def _psnr_shown(x: float) -> float | str:
    """PSNR as the app shows it: 2 decimals, or "identical" for identical images (PSNR = inf)."""
    x = float(x)
    return round(x, 2) if x != float("inf") else "identical"


def model_fingerprint(path: str | Path) -> str:
    """A short id of a local model folder's weights (their names, sizes and times), for example caches."""
    import hashlib  # noqa: PLC0415

    p = Path(path)
    h = hashlib.sha1()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]

"""Running an evaluation: calibration, this rank's share of the batches (resumable), the file
barrier between ranks, then scoring and the reports (`run`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dgq.cli_common import CliError
from dgq.cli_common import save_png as _save_png
from dgq.config import learns_step_sizes
from dgq.eval.plan import (
    Options,
    Plan,
    batch_fingerprint,
    digest,
    done_batches,
    image_path,
    rank_from_env,
    rounding_key,
    selected_metrics,
    setting_fingerprint,
    write_json,
)
from dgq.eval.report import write_results
from dgq.eval.scoring import Scorers, score_setting
from dgq.eval.settings import DEFAULT_SETTINGS, PRESETS, RESULTS_VERSION, Setting, parse_setting, parse_settings
from dgq.prompts import read_prompts

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- generation
def _calibration(pipe, opts: Options, out: Path):
    """The run's calibration: D/calibration if it matches, else rank 0 makes it (others wait)."""
    import dgq  # noqa: PLC0415
    from dgq.calibration import Calibration, CalibrationMismatch, prompts_hash  # noqa: PLC0415
    from dgq.studio import default_calibration_prompts, resolution_of  # noqa: PLC0415

    model_id = str(getattr(pipe, "dgq_model_id", "unknown"))
    if opts.calib_prompts_file:
        prompts = read_prompts(opts.calib_prompts_file)
    else:
        try:
            prompts = default_calibration_prompts(model_id)
        except FileNotFoundError as e:
            raise CliError(f"no default calibration prompts for this model ({e}); pass --calib-prompts-file") from None
    steps = opts.calib_steps or opts.steps
    calib_guidance = opts.guidance if opts.calib_guidance is None else opts.calib_guidance
    expect = {"model": model_id, "prompts_sha": prompts_hash(prompts), "n_prompts": len(prompts), "steps": steps,
              "guidance": calib_guidance, "scheduler": pipe.scheduler.__class__.__name__,
              "resolution": resolution_of(pipe), "batch_size": opts.calib_batch_size}
    path = out / "calibration"
    try:
        return Calibration.load(path, expect=expect)
    except CalibrationMismatch as e:
        if path.with_suffix(".json").exists() and opts.rank == 0:
            log.warning("calibration in %s not used (%s); recalibrating", out, e)
    if opts.rank == 0:
        calib = dgq.calibrate(pipe, prompts, steps=steps, guidance=calib_guidance, batch_size=opts.calib_batch_size,
                              cache=opts.calib_cache, progress=opts.progress)
        calib.save(path)
        return Calibration.load(path, expect=expect)  # meta now carries the checksum
    t0 = time.monotonic()
    while True:  # file barrier: rank 0 writes it atomically
        time.sleep(opts.poll_interval)
        try:
            return Calibration.load(path, expect=expect)
        except CalibrationMismatch:
            if opts.wait_timeout and time.monotonic() - t0 > opts.wait_timeout:
                raise CliError(f"rank {opts.rank}: no calibration from rank 0 in {out} after "
                               f"{opts.wait_timeout:.0f} s") from None


def _plan_info(opts: Options, pipe, plan: Plan, settings: list[Setting], calib, prompts_sha: str) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from dgq.studio import resolution_of, weights_fingerprint  # noqa: PLC0415

    dev = next(pipe.unet.parameters()).device
    # a model retrained or edited in place keeps its name: without this an FP setting (no
    # calibration checksum) would resume from the old weights' images
    weights = "-".join(weights_fingerprint(m) for m in (pipe.unet, pipe.text_encoder, pipe.vae))
    info: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "model": str(getattr(pipe, "dgq_model_id", opts.model)),
        "model_arg": opts.model,
        "weights": weights,
        "preset": opts.preset,
        "prompts_file": opts.prompts_file,
        "prompts_sha": prompts_sha,
        "n_prompts": len(plan.prompts),
        "images_per_prompt": plan.images_per_prompt,
        "n_images": plan.n,
        "seed": plan.seed,
        "seed_rule": "image i: seed + i, prompt i // images_per_prompt",
        "batch_size": plan.batch_size,
        "steps": opts.steps,
        "guidance": opts.guidance,
        "scheduler": pipe.scheduler.__class__.__name__,
        "resolution": resolution_of(pipe),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "device_type": dev.type,
        "weight_search": opts.weight_search,
        "torch": torch.__version__,
        "calibration": None,
        "settings": [s.to_dict() for s in settings],
    }
    if calib is not None:
        m = calib.meta
        info["calibration"] = {k: m.get(k) for k in ("steps", "guidance", "n_prompts", "prompts_sha", "sha256",
                                                     "seconds")}
    learned = sorted({(s.config.w_bits, s.config.weight_rounding) for s in settings
                      if not s.is_fp and s.config.weight_rounding != "nearest"})
    if learned:  # only then: the plans of runs without learned rounding stay as they were
        from dgq.studio import stored_rounding_identity  # noqa: PLC0415

        info["roundings"] = {rounding_key(b, r): stored_rounding_identity(pipe, b, r) for b, r in learned}
    return info


def _generate(studio, out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any], opts: Options) -> int:
    """This rank's share of every setting; returns the number of batches generated."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    mine = plan.shard(opts.rank, opts.world_size)
    made = 0
    for setting in settings:
        sdir = out / setting.slug
        sdir.mkdir(parents=True, exist_ok=True)
        sfp = setting_fingerprint(info, setting)
        if opts.rank == 0:
            write_json(sdir / "manifest.json", {**setting.to_dict(), "fingerprint": sfp, "n_images": plan.n,
                                                 "status": "generating"})
        done = done_batches(out, setting, plan, sfp, mine, info["resolution"])
        todo = [b for b in mine if b[0] not in done]
        n_mine = sum(e - s for s, e in mine)
        tag = f" [rank {opts.rank}/{opts.world_size}]" if opts.world_size > 1 else ""
        bar = tqdm(total=n_mine, initial=n_mine - sum(e - s for s, e in todo), unit="img",
                   desc=f"{setting.spec}{tag}", disable=not opts.progress)
        log_path = sdir / f"log.rank{opts.rank}.jsonl"
        first = True
        for s, e in todo:
            g = studio.generate([plan.prompt(i) for i in range(s, e)], seed=[plan.seed_of(i) for i in range(s, e)],
                                config=setting.config, steps=opts.steps, guidance=opts.guidance)
            for k, img in enumerate(g.images):
                _save_png(img, image_path(out, setting, s + k))
            rec = {"start": s, "end": e, "fp": batch_fingerprint(sfp, plan, s, e), "seconds": round(g.seconds, 4),
                   "first": first, "rank": opts.rank, "device": info["device_type"], "time": round(time.time(), 2)}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            first = False
            made += 1
            bar.update(e - s)
        bar.close()
    return made


def _marker(out: Path, rank: int) -> Path:
    return out / ".ranks" / f"done.{rank}.json"


def _missing_images(out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any],
                    known: dict[str, set[int]] | None = None) -> dict[str, int]:
    """Images not yet done per setting; `known` (setting → done batch starts) spares re-checking
    batches found done by an earlier poll."""
    known = {} if known is None else known
    missing = {}
    for setting in settings:
        sfp = setting_fingerprint(info, setting)
        done = known.setdefault(setting.spec, set())
        todo = [b for b in plan.batches() if b[0] not in done]
        done |= done_batches(out, setting, plan, sfp, todo, info["resolution"])
        n = sum(e - s for s, e in todo if s not in done)
        if n:
            missing[setting.spec] = n
    return missing


def _wait_for_ranks(out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any], opts: Options,
                    plan_fp: str, started: float) -> None:
    """Rank 0's file barrier: wait until every planned image is on disk with a current log line.

    Gives up when every other rank has left a marker for this plan (or a failure marker written
    during this run) while images are still missing, or after `opts.wait_timeout` seconds.
    """
    t0 = time.monotonic()
    known: dict[str, set[int]] = {}
    while True:
        missing = _missing_images(out, settings, plan, info, known)
        if not missing:
            return
        if opts.world_size == 1:
            raise CliError(f"images still missing after generation: {missing}")
        markers = []
        for r in range(1, opts.world_size):
            try:
                markers.append(json.loads(_marker(out, r).read_text()))
            except (OSError, ValueError):
                markers.append(None)
        failed = [m for m in markers if m is not None and m.get("status") == "failed"
                  and m.get("time", 0) >= started - 60]
        if failed:
            raise CliError(f"rank(s) {[m['rank'] for m in failed]} failed ({failed[0].get('error')}); "
                           f"images missing {missing}; run the same command again to fill them in")
        if all(m is not None and m.get("plan") == plan_fp for m in markers):
            failed = [m["rank"] for m in markers if m.get("status") != "done"]
            raise CliError(f"ranks finished ({'failed: ' + str(failed) if failed else 'all done'}) but images are "
                           f"missing {missing}; run the same command again to fill them in")
        if opts.wait_timeout and time.monotonic() - t0 > opts.wait_timeout:
            raise CliError(f"waited {opts.wait_timeout:.0f} s for the other ranks; still missing {missing}; "
                           "run again (finished batches are kept)")
        time.sleep(opts.poll_interval)




def run(opts: Options) -> dict[str, Any] | None:
    """Generate (this rank's share), then on rank 0 wait for the others and score.

    Returns the results document on rank 0 (None on other ranks or with ``no_score``).
    """
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    (out / ".ranks").mkdir(exist_ok=True)
    marker = _marker(out, opts.rank)
    marker.unlink(missing_ok=True)
    if opts.score_only:
        return _score_only(opts)
    started = time.time()
    try:
        return _run(opts, started)
    except BaseException as e:
        if not marker.exists():  # tell rank 0 not to wait for this rank
            write_json(marker, {"rank": opts.rank, "world_size": opts.world_size, "plan": None, "status": "failed",
                                 "error": f"{type(e).__name__}: {e}"[:500], "time": time.time()})
        raise


def _run(opts: Options, started: float) -> dict[str, Any] | None:
    out = opts.out
    marker = _marker(out, opts.rank)
    settings = parse_settings(opts.settings)
    if not opts.prompts_file:
        raise CliError("eval: --prompts-file is required (or --score-only to rescore a finished run)")
    prompts = read_prompts(opts.prompts_file, opts.prompt_column)
    if opts.limit:
        prompts = prompts[:opts.limit]
    plan = Plan(tuple(prompts), opts.images_per_prompt, opts.seed, opts.batch_size)
    metrics = selected_metrics(opts.metrics, _is_embedded(opts.model))
    from dgq.loading import load_pipeline  # noqa: PLC0415
    from dgq.studio import Studio, resolution_of  # noqa: PLC0415

    device = opts.device
    if opts.world_size > 1:
        import torch  # noqa: PLC0415

        _, _, local = rank_from_env()
        if (device in (None, "cuda")) and torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
    pipe = load_pipeline(opts.model, device=device, dtype=opts.dtype)
    if opts.guidance is None:
        from dgq.loading import default_guidance  # noqa: PLC0415

        opts = replace(opts, guidance=default_guidance(pipe))
    if opts.preset:
        want = PRESETS[opts.preset]["resolution"]
        if resolution_of(pipe) != want or pipe.scheduler.__class__.__name__ != "PNDMScheduler":
            log.warning("preset %s expects %d px and PNDM/PLMS; this model gives %d px with %s: numbers will not "
                        "be comparable with the paper's", opts.preset, want, resolution_of(pipe),
                        pipe.scheduler.__class__.__name__)
    calib = None if all(s.is_fp for s in settings) else _calibration(pipe, opts, out)
    info = _plan_info(opts, pipe, plan, settings, calib, digest(list(prompts)))
    studio = Studio(pipe, calib, weight_search=opts.weight_search, max_batch=max(16, opts.batch_size),
                    max_steps=max(200, opts.steps))
    for path in opts.rounding_files:
        try:
            bits, name = studio.use_rounding_file(path)
        except ValueError as e:
            raise CliError(f"eval: --rounding-file: {e}") from None
        key = rounding_key(bits, name)
        if key in info.get("roundings", {}):  # the plan names the rounding its images were made with
            info["roundings"][key] = str(studio.rounding(bits, name).meta.get("sha256"))
    learned = _learned_act_ranges(studio, settings)
    if learned:  # only then: the plans of runs without qdiff-paper stay as they were
        info["act_ranges"] = learned
    plan_fp = digest({k: v for k, v in info.items() if k not in ("preset", "model_arg", "prompts_file")})
    if opts.rank == 0:
        write_json(out / "prompts.json", list(prompts))
        write_json(out / "plan.json", {**info, "metrics": metrics, "fingerprint": plan_fp})
    status = "failed"
    try:
        made = _generate(studio, out, settings, plan, info, opts)
        status = "done"
    finally:
        write_json(marker, {"rank": opts.rank, "world_size": opts.world_size, "plan": plan_fp, "status": status,
                             "time": time.time()})
    log.info("rank %d generated %d batches", opts.rank, made)
    if opts.rank != 0 or opts.no_score:
        return None
    _wait_for_ranks(out, settings, plan, info, opts, plan_fp, started)
    from dgq.bops import count_macs, to_meta  # noqa: PLC0415

    return _score(out, settings, plan, info, metrics, opts, count_macs(to_meta(pipe.unet)))


def _learned_act_ranges(studio, settings: list[Setting]) -> dict[str, str]:
    """{"W4A6": checksum} of the learned step sizes each `qdiff-paper` setting uses; a clear error
    naming the command when one is not stored (before any image is made)."""
    pairs = sorted({(s.config.w_bits, s.config.a_bits) for s in settings if learns_step_sizes(s.config)})
    out: dict[str, str] = {}
    for w, a in pairs:
        r = studio.act_ranges(w, a)
        if r is None:
            steps = (studio.calibration.meta or {}).get("steps")
            raise ValueError(f"qdiff-paper:W{w}A{a} needs Q-Diffusion's step sizes learned on this run's calibration "
                             f"({steps} steps): run `python -m dgq reconstruct --model {studio.model_id} --method "
                             f"qdiff-paper --w-bits {w} --a-bits {a}` (it learns on the default 25-step calibration, "
                             "so run the eval with --calib-steps 25)")
        out[f"W{w}A{a}"] = str(r.meta.get("sha256"))
    return out


def _is_embedded(model: str) -> bool:
    from dgq.loading import is_embedded  # noqa: PLC0415

    return is_embedded(model)


def _score(out: Path, settings: list[Setting], plan: Plan, info: dict[str, Any], metrics: list[str], opts: Options,
           macs=None) -> dict[str, Any]:
    """Score every setting from its files; results are rewritten after each one."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    device = info.get("device_type", "cpu") if opts.device is None else opts.device
    scorers = Scorers(opts, device="cuda" if str(device).startswith("cuda") else "cpu",
                      embedded=_is_embedded(info.get("model_arg") or info["model"]))
    fp_setting = next((s for s in settings if s.is_fp), None)
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    if opts.metric_size:
        notes["metric_size"] = f"images resized to {opts.metric_size} px (bicubic) for CLIP and FID"
    if opts.clip_random_init or opts.inception_random_init:
        notes["WARNING"] = "scoring networks with RANDOM weights (tests only): CLIP/FID numbers are meaningless"
    for setting in tqdm(settings, desc="scoring", unit="setting", disable=not opts.progress):
        row = score_setting(out, setting, plan, info, metrics, scorers, fp_setting, macs, opts.metric_size,
                            opts.clip_limit, opts.domain_fid_refs)
        rows.append(row)
        man_path = out / setting.slug / "manifest.json"
        man = {**setting.to_dict(), "fingerprint": setting_fingerprint(info, setting), "n_images": plan.n,
               "status": "complete" if row["complete"] else "incomplete", "metrics": row["metrics"]}
        man_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(man_path, man)
        notes.update(scorers.notes)
        write_results(out, info, rows, notes, metrics, complete=False)
    complete = all(r["complete"] for r in rows)
    write_results(out, info, rows, notes, metrics, complete=complete)
    return json.loads((out / "results.json").read_text())


def _score_only(opts: Options) -> dict[str, Any] | None:
    """Rescore the images of a previous run (plan.json + prompts.json in the output folder)."""
    if opts.rank != 0:
        return None
    out = opts.out
    try:
        info = json.loads((out / "plan.json").read_text())
        prompts = json.loads((out / "prompts.json").read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"--score-only: {out} holds no finished plan (plan.json/prompts.json): {e}") from None
    settings = [parse_setting(s["setting"]) for s in info["settings"]]
    if opts.settings != DEFAULT_SETTINGS:  # a subset of the run's settings
        wanted = {s.spec for s in parse_settings(opts.settings)}
        settings = [s for s in settings if s.spec in wanted]
    plan = Plan(tuple(prompts), info["images_per_prompt"], info["seed"], info["batch_size"])
    metrics = selected_metrics(opts.metrics, _is_embedded(info.get("model_arg") or info["model"]))
    macs = None
    try:
        import torch  # noqa: PLC0415
        from diffusers import UNet2DConditionModel  # noqa: PLC0415

        from dgq.bops import count_macs  # noqa: PLC0415
        from dgq.loading import resolve_model  # noqa: PLC0415

        cfg = UNet2DConditionModel.load_config(resolve_model(info["model"]), subfolder="unet")
        with torch.device("meta"):
            macs = count_macs(UNet2DConditionModel.from_config(cfg))
    except Exception as e:  # noqa: BLE001 - BOPs are optional when rescoring
        log.warning("BOPs not computed (model config unavailable: %s)", e)
    return _score(out, settings, plan, info, metrics, opts, macs)

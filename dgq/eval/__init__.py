"""`python -m dgq eval`: generate images for several settings and score them (Table 2 style).

One run = one prompt list × several settings (FP, baselines, DGQ and its ablations). For every
setting the images are written to ``D/<setting-slug>/<index:05d>.png`` and then scored:

* alignment — the shapes evaluator's per-attribute accuracy (`dgq.tiny.evaluator`), embedded model;
* CLIP score — open_clip cosine similarity (not ×100), SD models;
* fidelity — domain FID against fresh renders (embedded model) or Inception FID against reference
  statistics (SD models); PSNR / SSIM against the FP images of the same seeds;
* cost — BOPs and model size (`dgq.bops`), latency per image (from the generation log).

A metric that cannot be computed here (weights or reference data missing) is the string
``"unavailable: <why>"``, never a number. Image ``i`` is made from prompt ``i // images_per_prompt``
with seed ``seed + i``, in fixed batches ``[k·B, (k+1)·B)``; a batch is the unit of work, of
resumption and of sharding, so results do not depend on how the work was split.

Layout of the output folder ``D``::

    plan.json, prompts.json          what is generated (rank 0 writes them)
    calibration.{safetensors,json}   the calibration every setting of this run uses
    <slug>/00000.png …               images (written atomically)
    <slug>/log.rank<r>.jsonl         one line per finished batch: fingerprint, seconds, device
    <slug>/manifest.json             the setting, its fingerprint, completeness and metrics
    .ranks/done.<r>.json             "rank r has finished its share" (the file barrier)
    results.json / .csv / .md        rewritten after each scored setting

Resuming: a batch whose images all exist and whose log line carries the current fingerprint (model
and a hash of its weights, steps, guidance, dtype, device type, config, calibration checksum,
prompts, seeds) is skipped; anything else is regenerated. Sharding: with ``RANK``/``WORLD_SIZE`` in
the environment (``torchrun``, ``accelerate launch --multi_gpu``) rank ``r`` takes the batches ``k``
with ``k % WORLD_SIZE == r``; rank 0 then waits until every planned image is on disk and scores. See docs/evaluation.md.
"""

from __future__ import annotations

from dgq.eval.cli import add_parser, cmd_eval
from dgq.eval.plan import Options, Plan
from dgq.eval.run import run
from dgq.eval.settings import SETTING_GROUPS, Setting, canonical_spec, parse_setting, parse_settings

__all__ = ["SETTING_GROUPS", "Options", "Plan", "Setting", "add_parser", "canonical_spec", "cmd_eval",
           "parse_setting", "parse_settings", "run"]

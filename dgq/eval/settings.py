"""The eval settings language (`fp`, `tfmq:W8A8`, `dgq:W4A6:K16:nolog`, named groups), the
presets and the metric names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from dgq.config import FP, BaselineConfig, FPConfig, QuantConfig, make_config

log = logging.getLogger(__name__)


RESULTS_VERSION = 1
UNAVAILABLE = "unavailable: "  # same convention as dgq.metrics (imported lazily there)
METRIC_NAMES = ("align", "domain-fid", "clip", "fid", "psnr", "ssim")
SHAPES_METRICS = ("align", "domain-fid", "clip", "psnr", "ssim")
SD_METRICS = ("clip", "fid", "psnr", "ssim")
DEFAULT_SETTINGS = "fp,tfmq:W8A8,dgq:W8A8:K16"
DEFAULT_SEED = 42  # the authors' seed_everything(42); here image i gets seed 42 + i

#: Paper protocols (dgq-method.md §F.4). Explicit flags override every value.
PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(steps=25, guidance=7.5, images_per_prompt=1, batch_size=5, metric_size=256, clip_limit=3000,
                 resolution=512, metrics="clip,fid,psnr,ssim"),
    "parti": dict(steps=25, guidance=7.5, images_per_prompt=3, batch_size=3, metric_size=0, clip_limit=3000,
                  resolution=512, metrics="clip,psnr,ssim"),
}
BUILTIN = dict(steps=25, guidance=None, images_per_prompt=1, batch_size=4, metric_size=0, clip_limit=0,
               metrics="auto")

#: Named groups usable inside --settings.
SETTING_GROUPS: dict[str, list[str]] = {
    "table2": ["fp"] + [f"{m}:W{w}A{a}" + (f":K{k}" if m == "dgq" else "")
                        for w, a in ((8, 8), (8, 6), (4, 8), (4, 6))
                        for m, k in (("qdiff", 0), ("tfmq", 0), ("dgq", 8), ("dgq", 16))],
    "ablation": ["fp", "dgq:W4A6:K16", "dgq:W4A6:K16:nogroups", "dgq:W4A6:K16:axis=channel",
                 "dgq:W4A6:K16:axis=pixel", "dgq:W4A6:K16:nolog", "dgq:W4A6:K16:nostart", "dgq:W4A6:K16:static",
                 "dgq:W4A6:K16:notime"],
}
_METHODS = {"fp": "fp", "fp32": "fp", "qdiff": "qdiff", "q-diff": "qdiff", "tfmq": "tfmq", "dgq": "dgq",
            "qdiff-paper": "qdiff-paper", "tfmq-paper": "tfmq-paper"}
#: DGQ ablation flags → DGQConfig field and value, in canonical order.
_FLAGS: dict[str, tuple[str, Any]] = {
    "nogroups": ("use_groups", False),
    "nolog": ("log_quant", False),
    "nostart": ("start_token", False),
    "static": ("dynamic_scale", False),
    "notime": ("time_aware", False),
    "batchscale": ("scale_scope", "batch"),
}




# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One row of the results: a config and its canonical spec (``dgq:W4A6:K16:nolog``)."""

    spec: str
    config: QuantConfig

    @property
    def slug(self) -> str:
        """Folder name: the spec lower-cased with ``:``/``=`` turned into ``-``."""
        return re.sub(r"[:=]", "-", self.spec.lower())

    @property
    def is_fp(self) -> bool:
        return isinstance(self.config, FPConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.spec, "slug": self.slug, "label": self.config.label(), "config": self.config.to_dict(),
                "w_bits": self.config.w_bits, "a_bits": self.config.a_bits}


def canonical_spec(config: QuantConfig) -> str:
    """The spec `parse_setting` maps back to `config` (used for slugs and fingerprints)."""
    if isinstance(config, FPConfig):
        return "fp"
    ada = "" if config.weight_rounding == "nearest" else f":{config.weight_rounding}"
    ada += ":execution=int8" if config.execution == "int8" else ""
    if isinstance(config, BaselineConfig):
        if config.style.paper:  # AdaRound (with TIAR for TFMQ-DM) is part of the recipe, not an option
            ada = ada.replace(f":{config.weight_rounding}", "")
        return f"{config.style.value}:W{config.w_bits}A{config.a_bits}{ada}"
    parts = [f"dgq:W{config.w_bits}A{config.a_bits}:K{config.groups}"]
    if not config.use_groups:
        parts.append("nogroups")
    if config.axis.value != "auto":
        parts.append(f"axis={config.axis.value}")
    parts += [name for name, (fld, val) in _FLAGS.items() if name != "nogroups" and
              (getattr(config, fld) == val or getattr(getattr(config, fld), "value", None) == val)]
    return ":".join(parts) + ada


def parse_setting(text: str) -> Setting:
    """``method[:WxAy][:Kn][:flag…]`` → `Setting`. Case-insensitive; W8A8 and K16 are the defaults.

    method: fp, qdiff, tfmq, dgq, qdiff-paper, tfmq-paper (the baselines as their papers run
    them; AdaRound weights implied). Flags (DGQ only): nogroups, axis=auto|channel|pixel, nolog,
    nostart, static, notime, batchscale. Any quantized method: adaround (the weights' learned
    rounding, `python -m dgq reconstruct`, instead of round-to-nearest); execution=simulated|int8
    (int8: integer GEMMs, `dgq.int8`; W <= 8, A = 8).

    Example:
        >>> parse_setting("dgq:W4A6:K8:nolog").config.label()
        'DGQ W4A6 K=8 no-log'
    """
    raw = text.strip()
    tokens = [t.strip().lower() for t in raw.split(":")]
    method = _METHODS.get(tokens[0])
    if method is None:
        raise ValueError(f"setting {raw!r}: unknown method {tokens[0]!r}; allowed: "
                         "fp, qdiff, tfmq, dgq, qdiff-paper, tfmq-paper")
    w = a = None
    opts: dict[str, Any] = {}
    rounding = "nearest"
    execution = "simulated"
    for tok in tokens[1:]:
        if tok in ("adaround", "adaround-tiar"):
            rounding = tok
        elif tok.startswith("execution="):
            execution = tok.split("=", 1)[1]
        elif m := re.fullmatch(r"w(\d+)a(\d+)", tok):
            if w is not None:
                raise ValueError(f"setting {raw!r}: bit-widths given twice")
            w, a = int(m.group(1)), int(m.group(2))
        elif m := re.fullmatch(r"k(\d+)", tok):
            opts["groups"] = int(m.group(1))
        elif tok.startswith("axis="):
            opts["axis"] = tok.split("=", 1)[1]
        elif tok in _FLAGS:
            fld, val = _FLAGS[tok]
            opts[fld] = val
        else:
            raise ValueError(f"setting {raw!r}: unknown part {tok!r}; expected WxAy, Kn or one of "
                             f"{', '.join(['axis=…', *_FLAGS, 'adaround', 'execution=…'])}")
    if method == "fp":
        if w is not None or opts or rounding != "nearest" or execution != "simulated":
            raise ValueError(f"setting {raw!r}: fp takes no bit-widths or options")
        return Setting("fp", FP)
    if method != "dgq" and opts:
        raise ValueError(f"setting {raw!r}: groups and flags apply to dgq only")
    try:
        config = make_config(method, w_bits=8 if w is None else w, a_bits=8 if a is None else a,
                             weight_rounding=rounding, execution=execution, **opts)
    except ValueError as e:
        raise ValueError(f"setting {raw!r}: {e}") from None
    return Setting(canonical_spec(config), config)


def parse_settings(text: str) -> list[Setting]:
    """Comma-separated `parse_setting` specs; the names in `SETTING_GROUPS` expand in place."""
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            items.extend(SETTING_GROUPS.get(part.lower(), [part]))
    if not items:
        raise ValueError("--settings is empty; e.g. fp,tfmq:W8A8,dgq:W4A6:K16")
    out: list[Setting] = []
    for item in items:
        s = parse_setting(item)
        if any(o.spec == s.spec for o in out):
            raise ValueError(f"setting {s.spec} is listed twice in --settings")
        out.append(s)
    return out

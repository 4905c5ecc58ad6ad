"""The run's reports: results.json (rows and notes), results.csv and results.md.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from dgq.bops import si
from dgq.eval.plan import write_json, write_text
from dgq.eval.settings import RESULTS_VERSION, UNAVAILABLE

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- reports
_TABLE_COLS = [  # (metric key, header, format)
    ("align_all", "align ↑", "{:.3f}"),
    ("domain_fid", "domain FID ↓", "{:.2f}"),
    ("clip_score", "CLIP ↑", "{:.4f}"),
    ("fid", "FID ↓", "{:.2f}"),
    ("psnr", "PSNR ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("bops", "BOPs", None),
    ("size_mb", "size MB", "{:.2f}"),
    ("latency_s", "s/img", "{:.3f}"),
]


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: row[k] for k in ("setting", "label", "w_bits", "a_bits", "n_images", "complete")}
    for k, v in row["metrics"].items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}_{kk}"] = vv
        else:
            flat[k] = v
    return flat


def write_results(out: Path, info: dict[str, Any], rows: list[dict[str, Any]], notes: dict[str, str],
                  metrics: list[str], complete: bool) -> None:
    """results.json, results.csv and results.md (each written atomically)."""
    doc = {"version": RESULTS_VERSION, "complete": complete, "plan": {k: v for k, v in info.items() if k != "settings"},
           "metrics": metrics, "notes": notes, "settings": rows}
    write_json(out / "results.json", doc)
    flats = [_flat_row(r) for r in rows]
    cols: list[str] = []
    for f in flats:
        cols += [k for k in f if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for f in flats:
        w.writerow({k: ("" if f.get(k) is None else f.get(k)) for k in cols})
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "results.md", render_markdown(info, rows, notes, complete))


def render_markdown(info: dict[str, Any], rows: list[dict[str, Any]], notes: dict[str, str], complete: bool) -> str:
    present = [c for c in _TABLE_COLS if any(c[0] in r["metrics"] for r in rows)]
    reasons: list[str] = []

    def cell(v: Any, fmt: str | None, key: str) -> str:
        if v is None:
            return "ref" if key in ("psnr", "ssim") else "—"
        if isinstance(v, str):
            if v.startswith(UNAVAILABLE):
                if v not in reasons:
                    reasons.append(v)
                return f"n/a [{reasons.index(v) + 1}]"
            return v
        return si(v, sep="") if fmt is None else fmt.format(v)

    lines = [f"# DGQ evaluation: {info.get('model')}", "",
             f"{info.get('n_images')} images ({info.get('n_prompts')} prompts × {info.get('images_per_prompt')}), "
             f"{info.get('steps')} steps, guidance {info.get('guidance')}, {info.get('resolution')} px, "
             f"{info.get('scheduler')}, seeds {info.get('seed')}+i, batch {info.get('batch_size')}, "
             f"{info.get('dtype')} on {info.get('device_type')}" + (f", preset {info['preset']}" if info.get("preset")
                                                                    else ""), ""]
    if not complete:
        lines += ["**Partial results** (the run has not finished every setting).", ""]
    head = ["setting", "W/A"] + [h for _, h, _ in present]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        wa = "32/32" if r["w_bits"] == 32 else f"{r['w_bits']}/{r['a_bits']}"
        cells = [r["label"], wa] + [cell(r["metrics"].get(k), fmt, k) for k, _, fmt in present]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for i, why in enumerate(reasons, 1):
        lines.append(f"[{i}] {why}")
    if reasons:
        lines.append("")
    for k, v in notes.items():
        lines.append(f"- {k}: {v}")
    lines.append("- PSNR/SSIM against the FP images of the same seeds; FIDs are biased upward at small sample counts "
                 "(compare only at equal numbers of images); s/img excludes each process's first batch.")
    return "\n".join(lines) + "\n"

"""The Markdown tables of docs/results.md, from the results.json that `paper_tables.sh` writes.

    python benchmarks/results_tables.py runs/results/table2/results.json

Prints the "Table 2 structure" and "Table 3 ablations" tables (rows in the order the document
discusses them) and the FP row's per-attribute accuracies, so the document is regenerated from
the run instead of being copied by hand. A setting the run lacks is an error, not a gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLE3 = ["tfmq:W4A6", "dgq:W4A6:K16:nolog:nostart:static", "dgq:W4A6:K16:nogroups", "dgq:W4A6:K16",
          "dgq:W4A6:K16:axis=channel", "dgq:W4A6:K16:axis=pixel", "dgq:W4A6:K2", "dgq:W4A6:K8", "dgq:W8A8:K2",
          "dgq:W4A6:K16:static", "dgq:W4A6:K16:nostart"]
HEADER = ("| setting | W/A | align ↑ | colour ↑ | pair colours ↑ | domain FID ↓ | PSNR ↑ | SSIM ↑ | BOPs | size MB "
          "| s/img |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _bops(b: float) -> str:
    g = b / 1e9
    return f"{g:.0f}G" if g >= 100 else f"{g:.1f}G"


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def row(s: dict) -> str:
    m = s["metrics"]
    a = m["align"]
    psnr = "ref" if s["setting"] == "fp" else _num(m.get("psnr"), ".2f")
    ssim = "ref" if s["setting"] == "fp" else _num(m.get("ssim"), ".4f")
    return (f"| {s['label']} | {min(s['w_bits'], 32)}/{min(s['a_bits'], 32)} | {a['all']:.3f} | "
            f"{a['single_color']:.3f} | {a['pair_colors']:.3f} | {_num(m.get('domain_fid'), '.1f')} | {psnr} | "
            f"{ssim} | {_bops(m['bops'])} | {m['size_mb']:.2f} | {m['latency_s']:.3f} |")


#: `BARS=1 paper_tables.sh`: the Table 2 rows of the quantization bars and Table 3(c) at A6
BARS_TABLE2 = ["fp"] + [f"{m}:{wa}" for wa in ("W8A8", "W8A6", "W4A6") for m in ("qdiff", "tfmq", "dgq")]
BARS_TABLE3 = ["dgq:W8A6:K16", "dgq:W8A6:K16:nolog:nostart:static", "dgq:W4A6:K16",
               "dgq:W4A6:K16:nolog:nostart:static"]


def tables(results: dict, layout: str = "full") -> str:
    """The document's tables: `layout` "full" (the 31-setting run) or "bars" (`BARS=1`)."""
    by = {s["setting"]: s for s in results["settings"]}
    if layout == "bars":
        order2 = [k if k.startswith(("fp", "qdiff", "tfmq")) else k + ":K16" for k in BARS_TABLE2]
        table3 = BARS_TABLE3
    elif layout == "full":
        order2 = ["fp"]
        for wa in ("W8A8", "W8A6", "W4A8", "W4A6", "W4A4"):
            order2 += [f"qdiff:{wa}", f"tfmq:{wa}", f"dgq:{wa}:K8", f"dgq:{wa}:K16"]
        order2 += ["tfmq:W8A4", "dgq:W8A4:K16"]
        table3 = TABLE3
    else:
        raise ValueError(f"layout must be 'full' or 'bars', not {layout!r}")
    missing = [k for k in order2 + table3 if k not in by]
    if missing:
        raise SystemExit(f"results lack the settings {missing}: run benchmarks/paper_tables.sh to the end")
    fp = by["fp"]["metrics"]["align"]
    lines = [f"FP: align {fp['all']:.3f}, single-object colour / shape / position {fp['single_color']:.3f} / "
             f"{fp['single_shape']:.3f} / {fp['single_position']:.3f}, pair colours {fp['pair_colors']:.3f} "
             f"({fp['n_single']} single-object and {fp['n_pair']} two-object prompts)",
             "", "## Table 2 structure", "", HEADER] + [row(by[k]) for k in order2]
    lines += ["", "## Table 3 ablations", "", HEADER] + [row(by[k]) for k in table3]
    if layout == "bars" and any(k.endswith("-paper") or "-paper:" in k for k in by):  # the paper-recipe rows were run
        missing = [k for k in PAPER_TABLE2 if k not in by]
        if missing:
            raise SystemExit(f"results lack the paper-recipe settings {missing}: run them to the end")
        lines += ["", "## Table 2 with the paper's recipe", "", HEADER] + [row(by[k]) for k in PAPER_TABLE2]
    return "\n".join(lines)


#: the paper-recipe rows: both baselines as their papers run them, DGQ with AdaRound weights and,
#: for the deltas, DGQ with round-to-nearest weights
PAPER_TABLE2 = [k for wa in ("W8A8", "W8A6", "W4A8", "W4A6")
                for k in (f"qdiff-paper:{wa}", f"tfmq-paper:{wa}", f"dgq:{wa}:K8:adaround", f"dgq:{wa}:K16:adaround",
                          f"dgq:{wa}:K16")]

PLAN_KEYS = ("model", "weights", "prompts_sha", "steps", "guidance", "seed", "resolution", "scheduler")


def merge(results: dict, others: list[dict], replace: bool = False) -> dict:
    """`results` with the settings of `others` appended (runs of the same plan — model, weights,
    steps, guidance, seeds — whose FP images are the same, so PSNR/SSIM share one reference).
    `replace=True`: a setting `results` already holds is replaced in place by the other run's
    (a re-made row, e.g. after a method changed), except FP, the shared reference."""
    out = dict(results, settings=list(results["settings"]))
    have = {s["setting"]: i for i, s in enumerate(out["settings"])}
    for o in others:
        diff = [k for k in PLAN_KEYS if o["plan"].get(k) != results["plan"].get(k)]
        if diff:
            raise SystemExit(f"cannot merge a run with another plan ({', '.join(diff)} differ)")
        for s in o["settings"]:
            if s["setting"] not in have:
                have[s["setting"]] = len(out["settings"])
                out["settings"].append(s)
            elif replace and s["setting"] != "fp":
                out["settings"][have[s["setting"]]] = s
        out["complete"] = bool(out.get("complete")) and bool(o.get("complete"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="results.json of a paper_tables.sh run")
    ap.add_argument("--layout", choices=["full", "bars"], default="bars", help="bars: a BARS=1 run")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="results.json of runs of the same plan whose "
                    "settings are added (e.g. the paper-recipe rows)")
    ap.add_argument("--replace", action="store_true", help="settings of --merge runs replace those already present "
                    "(FP excepted) instead of being skipped")
    ap.add_argument("--write", type=Path, default=None, help="also write the merged results.json here")
    a = ap.parse_args(argv)
    results = merge(json.loads(a.results.read_text()), [json.loads(p.read_text()) for p in a.merge], a.replace)
    if a.write is not None:
        a.write.write_text(json.dumps(results, indent=1))
    if not results.get("complete"):
        print("warning: the run is not complete; rows may be missing", file=sys.stderr)
    print(tables(results, a.layout))


if __name__ == "__main__":
    main()

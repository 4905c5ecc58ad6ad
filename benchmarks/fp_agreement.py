"""How close each quantized setting stays to FP on what the images show, measured per image.

An alignment score is a mean over prompts: two settings can score the same while getting different
prompts right, and at 200 prompts its noise (about ±3.5 points) hides differences of a few points.
"Closer to FP" is a paired question, so this script answers it per image, on the same seeds:

* ``same_reading``: the share of images that the shapes evaluator reads as the same scene as the FP
  image of the same seed (count, background, and every object attribute: `Evaluator.predict`);
* ``verdict_agree``: the share whose prompt verdict (meets every ask or not) equals FP's, with
  ``lost`` (FP right, quantized wrong) and ``gained`` (the reverse);
* ``psnr``: mean PSNR against the FP image, over the images that differ from it (an identical
  image has an infinite PSNR; a setting identical to FP everywhere reports inf);
* with the domain CLIP (`assets/tiny-clip`), the paper's alignment metric image by image:
  ``clip`` (mean CLIP score), ``clip_gap`` (mean |CLIP score − the FP image's|, per image: how far
  each image's prompt alignment moved, in either direction) and ``image_sim`` (mean cosine of the
  CLIP image embeddings of the image and the FP image). Without the domain CLIP they are None and
  the tables say "unavailable".

A setting may be named ``LABEL=FOLDER``, split at the last ``=`` (default: the eval's label in its
manifest). ``--pool`` joins the ``--json`` files of runs on other prompts into one table, matching
settings by label.

``--pair A:B`` compares two settings image by image: the difference of their ``same_reading``, of
their PSNR and of their ``clip_gap`` with a paired bootstrap 95 % interval (resampling prompts), and
an exact two-sided sign test on the images where exactly one of the two reads as FP does.

    python -m benchmarks.fp_agreement --run runs/results/bars \\
        --settings dgq-w4a6-k16,dgq-w4a6-k16-adaround --pair dgq-w4a6-k16-adaround:dgq-w4a6-k16

A setting is a folder of the run, or a path to another run's folder made with the same prompts,
seeds and model (its images are then compared with this run's FP images).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _images(folder: Path, n: int) -> list[Image.Image]:
    from dgq.eval.plan import image_file  # noqa: PLC0415

    paths = [image_file(folder, i) for i in range(n)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {n} images missing in {folder} (e.g. {missing[0].name})")
    return [Image.open(p).convert("RGB") for p in paths]


def sign_test(k: int, n: int) -> float:
    """Exact two-sided binomial test of k successes in n trials at p = 1/2."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_ci(diff: np.ndarray, reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of paired per-image differences (prompts resampled)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(reps, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def read(ev, images: list[Image.Image], prompts: list[str]) -> dict[str, Any]:
    """The evaluator's reading of each image and whether it meets its prompt (one network pass)."""
    reading, judged = ev.predict_and_judge(images, prompts)
    return {"ok": np.array([bool(j and j["all"]) for j in judged]), "reading": reading}


class ClipReader:
    """CLIP image embeddings and CLIP scores with the domain CLIP (prompt embeddings computed once)."""

    def __init__(self, scorer, prompts: list[str]) -> None:
        self.scorer = scorer
        self.text = scorer.embed_text(prompts)  # unit vectors, no grad (DomainClipScorer)

    def read(self, images: list[Image.Image]) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        step = self.scorer.batch_size
        emb = torch.cat([self.scorer.embed_images(images[i:i + step]) for i in range(0, len(images), step)])
        return {"emb": emb, "clip": (emb * self.text).sum(-1).double().numpy()}


def clip_reader(prompts: list[str]) -> tuple[ClipReader | None, str]:
    """The domain CLIP reader, or None and why it is unavailable."""
    try:
        from dgq.tiny.clip import DomainClipScorer  # noqa: PLC0415

        return ClipReader(DomainClipScorer(), prompts), ""
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        return None, f"domain CLIP unavailable ({e})"


def per_image(ev, images: list[Image.Image], prompts: list[str], fp: dict[str, Any],
              clip: ClipReader | None = None) -> dict[str, Any]:
    """Per-image verdicts, readings, PSNR and (with `clip`) CLIP figures of one setting against FP."""
    from dgq import metrics as M  # noqa: PLC0415
    from dgq.tiny.evaluator import to_uint8_batch  # noqa: PLC0415

    out = read(ev, images, prompts)
    out["same"] = np.array([a == b for a, b in zip(out["reading"], fp["reading"])])
    out["psnr"] = np.asarray(M.psnr(to_uint8_batch(images), fp["pixels"], reduction="none"), dtype=np.float64)
    if clip is not None and "emb" in fp:
        c = clip.read(images)
        out["clip"] = c["clip"]
        out["clip_gap"] = np.abs(c["clip"] - fp["clip"])
        out["image_sim"] = (c["emb"] * fp["emb"]).sum(-1).double().numpy()
    return out


def label_of(folder: Path, fallback: str) -> str:
    """The eval's label of a setting folder (its manifest.json), else `fallback`."""
    try:
        return str(json.loads((folder / "manifest.json").read_text())["label"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


CLIP_KEYS = ("clip", "clip_gap", "image_sim")  # per-setting CLIP figures (None without the domain CLIP)


def summary(name: str, s: dict[str, Any], fp: dict[str, Any], label: str | None = None) -> dict[str, Any]:
    psnr = s["psnr"]
    finite = psnr[np.isfinite(psnr)]
    return {"setting": name, "label": label or name, "n": int(len(s["ok"])), "align": float(s["ok"].mean()),
            "same_reading": float(s["same"].mean()), "verdict_agree": float((s["ok"] == fp["ok"]).mean()),
            "lost": int((fp["ok"] & ~s["ok"]).sum()), "gained": int((~fp["ok"] & s["ok"]).sum()),
            "psnr": float(finite.mean()) if len(finite) else float("inf"),
            **{k: float(s[k].mean()) if k in s else None for k in CLIP_KEYS}}


def _f(x: float | None, fmt: str) -> str:
    return "unavailable" if x is None else f"{x:{fmt}}"


def markdown(rows: list[dict[str, Any]], fp_align: float, fp_clip: float | None = None) -> str:
    """The settings as a markdown table (what docs/fp-agreement.md and docs/adaround.md show)."""
    out = [f"| setting | align ↑ (FP {fp_align:.3f}) | same reading as FP ↑ | verdict agrees with FP ↑ | lost | gained "
           f"| PSNR ↑ | CLIP (FP {_f(fp_clip, '.4f')}) | CLIP gap to FP ↓ | CLIP image sim. to FP ↑ |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['align']:.3f} | {r['same_reading']:.3f} | {r['verdict_agree']:.3f} | "
                   f"{r['lost']} | {r['gained']} | {r['psnr']:.2f} | {_f(r.get('clip'), '.4f')} | "
                   f"{_f(r.get('clip_gap'), '.4f')} | {_f(r.get('image_sim'), '.4f')} |")
    return "\n".join(out) + "\n"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _db(x: float | None) -> str:
    return "— (identical images)" if x is None else f"{x:+.2f} dB"


def pairs_markdown(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> str:
    """The paired comparisons as a markdown table, settings named by their labels."""
    label = {r["setting"]: r["label"] for r in rows}
    out = ["| A vs B | same reading, A − B | read as FP only by A / only by B | sign test p | PSNR, A − B "
           "| CLIP gap to FP, A − B |", "|---|---|---|---|---|---|"]
    def ci(v: list[float] | None, fmt: str) -> str:
        return "" if v is None else f" [{v[0]:{fmt}}, {v[1]:{fmt}}]"

    for c in pairs:
        out.append(f"| {label.get(c['a'], c['a'])} vs {label.get(c['b'], c['b'])} | {c['same_reading_diff']:+.3f}"
                   f"{ci(c.get('same_reading_ci95'), '+.3f')} | {c['only_a_reads_as_fp']} / {c['only_b_reads_as_fp']} | "
                   f"{_p(c['sign_test_p'])} | {_db(c['psnr_diff'])}{ci(c.get('psnr_ci95'), '+.2f')} | "
                   f"{_f(c.get('clip_gap_diff'), '+.4f')}{ci(c.get('clip_gap_ci95'), '+.4f')} |")
    return "\n".join(out) + "\n"


def compare(a: str, b: str, sa: dict[str, Any], sb: dict[str, Any]) -> dict[str, Any]:
    d_same = sa["same"].astype(np.float64) - sb["same"].astype(np.float64)
    only_a = int((sa["same"] & ~sb["same"]).sum())
    only_b = int((~sa["same"] & sb["same"]).sum())
    pa, pb = sa["psnr"], sb["psnr"]
    keep = np.isfinite(pa) & np.isfinite(pb)
    d_psnr = pa[keep] - pb[keep]
    return {"a": a, "b": b,
            "same_reading_diff": float(d_same.mean()), "same_reading_ci95": bootstrap_ci(d_same),
            "only_a_reads_as_fp": only_a, "only_b_reads_as_fp": only_b,
            "sign_test_p": sign_test(only_a, only_a + only_b),
            "psnr_diff": float(d_psnr.mean()) if len(d_psnr) else None,
            "psnr_ci95": bootstrap_ci(d_psnr) if len(d_psnr) else None, "psnr_n": int(keep.sum()),
            **clip_compare(sa, sb)}


def clip_compare(sa: dict[str, Any], sb: dict[str, Any]) -> dict[str, Any]:
    """Paired CLIP-gap difference (negative: A's images keep FP's CLIP score more closely)."""
    if "clip_gap" not in sa or "clip_gap" not in sb:
        return {"clip_gap_diff": None, "clip_gap_ci95": None}
    d = sa["clip_gap"] - sb["clip_gap"]
    return {"clip_gap_diff": float(d.mean()), "clip_gap_ci95": bootstrap_ci(d)}


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' figures (their --json files) as one, settings and pairs matched by label:
    means weighted by image counts, counts summed, the sign test on the summed counts, and paired
    intervals over all images when every run stored its per-image values (`--per-image`)."""
    def by_label(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {x["label"]: x for x in r["settings"]}

    tables = [by_label(r) for r in results]
    labels = [lab for lab in tables[0] if all(lab in t for t in tables)]
    n_all = sum(r["n"] for r in results)
    rows = []
    for lab in labels:
        xs = [t[lab] for t in tables]
        n = sum(x["n"] for x in xs)
        row = {"setting": lab, "label": lab, "n": n}
        for k in ("align", "same_reading", "verdict_agree", "psnr"):
            row[k] = sum(x[k] * x["n"] for x in xs) / n
        for k in CLIP_KEYS:
            row[k] = _weighted([(x.get(k), x["n"]) for x in xs])
        row.update(lost=sum(x["lost"] for x in xs), gained=sum(x["gained"] for x in xs))
        rows.append(row)
    pairs = []
    for c0 in results[0]["pairs"]:
        key = (_label_in(results[0], c0["a"]), _label_in(results[0], c0["b"]))
        cs = []
        for r in results:
            got = [c for c in r["pairs"] if (_label_in(r, c["a"]), _label_in(r, c["b"])) == key]
            if got:
                cs.append((r["n"], got[0]))
        if len(cs) != len(results):
            continue
        a_only, b_only = sum(c["only_a_reads_as_fp"] for _, c in cs), sum(c["only_b_reads_as_fp"] for _, c in cs)
        pairs.append({"a": key[0], "b": key[1], **_pooled_intervals(results, cs),
                      "same_reading_diff": sum(n * c["same_reading_diff"] for n, c in cs) / n_all,
                      "only_a_reads_as_fp": a_only, "only_b_reads_as_fp": b_only,
                      "sign_test_p": sign_test(a_only, a_only + b_only),
                      "psnr_diff": (sum(c["psnr_n"] * c["psnr_diff"] for _, c in cs if c["psnr_n"])
                                    / sum(c["psnr_n"] for _, c in cs)) if any(c["psnr_n"] for _, c in cs) else None,
                      "psnr_n": sum(c["psnr_n"] for _, c in cs),
                      "clip_gap_diff": _weighted([(c.get("clip_gap_diff"), n) for n, c in cs])})
    fp_align = sum(r["fp_align"] * r["n"] for r in results) / n_all
    fp_clip = _weighted([(r.get("fp_clip"), r["n"]) for r in results])
    return {"runs": [r["run"] for r in results], "n": n_all, "fp_align": fp_align, "fp_clip": fp_clip,
            "settings": rows, "pairs": pairs}


def per_image_values(s: dict[str, Any]) -> dict[str, list]:
    """What `--per-image` stores of one setting: enough to redo `compare` on pooled runs."""
    out = {"same": s["same"].astype(int).tolist(),
           "psnr": [None if not math.isfinite(v) else round(float(v), 3) for v in s["psnr"]]}
    if "clip_gap" in s:
        out["clip_gap"] = [round(float(v), 6) for v in s["clip_gap"]]
    return out


def dump(result: dict[str, Any]) -> str:
    """The --json text: indented, with each setting's per-image lists on one line."""
    body = {k: v for k, v in result.items() if k != "per_image"}
    text = json.dumps(body, indent=1, ensure_ascii=False)
    if "per_image" in result:
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                          for k, v in result["per_image"].items())
        text = text[:-2] + ',\n "per_image": {\n' + rows + "\n }\n}"
    return text + "\n"


def _as_arrays(v: dict[str, list]) -> dict[str, np.ndarray]:
    out = {"same": np.asarray(v["same"], dtype=bool),
           "psnr": np.asarray([np.inf if x is None else x for x in v["psnr"]], dtype=np.float64)}
    if "clip_gap" in v:
        out["clip_gap"] = np.asarray(v["clip_gap"], dtype=np.float64)
    return out


def _pooled_intervals(results: list[dict[str, Any]], cs: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Bootstrap intervals of a pooled pair from the runs' stored per-image values ({} without)."""
    if not all("per_image" in r for r in results):
        return {}
    a_parts, b_parts = [], []
    for r, (_, c) in zip(results, cs):
        a_parts.append(_as_arrays(r["per_image"][c["a"]]))
        b_parts.append(_as_arrays(r["per_image"][c["b"]]))
    join = {k: np.concatenate([p[k] for p in a_parts]) for k in a_parts[0] if all(k in p for p in a_parts + b_parts)}
    other = {k: np.concatenate([p[k] for p in b_parts]) for k in join}
    full = compare("a", "b", join, other)
    keep = ["same_reading_ci95", "psnr_ci95"] + (["clip_gap_ci95"] if "clip_gap" in join else [])
    return {k: None if full[k] is None else list(full[k]) for k in keep}  # lists: as read back from JSON


def _weighted(values: list[tuple[float | None, int]]) -> float | None:
    """The count-weighted mean, None when any part lacks the value (a run scored without CLIP)."""
    if any(v is None for v, _ in values):
        return None
    return sum(v * n for v, n in values) / sum(n for _, n in values)


def _label_in(result: dict[str, Any], setting: str) -> str:
    return next(x["label"] for x in result["settings"] if x["setting"] == setting)


def _resolve(run: Path, spec: str) -> tuple[str, Path]:
    p = Path(spec)
    if (run / spec).is_dir():
        return spec, run / spec
    if p.is_dir():
        return spec, p
    raise FileNotFoundError(f"setting {spec!r}: no folder {run / spec} and no folder {p}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/results/bars", help="a finished `dgq eval` output folder with an fp/ folder")
    ap.add_argument("--settings", default="", help="comma-separated folders (default: every folder of the run but fp)")
    ap.add_argument("--pair", action="append", default=[], metavar="A:B", help="compare two of the settings")
    ap.add_argument("--limit", type=int, default=0, help="first N images only")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--markdown", action="store_true", help="print the settings as a markdown table too")
    ap.add_argument("--no-clip", action="store_true", help="leave out the domain-CLIP columns")
    ap.add_argument("--per-image", action="store_true",
                    help="store the per-image values in --json too (then --pool gives intervals)")
    ap.add_argument("--pool", nargs="+", metavar="JSON", default=None,
                    help="instead: pool the --json files of several runs (settings and pairs matched by label)")
    a = ap.parse_args(argv)
    if a.pool:
        try:
            pooled = pool([json.loads(Path(f).read_text()) for f in a.pool])
        except (OSError, ValueError, KeyError, StopIteration) as e:
            print(f"error: cannot pool {a.pool}: {e!r}", file=sys.stderr)
            return 2
        print(f"{pooled['n']} images in {len(a.pool)} runs, FP align {pooled['fp_align']:.3f}, "
              f"FP CLIP {_f(pooled['fp_clip'], '.4f')}")
        print(markdown(pooled["settings"], pooled["fp_align"], pooled["fp_clip"]), end="")
        print()
        print(pairs_markdown(pooled["settings"], pooled["pairs"]), end="")
        if a.json:
            from dgq.eval.plan import write_json  # noqa: PLC0415 - atomic

            write_json(Path(a.json), pooled)
        return 0

    from dgq.tiny.evaluator import load_evaluator, to_uint8_batch  # noqa: PLC0415

    run = Path(a.run)
    try:
        prompts = json.loads((run / "prompts.json").read_text())
    except (OSError, ValueError) as e:
        print(f"error: {run} is not a finished eval run (prompts.json: {e})", file=sys.stderr)
        return 2
    n = min(a.limit, len(prompts)) if a.limit else len(prompts)
    prompts = prompts[:n]
    specs = [s for s in a.settings.split(",") if s] or sorted(
        d.name for d in run.iterdir() if d.is_dir() and d.name != "fp" and (d / "00000.png").is_file())
    labels = {}
    for i, s in enumerate(specs):
        if "=" in s:
            lab, specs[i] = s.rsplit("=", 1)  # labels may hold "=" (K=16), folder names do not
            labels[specs[i]] = lab
    pairs = []
    for p in a.pair:
        if p.count(":") != 1 or not all(p.split(":")):
            print(f"error: --pair {p!r} must be A:B", file=sys.stderr)
            return 2
        pairs.append(tuple(p.split(":")))
    try:
        folders = dict(_resolve(run, s) for s in specs)
        for x, y in pairs:
            for s in (x, y):
                if s not in folders:
                    folders.update([_resolve(run, s)])
        fp_images = _images(run / "fp", n)
        ev = load_evaluator()
        fp = {"pixels": to_uint8_batch(fp_images), **read(ev, fp_images, prompts)}
        clip, why = clip_reader(prompts) if not a.no_clip else (None, "not asked for (--no-clip)")
        if clip is None:
            print(f"CLIP columns unavailable: {why}", file=sys.stderr)
        else:
            fp.update(clip.read(fp_images))
        per = {name: per_image(ev, _images(folder, n), prompts, fp, clip) for name, folder in folders.items()}
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = [summary(name, per[name], fp, labels.get(name) or label_of(folder, name)) for name, folder in folders.items()]
    fp_clip = float(fp["clip"].mean()) if "clip" in fp else None
    print(f"{n} images, FP align {fp['ok'].mean():.3f}, FP CLIP {_f(fp_clip, '.4f')}  ({run})")
    print(f"{'setting':44s} {'align':>6s} {'same reading':>12s} {'verdict agree':>13s} {'lost':>5s} "
          f"{'gained':>6s} {'PSNR':>7s} {'CLIP':>7s} {'CLIP gap':>8s} {'img sim':>7s}")
    for r in rows:
        print(f"{r['setting']:44s} {r['align']:6.3f} {r['same_reading']:12.3f} {r['verdict_agree']:13.3f} "
              f"{r['lost']:5d} {r['gained']:6d} {r['psnr']:7.2f} {_f(r['clip'], '7.4f')} "
              f"{_f(r['clip_gap'], '8.4f')} {_f(r['image_sim'], '7.4f')}")
    cmp = [compare(x, y, per[x], per[y]) for x, y in pairs]
    for c in cmp:
        lo, hi = c["same_reading_ci95"]
        psnr = _db(c["psnr_diff"]) + ("" if c["psnr_ci95"] is None else
                                      " [{:+.2f}, {:+.2f}]".format(*c["psnr_ci95"]))
        print(f"{c['a']} vs {c['b']}: same reading {c['same_reading_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
              f"reads as FP only in A {c['only_a_reads_as_fp']} / only in B {c['only_b_reads_as_fp']} "
              f"(sign test p = {c['sign_test_p']:.3f}); PSNR {psnr}; CLIP gap "
              + ("unavailable" if c["clip_gap_diff"] is None else
                 "{:+.4f} [{:+.4f}, {:+.4f}]".format(c["clip_gap_diff"], *c["clip_gap_ci95"])))
    if a.markdown:
        print()
        print(markdown(rows, float(fp["ok"].mean()), fp_clip), end="")
        if cmp:
            print()
            print(pairs_markdown(rows, cmp), end="")
    if a.json:
        from dgq.eval.plan import write_text  # noqa: PLC0415 - atomic

        result = {"run": str(run), "n": n, "fp_align": float(fp["ok"].mean()), "fp_clip": fp_clip,
                  "settings": rows, "pairs": cmp}
        if a.per_image:
            result["per_image"] = {name: per_image_values(per[name]) for name in folders}
        write_text(Path(a.json), dump(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

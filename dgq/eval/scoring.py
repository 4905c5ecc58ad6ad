"""Scoring a setting's images: the scorers (the shapes evaluator, CLIP, Inception and domain FID),
loaded once and shared with the app (`load_alignment_scorer`), PSNR/SSIM against FP, cost and latency.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dgq.eval.plan import Options, Plan, batch_fingerprint, image_path, read_log, setting_fingerprint
from dgq.eval.settings import UNAVAILABLE, Setting

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- scoring
def _load_images(paths: Sequence[Path], size: int = 0, chunk: int = 64) -> Iterator[list[np.ndarray]]:
    """uint8 RGB arrays in chunks; `size` > 0 resizes (PIL bicubic, as BK-SDM's ``change_img_size``)."""
    from PIL import Image  # noqa: PLC0415

    for i in range(0, len(paths), chunk):
        batch = []
        for p in paths[i:i + chunk]:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size and im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                batch.append(np.asarray(im, dtype=np.uint8))
        yield batch


def load_shapes_evaluator(path: str | None = None) -> tuple[Any | None, str]:
    """(the shapes evaluator, where it came from) or (None, "unavailable: why"): how `eval` and the
    app load the alignment scorer of shapes-domain models."""
    from dgq.tiny.evaluator import load_evaluator  # noqa: PLC0415 - torch models, loaded on demand

    try:
        ev = load_evaluator(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        return None, f"{UNAVAILABLE}the shapes evaluator could not be loaded ({e})"
    return ev, f"shapes evaluator from {path or 'assets/evaluator'}"


def load_clip(model: str, pretrained: str | None, weights: str | None = None, device: str = "cpu",
              random_init: bool = False) -> tuple[Any | None, str]:
    """(a CLIP scorer, its description) or (None, "unavailable: why"), local weights only: how
    `eval` and the app load the alignment scorer of SD models (`random_init`: tests only)."""
    from dgq.metrics import ClipScorer  # noqa: PLC0415 - open_clip, loaded on demand

    return ClipScorer.try_load(model, None if random_init else pretrained,
                               weights_path=None if random_init else weights, device=device)


def load_domain_clip_scorer(path: str | None = None, device: str = "cpu") -> tuple[Any | None, str]:
    """(the domain CLIP scorer, its description) or (None, "unavailable: why"): the CLIP score of
    shapes-domain models (`dgq.tiny.clip`), scored by the same `similarities` call as SD's."""
    from dgq.tiny.clip import DomainClipScorer  # noqa: PLC0415

    try:
        scorer = DomainClipScorer(path, device)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        return None, f"{UNAVAILABLE}the domain CLIP could not be loaded ({e})"
    return scorer, f"loaded {scorer.description}"


class Scorers:
    """Scoring networks, each loaded once on first use; a failed load is remembered as its reason."""

    def __init__(self, opts: Options, device: str = "cpu", embedded: bool = False) -> None:
        self.opts, self.device, self.embedded = opts, device, embedded
        self._cache: dict[str, Any] = {}
        self.notes: dict[str, str] = {}

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _loaded(self, key: str, scorer: Any, msg: str) -> Any:
        """A loader's (scorer, message): the scorer with its message kept as a note, or the message
        alone (the reason it did not load)."""
        if scorer is None:
            return msg
        self.notes[key] = msg
        return scorer

    def evaluator(self):
        return self._get("evaluator", lambda: self._loaded("evaluator", *load_shapes_evaluator(self.opts.evaluator)))

    def clip(self):
        def build():
            o = self.opts
            if self.embedded and not o.clip_random_init and o.clip_weights is None:
                return self._loaded("clip", *load_domain_clip_scorer(device=self.device))
            if not o.clip_random_init and o.clip_pretrained is None and o.clip_weights is None:
                return f"{UNAVAILABLE}no CLIP weights: pass --clip-weights FILE or a --clip-pretrained tag"
            return self._loaded("clip", *load_clip(o.clip_model, o.clip_pretrained, o.clip_weights, self.device,
                                                   o.clip_random_init))
        return self._get("clip", build)

    def fid(self):
        def build():
            from dgq.metrics import FidScorer  # noqa: PLC0415

            o = self.opts
            return self._loaded("fid", *FidScorer.try_load(None if o.inception_random_init else o.inception_weights,
                                                           random_init=o.inception_random_init, device=self.device))
        return self._get("fid", build)

    def fid_reference(self):
        """(mu, sigma) of the reference set: a pytorch-fid .npz, or a folder of images (resized)."""
        def build():
            from dgq.metrics import feature_stats, load_stats  # noqa: PLC0415

            ref = self.opts.fid_ref_stats
            if not ref:
                return (f"{UNAVAILABLE}no FID reference: pass --fid-ref-stats real_im256.npz (pytorch-fid stats "
                        "of the reference images) or a folder of reference images")
            p = Path(ref)
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                if len(files) < 2:
                    return f"{UNAVAILABLE}FID reference folder {p} holds fewer than 2 images"
                scorer = self.fid()
                if isinstance(scorer, str):
                    return scorer
                feats = np.concatenate([scorer.features(b) for b in _load_images(files, self.opts.metric_size)])
                self.notes["fid_reference"] = f"{len(files)} images in {p}"
                return feature_stats(feats)
            if not p.is_file():
                return f"{UNAVAILABLE}FID reference statistics {p} not found"
            try:
                stats = load_stats(p)
            except (OSError, ValueError) as e:
                return f"{UNAVAILABLE}could not read FID reference statistics {p}: {e}"
            self.notes["fid_reference"] = str(p)
            return stats
        return self._get("fid_reference", build)


def _json_number(v: float) -> float | str:
    """JSON has no infinity: identical images (PSNR = inf) are written as the string "inf"."""
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def score_setting(out: Path, setting: Setting, plan: Plan, info: dict[str, Any], metrics: list[str],
                  scorers: Scorers, fp_setting: Setting | None, macs=None, metric_size: int = 0,
                  clip_limit: int = 0, domain_fid_refs: int = 2000) -> dict[str, Any]:
    """Metrics of one setting, recomputed from the image files."""
    import torch  # noqa: PLC0415

    from dgq import metrics as M  # noqa: PLC0415
    from dgq.tiny.evaluator import to_tensor_batch  # noqa: PLC0415

    n = plan.n
    paths = [image_path(out, setting, i) for i in range(n)]
    missing = sum(not p.is_file() for p in paths)
    row: dict[str, Any] = {**setting.to_dict(), "n_images": n - missing, "complete": missing == 0}
    m: dict[str, Any] = {}
    prompts = plan.image_prompts()
    if missing:
        why = f"{UNAVAILABLE}{missing} of {n} images missing (run the command again without --score-only)"
        for name in metrics:
            m[_metric_key(name)] = why
    else:
        if "align" in metrics or "domain-fid" in metrics:
            ev = scorers.evaluator()
            if isinstance(ev, str):
                x = None
            else:
                x = torch.cat([to_tensor_batch(b) for b in _load_images(paths)])
            if "align" in metrics:
                if x is None:
                    m["align_all"] = ev
                else:
                    sc = ev.score(x, prompts)
                    if sc["n"] == sc["n_unparsed"]:
                        m["align_all"] = f"{UNAVAILABLE}no prompt is in the shapes grammar"
                    else:
                        m["align_all"] = sc["all"]
                        m["align"] = sc
            if "domain-fid" in metrics:
                if x is None:
                    m["domain_fid"] = ev
                elif n < 2:
                    m["domain_fid"] = f"{UNAVAILABLE}FID needs at least 2 images"
                else:
                    m["domain_fid"] = M.domain_fid(x, n_ref=domain_fid_refs, evaluator=ev)
                    m["domain_fid_n"] = n
        if "clip" in metrics:
            scorer = scorers.clip()
            if isinstance(scorer, str):
                m["clip_score"] = scorer
            else:
                k = min(n, clip_limit) if clip_limit else n
                sims, off = [], 0
                for b in _load_images(paths[:k], metric_size):
                    sims.append(scorer.similarities(b, prompts[off:off + len(b)]))
                    off += len(b)
                m["clip_score"] = float(np.mean(np.concatenate(sims)))
                m["clip_n"] = k
        if "fid" in metrics:
            scorer, ref = scorers.fid(), None
            if not isinstance(scorer, str):
                ref = scorers.fid_reference()
            if isinstance(scorer, str) or isinstance(ref, str):
                m["fid"] = scorer if isinstance(scorer, str) else ref
            elif n < 2:
                m["fid"] = f"{UNAVAILABLE}FID needs at least 2 images"
            else:
                feats = np.concatenate([scorer.features(b) for b in _load_images(paths, metric_size)])
                m["fid"] = M.fid_from_features(feats, mu2=ref[0], sigma2=ref[1])
                m["fid_n"] = n
        for name, fn in (("psnr", M.psnr), ("ssim", M.ssim)):
            if name not in metrics:
                continue
            if fp_setting is None:
                m[name] = f"{UNAVAILABLE}add fp to --settings: {name.upper()} compares with the FP images"
            elif setting.is_fp:
                m[name] = None  # the reference itself
            else:
                ref_paths = [image_path(out, fp_setting, i) for i in range(n)]
                if not all(p.is_file() for p in ref_paths):
                    m[name] = f"{UNAVAILABLE}FP images missing"
                else:
                    vals = [fn(a, b, reduction="none") for a, b in zip(_load_images(paths), _load_images(ref_paths))]
                    m[name] = _json_number(float(np.mean(np.concatenate(vals))))
    if macs is not None:
        from dgq.bops import bops  # noqa: PLC0415

        r = bops(macs, setting.config.w_bits, setting.config.a_bits)
        m["bops"] = r.bops
        m["size_mb"] = r.size_mb
    m.update(_latency(out, setting, plan, info))
    row["metrics"] = m
    return row


def _metric_key(name: str) -> str:
    return {"align": "align_all", "domain-fid": "domain_fid", "clip": "clip_score"}.get(name, name)


def _latency(out: Path, setting: Setting, plan: Plan, info: dict[str, Any]) -> dict[str, Any]:
    """Seconds per image from the log lines of the current batches (a process's first batch, which
    also fills the weight cache, is left out when others exist)."""
    sfp = setting_fingerprint(info, setting)
    recs = read_log(out / setting.slug)
    chosen = []
    for s, e in plan.batches():
        fp = batch_fingerprint(sfp, plan, s, e)
        cur = [r for r in recs.get(s, ()) if r.get("fp") == fp]
        if cur:
            chosen.append(max(cur, key=lambda r: r.get("time", 0)))
    if not chosen:
        return {"latency_s": f"{UNAVAILABLE}no generation log for these images"}
    steady = [r for r in chosen if not r.get("first")] or chosen
    secs = sum(r["seconds"] for r in steady)
    imgs = sum(r["end"] - r["start"] for r in steady)
    devices = sorted({str(r.get("device")) for r in steady})
    return {"latency_s": secs / imgs, "latency_batches": len(steady), "latency_device": ",".join(devices)}

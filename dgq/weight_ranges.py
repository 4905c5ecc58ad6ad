"""Searched weight ranges kept on disk, so a change of weight bits does not search again.

Why: the authors' MSE clipping search (100 candidate ranges per output channel, L2.4 error) is
almost all the cost of moving the W slider: ~1.3 s for the embedded model's 3.3 M weights on 2 CPU
cores, minutes for SD v1.4's 860 M on a CPU. Its result — one (scale, zero-point) pair per output
channel — depends only on the weights, the bit-width and the search, so it is worth keeping:
quantizing the weights from a known range is one cheap pass.

A file holds every (layer, bits, search) entry a `Studio` has searched, under the UNet's weights
fingerprint; a file made for other weights, another format or a corrupted file is ignored (and
rewritten), never used. Writes are atomic. The embedded model ships its ranges for 2–8 bits next
to its calibration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SEP = "|"


def entry_count(layers: dict) -> int:
    """How many (layer, bits, search) ranges the layers hold now."""
    return sum(len(layer._dgq_wranges) for layer in layers.values())


def save(layers: dict, path: str | Path, weights: str) -> int:
    """Write every searched range of `layers` (name → wrapped layer) to `path`; returns the count."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for (bits, search), (s, z) in list(layer._dgq_wranges.items()):
            tensors[f"{name}{_SEP}{bits}{_SEP}{search}{_SEP}s"] = s.detach().float().cpu().contiguous()
            tensors[f"{name}{_SEP}{bits}{_SEP}{search}{_SEP}z"] = z.detach().float().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    meta = {"format_version": FORMAT_VERSION, "weights": weights, "entries": len(tensors) // 2,
            "sha256": _digest(tensors)}
    save_file(tensors, str(tmp), metadata={"json": json.dumps(meta)})
    os.replace(tmp, path)
    return len(tensors) // 2


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum of the values (safetensors checks its header, not the numbers)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_into(layers: dict, path: str | Path, weights: str, problems: list[str] | None = None) -> int:
    """Fill the layers' range caches from `path` if it was made for these weights; returns how
    many entries were loaded (0 for a missing, stale or invalid file). Entries a layer already
    holds are kept. An invalid file (unreadable, checksum, schema, shapes) appends its reason to
    `problems`, so the caller knows to rewrite it."""
    path = Path(path)
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["json"])
            if not isinstance(meta, dict):
                raise TypeError("metadata is not a JSON object")
            if meta.get("format_version") != FORMAT_VERSION or meta.get("weights") != weights:
                log.info("weight ranges at %s are for other weights or another format; not used", path)
                return 0
            device = next(iter(layers.values())).weight.device if layers else "cpu"
            raw = {key: f.get_tensor(key) for key in f.keys()}
        if meta.get("sha256") != _digest(raw):
            raise ValueError("checksum mismatch")
        found: dict[tuple, dict[str, torch.Tensor]] = {}
        for key, t in raw.items():
            name, bits, search, part = key.rsplit(_SEP, 3)
            found.setdefault((name, int(bits), search), {})[part] = t
        for (name, bits, search), parts in found.items():
            layer = layers.get(name)
            if layer is None:
                continue
            shape = (layer.weight.shape[0],)
            if (set(parts) != {"s", "z"} or parts["s"].shape != shape or parts["z"].shape != shape
                    or not bool(torch.isfinite(parts["s"]).all() and (parts["s"] > 0).all())
                    or not bool(torch.isfinite(parts["z"]).all())):
                raise ValueError(f"entry {name} W{bits} has wrong shapes or values")
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("weight ranges at %s are invalid (%s: %s); searched again and rewritten", path, type(e).__name__, e)
        if problems is not None:
            problems.append(f"{type(e).__name__}: {e}")
        return 0
    n = 0
    for (name, bits, search), parts in found.items():
        layer = layers.get(name)
        if layer is None:
            continue
        if (bits, search) not in layer._dgq_wranges:
            layer._dgq_wranges[(bits, search)] = (parts["s"].to(device), parts["z"].to(device))
            n += 1
    return n

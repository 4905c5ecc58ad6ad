"""A short identity of a module's weights: what every cache keyed on a model's weights uses
(calibrations, weight ranges, learned roundings, eval resumption), so a retrained or edited model
never reuses another model's files. A leaf module (torch only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks: the checksum cache files carry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

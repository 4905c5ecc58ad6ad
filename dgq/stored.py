"""Learned artefacts on disk: one safetensors file plus a JSON sidecar, written atomically and
verified on load. The learned weight rounding (`dgq.adaround`) and the learned activation step
sizes (`dgq.act_recon`) are stored this way.

Why one helper: both are expensive to learn and cheap to load, and both must never be used for
other weights, settings or a damaged file — a stale or corrupted pair raises `StoredMismatch` and
the caller learns it again instead.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dgq.fingerprint import file_sha256


class StoredMismatch(RuntimeError):
    """A stored pair that must not be used (missing, stale, for other weights or corrupted)."""


def write_pair(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], version: int) -> Path:
    """Write `<path>.safetensors` and `<path>.json` (meta + format version + sha256), each through
    a temporary file and `os.replace`, the tensors first: until both are replaced, the old
    sidecar's checksum fails against the new tensors and the pair is rebuilt, never misread."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    tag = f".{os.getpid()}.{threading.get_ident()}.tmp"
    tmp, tmp_js = st.with_name(st.name + tag), js.with_name(js.name + tag)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp_js.write_text(json.dumps(dict(meta, format_version=version, sha256=file_sha256(tmp)), indent=1))
    os.replace(tmp, st)
    os.replace(tmp_js, js)
    return st


def read_meta(path: str | Path, version: int, expect: dict[str, Any] | None = None, what: str = "file") -> dict[str, Any]:
    """The JSON sidecar, checked against the format `version` and `expect` (no tensor is read)."""
    path = Path(path)
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not st.is_file() or not js.is_file():
        raise StoredMismatch(f"no {what} at {path}")
    try:
        meta = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoredMismatch(f"unreadable {what} metadata {js}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != version:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise StoredMismatch(f"{what} at {js} has format {found}, not {version}")
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            raise StoredMismatch(f"{what} at {js} was made for {k}={meta.get(k)!r}, not {v!r}")
    return meta


def read_tensors(path: str | Path, meta: dict[str, Any], what: str = "file") -> dict[str, torch.Tensor]:
    """The tensors of a pair whose sidecar `meta` was read, after checking the checksum."""
    st = Path(path).with_suffix(".safetensors")
    if file_sha256(st) != meta.get("sha256"):
        raise StoredMismatch(f"checksum mismatch: {st} is corrupted")
    try:
        return load_file(str(st))
    except (SafetensorError, OSError) as e:
        raise StoredMismatch(f"unreadable {what} tensors {st}: {e}") from e

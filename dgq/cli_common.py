"""What every `python -m dgq` subcommand shares: the user-error type, the model options, PNG output.

Why apart from `dgq.cli`: the subcommands defined in their own modules (`eval` in dgq.eval,
`bench` in dgq.bench) need these pieces, and `dgq.cli` imports those modules to register them;
keeping the shared pieces here means neither imports the other back.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype and --cache-dir, as every subcommand that loads a model takes them."""
    p.add_argument("--model", default="tiny", help="'tiny' (embedded), a local diffusers folder, or a Hub id (default: tiny)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16"], help="model dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--cache-dir", default=None, help="calibration cache folder (default: $DGQ_CACHE or ~/.cache/dgq)")


def save_png(img, path: Path) -> None:
    """Write a PIL image as PNG atomically (a temporary file, then `os.replace`)."""
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)

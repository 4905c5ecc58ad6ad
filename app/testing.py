"""Helpers for the app's tests and benchmark: a random shapes-architecture model folder, a small
calibration, a free port and a locally launched app. Offline; nothing here is used by the app."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from pathlib import Path

CALIB_PROMPTS = ["a large red circle on the left", "a small blue square at the top",
                 "a green triangle above a yellow diamond",
                 "a large white circle in the center on a black background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.lru_cache(maxsize=None)
def random_model_folder() -> str:
    """A randomly initialised pipeline of the embedded architecture, saved once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dgq.tiny.models import build_pipeline  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="dgq-app-test-"))
    os.environ.setdefault("DGQ_CACHE", str(root / "cache"))  # calibrations of this test model
    folder = root / "random-tiny"
    build_pipeline(seed=0).save_pretrained(folder)
    return str(folder)


def model_for_tests() -> str:
    """The model the tests use: $DGQ_APP_TEST_MODEL (e.g. "tiny") or a random folder."""
    return os.environ.get("DGQ_APP_TEST_MODEL") or random_model_folder()


def make_engine(cache_size: int = 48):
    from app.engine import Engine  # noqa: PLC0415

    model = model_for_tests()
    small = model != "tiny"  # the embedded model ships its calibration; a random one gets a small one
    return Engine(default_model=model, calib_prompts=CALIB_PROMPTS if small else None,
                  calib_steps=4 if small else None, cache_size=cache_size)


def launch(engine=None, preload: bool = True):
    """Build and launch the app on 127.0.0.1:<free port>; returns (demo, url). Close with demo.close()."""
    from app.ui import build_demo  # noqa: PLC0415

    demo = build_demo(engine or make_engine(), preload=preload, cache_examples=False)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"

"""DGQ Studio's Gradio app: UI only, on top of dgq's public API.

`get_demo()` builds the app once per process; `app.py` (the Spaces entry point) exposes it as
`demo`. `import app; app.demo` works too, for hosts that import the package instead of the file.
"""

from __future__ import annotations

import threading
from typing import Any

_DEMO: Any = None
_LOCK = threading.Lock()


def get_demo():
    """The process-wide `gr.Blocks` (built on first call)."""
    global _DEMO
    with _LOCK:
        if _DEMO is None:
            from app.ui import build_demo  # noqa: PLC0415

            _DEMO = build_demo()
        return _DEMO


def __getattr__(name: str) -> Any:
    if name == "demo":
        return get_demo()
    raise AttributeError(f"module 'app' has no attribute {name!r}")

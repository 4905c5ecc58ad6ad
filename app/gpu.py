"""`spaces.GPU` when the `spaces` package is importable (Hugging Face ZeroGPU), a no-op otherwise."""

from __future__ import annotations

from typing import Callable, TypeVar

from app import constants as C

F = TypeVar("F", bound=Callable)

try:  # pragma: no cover - only on Hugging Face Spaces
    import spaces as _spaces
except ImportError:
    _spaces = None


def gpu(fn: F) -> F:
    """Run `fn` on a ZeroGPU slice when on Spaces; elsewhere return it unchanged (CPU fallback)."""
    if _spaces is None:
        return fn
    return _spaces.GPU(duration=C.GPU_DURATION)(fn)  # pragma: no cover


ON_SPACES = _spaces is not None

"""The per-generation state that wrapped modules read: which variant runs, at which timestep.

Modules are shared by every variant (one model in memory), so nothing variant-specific may live
on them. Instead each generation sets a `RunContext` in a `ContextVar`: every thread (and every
asyncio task) sees its own, so two generations with different settings never see each other's
state.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from dgq.calibration import StatsCollector
    from dgq.quantizer import QuantParams
    from dgq.recorder import Recorder


@dataclass
class Perturbation:
    """Outlier-drop experiment (paper Fig. 4a): zero k entries of every wrapped layer's input."""

    k: int = 1
    mode: str = "outlier"  # "outlier" = the top-k |x| per sample, "random" = k random entries
    seed: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("outlier", "random"):
            raise ValueError(f"perturbation mode {self.mode!r}; allowed: outlier, random")
        if self.k < 0:
            raise ValueError(f"k must be ≥ 0, got {self.k}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return x
        flat = x.reshape(x.shape[0], -1)
        k = min(self.k, flat.shape[1])
        if self.mode == "outlier":
            idx = flat.abs().topk(k, dim=1).indices
        else:
            idx = torch.stack([torch.randperm(flat.shape[1], generator=self.generator)[:k] for _ in range(flat.shape[0])])
            idx = idx.to(x.device)
        out = flat.clone()
        out.scatter_(1, idx, 0.0)
        return out.view_as(x)


@dataclass
class RunContext:
    """What one generation needs inside the UNet: params (None = FP), timestep, observers."""

    params: QuantParams | None = None
    collector: StatsCollector | None = None
    recorder: Recorder | None = None
    perturbation: Perturbation | None = None
    timestep: float | None = None
    t_key: int = -1  # calibrated timestep whose parameters apply now (-1 = the all-steps set)
    call_index: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    def on_unet_call(self, timestep: float) -> None:
        self.timestep = float(timestep)
        self.call_index += 1
        if self.collector is not None:
            self.collector.set_timestep(self.timestep)
        if self.params is not None:
            self.t_key = self.params.key_for(self.timestep)
        if self.recorder is not None:
            self.recorder.set_timestep(self.timestep, self.call_index)


ACTIVE: ContextVar[RunContext | None] = ContextVar("dgq_run", default=None)
# the recorder of an enclosing `dgq.record()` block, picked up by the generations run inside it
PENDING: ContextVar[Recorder | None] = ContextVar("dgq_recorder", default=None)


def active() -> RunContext | None:
    return ACTIVE.get()


def pending_recorder() -> Recorder | None:
    return PENDING.get()


@contextmanager
def use(ctx: RunContext) -> Iterator[RunContext]:
    """Make `ctx` the active run for the current thread/task for the duration of the block."""
    token = ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        ACTIVE.reset(token)

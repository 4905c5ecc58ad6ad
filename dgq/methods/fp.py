"""Full precision: nothing quantized, nothing calibrated (the base rules)."""

from __future__ import annotations

from dgq.config import FPConfig
from dgq.methods import register
from dgq.methods.base import MethodRules


@register(FPConfig)
class FPRules(MethodRules):
    pass

"""The method registry (`dgq.methods`): one rules object per config type, and a new method made
in one place runs through the shared quantizer without touching it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

import dgq
from dgq import methods
from dgq.config import FP, BaselineConfig, DGQConfig
from dgq.methods.base import MethodRules
from dgq.quantizer import QuantParams


def test_built_in_methods_are_registered_and_answer():
    assert type(methods.rules_for(FP)).__name__ == "FPRules"
    q = methods.rules_for(BaselineConfig(4, 6, "qdiff"))
    assert q.single_set(BaselineConfig(4, 6, "qdiff")) and not q.single_set(BaselineConfig(4, 6, "tfmq"))
    d = methods.rules_for(DGQConfig())
    assert d.groups(DGQConfig(groups=8)) == 8 and d.groups(DGQConfig(use_groups=False)) == 1
    with pytest.raises(TypeError, match="no quantization method is registered for int"):
        methods.rules_for(3)
    with pytest.raises(ValueError, match="already has rules"):
        methods.register(DGQConfig)(MethodRules)


def test_a_new_method_is_one_class_and_its_registration(random_calib):
    @dataclass(frozen=True)
    class AllStepsGroups:  # K=4 pixel groups, one set for all timesteps, uniform probabilities
        w_bits: int = 8
        a_bits: int = 6
        method: ClassVar[str] = "all-steps-groups"

    @methods.register(AllStepsGroups)
    class Rules(MethodRules):
        def needs_calibration(self, config):
            return True

        def single_set(self, config):
            return True

        def groups(self, config):
            return 4

        def axis(self, config):
            return dgq.Axis.PIXEL

        def prob(self, config, calib, site, t_key, bits):
            return methods.rules_for(BaselineConfig()).prob(BaselineConfig(), calib, site, t_key, bits)

    try:
        params = QuantParams(random_calib, AllStepsGroups()).build_all()
        site = next(n for n, i in random_calib.sites.items() if i.kind == "linear")
        q = params.act(site, params.key_for(500.0))
        assert q.mode == "pixel" and int(q.labels.max()) + 1 <= 4 and params.key_for(999.0) == params.key_for(1.0)
        p_site = next(n for n, i in random_calib.sites.items() if i.kind == "p")
        assert not params.prob(p_site, params.key_for(500.0)).log
        with pytest.raises(ValueError, match="need a calibration"):
            QuantParams(None, AllStepsGroups())
    finally:
        methods._RULES.pop(AllStepsGroups)

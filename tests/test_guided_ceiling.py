"""benchmarks/guided_ceiling.py: the per-step scale of a perfect guidance-distilled student."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import guided_ceiling as GC

ROOT = Path(__file__).resolve().parents[1]


def test_the_weight_matches_the_trainersramp():
    import torch

    from dgq.tiny.train import ramp

    sched = GC.parse_schedule("1.5:650:700")
    for t in (0, 300, 650, 660, 675, 699, 700, 900):
        r = float(ramp(torch.tensor([t]), 700, 650))
        assert GC.weight(t, 7.5, sched) == pytest.approx(1 - r * (1 - 1.5 / 7.5))
    assert GC.weight(100, 7.5, None) == 1.0


@pytest.mark.parametrize("bad", ["1.5:650", "a:b:c", "1.5:700:650", "0:1:2"])
def test_bad_schedules_are_clear_errors(bad):
    with pytest.raises(ValueError, match="--schedule"):
        GC.parse_schedule(bad)


@pytest.mark.skipif(not (ROOT / "assets/tiny-sd/model_index.json").exists(), reason="embedded model missing")
def test_every_schedule_is_scored_and_the_unet_is_restored(tmp_path):
    import json

    import dgq
    from dgq.tiny.evaluator import load_evaluator

    out = tmp_path / "ceiling.json"
    rep = GC.main(["--n", "2", "--steps", "2", "--schedule", "none", "--schedule", "1:999:1000", "--out", str(out)])
    assert set(rep["schedules"]) == {"none", "1:999:1000"} and json.loads(out.read_text()) == rep
    assert all(set(v) == set(GC.KEYS) for v in rep["schedules"].values())
    pipe = dgq.load_pipeline("tiny", device="cpu")
    real = pipe.unet.forward
    GC.run(pipe, load_evaluator(), ["a large red circle on the left"], 7.5, [("none", None)], steps=1)
    assert "forward" not in vars(pipe.unet) and pipe.unet.forward == real

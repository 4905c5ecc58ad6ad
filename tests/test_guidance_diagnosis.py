"""benchmarks/guidance_diagnosis.py runs end to end on the embedded model (a few prompts, 2 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "assets/tiny-sd/model_index.json").exists(), reason="embedded model missing")
def test_diagnosis_writes_every_section(tmp_path):
    from benchmarks import guidance_diagnosis as mod

    out = tmp_path / "diag.json"
    mod.main(["--n", "3", "--steps", "3", "--batch", "3", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert len(rep["interval"]) == 6 and all(set(v) == set(mod.KEYS) for v in rep["interval"].values())
    assert rep["interval"]["all 2.0"]["single_color"] is not None
    assert set(rep["latents"]) == {"data", "g2.0", "g7.5"} and len(rep["shrunk_decode"]) == 4
    assert [r["t"] for r in rep["predictions"]] == [980, 800, 600, 400, 250, 150, 80, 40, 10]
    # guidance multiplies the disagreement: the 7.5-guided x0 is never closer than the 2.0-guided one
    # at high noise, where the two branches differ most
    assert rep["predictions"][0]["x0_mse_g7.5"] > rep["predictions"][0]["x0_mse_g2.0"]

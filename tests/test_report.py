"""dgq.tiny.report: the held-out prompt files are the renderer's captions of consecutive seeds."""

from __future__ import annotations

from pathlib import Path

from dgq.paths import ASSETS, SHAPES_EVAL_PROMPTS
from dgq.tiny import report


def test_written_prompts_reproduce_the_shipped_held_out_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.txt"
    report.main(["--write-prompts", str(out), "--n", "240"])
    assert out.read_text() == SHAPES_EVAL_PROMPTS.read_text()
    more = tmp_path / "more.txt"
    report.main(["--write-prompts", str(more), "--n", "600", "--first-seed", str(report.HELD_OUT_SEED + 240)])
    assert more.read_text() == (ASSETS / "prompts" / "shapes_eval_more_600.txt").read_text()
    third = tmp_path / "third.txt"  # the next 800 seeds, after the 240 and the 600
    report.main(["--write-prompts", str(third), "--n", "800", "--first-seed", str(report.HELD_OUT_SEED + 840)])
    assert third.read_text() == (ASSETS / "prompts" / "shapes_eval_third_800.txt").read_text()
    assert "600 prompts" in capsys.readouterr().out
    assert report.held_out_prompts(3) == SHAPES_EVAL_PROMPTS.read_text().splitlines()[:3]

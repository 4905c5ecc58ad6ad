"""benchmarks/results_tables.py: docs/results.md's tables come from a run's results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import results_tables as RT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "results.json"


def test_the_committed_tables_are_the_committed_results():
    """Every table row of docs/results.md is what the script prints from docs/results/results.json."""
    printed = [ln for ln in RT.tables(json.loads(RESULTS.read_text()), "bars").splitlines() if ln.startswith("| ")]
    doc = [ln for ln in (ROOT / "docs" / "results.md").read_text().splitlines() if ln.startswith("| ")]
    assert printed == doc


def test_a_missing_setting_is_an_error_naming_it():
    results = json.loads(RESULTS.read_text())
    results["settings"] = [s for s in results["settings"] if s["setting"] != "dgq:W4A6:K16:nolog:nostart:static"]
    with pytest.raises(SystemExit, match="dgq:W4A6:K16:nolog:nostart:static"):
        RT.tables(results, "bars")
    with pytest.raises(ValueError, match="layout"):
        RT.tables(results, "other")


def test_merge_adds_the_settings_of_a_run_of_the_same_plan_only():
    results = json.loads(RESULTS.read_text())
    results["settings"] = [s for s in results["settings"] if "-paper" not in s["setting"]]
    RT.tables(results, "bars")  # without paper-recipe rows the paper table is left out
    extra = {"plan": dict(results["plan"]), "complete": True,
             "settings": [dict(results["settings"][1], setting="qdiff-paper:W8A8", label="Q-Diffusion (paper recipe) W8A8")]}
    merged = RT.merge(results, [extra])
    assert [s["setting"] for s in merged["settings"]][-1] == "qdiff-paper:W8A8"
    assert len(results["settings"]) + 1 == len(merged["settings"])  # the input is not changed
    with pytest.raises(SystemExit, match="paper-recipe settings"):  # once one paper row is there, all must be
        RT.tables(merged, "bars")
    other = dict(extra, plan=dict(results["plan"], steps=10))
    with pytest.raises(SystemExit, match="steps"):
        RT.merge(results, [other])


def test_merge_replace_swaps_a_re_made_row_in_place_and_keeps_fp():
    results = json.loads(RESULTS.read_text())
    i = next(k for k, s in enumerate(results["settings"]) if s["setting"] == "qdiff-paper:W4A6")
    remade = dict(results["settings"][i], metrics=dict(results["settings"][i]["metrics"], psnr=99.0))
    fp = dict(results["settings"][0], metrics=dict(results["settings"][0]["metrics"], psnr=1.0))
    extra = {"plan": dict(results["plan"]), "complete": True, "settings": [fp, remade]}
    kept = RT.merge(results, [extra])
    assert kept["settings"] == results["settings"]  # without replace: nothing already there changes
    swapped = RT.merge(results, [extra], replace=True)
    assert [s["setting"] for s in swapped["settings"]] == [s["setting"] for s in results["settings"]]
    assert swapped["settings"][i]["metrics"]["psnr"] == 99.0
    assert swapped["settings"][0] == results["settings"][0]  # FP, the shared reference, is never replaced
    assert results["settings"][i]["metrics"]["psnr"] != 99.0  # the input is not changed

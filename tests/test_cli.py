"""The CLI contract: `python -m dgq calibrate | generate | bops`, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "dgq", *args], cwd=ROOT, capture_output=True, text=True,
                          env=e, timeout=timeout)


@pytest.fixture(scope="module")
def saved_random_model(tmp_path_factory):
    """A randomly initialised pipeline of the embedded architecture saved as a diffusers folder."""
    from dgq.tiny.models import build_pipeline

    d = tmp_path_factory.mktemp("model") / "random-sd"
    build_pipeline(seed=0).save_pretrained(str(d))
    return d


def test_help_for_every_command():
    for cmd in ([], ["calibrate"], ["generate"], ["bops"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout.lower()


def test_bops_json_sd_v1_4():
    r = run("bops", "--arch", "sd-v1-4", "--w-bits", "4", "--a-bits", "6", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"params", "macs", "bops", "size_mb"}
    assert round(d["params"] / 1e6, 2) == 859.52 and round(d["bops"] / 1e12, 1) == 19.3
    fp = json.loads(run("bops", "--arch", "sd-v1-4", "--json").stdout)
    assert round(fp["bops"] / 1e12) == 823


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    cases = [
        ("generate", "--method", "dgq", "--a-bits", "3", "--prompt", "x", "--out", str(tmp_path / "a.png")),
        ("generate", "--method", "nope"),
        ("generate", "--method", "fp", "--prompt", "", "--out", str(tmp_path / "b.png")),
        ("bops", "--arch", "sd-v1-4", "--w-bits", "1"),
        ("calibrate", "--prompts-file", str(tmp_path / "missing.txt")),
    ]
    for args in cases:
        r = run(*args)
        assert r.returncode != 0, args
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_unreachable_model_is_one_clear_line():
    r = run("generate", "--model", "someone/not-a-real-model", "--method", "fp", "--prompt", "x", "--out", "/tmp/x.png")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "someone/not-a-real-model" in lines[0] and "local" in lines[0]


def test_calibrate_and_generate_single_and_batch(saved_random_model, tmp_path):
    env = {"DGQ_CACHE": str(tmp_path / "cache")}
    pf = tmp_path / "prompts.txt"
    pf.write_text("a large red circle on the left\na small blue square at the top\n")
    r = run("calibrate", "--model", str(saved_random_model), "--prompts-file", str(pf), "--steps", "3", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["sites"] > 0
    out = tmp_path / "img.png"
    r = run("generate", "--model", str(saved_random_model), "--method", "fp", "--prompt", "a red circle",
            "--steps", "3", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    d = tmp_path / "batch"
    r = run("-v", "generate", "--model", str(saved_random_model), "--method", "dgq", "--w-bits", "4", "--a-bits", "6",
            "--groups", "8", "--no-log", "--steps", "3", "--calib-steps", "3", "--calib-prompts-file", str(pf),
            "--prompts-file", str(pf), "--out-dir", str(d), env=env)
    assert r.returncode == 0, r.stderr
    assert "calibration loaded from" in r.stderr and "recalibrating" not in r.stderr  # the one `calibrate` made
    assert sorted(p.name for p in d.iterdir()) == ["0000.png", "0001.png", "settings.json"]
    s = json.loads((d / "settings.json").read_text())
    assert s["config"]["groups"] == 8 and s["config"]["log_quant"] is False and s["prompts"][1].startswith("a small")


def test_module_subcommands_are_registered_explicitly_and_a_silent_one_fails(monkeypatch):
    """`eval` and `bench` come from the MODULE_COMMANDS table, imported like any module (an import
    error stops the CLI); an add_parser that registers nothing raises instead of vanishing."""
    import argparse

    from dgq import cli

    subs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"eval", "bench"} <= set(cli.MODULE_COMMANDS) <= set(subs.choices)
    monkeypatch.setitem(cli.MODULE_COMMANDS, "nothing", lambda sub: None)
    with pytest.raises(RuntimeError, match="did not register the 'nothing' subcommand"):
        cli.build_parser()

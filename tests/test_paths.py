"""dgq.paths: the shipped files are found from any working directory; caches follow $DGQ_CACHE."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgq import paths

ROOT = Path(__file__).resolve().parents[1]
PRINT_PATHS = "from dgq import paths; print(paths.ASSETS); print(paths.TINY_DIR)"


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DGQ_ASSETS", "PYTHONPATH")}
    env.update(extra)
    return env


@pytest.mark.skipif("DGQ_ASSETS" in os.environ, reason="DGQ_ASSETS points elsewhere")
def test_the_shipped_files_are_in_the_checkouts_assets():
    assert paths.ASSETS == ROOT / "assets"
    for f in (paths.TINY_DIR / "model_index.json", paths.SHIPPED_CALIBRATION.with_suffix(".json"),
              paths.SHIPPED_CALIBRATION.with_suffix(".safetensors"), paths.SHIPPED_WEIGHT_RANGES,
              paths.EVALUATOR_DIR / "config.json", paths.SD_PROMPTS_FILE, paths.SHAPES_EVAL_PROMPTS):
        assert f.is_file(), f


def test_the_other_modules_take_their_paths_from_here():
    from dgq import kernels, loading, studio
    from dgq.tiny import evaluator, train

    assert kernels.cache_dir is paths.cache_dir and studio.cache_dir is paths.cache_dir
    assert loading.TINY_DIR == paths.TINY_DIR and loading.ALIASES["tiny"] == str(paths.TINY_DIR)
    assert studio.SHIPPED_CALIBRATION == paths.SHIPPED_CALIBRATION
    assert evaluator.default_path() == paths.EVALUATOR_DIR and train.DEFAULT_BASE == paths.TINY_DIR


def test_the_cache_follows_dgq_cache_at_each_call(monkeypatch, tmp_path):
    monkeypatch.setenv("DGQ_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    monkeypatch.delenv("DGQ_CACHE")
    assert paths.cache_dir() == Path.home() / ".cache" / "dgq"


def test_the_working_directory_does_not_matter_and_dgq_assets_overrides(tmp_path):
    """A fresh interpreter in another folder (this checkout on PYTHONPATH) finds the same files."""
    run = dict(cwd=tmp_path, capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", PRINT_PATHS], env=_child_env(PYTHONPATH=str(ROOT)), **run)
    assert out.stdout.split() == [str(ROOT / "assets"), str(ROOT / "assets" / "tiny-sd")]
    other = tmp_path / "elsewhere"
    out = subprocess.run([sys.executable, "-c", PRINT_PATHS],
                         env=_child_env(PYTHONPATH=str(ROOT), DGQ_ASSETS=str(other)), **run)
    assert out.stdout.split() == [str(other.resolve()), str(other.resolve() / "tiny-sd")]


def test_the_installed_package_imports_from_the_root_folder():
    """`pip install -e .` (make setup): `import dgq` and the `dgq` command work outside the checkout."""
    try:
        importlib.metadata.distribution("dgq")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dgq is not installed in this environment: pip install -e . (make setup does)")
    out = subprocess.run([sys.executable, "-c", "import dgq, dgq.paths; print(dgq.paths.TINY_DIR.is_dir())"],
                         cwd="/", env=_child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]
    script = Path(sys.executable).with_name("dgq")
    assert script.is_file(), f"no console script {script}: reinstall with pip install -e ."
    out = subprocess.run([str(script), "--help"], cwd="/", env=_child_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(cmd in out.stdout for cmd in ("calibrate", "generate", "bops", "eval", "bench"))

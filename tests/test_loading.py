"""Model folders: the generation defaults a folder declares (`dgq_defaults.json`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import dgq
from dgq.loading import SD_GUIDANCE, TINY_DIR, default_guidance, model_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_the_embedded_model_declares_its_guidance():
    g = model_defaults("tiny")["guidance"]
    assert g == 3.0  # its own scale, chosen on tuning prompts (docs/embedded-model.md); no distillation
    assert g != SD_GUIDANCE
    assert json.loads((TINY_DIR / "dgq_defaults.json").read_text())["guidance"] == g


def test_hub_ids_and_plain_folders_default_to_sd_guidance(tmp_path):
    assert model_defaults("CompVis/stable-diffusion-v1-4") == {}
    assert model_defaults(str(tmp_path)) == {}

    class Bare:  # a pipeline built in memory, not through load_pipeline
        pass

    assert default_guidance(Bare()) == SD_GUIDANCE


@pytest.mark.parametrize("text", ["not json", '{"guidance": "high"}', '{"guidance": 99}', "{}"])
def test_a_broken_defaults_file_is_a_clear_error(tmp_path, text):
    (tmp_path / "dgq_defaults.json").write_text(text)
    with pytest.raises(dgq.ModelLoadError, match="dgq_defaults.json"):
        model_defaults(str(tmp_path))


def test_load_pipeline_attaches_the_defaults_and_studio_uses_them(tmp_path):
    folder = tmp_path / "tiny-copy"
    shutil.copytree(TINY_DIR, folder)
    (folder / "dgq_defaults.json").write_text(json.dumps({"guidance": 2.0}))
    pipe = dgq.load_pipeline(str(folder), device="cpu")
    assert pipe.dgq_defaults == {"guidance": 2.0} and dgq.default_guidance(pipe) == 2.0
    studio = dgq.Studio(pipe)
    g = studio.generate("a large red circle on the left", seed=0, steps=2)
    assert g.guidance == 2.0
    same = studio.generate("a large red circle on the left", seed=0, steps=2, guidance=2.0)
    other = studio.generate("a large red circle on the left", seed=0, steps=2, guidance=7.5)
    assert np.array_equal(np.asarray(g.image), np.asarray(same.image))
    assert not np.array_equal(np.asarray(g.image), np.asarray(other.image))


def test_pickle_only_weights_are_refused_with_the_fix(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(TINY_DIR, folder)
    st = next((folder / "unet").glob("*.safetensors"))
    st.rename(st.with_suffix(".bin"))  # what a folder saved without safe_serialization holds
    with pytest.raises(dgq.ModelLoadError, match=r"unet hold\(s\) pickle weights only.*safe_serialization=True") as e:
        dgq.load_pipeline(str(folder), device="cpu")
    assert str(tmp_path) not in e.value.public and "pickles" in e.value.public


def test_one_folder_has_one_name_under_every_spelling(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(TINY_DIR, folder)
    (tmp_path / "link").symlink_to(folder)
    spellings = [str(folder), str(tmp_path / "m" / ".." / "m"), str(tmp_path / "link")]
    assert {dgq.canonical_model(s) for s in spellings} == {str(folder.resolve())}
    assert dgq.canonical_model(str(TINY_DIR / ".." / "tiny-sd")) == "tiny" == dgq.canonical_model("tiny")
    pipe = dgq.load_pipeline(spellings[1], device="cpu")
    assert pipe.dgq_model_id == str(folder.resolve())  # the calibration cache key: one file per folder
    assert dgq.load_pipeline(str(TINY_DIR / ".." / "tiny-sd"), device="cpu").dgq_model_id == "tiny"
    missing = tmp_path / "missing"
    with pytest.raises(dgq.ModelLoadError) as e:
        dgq.load_pipeline(str(missing), device="cpu")
    assert str(tmp_path) in str(e.value) and str(tmp_path) not in e.value.public

"""Searched weight ranges on disk: round trip, stale and corrupted files, the shipped file."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import dgq
from dgq import primitives as P
from dgq import weight_ranges as WR
from dgq.studio import SHIPPED_WEIGHT_RANGES, Studio, weights_fingerprint
from dgq.tiny.models import build_pipeline


def _forget(studio):
    for layer in studio._qlayers.values():
        layer._dgq_wranges.clear()
        layer._dgq_wcache.clear()


@pytest.fixture()
def pipe():
    return build_pipeline(seed=3)


def test_ranges_are_kept_and_reused_without_searching(pipe, tmp_path, monkeypatch):
    studio = Studio(pipe, range_cache=tmp_path)
    studio.search_weight_ranges([4, 6])
    files = list(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == [f"{weights_fingerprint(pipe.unet)}.safetensors"]
    want = {n: layer.quantized_weight(4).clone() for n, layer in studio._qlayers.items()}
    _forget(studio)

    def no_search(*a, **k):
        raise AssertionError("the weight range was searched again")

    monkeypatch.setattr(P, "mse_search", no_search)
    again = Studio(pipe, range_cache=tmp_path)
    assert WR.entry_count(again._qlayers) == 2 * len(again._qlayers)
    for n, layer in again._qlayers.items():
        assert torch.equal(layer.quantized_weight(4), want[n])


def test_ranges_of_other_weights_or_a_corrupted_file_are_not_used(pipe, tmp_path, caplog):
    studio = Studio(pipe, range_cache=tmp_path)
    studio.search_weight_ranges([4])
    path = next(tmp_path.glob("*.safetensors"))
    _forget(studio)
    assert WR.load_into(studio._qlayers, path, "other-weights") == 0
    path.write_bytes(b"\x00" * 64)
    with caplog.at_level(logging.WARNING):
        assert WR.load_into(studio._qlayers, path, weights_fingerprint(pipe.unet)) == 0
    assert "invalid" in caplog.text
    fresh = Studio(pipe, range_cache=tmp_path)  # a new session: nothing usable on disk
    assert WR.entry_count(fresh._qlayers) == 0
    fresh.search_weight_ranges([4])  # searched again and the file rewritten whole
    _forget(studio)
    assert WR.load_into(studio._qlayers, path, weights_fingerprint(pipe.unet)) == len(studio._qlayers)


def test_bad_widths_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="allowed: 2..8"):
        Studio(pipe, range_cache=tmp_path).search_weight_ranges([9])


def test_the_shipped_ranges_match_the_shipped_weights():
    meta = json.loads(__import__("safetensors").safe_open(str(SHIPPED_WEIGHT_RANGES), "pt").metadata()["json"])
    studio = Studio(dgq.load_pipeline("tiny", device="cpu"), range_cache=False)
    assert meta["weights"] == weights_fingerprint(studio.pipe.unet)
    studio = Studio(studio.pipe)  # loads the shipped file
    for bits in range(2, 9):
        assert all((bits, "mse") in layer._dgq_wranges for layer in studio._qlayers.values())
    for name in list(studio._qlayers)[::40]:  # a few layers: the stored range is what the search gives
        layer = studio._qlayers[name]
        s, z = layer._dgq_wranges[(4, "mse")]
        _, s2, z2 = P.quantize_weight(layer.weight, 4, "mse")
        assert torch.equal(s, s2) and torch.equal(z, z2)


def test_a_file_with_wrong_values_or_schema_is_reported_and_rewritten(pipe, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    studio = Studio(pipe, range_cache=tmp_path)
    studio.search_weight_ranges([4])
    path = next(tmp_path.glob("*.safetensors"))
    key = weights_fingerprint(pipe.unet)
    meta = safe_open(str(path), "pt").metadata()
    good = load_file(str(path))
    name = next(k for k in good if k.endswith("|s"))
    faults = {
        "a value changed": ({**good, name: good[name] * 2}, meta),  # checksum
        "a NaN scale": ({**good, name: good[name] * float("nan")}, None),  # values (checksum re-made)
        "a wrong shape": ({**good, name: good[name][:1]}, None),
        "metadata a list": (good, {"json": "[1, 2]"}),
    }
    for fault, (tensors, md) in faults.items():
        if md is None:
            md = {"json": json.dumps(dict(json.loads(meta["json"]), sha256=WR._digest(tensors)))}
        save_file(tensors, str(path), metadata=md)
        problems: list[str] = []
        _forget(studio)
        with caplog.at_level(logging.WARNING):
            assert WR.load_into(studio._qlayers, path, key, problems) == 0, fault
        assert len(problems) == 1, fault
        fresh = Studio(pipe, range_cache=tmp_path)  # reports it and rewrites the file at once
        fresh.search_weight_ranges([4])
        _forget(studio)
        assert WR.load_into(studio._qlayers, path, key) == len(studio._qlayers), fault

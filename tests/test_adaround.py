"""AdaRound math, BRECQ block reconstruction, the stored rounding and its use by the Studio."""

from __future__ import annotations

import json

import pytest
import torch

from dgq import adaround as AR
from dgq import primitives as P
from dgq import reconstruction as R
from dgq.config import BaselineConfig, DGQConfig, config_from_dict

PROMPTS = ["a large red circle on the left", "a small blue square at the top"]

FAST = AR.ReconSettings(iters=20, batch_size=4, samples=16, lr=1e-2, steps=2, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster than two on a shared machine (see `torch_threads`)."""
    with R.torch_threads(1):
        yield


def _weight(seed: int = 0, shape=(6, 5, 3, 3)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    _, s, z = P.quantize_weight(w, 4)
    return w, s, z


# ----------------------------------------------------------------------------- math
def test_mask_codes_are_floor_or_ceil_and_nearest_mask_is_round_to_nearest():
    w, s, z = _weight()
    x = AR.weight_grid(w, s)
    floor = torch.floor(x) + z[:, None]
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    codes = AR.mask_codes(w, s, z, mask, 4).reshape(x.shape).float()
    lo, hi = floor.clamp(0, 15), (floor + 1).clamp(0, 15)
    assert bool(((codes == lo) | (codes == hi)).all())
    assert torch.equal(codes, (floor + mask.float()).clamp(0, 15))
    assert torch.equal(AR.mask_codes(w, s, z, AR.nearest_mask(w, s), 4), P.weight_codes(w, s, z, 4))


def test_soft_weight_starts_at_fp_and_hard_limits_match_the_mask():
    w, s, z = _weight(2)
    alpha = AR.init_alpha(w, s)
    h = AR.rectified_sigmoid(alpha)
    x = AR.weight_grid(w, s)
    assert torch.allclose(h, (x - torch.floor(x)).clamp(1e-6, 1 - 1e-6), atol=1e-5)
    inside = ((x + z[:, None]) >= 0) & ((x + z[:, None]) <= 15)  # not clipped by the range
    soft = AR.soft_weight(w, s, z, alpha, 4).reshape(x.shape)
    assert torch.allclose(soft[inside], w.reshape(x.shape)[inside], atol=1e-5)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    hard = AR.soft_weight(w, s, z, torch.where(mask, 50.0, -50.0), 4)
    assert torch.equal(hard, P.dequantize_weight(AR.mask_codes(w, s, z, mask, 4), s, z))
    assert float(AR.round_reg(torch.where(mask, 50.0, -50.0), 2.0)) == 0.0
    assert float(AR.round_reg(torch.zeros(10), 2.0)) == pytest.approx(10.0)


def test_beta_is_annealed_after_the_warmup():
    assert AR.beta_at(0, 100, 0.2) == 20.0 and AR.beta_at(20, 100, 0.2) == 20.0
    assert AR.beta_at(60, 100, 0.2) == pytest.approx(11.0)
    assert AR.beta_at(100, 100, 0.2) == pytest.approx(2.0)


def test_mask_packing_round_trips():
    m = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    assert torch.equal(AR.unpack_mask(AR.pack_mask(m), (7, 13)), m)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="iters"):
        AR.ReconSettings(iters=0)
    with pytest.raises(ValueError, match="warmup"):
        AR.ReconSettings(warmup=1.0)


# ----------------------------------------------------------------------------- reconstruction
@pytest.fixture(scope="module")
def data(random_pipe):
    from dgq.loading import default_guidance

    return R.sample_inputs(random_pipe, FAST, PROMPTS, default_guidance(random_pipe))


@pytest.fixture(scope="module")
def rounding(random_pipe, data):
    return R.reconstruct(random_pipe, 3, FAST, PROMPTS, data=data)


def test_units_are_blocks_and_lone_layers_in_call_order(random_pipe):
    from dgq.modules import quantize_, quantized_layers

    quantize_(random_pipe.unet)
    layers = quantized_layers(random_pipe.unet)
    plan = R.units(random_pipe.unet, layers)
    kinds = {type(u.module).__name__ for u in plan}
    assert {"ResnetBlock2D", "BasicTransformerBlock"} <= kinds
    covered = [ln for u in plan for ln in u.layers]
    assert sorted(covered) == sorted(layers)  # every quantized layer in exactly one unit
    names = [u.name for u in plan]
    assert names[0].startswith("time_embedding") and names.index("mid_block.resnets.0") < names.index(
        next(n for n in names if n.startswith("up_blocks")))


def test_learning_lowers_a_blocks_output_mse(random_pipe, data):
    from dgq.modules import quantized_layers

    layers = quantized_layers(random_pipe.unet)
    unit = next(u for u in R.units(random_pipe.unet, layers) if type(u.module).__name__ == "ResnetBlock2D")
    ranges = {}
    for ln in unit.layers:
        _, s, z = P.quantize_weight(layers[ln].weight, 3)
        ranges[ln] = (s, z)
    inputs = {k: v for k, v in data.items() if k != "total"}
    _, _, target = R.capture(random_pipe.unet, unit, inputs, None, with_output=True)
    args, kwargs, _ = R.capture(random_pipe.unet, unit, inputs, None, with_output=False)
    near = {ln: P.dequantize_weight(*P.quantize_weight(layers[ln].weight, 3)) for ln in unit.layers}
    before = R._mse(unit, args, kwargs, target, near)
    masks = R.learn_unit(unit, layers, ranges, 3, args, kwargs, target, AR.ReconSettings(iters=150, batch_size=8, lr=1e-2),
                         torch.Generator().manual_seed(0))
    learned = {ln: R._dequant(layers[ln], masks[ln], *ranges[ln], 3) for ln in unit.layers}
    after = R._mse(unit, args, kwargs, target, learned)
    assert after < 0.95 * before


def test_reconstruction_lowers_most_units_and_every_weight_is_floor_or_ceil(random_pipe, rounding):
    from dgq.modules import quantized_layers

    rows = rounding.meta["units"]
    improved = [r for r in rows if not r["kept_nearest"]]
    assert len(improved) >= 0.7 * len(rows)
    assert all(r["mse_learned"] < r["mse_nearest"] for r in improved)
    for name, layer in quantized_layers(random_pipe.unet).items():
        mask, s, z = rounding.layers[name]
        floor = torch.floor(AR.weight_grid(layer.weight, s)) + z[:, None]
        codes = rounding.codes(name, layer.weight).reshape(floor.shape).float()
        assert bool(((codes == floor.clamp(0, 7)) | (codes == (floor + 1).clamp(0, 7))).all()), name


def test_reconstruction_is_reproducible_for_a_seed(random_pipe, rounding, tmp_path):
    # a second run from scratch (its own sampling runs, through the cached entry point)
    [(again, _, built)] = R.reconstruct_cached(random_pipe, [3], FAST, PROMPTS, folder=tmp_path)
    assert built
    assert all(torch.equal(again.layers[n][0], rounding.layers[n][0]) for n in rounding.layers)


# ----------------------------------------------------------------------------- storage
def test_cache_round_trip_and_a_corrupted_file_is_rebuilt(random_pipe, tmp_path):
    cheap = AR.ReconSettings(iters=2, batch_size=2, samples=2, steps=1)  # what is tested here is the file
    [(r1, path, built)] = R.reconstruct_cached(random_pipe, [3], cheap, PROMPTS, folder=tmp_path)
    assert built and path.is_file() and path.with_suffix(".json").is_file()
    [(r2, path2, built2)] = R.reconstruct_cached(random_pipe, [3], cheap, PROMPTS, folder=tmp_path)
    assert not built2 and path2 == path
    assert all(torch.equal(r1.layers[n][0], r2.layers[n][0]) and torch.equal(r1.layers[n][1], r2.layers[n][1])
               for n in r1.layers)
    with pytest.raises(AR.RoundingMismatch, match="weights"):
        AR.Rounding.load(path.with_suffix(""), {"weights": "0" * 16})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(AR.RoundingMismatch, match="checksum"):
        AR.Rounding.load(path.with_suffix(""))
    [(r3, _, built3)] = R.reconstruct_cached(random_pipe, [3], cheap, PROMPTS, folder=tmp_path)
    assert built3
    r4 = AR.Rounding.load(path.with_suffix(""), {"bits": 3})  # the rewritten file verifies again
    assert all(torch.equal(r4.layers[n][0], r3.layers[n][0]) for n in r3.layers)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(AR.RoundingMismatch, match="metadata"):
        AR.Rounding.load(path.with_suffix(""))


def test_studio_uses_the_stored_rounding(random_pipe, random_calib, rounding, tmp_path, monkeypatch):
    import dgq
    from dgq.modules import quantized_layers

    monkeypatch.setenv("DGQ_CACHE", str(tmp_path))
    studio = dgq.Studio(random_pipe, random_calib, range_cache=False)
    cfg = DGQConfig(w_bits=3, a_bits=8, weight_rounding="adaround")
    assert not studio.has_rounding(3)
    with pytest.raises(RuntimeError, match="reconstruct"):
        studio.generate("a red circle", seed=0, config=cfg, steps=2)
    rounding.save(tmp_path / "adaround" / AR.file_stem(rounding.meta["weights"], 3, rounding.meta["settings_key"]))
    assert studio.has_rounding(3) and not studio.has_rounding(4)
    near = studio.generate("a red circle", seed=0, config=DGQConfig(w_bits=3, a_bits=8), steps=2).image
    ada = studio.generate("a red circle", seed=0, config=cfg, steps=2).image
    assert ada.tobytes() != near.tobytes()
    assert studio.generate("a red circle", seed=0, config=cfg, steps=2).image.tobytes() == ada.tobytes()
    for name, layer in quantized_layers(random_pipe.unet).items():
        mask, s, z = rounding.layers[name]
        expect = P.dequantize_weight(AR.mask_codes(layer.weight, s, z, mask, 3), s, z)
        assert torch.equal(layer.quantized_weight(3, "adaround"), expect)
    assert studio.prepare(cfg) >= 0.0


def test_a_rounding_chosen_by_path_replaces_the_looked_up_one(random_pipe, random_calib, rounding, tmp_path,
                                                               monkeypatch):
    import dataclasses

    import dgq
    from dgq.modules import quantized_layers

    monkeypatch.setenv("DGQ_CACHE", str(tmp_path))
    rounding.save(tmp_path / "adaround" / AR.file_stem(rounding.meta["weights"], 3, rounding.meta["settings_key"]))
    # another rounding of the same weights: every mask flipped (a legal floor/ceil choice too)
    other = dataclasses.replace(rounding, layers={k: (~m, s, z) for k, (m, s, z) in rounding.layers.items()},
                                meta={k: v for k, v in rounding.meta.items() if k != "sha256"})
    chosen = other.save(tmp_path / "chosen" / "mine")
    studio = dgq.Studio(random_pipe, random_calib, range_cache=False)
    cfg = DGQConfig(w_bits=3, a_bits=8, weight_rounding="adaround")
    looked_up = studio.generate("a red circle", seed=0, config=cfg, steps=2).image
    assert studio.use_rounding_file(chosen) == (3, "adaround")
    assert studio.rounding(3).meta["sha256"] == json.loads(chosen.with_suffix(".json").read_text())["sha256"]
    for name, layer in quantized_layers(random_pipe.unet).items():
        mask, s, z = other.layers[name]
        assert torch.equal(layer.quantized_weight(3, "adaround"),
                           P.dequantize_weight(AR.mask_codes(layer.weight, s, z, mask, 3), s, z))
    assert studio.generate("a red circle", seed=0, config=cfg, steps=2).image.tobytes() != looked_up.tobytes()
    # wrong weights, another weight search, a corrupted file: clear errors, nothing installed
    meta = json.loads(chosen.with_suffix(".json").read_text())
    for change, match in (({"weights": "0" * 16}, "made for weights"), ({"search": "other"}, "weight ranges")):
        js = tmp_path / "bad" / "r.json"
        js.parent.mkdir(exist_ok=True)
        js.write_text(json.dumps({**meta, **change}))
        js.with_suffix(".safetensors").write_bytes(chosen.with_suffix(".safetensors").read_bytes())
        with pytest.raises(ValueError, match=match):
            studio.use_rounding_file(js.with_suffix(".safetensors"))
    js.write_text(json.dumps(meta))
    js.with_suffix(".safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="corrupted"):
        studio.use_rounding_file(js)
    assert studio.rounding(3).meta["sha256"] == meta["sha256"]
    # generate: a missing file is an exit-2 error, before anything is generated
    from dgq.cli import main
    assert main(["generate", "--model", "tiny", "--method", "dgq", "--w-bits", "4", "--a-bits", "8",
                 "--weight-rounding", "adaround", "--rounding-file", str(tmp_path / "nowhere.safetensors"),
                 "--prompt", "a red circle", "--out", str(tmp_path / "x.png"), "--steps", "1"]) == 2


def test_lookup_offers_only_roundings_of_the_layers_weight_search(random_pipe, random_calib, rounding, tmp_path,
                                                                    monkeypatch):
    """A rounding learned on another weight-range search is not offered (its codes would not apply)."""
    import dataclasses

    import dgq
    from dgq.fingerprint import weights_fingerprint

    monkeypatch.setenv("DGQ_CACHE", str(tmp_path))
    other = dataclasses.replace(rounding, search="minmax",
                                meta={k: v for k, v in rounding.meta.items() if k != "sha256"})
    other.save(tmp_path / "adaround" / AR.file_stem(rounding.meta["weights"], 3, "minmax0000"))
    studio = dgq.Studio(random_pipe, random_calib, range_cache=False)
    fp = weights_fingerprint(random_pipe.unet)
    folders = studio.rounding_folders()
    assert len(AR.candidates(folders, fp, 3)) == 1 and AR.candidates(folders, fp, 3, search="mse") == []
    assert not studio.has_rounding(3) and not studio.load_rounding(3)
    rounding.save(tmp_path / "adaround" / AR.file_stem(rounding.meta["weights"], 3, rounding.meta["settings_key"]))
    assert studio.has_rounding(3) and studio.load_rounding(3) and studio.rounding(3).search == "mse"


# ----------------------------------------------------------------------------- configs and CLI
def test_config_weight_rounding_field():
    c = DGQConfig(w_bits=4, a_bits=6, weight_rounding="adaround")
    assert c.to_dict()["weight_rounding"] == "adaround" and config_from_dict(c.to_dict()) == c
    assert "AdaRound" in c.label() and "AdaRound" in BaselineConfig(4, 6, weight_rounding="adaround").label()
    plain = DGQConfig(w_bits=4, a_bits=6)
    assert "weight_rounding" not in plain.to_dict()  # old dicts and fingerprints unchanged
    assert config_from_dict(json.loads(json.dumps(plain.to_dict()))).weight_rounding == "nearest"
    with pytest.raises(ValueError, match="weight_rounding"):
        DGQConfig(weight_rounding="stochastic")
    with pytest.raises(ValueError, match="int8"):
        BaselineConfig(4, 8, execution="int8", weight_rounding="adaround")


def test_cli_reconstruct_rejects_bad_bits(capsys):
    from dgq.cli import main

    assert main(["reconstruct", "--w-bits", "9"]) == 2
    assert "2..8" in capsys.readouterr().err
    assert main(["reconstruct", "--w-bits", "4", "--iters", "0"]) == 2


def test_statistics_from_the_quantized_network(random_pipe, tmp_path):
    import dgq

    fp = dgq.calibrate(random_pipe, PROMPTS, steps=2, cache=tmp_path, progress=False)
    net = BaselineConfig(w_bits=3, a_bits=6)
    q = dgq.calibrate(random_pipe, PROMPTS, steps=2, cache=tmp_path, progress=False, stats_network=net)
    assert q.meta["stats_network"] == net.to_dict() and "stats_network" not in fp.meta
    assert q.sites.keys() == fp.sites.keys()
    site = next(n for n, i in fp.sites.items() if i.kind == "conv")
    assert not torch.equal(q.tensors[f"{site}|ch_max"], fp.tensors[f"{site}|ch_max"])  # other inputs observed
    again = dgq.calibrate(random_pipe, PROMPTS, steps=2, cache=tmp_path, progress=False, stats_network=net)
    assert again.meta.get("sha256") is not None and torch.equal(again.tensors[f"{site}|ch_max"],
                                                                 q.tensors[f"{site}|ch_max"])


# ----------------------------------------------------------------------------- TIAR (TFMQ-DM)
def test_temporal_forward_is_what_the_unet_feeds_each_resnet(random_pipe, unet_call):
    from dgq.modules import quantize_, quantized_layers

    unet = random_pipe.unet
    quantize_(unet)
    layers = quantized_layers(unet)
    names = R.temporal_layers(layers)
    projs = [n for n in names if n.endswith("time_emb_proj")]
    assert names[:2] == ["time_embedding.linear_1", "time_embedding.linear_2"] and projs
    got = {}
    mods = dict(unet.named_modules())
    unet_call(unet, [mods[p].register_forward_hook(lambda _m, _a, out, p=p: got.__setitem__(p, out)) for p in projs],
              321)
    run = R.temporal_forward(unet, names, unet.time_proj(torch.tensor([321])))
    with torch.no_grad():
        out = run({}, torch.tensor([0]))
    assert torch.allclose(out, torch.cat([got[p].reshape(1, -1) for p in projs], 1), atol=1e-5)


def test_tiar_learns_the_temporal_block_first_as_one_unit(random_pipe, data, rounding):
    from dataclasses import replace

    assert "tiar" not in AR.ReconSettings().to_dict()  # the keys of files made before TIAR hold
    r = R.reconstruct(random_pipe, 3, replace(FAST, tiar=True), PROMPTS, data=data)
    rows = r.meta["units"]
    assert rows[0]["unit"] == "temporal information block" and not rows[0]["kept_nearest"]
    assert rows[0]["mse_learned"] < rows[0]["mse_nearest"] and rows[0]["timesteps"] >= 2
    assert not any(u["unit"].startswith("time_embedding") for u in rows[1:])
    plain = {u["unit"]: u["layers"] for u in rounding.meta["units"]}
    res = [u for u in rows[1:] if u["unit"].endswith("resnets.0") and "down_blocks.0" in u["unit"]][0]
    assert res["layers"] == plain[res["unit"]] - 1  # its time_emb_proj was learned by TIAR, then kept fixed
    assert r.meta["settings"]["tiar"] is True and AR.rounding_name(r.meta) == "adaround-tiar"
    assert AR.rounding_name(rounding.meta) == "adaround"

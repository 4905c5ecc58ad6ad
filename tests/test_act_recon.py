"""Q-Diffusion's learned activation step sizes (LSQ) and the paper-recipe baselines end to end."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dgq import act_recon, stored
from dgq import adaround as AR
from dgq import primitives as P
from dgq import reconstruction as R
from dgq.act_ranges import ActRanges, ActReconSettings, find
from dgq.attention import attention_names
from dgq.config import BaselineConfig, BaselineStyle, config_from_dict
from dgq.eval.settings import parse_setting

PROMPTS = ["a large red circle on the left", "a small blue square at the top"]
W = 5  # a width no other test module stores a rounding for
FAST = ActReconSettings(iters=30, batch_size=4, samples=16, lr=2e-3, steps=2, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    with R.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def studio(random_pipe, random_calib, tmp_path_factory):
    """A Studio over the random pipeline whose AdaRound rounding at W is stored in the cache."""
    import dgq
    from dgq.paths import cache_dir

    cheap = AR.ReconSettings(iters=5, batch_size=2, samples=8, steps=2)
    made = []
    for tiar in (False, True):  # qdiff-paper's AdaRound weights, tfmq-paper's (with TIAR)
        [(_, path, _)] = R.reconstruct_cached(random_pipe, [W], replace(cheap, tiar=tiar), PROMPTS,
                                              folder=cache_dir() / "adaround")
        made.append(path)
    yield dgq.Studio(random_pipe, random_calib, range_cache=False)
    for path in made:  # the session cache is shared: other modules expect no rounding for this model
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def learned(studio):
    return act_recon.learn(studio, W, 6, FAST, prompts=PROMPTS)


def test_lsq_fake_quant_matches_the_quantizer_and_passes_gradients_to_the_step():
    x = torch.randn(2, 3, 4, 4)
    s, z = P.uniform_qparams(torch.tensor(-2.0), torch.tensor(2.5), 6)
    scale = s.reshape(1).clone().requires_grad_(True)
    y = act_recon.lsq_fake_quant(x, scale, z.reshape(1), 6)
    assert torch.allclose(y, P.fake_quant(x, s, z, 6), atol=1e-6)
    (y - x * 1.1).pow(2).sum().backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0
    per_ch = act_recon.lsq_fake_quant(x, torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3), 6)
    assert torch.allclose(per_ch[:, 1], P.fake_quant(x[:, 1], torch.tensor(0.2), torch.tensor(0.0), 6))


def test_learning_lowers_unit_errors_and_never_keeps_a_worse_one(learned, studio):
    rows = learned.meta["units"]
    improved = [r for r in rows if not r["kept_initial"]]
    assert len(improved) >= 0.5 * len(rows)
    assert all(r["mse_learned"] < r["mse_initial"] for r in improved)
    attention = attention_names(studio.pipe.unet)
    assert set(learned.sites) == set(studio._qlayers) | {f"{a}.{x}" for a in attention for x in "qkvp"}
    initial = act_recon.initial_attention(studio.calibration, W, 6, attention)
    moved = [x for x in initial if not torch.equal(initial[x][0], learned.sites[x][0])]
    assert len(moved) >= len(initial) // 2  # Q, K, V and probability step sizes are learned, not kept
    assert all(float(learned.sites[f"{a}.p"][1].abs().max()) == 0 for a in attention)  # probabilities: z = 0
    splits = learned.meta["splits"]
    assert splits
    for site, split in splits.items():  # a split input keeps two step sizes, one per half
        s, _ = learned.sites[site]
        assert s.numel() == studio.calibration.sites[site].channels
        assert len(set(s[:split].tolist())) == 1 and len(set(s[split:].tolist())) == 1


def test_running_statistics_are_qdiffusions_ema_of_batch_extremes(studio):
    """`running_ranges` ends where Q-Diffusion's `--running_stat` does: each quantizer's raw
    min/max on the 16-sample init pass, moved by an EMA (0.95) of every later batch's min/max
    (one pair per half for a split input), zero kept inside; probabilities keep z = 0."""
    from dgq.loading import default_guidance
    from dgq.split import split_labels, split_points

    unet = studio.pipe.unet
    layers = dict(studio._qlayers)
    splits = {n: k for n, k in split_points(unet).items() if n in layers}
    labels = {n: split_labels(studio.calibration.sites[n].channels, k) for n, k in splits.items()}
    attention = {a: unet.get_submodule(a) for a in attention_names(unet)}
    ranges = {n: [t.clone() for t in act_recon.initial_range(studio.calibration, n, 6, splits.get(n))] for n in layers}
    light = act_recon.initial_attention(studio.calibration, W, 6, list(attention))
    ranges.update({k: [t.clone() for t in v] for k, v in light.items()})
    hooks = act_recon._Inputs(layers, ranges, 6, labels, attention)
    assert studio.load_rounding(W)
    weights = {n: m.quantized_weight(W, "adaround").detach() for n, m in layers.items()}
    data = R.unet_inputs(studio.pipe, PROMPTS, 6, default_guidance(studio.pipe))  # 2 prompts x 6 steps x 2 halves
    plain = next(n for n in layers if n not in splits and "conv" in n)
    split = next(iter(splits))
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {plain: [], split: []}

    def spy(name):
        def hook(_m, args):  # registered first: sees the input the running statistics see
            x = args[0].detach().float()
            parts = [x[:, :splits[name]], x[:, splits[name]:]] if name in splits else [x]
            seen[name].append((torch.stack([p.amin() for p in parts]), torch.stack([p.amax() for p in parts])))
        return hook

    handles = [layers[n].register_forward_pre_hook(spy(n)) for n in seen]
    try:
        batches = act_recon.running_ranges(unet, hooks, weights, data, splits, torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    assert batches == data["sample"].shape[0] // act_recon.EMA_BATCH == 3
    for name, calls in seen.items():
        assert len(calls) == 1 + batches
        lo, hi = calls[0]
        for blo, bhi in calls[1:]:
            lo, hi = 0.95 * lo + 0.05 * blo, 0.95 * hi + 0.05 * bhi
        s, z = P.uniform_qparams(lo.clamp(max=0), hi.clamp(min=0), 6)
        assert torch.allclose(ranges[name][0], s) and torch.equal(ranges[name][1], z)
        assert ranges[name][0].numel() == (2 if name in splits else 1)
    for a in attention:
        assert float(ranges[f"{a}.p"][1].abs().max()) == 0  # probabilities: z = 0
    moved = [k for k in light if not torch.allclose(light[k][0], ranges[k][0])]
    assert len(moved) == len(light)  # every attention quantizer took running statistics
    assert hooks.observe is None  # and the hooks are back to plain quantization


def test_init_is_part_of_the_key_and_checked(studio):
    ema = act_recon.identity(studio, W, 6, FAST, PROMPTS)["key"]
    assert ema != act_recon.identity(studio, W, 6, replace(FAST, init="steps"), PROMPTS)["key"]
    assert ema != act_recon.identity(studio, W, 6, replace(FAST, ema_samples=64), PROMPTS)["key"]
    with pytest.raises(ValueError, match="init"):
        ActReconSettings(init="mse")
    with pytest.raises(ValueError, match="ema_samples"):
        ActReconSettings(ema_samples=0)


def test_steps_init_starts_from_the_calibrated_ranges(studio):
    r = act_recon.learn(studio, W, 6, replace(FAST, iters=1, init="steps"), prompts=PROMPTS)
    assert r.meta["running_stat"] == {}
    e = act_recon.learn(studio, W, 6, replace(FAST, iters=1), prompts=PROMPTS)
    assert e.meta["running_stat"]["batches"] >= 1
    assert any(not torch.equal(r.sites[n][0], e.sites[n][0]) for n in studio._qlayers)  # the start matters


def test_learning_is_reproducible_for_a_seed(learned, studio):
    again = act_recon.learn(studio, W, 6, FAST, prompts=PROMPTS)
    assert all(torch.equal(again.sites[n][0], learned.sites[n][0]) for n in learned.sites)


def test_lsq_attention_is_what_qdiff_paper_runs(studio, learned):
    """The processor the step sizes are learned through computes what generation with the stored
    result computes (DGQAttnProcessor under `qdiff-paper`'s parameters), for a cross-attention."""
    from dgq.calibration import ALL
    from dgq.context import RunContext, use
    from dgq.methods import MethodInputs
    from dgq.quantizer import QuantParams

    unet = studio.pipe.unet
    name = next(a for a in attention_names(unet) if a.endswith("attn2"))
    attn = unet.get_submodule(name)
    gen = torch.Generator().manual_seed(0)
    d = attn.to_q.out_features // attn.heads  # Q, K, V as the processor hands them to the softmax
    q, k, v = (torch.randn(2, attn.heads, n, d, generator=gen) * 0.5 for n in (16, 77, 77))
    ranges = {k: list(v) for k, v in learned.sites.items()}
    lsq = act_recon.LSQAttnProcessor(name, True, ranges, 6)
    with torch.no_grad():
        want = lsq._attend(attn, q, k, v, None)
        params = QuantParams(studio.calibration, BaselineConfig(W, 6, style="qdiff-paper"),
                             inputs=MethodInputs(act_ranges=learned))
        with use(RunContext(params=params, t_key=ALL)):
            got = attn.processor._attend(attn, q, k, v, None)
        fp = attn.processor._attend(attn, q, k, v, None)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, fp, atol=1e-4)  # and it does quantize
    pq = params.prob(f"{name}.p", params.key_for(500))
    assert pq.scale == pytest.approx(float(learned.sites[f"{name}.p"][0]))


def test_learning_without_attention_keeps_the_light_ranges(studio, tmp_path):
    from dgq.methods import MethodInputs
    from dgq.quantizer import QuantParams

    r = act_recon.learn(studio, W, 6, replace(FAST, iters=2, attention=False), prompts=PROMPTS)
    assert set(r.sites) == set(studio._qlayers)
    assert r.meta["key"] != act_recon.identity(studio, W, 6, replace(FAST, iters=2), PROMPTS)["key"]
    r.save(tmp_path / act_recon.file_stem(r.meta["weights"], W, 6, r.meta["key"]))
    found = find(studio, W, 6, None, [tmp_path])  # a layers-only file is still a valid result
    assert found is not None and set(found[0].sites) == set(r.sites)
    site = f"{attention_names(studio.pipe.unet)[0]}.p"
    paper = QuantParams(studio.calibration, BaselineConfig(W, 6, style="qdiff-paper"), inputs=MethodInputs(act_ranges=r))
    light = QuantParams(studio.calibration, BaselineConfig(W, 6, style="qdiff"))
    assert paper.prob(site, paper.key_for(500)) == light.prob(site, light.key_for(500))


def test_cache_round_trip_and_a_corrupted_file_is_rebuilt(studio, tmp_path):
    cheap = ActReconSettings(iters=2, batch_size=2, samples=4, steps=1)
    r1, path, built = act_recon.learn_cached(studio, W, 8, cheap, folder=tmp_path, prompts=PROMPTS)
    assert built and path.is_file() and path.with_suffix(".json").is_file()
    r2, path2, built2 = act_recon.learn_cached(studio, W, 8, cheap, folder=tmp_path, prompts=PROMPTS)
    assert not built2 and path2 == path
    assert all(torch.equal(r1.sites[n][0], r2.sites[n][0]) for n in r1.sites)
    with pytest.raises(stored.StoredMismatch, match="weights"):
        ActRanges.load(path.with_suffix(""), {"weights": "0" * 16})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(stored.StoredMismatch, match="checksum"):
        ActRanges.load(path.with_suffix(""))
    assert find(studio, W, 8, cheap, [tmp_path]) is None  # a corrupted file is never used
    r3, _, built3 = act_recon.learn_cached(studio, W, 8, cheap, folder=tmp_path, prompts=PROMPTS)
    assert built3 and ActRanges.load(path.with_suffix("")).meta["sha256"] == r3.meta["sha256"]


def test_paper_configs_and_settings():
    c = BaselineConfig(4, 6, style="qdiff-paper")
    assert c.weight_rounding == "adaround" and c.style is BaselineStyle.QDIFF_PAPER  # AdaRound is the recipe
    assert BaselineConfig(4, 6, style="tfmq-paper").weight_rounding == "adaround-tiar"  # TFMQ-DM's: with TIAR
    assert config_from_dict(c.to_dict()) == c
    assert c.label() == "Q-Diffusion (paper recipe) W4A6"
    s = parse_setting("tfmq-paper:W4A8")
    assert s.spec == "tfmq-paper:W4A8" and s.config.style is BaselineStyle.TFMQ_PAPER
    assert parse_setting("qdiff-paper:W8A6:adaround").spec == "qdiff-paper:W8A6"
    with pytest.raises(ValueError, match="int8"):
        BaselineConfig(8, 8, style="tfmq-paper", execution="int8")


def test_paper_baselines_run_end_to_end(studio, learned, tmp_path, monkeypatch):
    prompt = "a red circle"
    assert studio.load_rounding(W, "adaround-tiar")  # from the session cache, before DGQ_CACHE moves below
    qcfg = BaselineConfig(W, 6, style="qdiff-paper")
    with pytest.raises(RuntimeError, match="reconstruct .*--method qdiff-paper"):
        studio.generate(prompt, seed=0, config=qcfg, steps=2)
    learned.save(tmp_path / "act-recon" / act_recon.file_stem(learned.meta["weights"], W, 6, learned.meta["key"]))
    monkeypatch.setenv("DGQ_CACHE", str(tmp_path))
    studio._act_ranges.clear()
    assert studio.has_act_ranges(W, 6) and not studio.has_act_ranges(W, 8)
    paper = studio.generate(prompt, seed=0, config=qcfg, steps=2).image
    assert studio.generate(prompt, seed=0, config=qcfg, steps=2).image.tobytes() == paper.tobytes()
    light = studio.generate(prompt, seed=0, config=BaselineConfig(W, 6, style="qdiff", weight_rounding="adaround"),
                            steps=2).image
    assert paper.tobytes() != light.tobytes()
    params = studio.params(qcfg)
    site = next(iter(learned.sites))
    q = params.act(site, params.key_for(500))
    assert torch.equal(q.scale.reshape(-1), learned.sites[site][0].reshape(-1))
    tfmq = studio.generate(prompt, seed=0, config=BaselineConfig(W, 6, style="tfmq-paper"), steps=2).image
    assert studio.rounding(W, "adaround-tiar") is not None  # tfmq-paper's weights are the TIAR rounding
    tfmq_light = studio.generate(prompt, seed=0, config=BaselineConfig(W, 6, style="tfmq", weight_rounding="adaround-tiar"),
                                 steps=2).image
    assert tfmq.tobytes() != tfmq_light.tobytes()  # the split changes the shortcut convs' inputs


def test_cli_reconstruct_qdiff_paper_needs_a_bits(capsys):
    from dgq.cli import main

    assert main(["reconstruct", "--model", "tiny", "--w-bits", "4", "--method", "qdiff-paper"]) != 0
    assert "--a-bits" in capsys.readouterr().err


def test_cli_reconstruct_checks_the_step_size_settings_first(capsys):
    from dgq.cli import main

    assert main(["reconstruct", "--model", "tiny", "--w-bits", "4", "--method", "qdiff-paper", "--a-bits", "6",
                 "--act-ema-samples", "0"]) != 0
    assert "ema_samples" in capsys.readouterr().err

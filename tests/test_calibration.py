from __future__ import annotations

import json

import pytest
import torch

from dgq.calibration import ALL, EMA_MOMENTUM, Calibration, CalibrationMismatch, StatsCollector


def _two_batches():
    c = StatsCollector()
    a = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])  # [B=1, N=2, C=2]
    b = torch.tensor([[[-4.0, 1.0], [2.0, 6.0]]])
    p1 = torch.softmax(torch.randn(1, 1, 4, 77), -1)
    p2 = torch.softmax(torch.randn(1, 1, 4, 77) * 3, -1)
    for t, x, p in ((900, a, p1), (900, b, p2), (100, a, p1)):
        c.set_timestep(t)
        c.observe("lin", x, "linear")
        c.observe_probs("attn2.p", p, cross=True)
    return c.finalize({"model": "x"}), (a, b, p1, p2)


def test_aggregation_rules_min_max_ema_hist():
    cal, (a, b, p1, p2) = _two_batches()
    assert cal.t_keys == [900, 100, ALL]
    assert float(cal.get("lin", "tmin", 900)) == -4.0 and float(cal.get("lin", "tmax", 900)) == 6.0
    assert cal.get("lin", "ch_min", 900).tolist() == [-4.0, -2.0]
    assert cal.get("lin", "px_max", 900).tolist() == [1.0, 6.0]
    ema = EMA_MOMENTUM * (-2.0) + (1 - EMA_MOMENTUM) * (-4.0)
    assert float(cal.get("lin", "ema_min", 900)) == pytest.approx(ema, rel=1e-3)  # stored in fp16
    assert float(cal.get("attn2.p", "pmax", 900)) == pytest.approx(float(torch.maximum(p1.max(), p2.max())), rel=1e-3)
    rest = torch.maximum(p1[..., 1:].max(), p2[..., 1:].max())
    assert float(cal.get("attn2.p", "pmax_rest", 900)) == pytest.approx(float(rest), rel=1e-3)
    assert float(cal.get("attn2.p", "hist", 900).sum()) == 2 * 4 * 76  # summed, <start> column apart
    assert float(cal.get("attn2.p", "hist0", 900).sum()) == 2 * 4
    # the all-steps key aggregates every call
    assert float(cal.get("lin", "tmin", ALL)) == -4.0 and float(cal.get("attn2.p", "hist", ALL).sum()) == 3 * 4 * 76
    assert cal.nearest_t(880) == 900 and cal.nearest_t(0) == 100


def test_all_steps_set_equals_aggregating_every_call():
    """The all-steps statistics are folded from the per-timestep ones at the end; they must equal
    aggregating every call in order (EMA included, which depends on the order)."""
    g = torch.Generator().manual_seed(0)
    c = StatsCollector()
    calls = [(t, torch.randn(2, 6, 4, generator=g) * (1 + i), torch.softmax(torch.randn(2, 1, 6, 77, generator=g) * 3, -1))
             for i, t in enumerate((900, 900, 500, 100, 500, 900))]
    for t, x, p in calls:
        c.set_timestep(t)
        c.observe("lin", x, "linear")
        c.observe_probs("attn2.p", p, cross=True)
    cal = c.finalize({"model": "x"})
    xs = torch.stack([x for _, x, _ in calls])
    assert float(cal.get("lin", "tmin", ALL)) == pytest.approx(float(xs.min()), rel=1e-3)
    assert torch.allclose(cal.get("lin", "ch_max", ALL), xs.amax(dim=(0, 1, 2)).half().float())
    assert torch.allclose(cal.get("lin", "px_min", ALL), xs.amin(dim=(0, 1, 3)).half().float())
    ema = None
    for _, x, _ in calls:
        v = min(float(x.min()), 0.0)
        ema = v if ema is None else EMA_MOMENTUM * ema + (1 - EMA_MOMENTUM) * v
    assert float(cal.get("lin", "ema_min", ALL)) == pytest.approx(ema, rel=1e-3)
    per_t = sum(cal.get("attn2.p", "hist", t) for t in (900, 500, 100))
    assert torch.equal(cal.get("attn2.p", "hist", ALL), per_t)
    assert float(per_t.sum()) == 6 * 2 * 6 * 76


def test_save_load_round_trip_and_refusals(tmp_path):
    cal, _ = _two_batches()
    cal.save(tmp_path / "c")
    back = Calibration.load(tmp_path / "c", expect={"model": "x"})
    assert set(back.tensors) == set(cal.tensors)
    assert all(torch.equal(back.tensors[k], cal.tensors[k]) for k in cal.tensors)
    assert back.sites["lin"].kind == "linear" and back.t_keys == cal.t_keys
    with pytest.raises(CalibrationMismatch, match="model"):
        Calibration.load(tmp_path / "c", expect={"model": "y"})
    meta = json.loads((tmp_path / "c.json").read_text())
    meta["format_version"] = 999
    (tmp_path / "c.json").write_text(json.dumps(meta))
    with pytest.raises(CalibrationMismatch, match="format"):
        Calibration.load(tmp_path / "c")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CalibrationMismatch, match="unreadable"):
        Calibration.load(tmp_path / "c")
    with pytest.raises(CalibrationMismatch, match="no calibration"):
        Calibration.load(tmp_path / "missing")


def test_log_hist_bins_match_their_edges():
    from dgq import primitives as P

    g = torch.Generator().manual_seed(9)
    x = torch.softmax(torch.randn(2, 2, 16, 77, generator=g) * 4, -1)
    x[0, 0, 0, :3] = 0.0
    h = P.log_hist(x)
    assert h.shape == (P.N_LOG_BINS + 1,) and float(h.sum()) == x.numel() and float(h[0]) == 3
    lo, hi = P._bin_edges()
    v = x.flatten().double()
    v = v[v > 0]
    j = torch.searchsorted(lo, v, right=True) - 1  # the bin each value belongs to by its edges
    assert torch.equal(torch.bincount(j, minlength=P.N_LOG_BINS).double(), h[1:])
    q = P.hist_quantile(h, 0.999)
    assert torch.quantile(v.float(), 0.999) <= q <= 2 * torch.quantile(v.float(), 0.999)


def test_retrained_weights_do_not_reuse_a_cached_calibration(random_pipe, tmp_path):
    from dgq.studio import _calibration_key

    key = _calibration_key(random_pipe, ["a red circle"], 4, 7.5)
    layer = random_pipe.unet.conv_in
    with torch.no_grad():
        layer.weight.add_(1e-3)
    try:
        assert _calibration_key(random_pipe, ["a red circle"], 4, 7.5)["weights"] != key["weights"]
    finally:
        with torch.no_grad():
            layer.weight.sub_(1e-3)


@pytest.mark.parametrize("fault", ["no sites", "t_keys a string", "a list", "a site of the wrong kind",
                                   "a tensor of the wrong length", "channels disagree"])
def test_a_calibration_that_parses_but_does_not_validate_is_rebuilt(random_pipe, tmp_path, fault):
    import json

    import dgq
    from dgq.calibration import Calibration, CalibrationMismatch

    prompts = ["a small green square at the bottom"]
    dgq.calibrate(random_pipe, prompts, steps=2, batch_size=1, cache=tmp_path, progress=False)
    js = next(tmp_path.glob("*.json"))
    meta = json.loads(js.read_text())
    site = next(n for n, d in meta["sites"].items() if d["kind"] == "linear")
    if fault == "no sites":
        del meta["sites"]
    elif fault == "t_keys a string":
        meta["t_keys"] = "961"
    elif fault == "a list":
        meta = [meta]
    elif fault == "a site of the wrong kind":
        meta["sites"][site]["kind"] = 7
    elif fault == "a tensor of the wrong length":
        meta["t_keys"] = meta["t_keys"][1:]
    else:
        meta["sites"][site]["channels"] += 1
    js.write_text(json.dumps(meta))
    with pytest.raises(CalibrationMismatch, match="not a JSON object|does not hold a valid calibration|format"):
        Calibration.load(js.with_suffix(""))
    again = dgq.calibrate(random_pipe, prompts, steps=2, batch_size=1, cache=tmp_path, progress=False)
    assert again.sites and Calibration.load(js.with_suffix("")).sites.keys() == again.sites.keys()  # rewritten valid

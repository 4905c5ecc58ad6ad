"""Metric functions: exact values where they are known, honest "unavailable" where weights are missing,
and no network access on any code path."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgq import metrics as M
from dgq.tiny import render as R


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: metrics must never download."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    torch.set_num_threads(1)


def _renders(n: int, start: int) -> np.ndarray:
    return np.stack([R.to_array(R.sample(start + i)[2]) for i in range(n)])


def test_import_is_light() -> None:
    code = "import sys, dgq.metrics; assert 'open_clip' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_psnr_and_ssim() -> None:
    a = _renders(3, 80_000_000)
    assert M.psnr(a, a) == float("inf")
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    b = a.astype(np.int16) + 1
    b = np.where(a == 255, 254, b).astype(np.uint8)  # every pixel off by exactly one level
    assert M.psnr(a, b) == pytest.approx(10 * np.log10(255.0 ** 2), abs=1e-6)
    assert M.ssim(a, b) < 1.0
    per = M.psnr(a, b, reduction="none")
    assert per.shape == (3,)
    noisy = np.random.default_rng(0).integers(0, 256, size=a.shape, dtype=np.uint8)
    assert M.psnr(a, noisy) < 15 and M.ssim(a, noisy) < 0.2
    assert M.psnr(R.sample(1)[2], R.sample(1)[2]) == float("inf")  # PIL inputs
    with pytest.raises(ValueError):
        M.psnr(a, a[:2])


def test_frechet_paths_agree() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    y = rng.normal(size=(150, 16)) * 1.3 + 0.2
    mu1, s1 = M.feature_stats(x)
    mu2, s2 = M.feature_stats(y)
    ref = M.frechet_distance(mu1, s1, mu2, s2)
    assert M.fid_from_features(x, y) == pytest.approx(ref, rel=1e-6)
    assert M.fid_from_features(x, mu2=mu2, sigma2=s2) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions: the low-rank path equals the exact symmetric form
    xs, ys = x[:10], y[:12]
    (m1, c1), (m2, c2) = M.feature_stats(xs), M.feature_stats(ys)
    exact = float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * M._sym_trace_sqrt(c1, c2))
    assert M.fid_from_features(xs, ys) == pytest.approx(exact, rel=1e-6)
    assert M.fid_from_features(xs, mu2=m2, sigma2=c2) == pytest.approx(exact, rel=1e-6)


def test_stats_npz_roundtrip(tmp_path: Path) -> None:
    mu, sigma = np.arange(3.0), np.eye(3)
    M.save_stats(tmp_path / "ref.npz", mu, sigma)
    got_mu, got_sigma = M.load_stats(tmp_path / "ref.npz")
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError):
        M.load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    with pytest.raises(ValueError):  # object arrays need pickle, which is refused
        M.load_stats(tmp_path / "pickled.npz")


def test_domain_fid_renders_vs_renders_small_vs_noise_large() -> None:
    gen = _renders(300, 80_100_000)
    noise = np.random.default_rng(1).integers(0, 256, size=(300, 64, 64, 3), dtype=np.uint8)
    same = M.domain_fid(gen, n_ref=600)
    far = M.domain_fid(noise, n_ref=600)
    assert isinstance(same, float) and isinstance(far, float)
    assert 0 <= same < 0.1 * far  # measured: ~360 vs ~10,000 at these sample sizes


def test_domain_fid_unavailable_without_evaluator(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise FileNotFoundError("no evaluator weights at /nowhere")

    monkeypatch.setattr(M, "_default_evaluator", missing)
    v = M.domain_fid(_renders(2, 80_200_000), n_ref=2)
    assert M.is_unavailable(v)


@pytest.fixture(scope="module")
def random_clip() -> M.ClipScorer:
    return M.ClipScorer("ViT-B-32", pretrained=None)


def test_clip_scorer_random_weights_end_to_end(random_clip: M.ClipScorer) -> None:
    assert random_clip.random_weights
    imgs = [R.sample(80_300_000 + i)[2] for i in range(3)]
    caps = [R.sample(80_300_000 + i)[1] for i in range(3)]
    sims = random_clip.similarities(imgs, caps)
    assert sims.shape == (3,) and np.all(np.abs(sims) <= 1)
    s = random_clip.score(imgs, caps)
    assert isinstance(s, float) and -1.0 <= s <= 1.0
    assert M.clip_score(imgs, caps, scorer=random_clip) == pytest.approx(s)


def test_clip_scorer_loads_from_local_hf_cache_and_file(random_clip: M.ClipScorer, tmp_path: Path) -> None:
    """A tag whose weights sit in the HF cache loads offline; so does an explicit weights file."""
    from safetensors.torch import save_file

    snap = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    state = {k: v.detach().half().contiguous() for k, v in random_clip.model.state_dict().items()}
    save_file(state, str(snap / "open_clip_model.safetensors"))
    del state
    found = M.find_local_open_clip_weights("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path)
    assert found == snap / "open_clip_model.safetensors"
    scorer, reason = M.ClipScorer.try_load("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path)
    assert scorer is not None and not scorer.random_weights, reason
    imgs = [R.sample(80_600_000 + i)[2] for i in range(2)]
    caps = [R.sample(80_600_000 + i)[1] for i in range(2)]
    np.testing.assert_allclose(scorer.similarities(imgs, caps), random_clip.similarities(imgs, caps), atol=2e-2)
    del scorer
    by_file, _ = M.ClipScorer.try_load("ViT-B-32", None, weights_path=snap / "open_clip_model.safetensors")
    assert by_file is not None and not by_file.random_weights


def test_clip_scorer_unavailable_without_weights(tmp_path: Path) -> None:
    scorer, reason = M.ClipScorer.try_load(weights_path=tmp_path / "nope.safetensors")
    assert scorer is None and reason.startswith("unavailable")
    # the default ViT-g-14 tag, looked up in an empty cache: no download, a reason that says what to pass
    scorer, reason = M.ClipScorer.try_load(cache_dir=tmp_path)
    assert scorer is None
    assert reason == ("unavailable: open_clip ViT-g-14/laion2b_s34b_b88k weights not found locally "
                      "(pass --clip-weights PATH)")
    assert M.is_unavailable(M.clip_score([R.sample(1)[2]], ["x"], cache_dir=tmp_path))
    scorer, reason = M.ClipScorer.try_load("ViT-B-32", pretrained="no-such-tag", cache_dir=tmp_path)
    assert scorer is None and reason.startswith("unavailable")


def test_fid_scorer_random_inception_runs(tmp_path: Path) -> None:
    scorer = M.FidScorer(random_init=True)
    assert scorer.random_weights
    gen, ref = _renders(3, 80_400_000), _renders(3, 80_500_000)
    value = scorer.compute(gen, ref)
    assert isinstance(value, float) and np.isfinite(value) and value > -1e-6
    mu, sigma = scorer.stats(ref)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    M.save_stats(tmp_path / "ref.npz", mu, sigma)
    from_stats = scorer.compute(gen, ref_stats=tmp_path / "ref.npz")
    assert from_stats == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_fid_scorer_unavailable_without_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    scorer, reason = M.FidScorer.try_load()
    assert scorer is None and reason.startswith("unavailable") and "--inception-weights" in reason
    scorer, reason = M.FidScorer.try_load(tmp_path / "missing.pth")
    assert scorer is None and reason.startswith("unavailable")
    assert M.is_unavailable(M.fid(_renders(2, 1), _renders(2, 3)))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    scorer, reason = M.FidScorer.try_load(tmp_path / "junk.pth")
    assert scorer is None and reason.startswith("unavailable")

"""The fused CPU kernels must give exactly what the eager quantizer ops give."""

from __future__ import annotations

import pytest
import torch

import dgq.kernels as K
from dgq.quantizer import ActQuant, ProbQuant, apply_act, apply_prob, fake_quant_prepared

needs_kernels = pytest.mark.skipif(not K.available(), reason="no C compiler: the eager path is the only one")


@pytest.fixture
def eager(monkeypatch):
    """Run with the kernels switched off (what a machine without a compiler does)."""
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", True)


def _act_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for kind, mode, shape, n in [("linear", "channel", (2, 40, 24), 24), ("linear", "pixel", (2, 40, 24), 40),
                                 ("conv", "channel", (2, 12, 6, 5), 12), ("conv", "pixel", (2, 12, 6, 5), 30),
                                 ("linear2", "tensor", (2, 33), 1), ("cols", "pixel", (2, 27, 30), 30)]:
        for bits in (4, 6, 8):
            x = torch.randn(*shape, generator=g) * 4
            s = torch.rand(n, generator=g) * 0.2 + 0.01
            z = torch.randint(0, 2**bits, (n,), generator=g).float()
            if mode == "tensor":
                s, z = s[0], z[0]
            cases.append((kind, ActQuant(bits, mode, s, z), x))
    return cases


def _fresh(q: ActQuant) -> ActQuant:
    return ActQuant(q.bits, q.mode, q.scale, q.zero)


@needs_kernels
def test_fused_activation_quantizer_is_bit_identical_to_eager(monkeypatch):
    fused = []
    for kind, q, x in _act_cases():
        fq = _fresh(q)
        fused.append(fake_quant_prepared(x, fq, kind))
        assert all(plan[1] is not None for plan in fq._by_input.values()), (kind, q.mode)  # the kernel ran
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", True)
    for (kind, q, x), y in zip(_act_cases(), fused):
        ref = fake_quant_prepared(x, _fresh(q), kind)
        assert torch.equal(y, ref), (kind, q.mode, q.bits)


@needs_kernels
def test_fused_qkv_on_transposed_views_and_odd_layouts(monkeypatch):
    g = torch.Generator().manual_seed(1)
    b, n, h, d = 2, 20, 3, 8
    flat = torch.randn(b, n, h * d, generator=g) * 3
    view = flat.view(b, n, h, d).transpose(1, 2)  # how attention hands q/k/v over
    odd = torch.randn(b, d, h, n, generator=g).permute(0, 2, 3, 1)  # another layout: eager
    qs = [ActQuant(6, "channel", torch.rand(d, generator=g) + 0.05, torch.randint(0, 64, (d,), generator=g).float()),
          ActQuant(6, "pixel", torch.rand(n, generator=g) + 0.05, torch.randint(0, 64, (n,), generator=g).float())]
    got = []
    for q in qs:
        fq, fo = _fresh(q), _fresh(q)
        got.append((apply_act(view, fq, "q"), apply_act(odd, fo, "q")))
        assert next(iter(fq._by_input.values()))[1] is not None  # transposed view: kernel, no copy
        assert next(iter(fo._by_input.values()))[1] is None  # a layout it does not cover: eager
    assert got[0][0].shape == view.shape
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", True)
    for q, (a, o) in zip(qs, got):
        assert torch.equal(a, apply_act(view, _fresh(q), "q"))
        assert torch.equal(o, apply_act(odd, _fresh(q), "q"))


@needs_kernels
def test_fused_probability_quantizer_is_bit_identical_to_eager(monkeypatch):
    g = torch.Generator().manual_seed(2)
    maps = [torch.softmax(torch.randn(2, 2, 16, 77, generator=g) * t, -1) for t in (1.0, 4.0)]
    maps.append(torch.softmax(torch.randn(2, 2, 16, 16, generator=g) * 3, -1))
    qs = [ProbQuant(bits, True, start, dyn, scope, None if dyn else 0.07)
          for bits in (4, 6, 8) for start in (True, False) for dyn in (True, False) for scope in ("sample", "batch")]
    used = []

    def counting(real):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            used.append(out is not None)
            return out
        return call

    for name in ("log_quant_", "log_quant_dynamic_"):
        monkeypatch.setattr(K, name, counting(getattr(K, name)))
    fused = [apply_prob(p.clone(), q, inplace=True) for p in maps for q in qs]
    assert len(used) == len(fused) and all(used)  # every map went through a kernel
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", True)
    ref = [apply_prob(p.clone(), q, inplace=True) for p in maps for q in qs]
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)


def test_without_kernels_results_are_the_same_formula(eager):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 5, generator=g) * 3
    s, z = torch.rand(8, generator=g) * 0.1 + 0.01, torch.randint(0, 64, (8,), generator=g).float()
    out = apply_act(x, ActQuant(6, "channel", s, z), "conv")
    ref = (torch.clamp(torch.round(x * (1 / s).view(1, -1, 1, 1)) + z.view(1, -1, 1, 1), 0, 63) - z.view(1, -1, 1, 1)) * s.view(1, -1, 1, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert K.library() is None


def test_a_broken_compiler_falls_back_to_eager(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", False)
    monkeypatch.setenv("DGQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert K.library() is None
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
    x = torch.randn(2, 10, 4)
    q = ActQuant(8, "channel", torch.rand(4) + 0.1, torch.full((4,), 128.0))
    assert apply_act(x, q, "linear").shape == x.shape


def test_kernels_switch_off_with_the_environment(monkeypatch):
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", False)
    monkeypatch.setenv("DGQ_KERNELS", "0")
    assert K.library() is None


@needs_kernels
@pytest.mark.parametrize("openmp", [False, True])
def test_large_tensors_go_to_the_threaded_eager_ops_only_from_a_serial_build(monkeypatch, openmp):
    """A serial build leaves maps above SINGLE_THREAD_MAX to PyTorch's threaded ops when more
    than one thread is allowed; an OpenMP build splits them itself."""
    monkeypatch.setattr(K, "SINGLE_THREAD_MAX", 100)
    monkeypatch.setattr(K, "_parallel", openmp)
    monkeypatch.setattr(K, "_LAYOUTS", {})  # the kernels' layout decisions, cached per input
    assert K.parallel_build() is openmp
    x = torch.randn(2, 10, 8)  # 160 elements
    q = ActQuant(8, "channel", torch.rand(8) + 0.1, torch.full((8,), 128.0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = apply_act(x, q, "linear")
        assert (next(iter(q._by_input.values()))[1] is not None) is openmp
        torch.set_num_threads(1)
        q1 = ActQuant(8, "channel", q.scale, q.zero)
        assert torch.equal(apply_act(x, q1, "linear"), y)
        assert next(iter(q1._by_input.values()))[1] is not None
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_results_do_not_depend_on_the_thread_split(monkeypatch):
    """With OpenMP a map above PARALLEL_MIN is split over the intra-op threads: elementwise work
    and exact maxima, so one thread and two give the same bits (and so does the eager path)."""
    monkeypatch.setattr(K, "PARALLEL_MIN", 64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 24, generator=g) * 3
    q = ActQuant(6, "channel", torch.rand(24, generator=g) + 0.05, torch.randint(0, 64, (24,), generator=g).float())
    p = torch.softmax(torch.randn(3, 2, 16, 77, generator=g) * 3, -1)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fq = _fresh(q)
            y = apply_act(x, fq, "linear")
            assert next(iter(fq._by_input.values()))[2][-1] == n  # the plan's constants carry the split
            pq = apply_prob(p.clone(), ProbQuant(4, True, True, True, "sample", None), inplace=True)
            out.append((y, pq))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", True)
    assert torch.equal(out[0][0], apply_act(x, _fresh(q), "linear"))
    assert torch.equal(out[0][1], apply_prob(p.clone(), ProbQuant(4, True, True, True, "sample", None)))


@needs_kernels
def test_heads_kernel_keeps_start_token_and_tensor_mode_and_returns_head_major(monkeypatch):
    """q/k/v views come back contiguous in [B, heads, T, d] order, token 0 kept in FP when asked,
    and equal (values) to the eager path in every mode."""
    g = torch.Generator().manual_seed(7)
    b, n, h, d = 2, 12, 2, 8
    view = (torch.randn(b, n, h * d, generator=g) * 3).view(b, n, h, d).transpose(1, 2)
    qs = [ActQuant(4, "channel", torch.rand(d, generator=g) + 0.05, torch.randint(0, 16, (d,), generator=g).float(), True),
          ActQuant(4, "pixel", torch.rand(n, generator=g) + 0.05, torch.randint(0, 16, (n,), generator=g).float(), True),
          ActQuant(4, "tensor", torch.tensor(0.3), torch.tensor(7.0)),
          ActQuant(4, "tensor", torch.tensor(0.3), torch.tensor(7.0), True)]
    fresh = [ActQuant(q.bits, q.mode, q.scale, q.zero, q.start_fp) for q in qs]
    got = [apply_act(view, q, "k") for q in fresh]
    for q, y in zip(fresh, got):
        assert next(iter(q._by_input.values()))[1] is not None  # the kernel ran
        assert y.is_contiguous() and y.shape == view.shape
        if q.start_fp:
            assert torch.equal(y[:, :, 0], view[:, :, 0])
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_tried", True)
    for q, y in zip(qs, got):
        assert torch.equal(y, apply_act(view, ActQuant(q.bits, q.mode, q.scale, q.zero, q.start_fp), "k"))


@needs_kernels
def test_slot_buffers_are_reused_per_slot_and_never_under_autograd():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 4, 4, generator=g)
    q = ActQuant(6, "channel", torch.rand(6, generator=g) + 0.05, torch.randint(0, 64, (6,), generator=g).float())
    with torch.no_grad():
        a = apply_act(x, q, "conv", slot="layer-a")
        a_vals = a.clone()
        a2 = apply_act(x * 2, q, "conv", slot="layer-a")
        assert a2.data_ptr() == a.data_ptr()  # the slot's buffer, overwritten by its next call
        b = apply_act(x, q, "conv", slot="layer-b")
        assert b.data_ptr() != a.data_ptr() and torch.equal(b, a_vals)
        assert torch.equal(apply_act(x, q, "conv"), a_vals)  # no slot: a fresh tensor each call
    with torch.enable_grad():
        c1 = apply_act(x, q, "conv", slot="layer-a")
        c2 = apply_act(x, q, "conv", slot="layer-a")
        assert c1.data_ptr() != c2.data_ptr()  # a graph could keep the first one


def test_a_damaged_library_is_detected_and_rebuilt(monkeypatch, tmp_path, caplog):
    import logging

    if K._build(tmp_path) is None:
        pytest.skip("no C compiler")
    lib = next(tmp_path.glob("*.so"))
    good = lib.read_bytes()
    lib.write_bytes(good[: len(good) // 3])  # truncated, as by a full disk or a killed copy
    assert K._check_library(lib) is not None
    with caplog.at_level(logging.WARNING):
        path, _ = K._build(tmp_path)
    assert "damaged" in caplog.text and path == lib and lib.read_bytes() != good[: len(good) // 3]
    assert K._check_library(lib) is None
    K._digest_file(lib).write_text("0" * 64)  # a checksum that does not match: rebuilt too
    assert K._check_library(lib) is not None
    assert K._build(tmp_path)[0] == lib and K._check_library(lib) is None

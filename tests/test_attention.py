from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

import dgq.attention as A
from dgq.calibration import StatsCollector
from dgq.context import RunContext, use


def _attn(cross: bool) -> Attention:
    torch.manual_seed(0)
    a = Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=2, dim_head=16)
    a.set_processor(A.DGQAttnProcessor("blk.attn2" if cross else "blk.attn1", cross=cross))
    return a.eval()


def _run(a: Attention, x: torch.Tensor, ctx: torch.Tensor | None, explicit: bool) -> torch.Tensor:
    with torch.no_grad():
        if not explicit:
            return a(x, encoder_hidden_states=ctx)
        collector = StatsCollector()
        collector.set_timestep(999)
        with use(RunContext(collector=collector)):
            return a(x, encoder_hidden_states=ctx)


def test_explicit_softmax_path_equals_fused_attention():
    g = torch.Generator().manual_seed(1)
    for cross in (False, True):
        a = _attn(cross)
        x = torch.randn(2, 64, 32, generator=g)
        ctx = torch.randn(2, 77, 24, generator=g) if cross else None
        assert torch.allclose(_run(a, x, ctx, explicit=True), _run(a, x, ctx, explicit=False), atol=1e-5)


def test_reused_score_buffer_never_aliases_an_output(monkeypatch):
    """The CPU score buffer is reused across calls: earlier outputs must stay intact and equal
    what a freshly allocated buffer gives."""
    g = torch.Generator().manual_seed(2)
    a = _attn(cross=False)
    xs = [torch.randn(2, 64, 32, generator=g) for _ in range(3)]
    outs = [_run(a, x, None, explicit=True) for x in xs]
    kept = [o.clone() for o in outs]
    _run(a, torch.randn(2, 64, 32, generator=g), None, explicit=True)  # one more call reuses the buffer
    assert all(torch.equal(o, k) for o, k in zip(outs, kept))
    monkeypatch.setattr(A, "_WORKSPACE_MAX", 0)  # no buffer: allocate per call
    for x, k in zip(xs, kept):
        assert torch.equal(_run(a, x, None, explicit=True), k)


def test_score_buffers_are_per_thread_and_bounded():
    import threading

    seen = []

    def work():
        seen.append(A._scores_buffer(torch.Size((1, 2, 8, 8)), torch.zeros(1)))

    t1, t2 = threading.Thread(target=work), threading.Thread(target=work)
    t1.start()
    t1.join()
    t2.start()
    t2.join()
    assert seen[0] is not seen[1]
    for n in range(12):
        A._scores_buffer(torch.Size((1, 1, n + 1, 3)), torch.zeros(1))
    assert len(A._WS.bufs) <= 8
    assert A._scores_buffer(torch.Size((1, 1, 1 << 14, 1 << 13)), torch.zeros(1)) is None  # too large: allocate

"""benchmarks/bench_kernels.py runs on small maps and times both paths."""

from __future__ import annotations

import pytest

import dgq.kernels as K

from benchmarks import bench_kernels as mod


@pytest.mark.skipif(not K.available(), reason="no C compiler: there is no kernel to compare")
def test_kernel_benchmark_times_both_paths_and_restores_the_rule():
    real = K.usable
    rows = mod.main(["--repeats", "1", "--max-elements", "1100000"])
    assert {r["map"] for r in rows} == {"act", "probs"}
    assert all(r["eager_ms"] > 0 and r["kernel_ms"] > 0 for r in rows)
    assert K.usable is real

"""Optional fused CPU kernels for the two quantizers that run on every UNet call.

Simulated quantization in eager PyTorch is five elementwise ops per site (multiply by 1/s,
round, max, min, rescale), each a pass over the tensor plus a dispatch. On the embedded model's
small maps the dispatches and passes cost more than the arithmetic: ~172 activation sites and
14 probability maps per call. These kernels do each quantizer in one pass, split over PyTorch's
intra-op threads when built with OpenMP and the map is large enough to pay for waking them
(measured on the embedded model, 2 cores: DGQ's UNet step 2–4 % faster than one thread).

They are plain C (no PyTorch headers, so a compile takes about a second), built on first use
with the system C compiler into the cache folder (keyed by a hash of the source, the flags and
the CPU) and called through ctypes. They compute exactly what the eager code computes, in the
same float32 operations and order (no fast-math, no FMA contraction), so results are
bit-identical; the tests check it. With no compiler, a failed build, a GPU tensor or a layout
they do not cover, callers fall back to the eager path. `DGQ_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from dgq.paths import cache_dir
from dgq.primitives import EPS

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* One row of n elements, y = s * min(max(round(x * inv), lo), hi): with a parameter per
   element (row_each) or one for the whole row (row_one). Both kernels below are built from these
   two, so every layout does the same float32 operations in the same order. */
static inline void row_each(const float* restrict xr, float* restrict yr, int64_t n, const float* restrict s,
                            const float* restrict inv, const float* restrict lo, const float* restrict hi) {
    for (int64_t c = 0; c < n; ++c) {
        float v = nearbyintf(xr[c] * inv[c]);
        v = v < lo[c] ? lo[c] : v;
        v = v > hi[c] ? hi[c] : v;
        yr[c] = v * s[c];
    }
}

static inline void row_one(const float* restrict xr, float* restrict yr, int64_t n, float s, float inv,
                           float lo, float hi) {
    for (int64_t i = 0; i < n; ++i) {
        float v = nearbyintf(xr[i] * inv);
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        yr[i] = v * s;
    }
}

/* y = s[c] * min(max(round(x * inv[c]), lo[c]), hi[c]) for x viewed as [outer, C, inner],
   split over nt threads (OpenMP, when built with it): every element is independent, so the
   result does not depend on the split. */
void dgq_fake_quant(const float* restrict x, float* restrict y, int64_t outer, int64_t C, int64_t inner,
                    const float* restrict s, const float* restrict inv, const float* restrict lo,
                    const float* restrict hi, int nt) {
    if (inner == 1) {
        #pragma omp parallel for num_threads(nt) if(nt > 1) schedule(static)
        for (int64_t o = 0; o < outer; ++o) row_each(x + o * C, y + o * C, C, s, inv, lo, hi);
        return;
    }
    #pragma omp parallel for num_threads(nt) if(nt > 1) schedule(static)
    for (int64_t oc = 0; oc < outer * C; ++oc) {
        const int64_t c = oc % C;
        row_one(x + oc * inner, y + oc * inner, inner, s[c], inv[c], lo[c], hi[c]);
    }
}

/* Attention's q/k/v: x is the contiguous [B, N, H, D] output of to_q/to_k/to_v, read as the
   [B, H, N, D] view the heads are split into; y is written contiguous [B, H, N, D], so the
   matmuls that follow need no copy of their own. Parameters are indexed by d (mode 0), by the
   token n (mode 1) or single (mode 2); with keep_first, token 0 is copied unquantized (the
   <start> key kept in FP). */
void dgq_fake_quant_heads(const float* restrict x, float* restrict y, int64_t B, int64_t N, int64_t H, int64_t D,
                          int mode, const float* restrict s, const float* restrict inv, const float* restrict lo,
                          const float* restrict hi, int keep_first, int nt) {
    #pragma omp parallel for num_threads(nt) if(nt > 1) schedule(static)
    for (int64_t r = 0; r < B * H * N; ++r) {
        const int64_t n = r % N, bh = r / N, h = bh % H, b = bh / H;
        const float* xr = x + ((b * N + n) * H + h) * D;
        float* yr = y + r * D;
        if (keep_first && n == 0) {
            memcpy(yr, xr, (size_t)D * sizeof(float));
            continue;
        }
        if (mode == 0) {
            row_each(xr, yr, D, s, inv, lo, hi);
        } else {
            const int64_t i = mode == 1 ? n : 0;
            row_one(xr, yr, D, s[i], inv[i], lo[i], hi[i]);
        }
    }
}

/* The two activation kernels with their per-site constants packed in one int64 array, built
   once per plan: a call from Python then converts three arguments instead of ten or thirteen
   (ctypes' conversions cost more than the pass itself on the smallest maps). */
void dgq_fake_quant_packed(const float* restrict x, float* restrict y, const int64_t* a) {
    dgq_fake_quant(x, y, a[0], a[1], a[2], (const float*)(intptr_t)a[3], (const float*)(intptr_t)a[4],
                   (const float*)(intptr_t)a[5], (const float*)(intptr_t)a[6], (int)a[7]);
}

void dgq_fake_quant_heads_packed(const float* restrict x, float* restrict y, const int64_t* a) {
    dgq_fake_quant_heads(x, y, a[0], a[1], a[2], a[3], (int)a[4], (const float*)(intptr_t)a[5],
                         (const float*)(intptr_t)a[6], (const float*)(intptr_t)a[7], (const float*)(intptr_t)a[8],
                         (int)a[9], (int)a[10]);
}

/* In place, p viewed as [B, rows, cols]: q = 2^floor(log2(p * mul[b])) via the exponent bits,
   optionally clamped to 1, zeroed at or below thr, times scale[b]; column 0 untouched when
   skip_first (the <start> key kept in FP). mul[b] = sqrt(2) / scale[b], computed by the caller. */
void dgq_log_quant(float* restrict p, int64_t B, int64_t rows, int64_t cols, const float* restrict mul,
                   const float* restrict scale, int64_t n_scale, float thr, int clamp, int skip_first, int nt) {
    const int64_t c0 = skip_first ? 1 : 0;
    #pragma omp parallel for num_threads(nt) if(nt > 1) schedule(static)
    for (int64_t br = 0; br < B * rows; ++br) {
        const int64_t b = br / rows;
        const float m = mul[n_scale == 1 ? 0 : b], s = scale[n_scale == 1 ? 0 : b];
        float* row = p + br * cols;
        for (int64_t c = c0; c < cols; ++c) {
            float z = row[c] * m;
            uint32_t u;
            memcpy(&u, &z, 4);
            u &= 0x7F800000u;
            memcpy(&z, &u, 4);
            if (clamp) z = z > 1.0f ? 1.0f : z;
            z = z <= thr ? 0.0f : z;
            row[c] = z * s;
        }
    }
}

/* The dynamic variant: scale = max(EPS, max of the quantized part) per sample (per_sample) or
   over the whole batch, mul = (1 / scale) * sqrt2 (the eager code's reciprocal-then-multiply),
   then dgq_log_quant. Writes the scales it used to scale_out[B]. */
void dgq_log_quant_dynamic(float* restrict p, int64_t B, int64_t rows, int64_t cols, int per_sample,
                           float eps, float sqrt2, float thr, int skip_first, float* restrict scale_out,
                           float* restrict mul_out, int nt) {
    const int64_t c0 = skip_first ? 1 : 0;
    float all = -INFINITY;
    #pragma omp parallel for num_threads(nt) if(nt > 1 && B > 1) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        /* eight running maxima (one SIMD register; max is order-free for the non-NaN values a
           softmax gives, so the result is the sequential one), folded at the end */
        float acc[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        float top = -INFINITY;
        for (int64_t r = 0; r < rows; ++r) {
            const float* row = p + (b * rows + r) * cols;
            int64_t c = c0;
            for (; c + 8 <= cols; c += 8)
                for (int j = 0; j < 8; ++j) acc[j] = row[c + j] > acc[j] ? row[c + j] : acc[j];
            for (; c < cols; ++c) top = row[c] > top ? row[c] : top;
        }
        for (int j = 0; j < 8; ++j) top = acc[j] > top ? acc[j] : top;
        scale_out[b] = top;
    }
    for (int64_t b = 0; b < B; ++b) all = scale_out[b] > all ? scale_out[b] : all;
    for (int64_t b = 0; b < B; ++b) {
        float s = per_sample ? scale_out[b] : all;
        s = s < eps ? eps : s;
        scale_out[b] = s;
        mul_out[b] = (1.0f / s) * sqrt2;
    }
    dgq_log_quant(p, B, rows, cols, mul_out, scale_out, B, thr, 0, skip_first, nt);
}
"""

_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c99"]
# With OpenMP a kernel splits a large map over PyTorch's intra-op threads (the same libgomp: the
# loader reuses the one torch brought). A compiler without it builds the serial kernels.
_OPENMP = ["-fopenmp"]
# Maps smaller than this run on one thread: waking the pool costs more than it saves.
PARALLEL_MIN = 1 << 10
# Above this many elements a serial build gives way to PyTorch's multi-threaded eager ops when
# more than one thread is allowed (SD-scale maps on a many-core machine); an OpenMP build splits
# such maps over the same threads itself (`benchmarks/bench_kernels.py` compares the two).
SINGLE_THREAD_MAX = 1 << 20
_lib: ctypes.CDLL | None = None
_parallel = False  # whether the loaded build uses OpenMP
_tried = False
_lock = threading.Lock()


def _cpu_tag() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
    except OSError:
        flags = model = ""
    return f"{platform.machine()}|{model}|{flags}"


def _build(folder: Path) -> tuple[Path, bool] | None:
    """Compile (OpenMP first, then serial) into `folder`, or reuse an earlier build: (library,
    built with OpenMP)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    err = ""
    for extra in (_OPENMP, []):
        flags = [*_FLAGS, *extra]
        key = hashlib.sha256("\n".join([_SOURCE, " ".join(flags), _cpu_tag()]).encode()).hexdigest()[:16]
        lib = folder / f"dgq_kernels_{key}.so"
        if lib.exists():
            problem = _check_library(lib)
            if problem is None:
                return lib, bool(extra)
            log.warning("compiled kernels %s are damaged (%s); rebuilding", lib.name, problem)
            for f in (lib, _digest_file(lib)):
                f.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            res = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                digest = _digest_file(lib)
                digest.with_name(digest.name + ".tmp").write_text(_sha256_of(out))
                os.replace(digest.with_name(digest.name + ".tmp"), digest)
                os.replace(out, lib)  # atomic: a concurrent builder either sees the whole file or none
                return lib, bool(extra)
            err = res.stderr.strip()[:500]
    log.warning("fused CPU kernels not built (%s): %s", cc, err)
    return None


_SYMBOLS = ("dgq_fake_quant_packed", "dgq_fake_quant_heads_packed", "dgq_log_quant", "dgq_log_quant_dynamic")


def _digest_file(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_library(lib: Path) -> str | None:
    """Why a built library must not be used (None = fine): its recorded checksum (a truncated or
    overwritten file), then a load test in a child process with every entry point looked up, so a
    damaged file can never crash this one."""
    digest = _digest_file(lib)
    try:
        if not digest.exists() or digest.read_text().strip() != _sha256_of(lib):
            return "checksum missing or different"
    except OSError as e:
        return str(e)
    probe = ("import ctypes,sys\nlib=ctypes.CDLL(sys.argv[1])\n"
             + "".join(f"lib.{name}\n" for name in _SYMBOLS))
    try:
        res = subprocess.run([sys.executable, "-c", probe, str(lib)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"load test failed: {e}"
    return None if res.returncode == 0 else f"load test failed: {res.stderr.strip().splitlines()[-1:]}"


def threads_for(numel: int) -> int:
    """How many threads a kernel call on `numel` elements uses: PyTorch's intra-op count for
    large maps, one for small ones (serial builds ignore it)."""
    return torch.get_num_threads() if numel >= PARALLEL_MIN else 1


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, build failed, or DGQ_KERNELS=0)."""
    global _lib, _tried, _parallel
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("DGQ_KERNELS", "1") != "0":
            try:
                built = _build(cache_dir() / "kernels")
                if built is not None:
                    path, parallel = built
                    lib = ctypes.CDLL(str(path))
                    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
                    ci = ctypes.c_int
                    for name in ("dgq_fake_quant_packed", "dgq_fake_quant_heads_packed"):
                        getattr(lib, name).argtypes = [p, p, p]
                        getattr(lib, name).restype = None
                    lib.dgq_log_quant.argtypes = [p, i64, i64, i64, p, p, i64, f32, ci, ci, ci]
                    lib.dgq_log_quant.restype = None
                    lib.dgq_log_quant_dynamic.argtypes = [p, i64, i64, i64, ci, f32, f32, f32, ci, p, p, ci]
                    lib.dgq_log_quant_dynamic.restype = None
                    _lib, _parallel = lib, parallel
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("fused CPU kernels unavailable: %s", e)
                _lib = None
        _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def parallel_build() -> bool:
    """Whether the loaded kernels were built with OpenMP (False when none are loaded)."""
    return library() is not None and _parallel


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels take this tensor: CPU fp32 with no autograd, and an OpenMP build,
    a map small enough, or only one thread allowed."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad
            and (t.numel() <= SINGLE_THREAD_MAX or torch.get_num_threads() == 1 or parallel_build()))


def log_quant_dynamic_(p: torch.Tensor, bits: int, per_sample: bool, skip_first: bool) -> torch.Tensor | None:
    """In-place log2 quantize-dequantize of a contiguous fp32 CPU probability map [B, …, cols]
    with the dynamic scale (max of the quantized part, per sample or over the batch) found in
    the same call; None when the kernels cannot take it."""
    lib = library()
    if lib is None or not usable(p) or not p.is_contiguous() or p.dim() < 2:
        return None
    b, cols = p.shape[0], p.shape[-1]
    work = torch.empty(2, b)
    lib.dgq_log_quant_dynamic(p.data_ptr(), b, p[0].numel() // cols, cols, int(per_sample), EPS, math.sqrt(2.0),
                              0.75 * 2.0 ** -(2**bits - 2), int(skip_first), work[0].data_ptr(), work[1].data_ptr(),
                              threads_for(p.numel()))
    return p


def log_quant_(p: torch.Tensor, scale: torch.Tensor, bits: int, clamp: bool, skip_first: bool) -> torch.Tensor | None:
    """In-place log2 quantize-dequantize of a contiguous fp32 CPU probability map [B, …, cols]
    with a per-sample ([B]) or single scale; None when the kernels cannot take it."""
    lib = library()
    if lib is None or not usable(p) or not p.is_contiguous() or p.dim() < 2:
        return None
    scale = scale.detach().float().reshape(-1).clamp_min(EPS).contiguous()
    if scale.numel() not in (1, p.shape[0]) or scale.device.type != "cpu":
        return None
    mul = (math.sqrt(2.0) / scale).contiguous()  # the same fp32 division as the eager quantizer
    smallest = 2.0 ** -(2**bits - 2)
    cols = p.shape[-1]
    lib.dgq_log_quant(p.data_ptr(), p.shape[0], p[0].numel() // cols, cols, mul.data_ptr(), scale.data_ptr(),
                      scale.numel(), 0.75 * smallest, int(clamp), int(skip_first), threads_for(p.numel()))
    return p


# ----------------------------------------------------------------------------- dispatch
_OUT = threading.local()
# Reusable output buffers per thread, in all (fp32 elements): the embedded model needs ~3 M.
_OUT_MAX = 1 << 23


def out_buffer(slot: object, shape: torch.Size) -> torch.Tensor:
    """A per-(thread, slot, shape) fp32 buffer for a quantizer's output, or a fresh tensor.

    On CPU a fresh output of a few hundred kB is a fresh mapping from the allocator, and its page
    faults cost as much as the quantizer's pass that fills it. A slot's buffer is overwritten by
    the slot's next call, so only callers that consume the result before then pass a slot (a
    layer quantizing its own input, attention's q/k/v), and only without autograd (a graph
    would keep the buffer for the backward pass). Past `_OUT_MAX` elements per thread the
    buffers are dropped and collected again (a model switch leaves its old slots behind)."""
    if torch.is_grad_enabled():
        return torch.empty(shape, dtype=torch.float32)
    bufs = getattr(_OUT, "bufs", None)
    if bufs is None:
        bufs = _OUT.bufs = {}
        _OUT.size = 0
    key = (slot, shape)
    buf = bufs.get(key)
    if buf is None:
        buf = torch.empty(shape, dtype=torch.float32)
        if _OUT.size + buf.numel() > _OUT_MAX:
            bufs.clear()
            _OUT.size = 0
        bufs[key] = buf
        _OUT.size += buf.numel()
    return buf


_LAYOUTS: dict[tuple, tuple | None] = {}  # (input key, mode) → (heads, layout) or None
_HEAD_MODES = {"channel": 0, "pixel": 1, "tensor": 2}


def plan(x: torch.Tensor, params: tuple[torch.Tensor, ...], shp: tuple[int, ...], mode: str, kind: str,
         key: tuple, keep_first: bool = False) -> tuple[tuple | None, object]:
    """How the fused kernels quantize inputs like x with `params` (s, 1/s, lo, hi shaped `shp`):
    ((packed kernel, address of the constants, whether it is the heads kernel), the constants) or
    (None, None) for the eager ops. The layout part is shared by every site (`key` holds the
    input's shape, strides, dtype and thread count, on which `usable` depends)."""
    lkey = (key, mode)
    lay = _LAYOUTS.get(lkey, False)
    if lay is False:
        lay = _LAYOUTS[lkey] = _kernel_layout(x, shp, mode, kind) if usable(x) else None
    if lay is None or (lib := library()) is None:
        return None, None
    heads, layout = lay
    n = {0: layout[3], 1: layout[1], 2: 1}[layout[4]] if heads else layout[1]
    for p in params:
        if p.numel() != n or not p.is_contiguous() or p.dtype != torch.float32:
            return None, None
    ptrs = [p.data_ptr() for p in params]
    nt = threads_for(x.numel())
    if heads:
        call, values = lib.dgq_fake_quant_heads_packed, [*layout, *ptrs, int(keep_first), nt]
    else:
        call, values = lib.dgq_fake_quant_packed, [*layout, *ptrs, nt]
    args = (ctypes.c_int64 * len(values))(*values)
    return (call, ctypes.addressof(args), heads), args


def _kernel_layout(x: torch.Tensor, shp: tuple[int, ...], mode: str, kind: str) -> tuple | None:
    """How the fused CPU kernels take inputs of x's shape and strides: (False, (outer, indices,
    inner)) for a contiguous x, (True, (B, T, heads, d, mode code)) for attention's [B, heads, T,
    d] view of a contiguous [B, T, heads, d] tensor (quantized into a contiguous [B, heads, T, d]
    result), or None (a layout they do not cover: eager ops)."""
    if not x.is_contiguous():
        if kind not in ("q", "k", "v") or x.dim() != 4 or not x.transpose(1, 2).is_contiguous():
            return None
        b, h, t, d = x.shape
        return True, (b, t, h, d, _HEAD_MODES[mode])
    if not shp:
        return False, (1, 1, x.numel())
    if len(shp) != x.dim():
        return None
    idx = [i for i, v in enumerate(shp) if v != 1]
    first, last = idx[0], idx[-1]
    return False, (math.prod(x.shape[:first]), math.prod(x.shape[first:last + 1]), math.prod(x.shape[last + 1:]))

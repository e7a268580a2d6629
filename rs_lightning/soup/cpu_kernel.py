"""Optional fused CPU kernel for the soup's linear core: out[i] = round(sum_k w_k * x_k[i]) in one pass.

Why it exists (measured with `scripts/merge_table.py`, 2-core Xeon, 2 torch threads, P = 128M, K = 3): the
chunked torch loop costs K + 2 ops per chunk, each an OpenMP region with a barrier; bf16 sources are
converted by each mixed-dtype `add_`; and on a shared machine every barrier waits for a descheduled thread.
It ran at 30-70 % of `copy_` (6-20 % when the 2 cores were busy with other jobs). A fused loop reads each
source once, keeps the sum in registers (bf16/fp16 converted in registers) and writes the output once.

- Written in C++ without torch headers, compiled once per machine with the system compiler (about 0.7 s)
  and cached as a shared library keyed by the source, the compiler and the CPU flags; loaded with ctypes.
  `torch.compile` of the same function gave the same throughput but cost 26 s on a cold process (1.5 s
  per further (dtype, K)), which a single merge of a 100M-parameter model cannot amortise.
- One loop per K = 1..8 with the sum in registers; larger K go through a 1024-element accumulator in L1.
- Accumulation is fp32 for fp32/bf16/fp16 (fp64 for fp64), products and partial sums in a fixed order
  (bit-identical across runs and thread counts), rounded once to the output dtype: round-to-nearest-even,
  NaN -> 0x7FC0 for bf16 (as torch), the hardware conversion for fp16. No fast-math, no flush-to-zero.
- `out` may be one of the sources (same pointer): every element is read from all sources before it is
  written. Partial overlaps are refused (`supported` returns False) and go through the torch loop.
- Threads: `torch.get_num_threads()` Python threads, each calling the kernel on a contiguous stripe
  (ctypes releases the GIL), so the work is split once per call, not once per chunk.
- On by default since it wins every CPU row of `benchmarks/bench_merge.py`; `RS_SOUP_NATIVE=0` turns it off.
  Unavailable (turned off, no compiler, a compile error, another OS): `load()` returns None and the chunked
  torch loop is used; the soup changes only in its last bit (both are exact to one rounding; for two experts
  the loop calls `torch.lerp`, a + w (b - a), where the kernel computes w_1 a + w_2 b).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError

log = logging.getLogger(__name__)

SOURCE = r"""
#include <cstdint>
#include <cstring>
namespace {
struct F32 { using T = float; using A = float;
  static inline A load(T x) { return x; } static inline T store(A a) { return a; } };
struct F64 { using T = double; using A = double;
  static inline A load(T x) { return x; } static inline T store(A a) { return a; } };
struct BF16 { using T = uint16_t; using A = float;
  static inline A load(T h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  static inline T store(A f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    uint16_t r = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? uint16_t(0x7FC0) : r; } };
#ifndef RS_NO_F16
struct F16 { using T = _Float16; using A = float;
  static inline A load(T h) { return float(h); } static inline T store(A f) { return T(f); } };
#endif
template <class D, int K>
void fixed(typename D::T *out, const typename D::T *const *xs, const typename D::A *w, int64_t a, int64_t b) {
  const typename D::T *x[K]; typename D::A v[K];
  for (int k = 0; k < K; k++) { x[k] = xs[k]; v[k] = w[k]; }
  // out may be x[k] itself (same index): no dependence across iterations, so vectorising is safe.
#pragma GCC ivdep
  for (int64_t i = a; i < b; i++) {
    typename D::A s = D::load(x[0][i]) * v[0];
    for (int k = 1; k < K; k++) s += D::load(x[k][i]) * v[k];
    out[i] = D::store(s);
  }
}
template <class D>
void run(typename D::T *out, const typename D::T *const *xs, const typename D::A *w, int k, int64_t a, int64_t b) {
  switch (k) {
    case 1: return fixed<D, 1>(out, xs, w, a, b);
    case 2: return fixed<D, 2>(out, xs, w, a, b);
    case 3: return fixed<D, 3>(out, xs, w, a, b);
    case 4: return fixed<D, 4>(out, xs, w, a, b);
    case 5: return fixed<D, 5>(out, xs, w, a, b);
    case 6: return fixed<D, 6>(out, xs, w, a, b);
    case 7: return fixed<D, 7>(out, xs, w, a, b);
    case 8: return fixed<D, 8>(out, xs, w, a, b);
  }
  constexpr int B = 1024;
  typename D::A acc[B];
  for (int64_t s = a; s < b; s += B) {
    int64_t m = b - s < B ? b - s : B;
    for (int64_t i = 0; i < m; i++) acc[i] = D::load(xs[0][s + i]) * w[0];
    for (int j = 1; j < k; j++)
      for (int64_t i = 0; i < m; i++) acc[i] += D::load(xs[j][s + i]) * w[j];
    for (int64_t i = 0; i < m; i++) out[s + i] = D::store(acc[i]);
  }
}
// 1 if any element of x[a:b] is NaN or +-inf (exponent bits all ones), else 0: an exact, read-only check.
template <class U>
int any_nonfinite(const U *x, U mask, int64_t a, int64_t b) {
  U bad = 0;
  for (int64_t i = a; i < b; i++) bad |= U((x[i] & mask) == mask);
  return bad != 0;
}
}  // namespace
extern "C" {
int rs_nonfinite_16(const uint16_t *x, int64_t mask, int64_t a, int64_t b) {
  return any_nonfinite<uint16_t>(x, uint16_t(mask), a, b); }
int rs_nonfinite_32(const uint32_t *x, int64_t mask, int64_t a, int64_t b) {
  return any_nonfinite<uint32_t>(x, uint32_t(mask), a, b); }
int rs_nonfinite_64(const uint64_t *x, int64_t mask, int64_t a, int64_t b) {
  return any_nonfinite<uint64_t>(x, uint64_t(mask), a, b); }
void rs_wsum_f32(float *o, const float *const *x, const float *w, int k, int64_t a, int64_t b) {
  run<F32>(o, x, w, k, a, b); }
void rs_wsum_f64(double *o, const double *const *x, const double *w, int k, int64_t a, int64_t b) {
  run<F64>(o, x, w, k, a, b); }
void rs_wsum_bf16(uint16_t *o, const uint16_t *const *x, const float *w, int k, int64_t a, int64_t b) {
  run<BF16>(o, x, w, k, a, b); }
#ifndef RS_NO_F16
void rs_wsum_f16(_Float16 *o, const _Float16 *const *x, const float *w, int k, int64_t a, int64_t b) {
  run<F16>(o, x, w, k, a, b); }
#endif
}
"""

_SYMBOLS = {
    torch.float32: ("rs_wsum_f32", ctypes.c_float),
    torch.float64: ("rs_wsum_f64", ctypes.c_double),
    torch.bfloat16: ("rs_wsum_bf16", ctypes.c_float),
    torch.float16: ("rs_wsum_f16", ctypes.c_float),
}
# Stripe boundaries are multiples of this many elements (a cache line or more for every dtype).
ALIGN = 64

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("RS_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rs_lightning"
    )
    return Path(root) / "kernels"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "soup_kernel.cpp"
        src.write_text(SOURCE)
        lib = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(src), "-o", str(lib)], check=True, capture_output=True, timeout=120)
        os.replace(lib, target)  # atomic: a concurrent process sees the old file or the whole new one


def _build() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return None
    # -ffp-contract=off: no fused multiply-add, so every product and partial sum is rounded as the torch loop's
    # mul_/add_ round them, whatever FMA units the CPU has (GCC contracts by default in GNU mode).
    base = ["-O3", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-ffp-contract=off"]
    # -march=native for the AVX-512/AVX2 conversions; the cache key holds the CPU flags, so a cache shared
    # by machines of different CPUs never loads a library built for another instruction set.
    for flags in (base + ["-march=native"], base + ["-march=native", "-DRS_NO_F16"], base, base + ["-DRS_NO_F16"]):
        key = hashlib.sha256("\0".join([SOURCE, compiler, *flags, _cpu_flags(), torch.__version__]).encode())
        target = _cache_dir() / f"soup_kernel_{key.hexdigest()[:20]}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("soup CPU kernel: %s %s failed: %s", compiler, " ".join(flags), err)
            continue
        for name, _ in _SYMBOLS.values():
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                               ctypes.c_int64]
        for name in ("rs_nonfinite_16", "rs_nonfinite_32", "rs_nonfinite_64"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        return lib
    return None


def enabled() -> bool:
    """The fused kernel is on unless `RS_SOUP_NATIVE=0` (the switch exists to compare with the torch loop and
    to reproduce soups made with it bit for bit)."""
    value = os.environ.get("RS_SOUP_NATIVE", "1")
    if value not in ("0", "1"):
        raise SoupError(f"environment variable RS_SOUP_NATIVE must be 0 or 1, got {value!r}")
    return value == "1"


def load() -> ctypes.CDLL | None:
    """The compiled kernel library when enabled (not `RS_SOUP_NATIVE=0`) and buildable here, else None."""
    return build_library() if enabled() else None


def build_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be built here (built at most once per process)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _build()
                except Exception as err:  # never let the accelerator break a merge
                    log.debug("soup CPU kernel unavailable: %s", err)
                    _state["lib"] = None
    return _state["lib"]


def _pool(workers: int) -> ThreadPoolExecutor:
    # Recreated after a fork (a forked child inherits the pool object but not its threads).
    key = (os.getpid(), workers)
    if _state.get("pool_key") != key:
        _state["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="rs-soup")
        _state["pool_key"] = key
    return _state["pool"]


def _span(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def supported(out: Tensor, xs: list[Tensor]) -> bool:
    """True if the kernel can compute this sum: CPU, contiguous, same dtype, no partial overlap with out."""
    lib = load()
    if lib is None or out.device.type != "cpu" or out.dtype not in _SYMBOLS or not out.is_contiguous():
        return False
    if getattr(lib, _SYMBOLS[out.dtype][0], None) is None:
        return False
    lo, hi = _span(out)
    for x in xs:
        if x.device.type != "cpu" or x.dtype != out.dtype or not x.is_contiguous() or x.numel() != out.numel():
            return False
        a, b = _span(x)
        if a != lo and a < hi and lo < b:
            return False
    return True


def weighted_sum(jobs: list[tuple[Tensor, list[Tensor]]], weights: list[float]) -> None:
    """For each (out, xs) in jobs (all `supported`): out <- sum_k weights[k] * xs[k], rounded once."""
    lib = load()
    assert lib is not None
    k = len(weights)
    tasks = []
    for out, xs in jobs:
        name, ctype = _SYMBOLS[out.dtype]
        ptrs = (ctypes.c_void_p * k)(*[x.data_ptr() for x in xs])
        w = (ctype * k)(*weights)
        tasks.append((getattr(lib, name), (out.data_ptr(), ptrs, w, k), out.numel()))
    _parallel(tasks)


# Exponent masks of the floating dtypes, as the unsigned integer of the same width.
_NONFINITE = {
    torch.bfloat16: ("rs_nonfinite_16", 0x7F80),
    torch.float16: ("rs_nonfinite_16", 0x7C00),
    torch.float32: ("rs_nonfinite_32", 0x7F800000),
    torch.float64: ("rs_nonfinite_64", 0x7FF0000000000000),
}


def can_check(t: Tensor) -> bool:
    """True if `any_nonfinite` can check `t`: a contiguous CPU tensor of a soupable float dtype."""
    return t.device.type == "cpu" and t.dtype in _NONFINITE and t.is_contiguous() and load() is not None


def any_nonfinite(tensors: list[Tensor]) -> list[bool]:
    """For each tensor (all `can_check`): True if it holds a NaN or an inf. One read, no temporary."""
    lib = load()
    assert lib is not None
    tasks = []
    for t in tensors:
        name, mask = _NONFINITE[t.dtype]
        tasks.append((getattr(lib, name), (t.data_ptr(), mask), t.numel()))
    return [bool(r) for r in _parallel(tasks)]


def _parallel(tasks: list[tuple]) -> list[int]:
    """Run fn(*args, a, b) over [0, n) for each (fn, args, n), split into one contiguous stripe per thread.

    Returns, per task, the OR of what its calls returned. Threads: torch.get_num_threads(), fewer for small
    work (a stripe gets at least 2^16 elements); ctypes releases the GIL during each call.
    """
    results = [0] * len(tasks)
    total = sum(t[2] for t in tasks)
    threads = max(1, min(torch.get_num_threads(), total >> 16))
    per = -(-total // threads // ALIGN) * ALIGN
    stripes: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    t, room = 0, per
    for i, (_, _, n) in enumerate(tasks):
        s = 0
        while s < n:
            take = min(n - s, room)
            stripes[t].append((i, s, s + take))
            s += take
            room -= take
            if room == 0 and t < threads - 1:
                t, room = t + 1, per

    def work(stripe: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        return [(i, tasks[i][0](*tasks[i][1], a, b)) for i, a, b in stripe]

    if threads == 1:
        done = [work(stripes[0])]
    else:
        futures = [_pool(threads - 1).submit(work, s) for s in stripes[1:]]
        done = [work(stripes[0])] + [f.result() for f in futures]
    for part in done:
        for i, r in part:
            results[i] |= r or 0
    return results

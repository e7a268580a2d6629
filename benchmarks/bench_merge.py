"""Merge throughput: our torch and Triton paths against what users would otherwise write, and `copy_`.

For P parameters in K sources of dtype b bytes a weighted sum moves (K+1)·P·b bytes; GB/s is that over
the time. `copy_` of the same P parameters (2·P·b bytes) is the bandwidth reference measured in the same
run. Every result carries GB/s and the ratio to copy's GB/s in `extra_info`.

    (a) naive   {k: sum(w_i * sd_i[k])}                     model-soups style
    (b) stack   (torch.stack([sd_i[k]]) * w[:, None]).sum(0)  mergekit style (per tensor)
    (c) torch   rs_lightning.soup.interpolate(impl="torch") with the fused CPU kernel off (RS_SOUP_NATIVE=0):
        the chunked torch loop, the fallback where no C++ compiler is found
    (c') native rs_lightning.soup.interpolate, in place, as it runs by default on CPU (the fused kernel);
        native_nocheck: the same without the NaN/inf pre-check pass (allow_nonfinite=True), the merge core alone
    (d) triton  rs_lightning.soup.interpolate(impl="triton"), CUDA only
    (e) copy    out[k].copy_(sd_0[k])

Run: `make bench` (or `pytest benchmarks/bench_merge.py --benchmark-json=out.json`); sizes with
RS_BENCH_SIZES="16M,128M" (the GPU check uses "1G"); RS_BENCH_DTYPES, RS_BENCH_K likewise.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from rs_lightning.soup import cpu_kernel, interpolate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Realistic layout: a model is many tensors; 32 equal tensors plus a tail of small ones per source.
N_BIG = 32


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 10**9}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


SIZES = [_parse_size(s) for s in os.environ.get("RS_BENCH_SIZES", "16M,128M").split(",")]
DTYPE_NAMES = os.environ.get("RS_BENCH_DTYPES", "fp32,bf16").split(",")
KS = [int(k) for k in os.environ.get("RS_BENCH_K", "2,3,4").split(",")]
METHODS = ["naive", "stack", "torch", "native", "native_nocheck", "triton", "copy"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_CACHE: dict = {}


def make_sources(p: int, k: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """K state dicts of p parameters in total (cached across tests of the same shape)."""
    key = (p, dtype)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        _sync()
        _CACHE["key"] = key
        _CACHE["sources"] = []
    sources = _CACHE["sources"]
    big = p // N_BIG
    while len(sources) < k:
        g = torch.Generator(device=DEVICE).manual_seed(len(sources))
        sd = {f"layer{i}.weight": torch.randn(big, generator=g, device=DEVICE).to(dtype) for i in range(N_BIG)}
        tail = p - big * N_BIG
        if tail:
            sd["tail"] = torch.randn(tail, generator=g, device=DEVICE).to(dtype)
        sources.append(sd)
    return sources[:k]


def weights_for(k: int) -> list[float]:
    w = [1.0 / k] * k
    w[-1] = 1.0 - sum(w[:-1])
    return w


def run_method(method: str, sources, out, weights):
    if method == "naive":
        return {key: sum(w * sd[key] for w, sd in zip(weights, sources)) for key in sources[0]}
    if method == "stack":
        w = torch.tensor(weights, device=DEVICE)
        return {
            key: (torch.stack([sd[key] for sd in sources]) * w.to(sources[0][key].dtype)[:, None]).sum(0)
            for key in sources[0]
        }
    if method == "triton":
        return interpolate(sources, weights, out=out, impl=method)
    if method in ("torch", "native", "native_nocheck"):
        # "torch": the chunked loop (the fused CPU kernel off); "native": the default CPU path, the fused kernel;
        # "nocheck" skips interpolate's NaN/inf pre-check pass (allow_nonfinite), i.e. the merge core alone:
        # the check reads every source once more before writing.
        previous = os.environ.get("RS_SOUP_NATIVE")
        os.environ["RS_SOUP_NATIVE"] = "0" if method == "torch" else "1"
        try:
            return interpolate(sources, weights, out=out, impl="torch", allow_nonfinite=method == "native_nocheck")
        finally:
            if previous is None:
                del os.environ["RS_SOUP_NATIVE"]
            else:
                os.environ["RS_SOUP_NATIVE"] = previous
    if method == "copy":
        for key, value in out.items():
            value.copy_(sources[0][key])
        return out
    raise ValueError(method)


def time_once(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def best_time(method: str, sources, out, weights, repeats: int) -> float:
    """Best wall time of `repeats` runs of `method`, after one warm-up run."""
    run_method(method, sources, out, weights)
    return min(time_once(lambda: run_method(method, sources, out, weights)) for _ in range(repeats))


_COPY_GBS: dict = {}


def copy_gbs(p: int, dtype: torch.dtype) -> float:
    """Measured copy_ bandwidth for this size and dtype (best of 5), the reference for every ratio."""
    if (p, dtype) not in _COPY_GBS:
        sources = make_sources(p, 1, dtype)
        out = {key: torch.empty_like(v) for key, v in sources[0].items()}
        run_method("copy", sources, out, [1.0])
        best = min(time_once(lambda: run_method("copy", sources, out, [1.0])) for _ in range(5))
        _COPY_GBS[(p, dtype)] = 2 * p * dtype.itemsize / best / 1e9
    return _COPY_GBS[(p, dtype)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("p", SIZES, ids=lambda p: f"P{p / 2**20:.0f}M" if p < 10**9 else f"P{p / 1e9:.0f}G")
def test_merge_throughput(benchmark, machine, p, dtype_name, k, method):
    if method == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton path is benchmarked on CUDA only (the CPU interpreter is for tests)")
    if method.startswith("native") and (DEVICE != "cpu" or cpu_kernel.build_library() is None):
        pytest.skip("the fused kernel is a CPU path and needs a C++ compiler")
    if method == "copy" and k != KS[0]:
        pytest.skip("copy does not depend on K: measured once per size and dtype")
    dtype = DTYPES[dtype_name]
    sources = make_sources(p, k, dtype)
    out = {key: torch.empty_like(v) for key, v in sources[0].items()}
    weights = weights_for(k)
    ref = copy_gbs(p, dtype)
    rounds = 3 if p >= 2**27 else 5
    benchmark.pedantic(run_method, args=(method, sources, out, weights), rounds=rounds, warmup_rounds=1)
    _sync()
    seconds = benchmark.stats.stats.min
    moved = (2 if method == "copy" else k + 1) * p * dtype.itemsize
    gbs = moved / seconds / 1e9
    benchmark.extra_info.update(
        machine=machine, device=DEVICE, P=p, K=k, dtype=dtype_name, method=method,
        gb_per_s=round(gbs, 2), copy_gb_per_s=round(ref, 2), ratio_to_copy=round(gbs / ref, 3),
    )


LORA_SHAPES = [(16, 4096), (4096, 16)] * 128  # 256 tensors, 16.8M parameters: LLaMA-7B r=16 on q,k,v,o


@pytest.mark.parametrize("method", ["naive", "torch", "triton"])
@pytest.mark.parametrize("k", [2, 3])
def test_lora_shaped_merge(benchmark, machine, method, k):
    if method == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton path is benchmarked on CUDA only")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    sources = [
        {f"a{i}": torch.randn(s, generator=g, device=DEVICE).to(dtype) for i, s in enumerate(LORA_SHAPES)}
        for _ in range(k)
    ]
    out = {key: torch.empty_like(v) for key, v in sources[0].items()}
    weights = weights_for(k)
    benchmark.pedantic(run_method, args=(method, sources, out, weights), rounds=10, warmup_rounds=2)
    p = sum(a * b for a, b in LORA_SHAPES)
    benchmark.extra_info.update(
        machine=machine, device=DEVICE, P=p, K=k, dtype=str(dtype).removeprefix("torch."), method=method,
        tensors=len(LORA_SHAPES), us_per_merge=round(benchmark.stats.stats.min * 1e6, 1),
    )


@pytest.mark.parametrize("k", [3])
def test_streaming_file_merge(benchmark, machine, tmp_path, k):
    """End to end from disk: K safetensors files -> merged safetensors, tensor by tensor (rs soup's path)."""
    from safetensors.torch import save_file

    from rs_lightning.soup import merge_files

    p = SIZES[0]
    paths = []
    for i, sd in enumerate(make_sources(p, k, torch.float32)):
        path = tmp_path / f"expert{i}.safetensors"
        save_file({key: v.cpu().contiguous() for key, v in sd.items()}, str(path))
        paths.append(str(path))
    out = tmp_path / "soup"

    def merge():
        merge_files(paths, weights_for(k), out, overwrite=True)

    benchmark.pedantic(merge, rounds=3, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(machine=machine, P=p, K=k, dtype="fp32", method="merge_files",
                                gb_per_s=round((k + 1) * p * 4 / seconds / 1e9, 2))

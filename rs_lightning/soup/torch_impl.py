"""Torch path of the soup engine: out_j <- sum_k w_k x_kj, fast on CPU and GPU, exact to one rounding.

Why it is shaped this way:
- On CPU, large contiguous tensors go through the fused kernel of `cpu_kernel` when it can be built here (a
  C++ compiler): each source read once, the sum kept in fp32 registers (bf16/fp16 converted in registers),
  the output written once, one call for all tensors split once across the threads. Measured side by side
  (2-core Xeon, 2 threads, P = 128M, best of 5): 108-139 % of `copy_` GB/s for fp32/bf16 at K = 3 and 8,
  2.2-3.6x the chunked loop below (30-60 % of `copy_`: K + 2 OpenMP regions per chunk, mixed-dtype adds).
  On by default (`RS_SOUP_NATIVE=0` turns it off, see cpu_kernel.enabled); the loop below is the fallback
  (turned off, no compiler, strided, CUDA).
- Large tensors are processed in chunks: for each chunk a small fp32 (fp64 for fp64 inputs) accumulator
  is filled from the K sources and written once to the output. The accumulator stays in cache, so memory
  traffic is close to the (K+1)·P·bytes minimum, there is no K-sized temporary (no `torch.stack`), and
  writing into a tensor that is also a source is safe: every chunk is fully read before it is written.
- Small tensors (LoRA factors, norms, biases) are launch-bound, not bandwidth-bound: they are packed with
  one `torch.cat` per source into a flat accumulator, summed with K ops and scattered back with one
  `torch._foreach_copy_`, so 256 adapter tensors cost a handful of ops instead of ~1000.
- Two sources whose weights sum to exactly 1 use one fused `torch.lerp` (fp32 math, one rounding).
- Accumulation is fp32 for fp32/fp16/bf16 and fp64 for fp64, with a single rounding to the output dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rs_lightning.soup import cpu_kernel

# Elements per chunk for large tensors: 2^18 fp32 = 1 MiB accumulator, resident in a CPU's L2. On CUDA each
# chunk costs K + 2 kernel launches (~10 us each), so 1 MiB chunks made the path launch-bound (measured on an
# H100: 2 % of copy_ bandwidth at K = 3); 2^24 fp32 = 64 MiB keeps launches few and the temporary bounded.
CHUNK = 1 << 18
CHUNK_CUDA = 1 << 24
# Tensors with fewer elements than this are packed together; a pack holds at most PACK_LIMIT elements.
SMALL = 1 << 16
PACK_LIMIT = 1 << 22


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum_(outs: list[Tensor], sources: list[list[Tensor]], weights: list[float]) -> None:
    """Write sum_k weights[k] * sources[k][j] into outs[j] for every j, in place.

    Args:
        outs: J floating tensors (any shape); outs[j] may be the same tensor as some sources[k][j].
        sources: K lists of J tensors; sources[k][j] has the shape, dtype and device of outs[j].
        weights: K finite floats.
    """
    packs: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    fused: list[tuple[Tensor, list[Tensor]]] = []
    for j, out in enumerate(outs):
        if out.numel() < SMALL:
            packs.setdefault((out.device, accumulation_dtype(out.dtype)), []).append(j)
            continue
        xs = [src[j] for src in sources]
        if out.device.type == "cpu" and cpu_kernel.supported(out, xs):
            fused.append((out, xs))
        else:
            _sum_large(out, xs, weights)
    if fused:
        # One fused pass over all large CPU tensors, split once across the threads (see cpu_kernel).
        cpu_kernel.weighted_sum(fused, weights)
    for (_, acc_dtype), idx in packs.items():
        start = 0
        total = 0
        for n, j in enumerate(idx):
            total += outs[j].numel()
            if total >= PACK_LIMIT or n == len(idx) - 1:
                part = idx[start : n + 1]
                _sum_packed([outs[i] for i in part], [[s[i] for i in part] for s in sources], weights, acc_dtype)
                start, total = n + 1, 0


def _sum_large(out: Tensor, xs: list[Tensor], weights: list[float]) -> None:
    """Chunked weighted sum of one big tensor; the accumulator lives in cache between the K reads."""
    acc_dtype = accumulation_dtype(out.dtype)
    if len(xs) == 2 and weights[0] + weights[1] == 1.0:
        # Two experts: lerp is one fused pass computed in fp32 (opmath) and rounded once, 1.6-2.5x faster
        # than the chunked loop on CPU (bf16 conversions dominate there). lerp picks a + w(b - a) or
        # b - (1 - w)(b - a) by w, so its fp32 error stays within that of the loop.
        torch.lerp(xs[0], xs[1], weights[1], out=out)
        return
    if not out.is_contiguous() or not all(x.is_contiguous() for x in xs):
        # Strided tensors: go through contiguous copies (rare for parameters; correctness first).
        result = _sum_packed_flat([x.reshape(-1) for x in xs], weights, acc_dtype)
        out.copy_(result.view(out.shape))
        return
    flat_out = out.view(-1)
    flat_xs = [x.view(-1) for x in xs]
    n = flat_out.numel()
    chunk = CHUNK_CUDA if out.device.type == "cuda" else CHUNK
    acc_full = torch.empty(min(chunk, n), dtype=acc_dtype, device=out.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        acc = acc_full[: stop - start]
        # copy_ then mul_ (not mul(out=acc)): a bf16 * scalar product would be rounded in bf16 first.
        acc.copy_(flat_xs[0][start:stop])
        acc.mul_(weights[0])
        for x, w in zip(flat_xs[1:], weights[1:]):
            acc.add_(x[start:stop], alpha=w)
        flat_out[start:stop].copy_(acc)


def _sum_packed_flat(flat_xs: list[Tensor], weights: list[float], acc_dtype: torch.dtype) -> Tensor:
    acc = flat_xs[0].to(acc_dtype, copy=True)
    acc.mul_(weights[0])
    for x, w in zip(flat_xs[1:], weights[1:]):
        acc.add_(x, alpha=w)
    return acc


def _sum_packed(outs: list[Tensor], xs: list[list[Tensor]], weights: list[float], acc_dtype: torch.dtype) -> None:
    """Weighted sum of many small tensors with O(K) ops: pack each source, sum, scatter back."""
    flats = [torch.cat([t.reshape(-1) for t in src]) if len(src) > 1 else src[0].reshape(-1) for src in xs]
    acc = _sum_packed_flat(flats, weights, acc_dtype)
    pieces = torch.split(acc, [o.numel() for o in outs])
    views = [p.view(o.shape) for p, o in zip(pieces, outs)]
    # copy_ rounds fp32 -> bf16/fp16 once, to nearest even, as a single kernel over the list.
    torch._foreach_copy_(outs, views)

"""Triton path of the soup engine: out_j <- sum_k w_k x_kj for many tensors in one launch, in place.

Layout (torch's multi_tensor_apply, done with a pointer table instead of kernel arguments):
- Tensors are grouped by (device, dtype, address alignment); each group is ONE launch, however many
  tensors it holds (a model in one dtype whose tensors are 16-byte aligned, as allocations are: one launch
  per call; at most 4 alignment classes per dtype).
- Per group, a device table `meta[T, K + 3]` (int64) holds for tensor t: its numel, the index of its first
  program, the address of the output, and the K source addresses. Inside the kernel the addresses are cast
  with `.to(tl.pointer_type(dtype))`; this works both compiled and under TRITON_INTERPRET=1 on CPU tensors
  (checked with triton 3.8.0), so no flat buffer is needed.
- A second table `tile_tensor[B]` maps each program to its tensor; the program handles the BLOCK elements
  starting at (pid - first_block[t]) * BLOCK, computed in int64 (models above 2^31 elements).
- Full tiles take an unmasked path, the last tile of each tensor a masked one: a mask built from a numel
  loaded at run time would stop the compiler from emitting 16-byte vector loads. For the same reason the
  pointers cast from the table carry a `tl.multiple_of(ptr, ALIGN)` hint (ALIGN: the largest of 16, 8, 4,
  2 bytes dividing every address of the group). Checked in the PTX for sm_90: 16-byte ld/st on full tiles.
- Accumulation is fp32 (weights are an fp32 device tensor: new values never recompile), one rounding to
  the output dtype at the store. A program reads all K sources of its tile before it stores, so an output
  that is also a source is safe.
- Tables are cached by (addresses, numels): a front sweep over lambda re-runs the same tensors with new
  weights and then pays only for the weights upload and the launch. A table is a pure function of its key,
  so an address reused by a new tensor can never make a stale entry wrong. Size: 8 bytes per program
  (about 14 MB for 7e9 elements) plus (K + 3) * 8 bytes per tensor.
- Under the interpreter, fp32 -> bf16 rounds toward zero (compiled code rounds to nearest even): CPU tests
  allow one bf16 ulp.

Limits and fallbacks: K > MAX_K raises NotImplementedError (the dispatcher falls back to torch). Tensors
that are not dense, or whose strides differ between the output and a source, go through contiguous
copies (and a copy back into the output). Compiled mode needs CUDA tensors; the interpreter needs CPU
tensors (it cannot follow device addresses); anything else raises NotImplementedError.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

# Largest K compiled; each K is its own specialisation (the source loop is unrolled).
MAX_K = 16
# Elements per program: 4096 bf16 = 8 KiB per source, 16 elements (two 16-byte vectors) per thread at 8 warps.
BLOCK = 4096
NUM_WARPS = 8
# Number of (group key -> device tables) entries kept; one per dtype group of the model being swept.
_CACHE_SIZE = 8
_table_cache: OrderedDict[tuple, tuple[Tensor, Tensor, int]] = OrderedDict()
# TRITON_INTERPRET is read when @triton.jit runs, i.e. at import: that decides which tensors we can take.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """True when the kernel can run here: CUDA present, or Triton's interpreter enabled at import."""
    try:
        return _INTERPRET or torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not break the dispatcher
        return False


def supports(device: torch.device) -> bool:
    """True when `weighted_sum_` can address tensors on `device` (CPU only under the interpreter,
    CUDA only when compiled: the interpreter cannot follow device addresses read from the table)."""
    return is_available() and device.type == ("cpu" if _INTERPRET else "cuda")


@triton.jit
def _tile_start(pid, first_block, BLOCK: tl.constexpr):
    """Offset of this program's first element inside its tensor, in int64 (pid * BLOCK overflows int32)."""
    return (tl.cast(pid, tl.int64) - tl.cast(first_block, tl.int64)) * BLOCK


@triton.jit
def _tile(row, w_ptr, offs, numel, ty, K: tl.constexpr, ALIGN: tl.constexpr, MASKED: tl.constexpr):
    mask = offs < numel
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    for k in tl.static_range(K):
        base = tl.load(row + 3 + k).to(tl.pointer_type(ty))
        if ALIGN > 1:
            base = tl.multiple_of(base, ALIGN)
        src = base + offs
        if MASKED:
            x = tl.load(src, mask=mask, other=0.0)
        else:
            x = tl.load(src)
        acc += tl.load(w_ptr + k) * x.to(tl.float32)
    base = tl.load(row + 2).to(tl.pointer_type(ty))
    if ALIGN > 1:
        base = tl.multiple_of(base, ALIGN)
    dst = base + offs
    if MASKED:
        tl.store(dst, acc.to(ty), mask=mask)
    else:
        tl.store(dst, acc.to(ty))


@triton.jit
def _weighted_sum_kernel(meta_ptr, tile_tensor_ptr, w_ptr, proto_ptr,
                         K: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """One BLOCK-element tile of one tensor. meta: [T, K + 3] int64 (numel, first_block, out, sources...);
    tile_tensor: [B] int64 tensor index per program; w: [K] fp32; proto: any tensor of the group's dtype."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor_ptr + pid)
    row = meta_ptr + t * (K + 3)
    numel = tl.load(row)
    start = _tile_start(pid, tl.load(row + 1), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    ty = proto_ptr.dtype.element_ty
    if start + BLOCK <= numel:
        _tile(row, w_ptr, offs, numel, ty, K, ALIGN, False)
    else:
        _tile(row, w_ptr, offs, numel, ty, K, ALIGN, True)


def tile_tables(numels: list[int], block: int) -> tuple[list[int], list[int]]:
    """Host side of the program -> (tensor, offset) map.

    Args:
        numels: element count of each tensor of a group (zeros allowed: such tensors get no program).
        block: elements per program.

    Returns:
        (first_block, tiles): first_block[t] is the first program of tensor t; tiles[t] its program count.
        Program p works on tensor t with first_block[t] <= p < first_block[t] + tiles[t], at element
        offset (p - first_block[t]) * block.
    """
    first, tiles, total = [], [], 0
    for n in numels:
        first.append(total)
        tiles.append(-(-n // block))
        total += tiles[-1]
    return first, tiles


def _dense_layout(t: Tensor) -> tuple[int, ...] | str | None:
    """A key equal for two same-shape tensors iff flat index i is the same element in both; None when the
    elements do not fill [data_ptr, data_ptr + numel) exactly (strided or overlapping).

    Dims of size 1 get stride 0 in the key: their stride is meaningless and may differ between tensors."""
    if t.is_contiguous():  # the common case, and cheap: this runs K + 1 times per tensor per call
        return "C"
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return None
        expected *= size
    return tuple(s if n != 1 else 0 for n, s in zip(t.shape, t.stride()))


def _device_tables(key: tuple, rows: list[list[int]], tiles: list[int], device: torch.device):
    """Upload (or reuse) meta [T, K + 3] and tile_tensor [B]; the table is a pure function of `key`."""
    hit = _table_cache.get(key)
    if hit is not None:
        _table_cache.move_to_end(key)
        return hit
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    n_tiles = sum(tiles)
    tile_tensor = torch.repeat_interleave(torch.tensor(tiles, dtype=torch.int64).to(device), output_size=n_tiles)
    _table_cache[key] = (meta, tile_tensor, n_tiles)
    if len(_table_cache) > _CACHE_SIZE:
        _table_cache.popitem(last=False)
    return meta, tile_tensor, n_tiles


def _alignment(ts: tuple[Tensor, ...]) -> int:
    """Largest of 16, 8, 4, 2, 1 bytes dividing every data pointer (the hint must never lie)."""
    align = 16
    for t in ts:
        while t.data_ptr() % align:
            align //= 2
    return align


def _launch(outs: list[Tensor], srcs: list[list[Tensor]], w: Tensor, align: int, block: int) -> None:
    """One kernel launch over a group: outs[t] <- sum_k w[k] srcs[t][k]; all dense, same dtype and layout."""
    numels = [o.numel() for o in outs]
    first, tiles = tile_tables(numels, block)
    rows = [[n, f, o.data_ptr(), *(x.data_ptr() for x in xs)] for n, f, o, xs in zip(numels, first, outs, srcs)]
    key = (outs[0].device, outs[0].dtype, len(srcs[0]), block, *(a for r in rows for a in r))
    meta, tile_tensor, n_tiles = _device_tables(key, rows, tiles, outs[0].device)
    _weighted_sum_kernel[(n_tiles,)](meta, tile_tensor, w, outs[0], K=len(srcs[0]), BLOCK=block,
                                     ALIGN=align, num_warps=NUM_WARPS)


def weighted_sum_(outs: list[Tensor], sources: list[list[Tensor]], weights: list[float], *,
                  block: int = BLOCK) -> None:
    """Write sum_k weights[k] * sources[k][j] into outs[j] for every j, in place, with one launch per group.

    Args:
        outs: J floating tensors (fp32/fp16/bf16, any shape); outs[j] may be the same tensor as some
            sources[k][j].
        sources: K lists of J tensors; sources[k][j] has the shape, dtype and device of outs[j]; 2 <= K <= MAX_K.
        weights: K finite floats (uploaded as fp32).
        block: elements per program, a power of 2 (tests use small blocks to cover many tiles).

    Raises:
        NotImplementedError: K > MAX_K, or tensors this mode cannot address (see the module docstring).
    """
    k = len(sources)
    if k > MAX_K:
        raise NotImplementedError(f"triton weighted_sum_ supports up to {MAX_K} sources, got {k}")
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of 2, got {block}")
    groups: dict[tuple, tuple[list[Tensor], list[list[Tensor]]]] = {}
    copy_back: list[tuple[Tensor, Tensor]] = []
    checked: set[torch.device] = set()  # host work per tensor is the cost of LoRA-sized merges: check once
    for j, out in enumerate(outs):
        if out.numel() == 0:
            continue
        if out.device not in checked:
            if not supports(out.device):
                mode = "the interpreter (TRITON_INTERPRET=1)" if _INTERPRET else "compiled Triton"
                raise NotImplementedError(f"{mode} cannot run weighted_sum_ on {out.device} tensors")
            checked.add(out.device)
        xs = [src[j] for src in sources]
        layout = _dense_layout(out)
        if layout is None:
            # Strided output: compute into a contiguous buffer, copied back after the launches.
            tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            copy_back.append((out, tmp))
            out, layout = tmp, _dense_layout(tmp)
        # A source with another layout is copied into the output's layout, so flat index i is the same
        # element everywhere (copies are taken before any launch: aliasing stays safe).
        xs = [x if _dense_layout(x) == layout else torch.empty_like(out).copy_(x) for x in xs]
        group = groups.setdefault((out.device, out.dtype, _alignment((out, *xs))), ([], []))
        group[0].append(out)
        group[1].append(xs)
    w_by_device: dict[torch.device, Tensor] = {}
    for (device, _, align), (g_outs, g_srcs) in groups.items():
        if device not in w_by_device:
            w_by_device[device] = torch.tensor(weights, dtype=torch.float32).to(device)
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            _launch(g_outs, g_srcs, w_by_device[device], align, block)
    for out, tmp in copy_back:
        out.copy_(tmp)

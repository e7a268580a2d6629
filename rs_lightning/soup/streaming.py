"""Streaming merge of full checkpoints on disk: theta = sum_i w_i theta_i, tensor by tensor.

`merge_files` never holds K models in memory. It first checks every source's keys, shapes and dtypes
from metadata alone (no tensor is read, so a mismatch fails in seconds, naming the key and the file),
then reads one small group of tensors from each source, interpolates it with `interpolate` (fp32
accumulation), and streams the result into pre-planned safetensors shards. Peak memory is about
(K + 1) x the largest tensor (or group, at most GROUP_BYTES), independent of the model and shard size.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from rs_lightning.soup.atomic import atomic_dir, explained_write_errors
from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.interpolate import interpolate
from rs_lightning.soup.methods.merge import check_method_inputs, check_method_weights, merge
from rs_lightning.soup.methods.registry import get_method
from rs_lightning.soup.paths import check_output
from rs_lightning.soup.sources import DTYPE_NAMES, Source, TensorInfo, open_source
from rs_lightning.soup.values import check_dtype, check_finite_result, is_finite, nonfinite_error
from rs_lightning.soup.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    SOUP_FILE,
    SaveResult,
    copy_model_files,
    plan_shards,
    soup_record,
    write_planned,
)

# Small tensors (norms, biases) are interpolated in groups of up to this many bytes per source: one
# `interpolate` call per tensor would cost more in Python overhead than in arithmetic.
GROUP_BYTES = 4 * 2**20
# Above this many bytes read, `progress=None` shows a progress bar.
PROGRESS_BYTES = 2**30
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None, a torch floating dtype, or one of "float32", "float16", "bfloat16" (also "fp32", "bf16"...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise SoupError(f"the output dtype must be floating, got {dtype}")
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower()).removeprefix("torch.")
    if name not in OUTPUT_DTYPES:
        raise SoupError(f"unknown output dtype {dtype!r}: use one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


def check_sources(sources: Sequence[Source]) -> list[str]:
    """Check that all sources have the same keys, shapes and dtypes, from metadata only.

    Returns:
        The keys, in source 0's order.

    Raises:
        SoupError: naming the first offending key and the file it comes from.
    """
    if not sources:
        raise SoupError("no sources given: a soup needs at least one checkpoint")
    ref = sources[0]
    keys = list(ref)
    for key in keys:
        check_dtype(ref.info(key).dtype, key, f"source 0 ({ref.path})")
    for i, src in enumerate(sources[1:], start=1):
        for key in keys:
            if key not in src:
                raise SoupError(f"key '{key}' of source 0 ({ref.path}) is missing from source {i} ({src.path})")
        if len(src) != len(keys):
            extra = next(k for k in src if k not in ref)
            raise SoupError(f"key '{extra}' of source {i} ({src.path}) is missing from source 0 ({ref.path})")
        for key in keys:
            a, b = ref.info(key), src.info(key)
            if a.shape != b.shape:
                raise SoupError(
                    f"key '{key}': source {i} ({src.path}) has shape {b.shape}, source 0 ({ref.path}) has {a.shape}"
                )
            if a.dtype != b.dtype:
                raise SoupError(
                    f"key '{key}': source {i} ({src.path}) has dtype {b.dtype}, source 0 ({ref.path}) has "
                    f"{a.dtype} (cast the experts to one dtype first)"
                )
    return keys


def merge_files(
    paths: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    allow_extrapolation: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    prefix: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    allow_nonfinite: bool = False,
    method: str = "linear",
    options: dict | None = None,
    base: str | os.PathLike | None = None,
    fisher: Sequence[str | os.PathLike] | None = None,
) -> SaveResult:
    """Merge K checkpoints on disk into a safetensors folder, streaming tensor by tensor.

    Args:
        paths: K sources of any format `open_source` reads (not PEFT adapters: see `lora_soup`).
        weights: K weights aligned with `paths`, theta = sum_i weights[i] * theta_i; on the simplex
            unless `allow_extrapolation`.
        out_dir: output folder (single `model.safetensors` or shards + index, and `soup.json`); the
            config files of a HF-folder source 0 are copied next to them.
        dtype: cast floating outputs to float32/float16/bfloat16; None keeps the sources' dtype.
        allow_extrapolation: allow negative weights (the sum must still be 1).
        max_shard_bytes: the largest output shard.
        prefix: keep only the keys starting with it, stripped (e.g. "policy." for a Lightning ckpt).
        overwrite: replace an existing `out_dir`.
        progress: a tqdm bar on stderr; None shows it when the merge reads more than 1 GiB.
        allow_nonfinite: write the soup even if a source with non-zero weight holds NaN/inf, or the soup
            overflows its dtype (refused by default, naming the key and the source).
        method: a merge method of `rs_lightning.soup.methods` (default: the linear soup), with `options`.
        base: theta_0's checkpoint, for the task-vector methods (read with the same `prefix`).
        fisher: one Fisher safetensors file per source, for `fisher` (from `rs fisher`; no prefix applied).

    Raises:
        SoupError: bad weights, unreadable or incompatible sources (before any tensor is read), an output
            that cannot be written or overlaps a source (`rs_lightning.soup.paths.check_output`), another
            process writing the same output, NaN/inf (see `allow_nonfinite`).
        FileExistsError: `out_dir` exists and `overwrite` is False.
        OSError: writing failed (e.g. disk full); nothing is left behind.
    """
    start = time.perf_counter()
    if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, Sequence):
        raise SoupError(f"paths must be a list of checkpoint paths, got {type(paths).__name__}")
    m = get_method(method)
    opts = m.resolve_options(options)
    ws = check_method_weights(m, weights, len(paths), allow_extrapolation)
    check_method_inputs(m, base, fisher)
    out_dtype = parse_dtype(dtype)
    out = Path(out_dir) if out_dir is not None else None
    extra_inputs = [*([base] if base is not None else []), *(fisher or [])]
    check_output(out, inputs=[*paths, *extra_inputs], overwrite=overwrite, flag="out_dir")
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_source(p, prefix=prefix)) for p in paths]
        base_src = stack.enter_context(open_source(base, prefix=prefix)) if base is not None else None
        for src in [*sources, *([base_src] if base_src is not None else [])]:
            if src.kind == "peft-adapter":
                raise SoupError(f"{src.path} is a PEFT adapter folder: soup adapters with lora_soup / `rs soup`")
        keys = check_sources([*sources, *([base_src] if base_src is not None else [])])
        fisher_srcs = None
        if fisher is not None:
            if len(fisher) != len(paths):
                raise SoupError(f"got {len(fisher)} Fisher files for {len(paths)} sources: give one per source")
            fisher_srcs = [stack.enter_context(open_source(f)) for f in fisher]
            _check_fisher_sources(fisher_srcs, sources[0], keys)
        merger = _Merger(m, opts, base_src, fisher_srcs)
        in_infos = {k: sources[0].info(k) for k in keys}
        out_infos = {k: _out_info(info, out_dtype) for k, info in in_infos.items()}
        for k, info in out_infos.items():
            if info.dtype not in DTYPE_NAMES:
                raise SoupError(f"key '{k}' has dtype {info.dtype}, which safetensors cannot store")
        shards = plan_shards([(k, out_infos[k]) for k in keys], max_shard_bytes)
        order = [k for layout in shards for k, _ in layout]
        tensors = _merged(sources, order, in_infos, ws, out_dtype, allow_extrapolation, allow_nonfinite, merger)
        reads = sum(w != 0 for w in ws) if m.name == "linear" else len(ws) + (base is not None) + len(fisher or [])
        read_bytes = sum(info.nbytes for info in in_infos.values()) * reads
        if progress or (progress is None and read_bytes >= PROGRESS_BYTES):
            tensors = _with_progress(tensors, len(order))

        result = SaveResult(out, n_tensors=len(keys), total_bytes=sum(i.nbytes for i in out_infos.values()))
        stack.enter_context(explained_write_errors(out))
        with atomic_dir(out, overwrite=overwrite, lock=True) as tmp:
            result.files = write_planned(tmp, shards, tensors)
            if sources[0].folder is not None:
                copy_model_files(sources[0].folder, tmp, dtype=out_dtype)
            # dtype: the requested cast (None: as the sources); dtypes: what the output holds, tensor counts.
            dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in out_infos.values())
            methods = {} if m.name == "linear" else {
                "merge_method": m.name, "merge_options": opts,
                **({"base": str(base_src.path)} if base_src is not None else {}),
                **({"fisher": [str(f.path) for f in fisher_srcs]} if fisher_srcs is not None else {})}
            info = soup_record([s.path for s in sources], ws, mode="full", prefix=prefix, **methods,
                               dtype=str(out_dtype).removeprefix("torch.") if out_dtype else None,
                               dtypes=dict(sorted(dtypes.items())), allow_extrapolation=allow_extrapolation,
                               n_tensors=len(keys))
            (tmp / SOUP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    result.seconds = time.perf_counter() - start
    return result


def _out_info(info: TensorInfo, out_dtype: torch.dtype | None) -> TensorInfo:
    if out_dtype is None or not info.dtype.is_floating_point:
        return info  # non-floating tensors (step counters, index buffers) keep their dtype
    return TensorInfo(info.shape, out_dtype)


class _Merger:
    """The merge method of a streaming merge and its extra inputs (theta_0, Fisher files), read per group."""

    def __init__(self, method, options: dict, base: Source | None, fisher: list[Source] | None):
        self.method, self.options, self.base, self.fisher = method, options, base, fisher

    @property
    def linear(self) -> bool:
        return self.method.name == "linear"

    def merge(self, per_source: list[dict], weights: list[float], keys: list[str], load_extra) -> dict:
        base = None if self.base is None else {k: load_extra(self.base, k) for k in keys}
        floating = [k for k in keys if per_source[0][k].is_floating_point()]
        fisher = None if self.fisher is None else [{k: f[k] for k in floating} for f in self.fisher]
        return merge(per_source, weights, self.method, base=base, fisher=fisher, allow_nonfinite=True,
                     allow_extrapolation=True, **self.options)


def _check_fisher_sources(fisher: Sequence[Source], ref: Source, keys: Sequence[str]) -> None:
    """Every floating key of the sources is in each Fisher file with the same shape (metadata only)."""
    for f in fisher:
        for key in keys:
            info = ref.info(key)
            if not info.dtype.is_floating_point:
                continue
            if key not in f:
                raise SoupError(f"key '{key}' of the sources is missing from the Fisher file {f.path}")
            if f.info(key).shape != info.shape:
                raise SoupError(f"key '{key}': the Fisher file {f.path} has shape {f.info(key).shape}, the "
                                f"sources have {info.shape}")


def _merged(
    sources: Sequence[Source],
    order: list[str],
    infos: dict[str, TensorInfo],
    weights: list[float],
    out_dtype: torch.dtype | None,
    allow_extrapolation: bool,
    allow_nonfinite: bool,
    merger: _Merger,
) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, soup tensor) in `order`, reading one group of tensors per source at a time."""
    group: list[str] = []
    size = 0
    args = (infos, weights, out_dtype, allow_extrapolation, allow_nonfinite, merger)
    for key in order:
        nbytes = infos[key].nbytes
        if group and size + nbytes > GROUP_BYTES:
            yield from _merge_group(sources, group, *args)
            group, size = [], 0
        group.append(key)
        size += nbytes
    if group:
        yield from _merge_group(sources, group, *args)


def _merge_group(sources, keys, infos, weights, out_dtype, allow_extrapolation, allow_nonfinite, merger):
    # Zero-weight sources contribute nothing to a linear soup's floating tensors: do not even read them (a
    # one-hot soup, the front's endpoints, then reads one model). Non-floating tensors need all sources (see
    # interpolate), and so do the other methods (slerp's angle, TIES's election read every source).
    floating = all(infos[k].dtype.is_floating_point for k in keys)
    live = [i for i, w in enumerate(weights) if w != 0.0] if floating and merger.linear else list(range(len(sources)))

    def read(src: Source, key: str, where: str, check: bool) -> Tensor:
        t = src[key]
        # Checked as read (the file is named, nothing is written yet).
        if check and not is_finite(t):
            raise nonfinite_error(t, key, where)
        # Upcasting before the sum (e.g. bf16 experts -> fp32 soup) keeps the fp32 result exact, instead
        # of rounding to bf16 first and widening after.
        if out_dtype is not None and t.is_floating_point() and out_dtype.itemsize > t.dtype.itemsize:
            t = t.to(out_dtype)
        return t

    def load(i: int, key: str) -> Tensor:
        # A zero-weight source adds nothing to a linear soup; every other method reads it (0 x NaN = NaN).
        check = not allow_nonfinite and (weights[i] != 0.0 or not merger.linear)
        return read(sources[i], key, f"source {i} ({sources[i].path})", check)

    def load_extra(src: Source, key: str) -> Tensor:
        return read(src, key, f"the base {src.path}", not allow_nonfinite)

    per_source = [{k: load(i, k) for k in keys} for i in live]
    if merger.linear:
        # Sources were checked above; interpolate's own check would read them all a second time.
        soup = interpolate(per_source, [weights[i] for i in live], allow_extrapolation=allow_extrapolation,
                           allow_nonfinite=True)
    else:
        soup = merger.merge(per_source, [weights[i] for i in live], keys, load_extra)
        if not allow_nonfinite:
            for k in keys:
                if soup[k].is_floating_point():
                    check_finite_result(soup[k], k, f" (method {merger.method.name})")
    del per_source
    for k in keys:
        t = soup.pop(k)
        narrowed = out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype
        if narrowed:
            t = t.to(out_dtype)
        if not allow_nonfinite and (narrowed or allow_extrapolation):  # finite sources may still overflow
            check_finite_result(t, k, f" (cast to {str(out_dtype).removeprefix('torch.')})" if narrowed else "")
        yield k, t


def _with_progress(tensors: Iterator[tuple[str, Tensor]], total: int) -> Iterator[tuple[str, Tensor]]:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional for the engine: no bar, same result
        yield from tensors
        return
    with tqdm(total=total, unit="tensor", desc="soup", file=sys.stderr, leave=False) as bar:
        for item in tensors:
            yield item
            bar.update(1)

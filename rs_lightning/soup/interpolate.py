"""`interpolate`: the soup engine's public entry point (validation, then dispatch to an implementation).

theta = sum_i w_i theta_i over state dicts, written into fresh tensors or IN PLACE into existing ones
(a live model's parameters), so a front sweep never saves and reloads a model per point.

Rules (see README "Weight convention"):
- weights are aligned with `sources`; by default on the simplex (>= 0, sum 1 within 1e-6); with
  `allow_extrapolation=True` negative weights are allowed but the sum must still be 1.
- floating tensors: sum accumulated in fp32 (fp64 for fp64 inputs) and rounded once to the dtype.
  Sources with weight exactly 0 are skipped (0 * inf would poison the soup), so one-hot weights copy that
  source bit for bit, for every dtype.
- non-floating tensors (e.g. BatchNorm's `num_batches_tracked`, integer buffers) cannot be averaged: when
  identical across sources they are copied; otherwise the one from the source with the largest weight
  (the first such source on ties) is taken.
- refused (see `values.py`): complex and float8-like dtypes, and by default NaN/inf in a source that enters
  the soup (`allow_nonfinite=True` lets them through).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from rs_lightning.soup import torch_impl
from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.values import check_dtype, check_finite_result, check_finite_sources
from rs_lightning.soup.weights import validate_weights

IMPLS = ("auto", "torch", "triton")


def _as_state_dict(obj, what: str) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise SoupError(f"{what} must be a state dict (name -> tensor) or an nn.Module, got {type(obj).__name__}")


def _source_list(sources, what: str = "sources") -> list:
    if isinstance(sources, (Mapping, nn.Module, str, bytes)) or not isinstance(sources, Sequence):
        hint = ": wrap a single one in a list" if isinstance(sources, (Mapping, nn.Module)) else ""
        raise SoupError(f"{what} must be a list of state dicts or modules, got {type(sources).__name__}{hint}")
    return list(sources)


def check_compatible(sources: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None) -> list[str]:
    """Check that all sources have the same keys, shapes and dtypes; return the keys in source 0's order.

    Args:
        sources: the state dicts.
        names: how each source is named in messages (default "source i").

    Raises:
        SoupError: naming the first offending key and the source; also for a non-tensor value and a dtype
            that cannot be souped (complex, float8: see `values.py`).
    """
    sources = _source_list(sources)
    if len(sources) == 0:
        raise SoupError("no sources given: a soup needs at least one state dict")
    names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
    for i, src in enumerate(sources):
        if not isinstance(src, Mapping):
            raise SoupError(f"{names[i]} must be a state dict (name -> tensor), got {type(src).__name__}")
    ref = sources[0]
    keys = list(ref.keys())
    for key in keys:
        if not isinstance(ref[key], Tensor):
            raise SoupError(f"key '{key}' of {names[0]} is a {type(ref[key]).__name__}, not a tensor")
        check_dtype(ref[key].dtype, key, names[0])
    for i, src in enumerate(sources[1:], start=1):
        for key in keys:
            if key not in src:
                raise SoupError(f"key '{key}' of {names[0]} is missing from {names[i]}")
        if len(src) != len(keys):
            extra = next(k for k in src.keys() if k not in ref)
            raise SoupError(f"key '{extra}' of {names[i]} is missing from {names[0]}")
        for key in keys:
            a, b = ref[key], src[key]
            if not isinstance(b, Tensor):
                raise SoupError(f"key '{key}' of {names[i]} is a {type(b).__name__}, not a tensor")
            if a.shape != b.shape:
                raise SoupError(
                    f"key '{key}': {names[i]} has shape {tuple(b.shape)}, {names[0]} has {tuple(a.shape)}"
                )
            if a.dtype != b.dtype:
                raise SoupError(f"key '{key}': {names[i]} has dtype {b.dtype}, {names[0]} has {a.dtype}")
    return keys


def _check_out(out: Mapping[str, Tensor], ref: Mapping[str, Tensor], keys: list[str]) -> None:
    for key in keys:
        if key not in out:
            raise SoupError(f"key '{key}' of the sources is missing from `out`")
        o, s = out[key], ref[key]
        if o.shape != s.shape:
            raise SoupError(f"key '{key}': `out` has shape {tuple(o.shape)}, the sources have {tuple(s.shape)}")
        if o.dtype != s.dtype:
            raise SoupError(f"key '{key}': `out` has dtype {o.dtype}, the sources have {s.dtype}")


def _pick_impl(impl: str, device: torch.device, dtype: torch.dtype, k: int):
    """The weighted-sum function for one (device, dtype) group of tensors."""
    if impl == "torch" or dtype == torch.float64 or (impl == "auto" and device.type != "cuda"):
        return torch_impl.weighted_sum_
    try:
        from rs_lightning.soup import triton_impl
    except ImportError as err:
        if impl == "triton":
            raise SoupError(f"impl='triton' requested but triton cannot be imported: {err}") from err
        return torch_impl.weighted_sum_
    usable = triton_impl.supports(device) and k <= triton_impl.MAX_K
    if impl == "triton" and not usable:
        raise SoupError(
            f"impl='triton' cannot take {device.type} tensors with K={k} here: the compiled kernel needs CUDA "
            f"tensors, the interpreter (TRITON_INTERPRET=1, for tests) CPU tensors; K <= {triton_impl.MAX_K}"
        )
    return triton_impl.weighted_sum_ if usable else torch_impl.weighted_sum_


def interpolate(
    sources: Sequence[Mapping[str, Tensor] | nn.Module],
    weights: Sequence[float],
    *,
    out: Mapping[str, Tensor] | nn.Module | None = None,
    allow_extrapolation: bool = False,
    impl: str = "auto",
    allow_nonfinite: bool = False,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Weight-space interpolation theta = sum_i weights[i] * sources[i].

    Args:
        sources: K state dicts (or modules) with identical keys, shapes and dtypes.
        weights: K floats aligned with `sources`; on the simplex unless `allow_extrapolation`.
        out: where to write: a mapping of existing tensors (e.g. `model.state_dict()`) or an nn.Module,
            written in place; it may alias one of the sources and may hold extra keys (left untouched).
            None allocates fresh tensors.
        allow_extrapolation: allow negative weights (their sum must still be 1).
        impl: "torch", "triton" or "auto" (Triton for CUDA tensors when triton imports).
        allow_nonfinite: soup sources holding NaN/inf (refused by default: the soup would hold them too).
        names: how each source is named in error messages (default "source i").

    Returns:
        name -> tensor for every source key: the tensors of `out` that were written, or new tensors.

    Raises:
        SoupError: incompatible sources or `out`, bad weights, an unusable `impl`, a dtype that cannot be
            souped, or (unless `allow_nonfinite`) NaN/inf in a source with non-zero weight (checked before
            anything is written, so a live `out` is left untouched) or in the soup (extrapolation overflow).
    """
    srcs = [_as_state_dict(s, f"source {i}") for i, s in enumerate(_source_list(sources))]
    labels = list(names) if names is not None else [f"source {i}" for i in range(len(srcs))]
    keys = check_compatible(srcs, labels)
    ws = validate_weights(weights, len(srcs), allow_extrapolation=allow_extrapolation)
    if impl not in IMPLS:
        raise SoupError(f"impl must be one of {IMPLS}, got {impl!r}")
    if out is None:
        target = {k: torch.empty_like(srcs[0][k]) for k in keys}
    else:
        target = _as_state_dict(out, "out")
        _check_out(target, srcs[0], keys)
    result = {k: target[k] for k in keys}

    live = [i for i, w in enumerate(ws) if w != 0.0]
    floating = [k for k in keys if srcs[0][k].is_floating_point()]
    if not allow_nonfinite:
        check_finite_sources(srcs, floating, labels, live)
    heaviest = max(range(len(ws)), key=lambda i: (ws[i], -i))
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key in distinct_storage(result, keys):
        o = result[key]
        if not o.is_floating_point():
            copy_non_floating(o, [s[key] for s in srcs], heaviest)
        elif len(live) == 1:
            x = srcs[live[0]][key]
            if x is not o:
                o.copy_(x)
        else:
            groups.setdefault((o.device, o.dtype), []).append(key)

    with torch.no_grad():
        for (device, dtype), gkeys in groups.items():
            fn = _pick_impl(impl, device, dtype, len(live))
            outs = [result[k] for k in gkeys]
            per_source = [[srcs[i][k] for k in gkeys] for i in live]
            if any(x.device != device for xs in per_source for x in xs):
                # Sources elsewhere (e.g. experts on CPU, model on GPU): move one tensor at a time so the
                # temporaries stay the size of a tensor, not of K models.
                for j, o in enumerate(outs):
                    fn([o], [[xs[j].to(device, non_blocking=True)] for xs in per_source], [ws[i] for i in live])
            else:
                fn(outs, per_source, [ws[i] for i in live])
    if allow_extrapolation and not allow_nonfinite:
        # Finite sources and weights on the simplex stay within the sources' range; beyond it they may overflow.
        for key in floating:
            check_finite_result(result[key], key, " (extrapolated weights)")
    return result


def distinct_storage(out: Mapping[str, Tensor], keys: Sequence[str]) -> list[str]:
    """`keys` without the later names of a tensor already listed: tied weights appear under two names with one
    storage, and must be written once, or a write through the first name would corrupt a source that aliases
    `out` before the second name reads it."""
    kept, seen = [], set()
    for key in keys:
        o = out[key]
        ident = (o.device, o.data_ptr(), tuple(o.shape), tuple(o.stride()), o.dtype) if o.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        kept.append(key)
    return kept


def copy_non_floating(o: Tensor, xs: list[Tensor], heaviest: int) -> None:
    """Integer/bool buffers cannot be averaged: copied when identical across sources, else the heaviest
    source's (index `heaviest`)."""
    first = xs[0]
    same = all(x.device == first.device and torch.equal(x, first) for x in xs[1:])
    chosen = first if same else xs[heaviest]
    if chosen is not o:
        with torch.no_grad():
            o.copy_(chosen)

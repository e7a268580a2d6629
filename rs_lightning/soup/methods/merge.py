"""`merge`: N state dicts into one with any registered method; `linear` goes to `interpolate`, the fast core.

    merge([theta_1, theta_2], [0.3, 0.7])                                   # the rewarded soup
    merge([theta_1, theta_2], [0.5, 0.5], method="ties", base=theta_0, density=0.2)
    merge([theta_1, theta_2], [0.5, 0.5], method="fisher", fisher=[F_1, F_2])
    merge([theta_1, theta_2], [0.3, 0.7], method="slerp")                   # t = 0.7, the second weight

Weights follow the soup convention (aligned with the sources; for two, lam is the weight of the second).
`linear`, `slerp` and `fisher` take weights on the simplex; the task-vector methods take any finite weights
(negative ones with `allow_extrapolation`), as mergekit's do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.interpolate import (
    _as_state_dict,
    _check_out,
    _source_list,
    check_compatible,
    distinct_storage,
    interpolate,
)
from rs_lightning.soup.methods.base import MergeMethod, merge_one
from rs_lightning.soup.methods.registry import get_method
from rs_lightning.soup.values import check_finite_sources
from rs_lightning.soup.weights import validate_weights


def check_method_weights(method: MergeMethod, weights: Sequence[float], n: int, allow_extrapolation: bool
                         ) -> list[float]:
    """The weights `method` accepts for `n` sources (see the module docstring); a bad one is a SoupError."""
    if method.n_sources is not None and n != method.n_sources:
        raise SoupError(f"method '{method.name}' merges exactly {method.n_sources} sources, got {n}")
    if method.simplex_weights:
        ws = validate_weights(weights, n, allow_extrapolation=allow_extrapolation)
        if method.name == "fisher" and min(ws) < 0:
            raise SoupError(f"method 'fisher' takes weights >= 0 (sum_i w_i F_i must stay positive), got {ws}")
        return ws
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError) as err:
        raise SoupError(f"weights must be numbers, one per source, got {weights!r}") from err
    if len(ws) != n:
        raise SoupError(f"got {len(ws)} weights for {n} sources: give one weight per source, in order")
    for i, w in enumerate(ws):
        if not math.isfinite(w):
            raise SoupError(f"weight {i} is {w}: weights must be finite")
        if w < 0 and not allow_extrapolation:
            raise SoupError(f"weight {i} is {w} < 0: negative task-vector weights need allow_extrapolation=True "
                            "/ --allow-extrapolation")
    if not any(ws):
        raise SoupError(f"all weights are 0: method '{method.name}' would return theta_0 unchanged")
    return ws


def check_method_inputs(method: MergeMethod, base, fisher) -> None:
    """theta_0 and Fisher tensors are given exactly when the method uses them."""
    if method.needs_base and base is None:
        raise SoupError(f"method '{method.name}' needs theta_0, the shared initialisation (--base / base=)")
    if not method.needs_base and base is not None:
        raise SoupError(f"method '{method.name}' does not use theta_0: drop --base / base= (it needs it only for "
                        "task_arithmetic, ties, dare_linear, dare_ties)")
    if method.needs_fisher and fisher is None:
        raise SoupError(f"method '{method.name}' needs one Fisher file per source (--fisher / fisher=), "
                        "from `rs fisher`")
    if not method.needs_fisher and fisher is not None:
        raise SoupError(f"method '{method.name}' does not use Fisher tensors: drop --fisher / fisher=")


def check_fisher(fisher: Sequence[Mapping[str, Tensor]], sources: Sequence[Mapping[str, Tensor]],
                 keys: Sequence[str], names: Sequence[str]) -> None:
    """One Fisher state dict per source holding every floating key of the sources, with its shape."""
    if len(fisher) != len(sources):
        raise SoupError(f"got {len(fisher)} Fisher files for {len(sources)} sources: give one per source, in order")
    for i, f in enumerate(fisher):
        for key in keys:
            if not sources[0][key].is_floating_point():
                continue
            if key not in f:
                raise SoupError(f"key '{key}' is missing from the Fisher of {names[i]}")
            if tuple(f[key].shape) != tuple(sources[0][key].shape):
                raise SoupError(f"key '{key}': the Fisher of {names[i]} has shape {tuple(f[key].shape)}, the "
                                f"sources have {tuple(sources[0][key].shape)}")
            if not f[key].is_floating_point():
                raise SoupError(f"key '{key}': the Fisher of {names[i]} is {f[key].dtype}, not floating")
            if bool((f[key] < 0).any()) or not bool(torch.isfinite(f[key]).all()):
                raise SoupError(f"key '{key}': the Fisher of {names[i]} has negative or non-finite entries "
                                "(a diagonal Fisher is a mean of squares)")


def merge(
    sources: Sequence[Mapping[str, Tensor] | nn.Module],
    weights: Sequence[float],
    method: str | MergeMethod = "linear",
    *,
    base: Mapping[str, Tensor] | nn.Module | None = None,
    fisher: Sequence[Mapping[str, Tensor]] | None = None,
    out: Mapping[str, Tensor] | nn.Module | None = None,
    allow_extrapolation: bool = False,
    allow_nonfinite: bool = False,
    names: Sequence[str] | None = None,
    impl: str = "auto",
    **options,
) -> dict[str, Tensor]:
    """Merge state dicts with `method`; returns name -> tensor (those of `out` when given, written in place).

    Args:
        sources: K state dicts (or modules) with identical keys, shapes and dtypes.
        weights: K floats aligned with `sources` (see the module docstring for each method's rule).
        method: a name from `METHODS` (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, fisher).
        base: theta_0 for the task-vector methods (same keys, shapes and dtypes as the sources).
        fisher: K state dicts of diagonal Fisher tensors for `fisher`.
        out: write here in place (may alias a source); None allocates.
        impl: `linear` only: "auto", "torch" or "triton" (see `interpolate`).
        **options: the method's options (e.g. density=0.2 for ties, drop_rate=0.9 and seed=0 for DARE,
            scaling=1.0, epsilon); unknown ones are refused.

    Raises:
        SoupError: naming the problem (method, option, weight, key, source) before anything is written.
    """
    m = get_method(method)
    opts = m.resolve_options(options)
    srcs = [_as_state_dict(s, f"source {i}") for i, s in enumerate(_source_list(sources))]
    labels = list(names) if names is not None else [f"source {i}" for i in range(len(srcs))]
    ws = check_method_weights(m, weights, len(srcs), allow_extrapolation)
    check_method_inputs(m, base, fisher)
    if m.name == "linear":
        return interpolate(srcs, ws, out=out, allow_extrapolation=allow_extrapolation, impl=impl,
                           allow_nonfinite=allow_nonfinite, names=labels)
    if impl not in ("auto", "torch"):
        raise SoupError(f"impl={impl!r} applies to method 'linear' only (the other methods run in torch)")
    base_sd = None if base is None else _as_state_dict(base, "base")
    keys = check_compatible(srcs + ([base_sd] if base_sd is not None else []),
                            labels + (["base (theta_0)"] if base_sd is not None else []))
    fisher_sds = None
    if fisher is not None:
        fisher_sds = [_as_state_dict(f, f"Fisher {i}") for i, f in enumerate(_source_list(fisher, "fisher"))]
        check_fisher(fisher_sds, srcs, keys, labels)
    if out is None:
        target = {k: torch.empty_like(srcs[0][k]) for k in keys}
    else:
        target = _as_state_dict(out, "out")
        _check_out(target, srcs[0], keys)
    floating = [k for k in keys if srcs[0][k].is_floating_point()]
    if not allow_nonfinite:
        # Every source enters a non-linear merge, whatever its weight (slerp's angle, TIES's election, 0 x NaN).
        check_finite_sources(srcs, floating, labels, list(range(len(srcs))))
        if base_sd is not None:
            check_finite_sources([base_sd], floating, ["base (theta_0)"], [0])
    result = {k: target[k] for k in keys}
    for key in distinct_storage(result, keys):  # tied weights: one storage under two names, merged once
        o = result[key]
        merge_one(m, o, [s[key] for s in srcs], ws, None if base_sd is None else base_sd[key], opts, key,
                  None if fisher_sds is None or not o.is_floating_point() else [f[key] for f in fisher_sds],
                  allow_nonfinite)
    return result

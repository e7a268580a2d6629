"""Intervals for every front claim: a paired bootstrap over the test examples.

Rows can carry their per-example test rewards (`per_example`, see per_example.py), and evaluation loaders
are not shuffled, so example j is the same input at every point. One bootstrap replicate draws n example
indices with replacement ONCE and recomputes every point's mean rewards on them: the points stay paired, so
a difference between points (RS minus MORL hypervolume, an expert's margin on its own reward, a soup's gap
to the chord) keeps the correlation that makes it far tighter than the points' own intervals. Each
statistic is recomputed in each replicate exactly as the summary computes its point estimate, normalisation
included (normalisation.NormRule: one normalisation per replicate, shared by all its groups) and the
reference point. Intervals are percentile intervals of the replicates (Efron & Tibshirani 1993, "An
Introduction to the Bootstrap", ch. 13); "value" is the statistic on the full test set.

Vectorised: the per-example array is [P, n, K] (points, examples, rewards); the index matrix [n_boot, n]
becomes a count matrix and the replicate means are one product [n_boot, n] @ [n, P*K]. The hypervolume of each
replicate is moocore's exact one (metrics.hypervolume_positive), any number of rewards: ~15-25 ms for 1000
replicates of 13-66 points in 2-4 dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rs_lightning.front.errors import FrontError
from rs_lightning.front.normalisation import NormRule

METHOD = "paired bootstrap over test examples (percentile intervals)"
HV_GROUPS = ("rs", "morl", "experts", "init", "ensemble")


@dataclass
class FrontContext:
    """What build_summary decided about the rows: reward order, groups and the normalisation rule.

    Attributes:
        names: the scored rewards, in order.
        groups: hypervolume groups ("rs", "morl", "experts", "init") -> indices of their VALID rows.
        experts: the expert rows in expert order (expert i is the one-hot weight on i, aligned with reward i).
        soups: the valid soups on the simplex (the LMC check).
        init: the valid init row, or None.
        rule: the normalisation rule.
        reference: hypervolume reference point in raw units, or None for the normalised nadir - ref_margin.
        ref_margin: see SummarySettings.
    """

    names: list[str]
    groups: dict[str, list[int]]
    experts: list[int]
    soups: list[int]
    init: int | None
    rule: NormRule
    reference: list[float] | None = None
    ref_margin: float = 0.1


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] example indices drawn with replacement; row b is replicate b, shared by every point."""
    dtype = np.int32 if n < 2**31 else np.int64
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=dtype)


def resampled_means(per_example: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[B, P, K] mean rewards of every point on every replicate's examples (per_example [P, n, K], idx [B, n])."""
    x = np.asarray(per_example, dtype=np.float64)
    p, n, k = x.shape
    b = idx.shape[0]
    # Replicate b's mean is sum_j count_bj x_j / n: one bincount and one matrix product for all replicates.
    flat = (idx.astype(np.int64) + n * np.arange(b, dtype=np.int64)[:, None]).ravel()
    counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
    return (counts @ x.transpose(1, 0, 2).reshape(n, p * k)).reshape(b, p, k) / n


def hypervolume_draws(z: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Exact hypervolume (maximisation) of each replicate's points: z [B, m, d], ref [B, d] -> [B]."""
    z = np.asarray(z, dtype=np.float64)
    b, m, d = z.shape
    if m == 0:
        return np.zeros(b)
    q = z - np.asarray(ref, dtype=np.float64)[:, None, :]
    # A point not strictly above the reference on every reward adds nothing (as in metrics.hypervolume):
    # zero it, so that it neither covers any volume nor raises a running maximum.
    q = np.where(np.all(q > 0, axis=2)[..., None], q, 0.0)
    return _hv_positive_draws(q)


def _hv_positive_draws(q: np.ndarray) -> np.ndarray:
    """Volume of the union of boxes [0, q_i] per replicate (q >= 0, [B, m, d]); zero rows cover nothing."""
    from rs_lightning.front.metrics import hypervolume_positive

    out = np.zeros(q.shape[0])
    for i, draw in enumerate(q):
        keep = draw[np.all(draw > 0, axis=1)]
        out[i] = hypervolume_positive(keep) if len(keep) else 0.0
    return out
def interval(draws: np.ndarray, value: float, level: float) -> dict:
    """{"value", "low", "high"}: the full-sample statistic and the percentile interval of its replicates."""
    a = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(draws, dtype=np.float64), [a, 1.0 - a])
    return {"value": float(value), "low": float(low), "high": float(high)}


def verdict(interval: dict, positive: str = "above", negative: str = "below", level: float = 0.95) -> str:
    """`positive` if the interval is above 0, `negative` if below, else "indistinguishable at <level> %"."""
    if interval["low"] > 0:
        return positive
    if interval["high"] < 0:
        return negative
    return f"indistinguishable at {level * 100:g} %"


def per_example_array(rows: Sequence[dict], index: Sequence[int], names: Sequence[str],
                      field: str = "per_example") -> tuple[np.ndarray | None, str | None]:
    """([P, n, K] float64 per-example rewards of rows[index], None) or (None, why there are no intervals).

    Raises:
        FrontError: the rows hold different numbers of examples (they cannot be paired).
    """
    if not any(rows[i].get(field) for i in index):
        return None, ("the rows carry no per-example rewards (the task's test_step returns none; see "
                      "rs_lightning.front.per_example): no intervals")
    lacking = [rows[i]["name"] for i in index if any(n not in (rows[i].get(field) or {}) for n in names)]
    if lacking:
        return None, f"rows without per-example values for every scored reward: {', '.join(lacking)}; no intervals"
    lengths = {rows[i]["name"]: {len(rows[i][field][n]) for n in names} for i in index}
    if len({n for sizes in lengths.values() for n in sizes}) != 1:
        raise FrontError(f"per-example rewards of different lengths across rows {lengths}: the bootstrap pairs "
                         "example j across points, so every row must score the same examples (an unshuffled "
                         "evaluation loader, the same data)")
    x = np.asarray([[[math.nan if v is None else v for v in rows[i][field][n]] for n in names] for i in index],
                   dtype=np.float64).transpose(0, 2, 1)
    if not np.all(np.isfinite(x)):
        bad = [rows[i]["name"] for i, ok in zip(index, np.all(np.isfinite(x), axis=(1, 2))) if not ok]
        return None, f"non-finite per-example rewards in rows {', '.join(bad)}: no intervals"
    if x.shape[1] == 0:
        return None, "the rows hold zero examples: no intervals"
    return x, None


def _statistics(m: np.ndarray, ctx: FrontContext, pos: dict[int, int], rows: Sequence[dict]) -> dict[tuple, np.ndarray]:
    """Every scalar claim of the summary on each of the [B, P, K] replicate means: {key: [B]}."""
    init = pos.get(ctx.init) if ctx.init is not None else None
    lo, hi = ctx.rule.bounds(m, init)
    width = hi - lo
    z = (m - lo[:, None, :]) / width[:, None, :]
    if ctx.reference is not None:
        ref = (np.asarray(ctx.reference, dtype=np.float64)[None, :] - lo) / width
    else:
        ref = np.full(lo.shape, -float(ctx.ref_margin))
    out: dict[tuple, np.ndarray] = {}
    for g in HV_GROUPS:
        idx = [pos[i] for i in ctx.groups.get(g, [])]
        if idx:
            out[("hv", g)] = hypervolume_draws(z[:, idx, :], ref)
    for g in ("morl", "experts", "init", "ensemble"):
        if ("hv", "rs") in out and ("hv", g) in out:
            out[("hv", f"rs_minus_{g}")] = out[("hv", "rs")] - out[("hv", g)]
    experts = [pos.get(i) for i in ctx.experts]
    if len(experts) >= 2 and None not in experts and ctx.soups:
        w = np.asarray([rows[i]["weights"] for i in ctx.soups], dtype=np.float64)  # [S, N]
        gaps = m[:, [pos[i] for i in ctx.soups], :] - np.einsum("sn,bnk->bsk", w, m[:, experts, :])
        for k, name in enumerate(ctx.names):
            out[("lmc", name, "mean")] = gaps[:, :, k].mean(axis=1)
            out[("lmc", name, "min")] = gaps[:, :, k].min(axis=1)
    if len(experts) == len(ctx.names) and None not in experts:
        for k, (name, e) in enumerate(zip(ctx.names, experts)):
            if init is not None:
                out[("margin", name, "vs_init")] = m[:, e, k] - m[:, init, k]
            for j, other in enumerate(experts):
                if j != k:
                    out[("margin", name, "vs_others", rows[ctx.experts[j]]["name"])] = m[:, e, k] - m[:, other, k]
    return out


def point_labels(rows: Sequence[dict], index: Sequence[int]) -> list[str]:
    """Keys of `uncertainty.points`: the row names (kind:name where two of rows[index] share a name)."""
    names = [rows[i]["name"] for i in index]
    return [n if names.count(n) == 1 else f"{rows[i]['kind']}:{n}" for i, n in zip(index, names)]


def summarise(rows: Sequence[dict], valid: Sequence[bool], ctx: FrontContext, *, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> tuple[dict, dict]:
    """summary.json's ("uncertainty", "verdicts") for the rows (see the module docstring for the method)."""
    index = [i for i, ok in enumerate(valid) if ok]
    head = {"method": METHOD, "n_boot": int(n_boot), "level": float(level), "seed": int(seed)}
    if n_boot <= 0:
        return {**head, "skipped": "n_boot = 0: no intervals"}, {"skipped": "no intervals"}
    x, why = per_example_array(rows, index, ctx.names)
    if x is None:
        return {**head, "skipped": why}, {"skipped": "no intervals"}
    pos = {i: p for p, i in enumerate(index)}
    draws_m = resampled_means(x, bootstrap_indices(x.shape[1], n_boot, seed))
    full_m = x.mean(axis=1)[None]
    draws, values = _statistics(draws_m, ctx, pos, rows), _statistics(full_m, ctx, pos, rows)
    keys = list(draws)
    a = (1.0 - level) / 2.0
    bounds = np.quantile(np.stack([draws[k] for k in keys]), [a, 1.0 - a], axis=1) if keys else np.zeros((2, 0))
    iv = {k: {"value": float(values[k][0]), "low": float(bounds[0, j]), "high": float(bounds[1, j])}
          for j, k in enumerate(keys)}
    point_bounds = np.quantile(draws_m, [a, 1.0 - a], axis=0)  # [2, P, K]
    points = {label: {name: {"value": float(full_m[0, p, k]), "low": float(point_bounds[0, p, k]),
                             "high": float(point_bounds[1, p, k])} for k, name in enumerate(ctx.names)}
              for p, label in enumerate(point_labels(rows, index))}
    lmc: dict = {}
    margins: dict = {}
    for key, value in iv.items():
        if key[0] == "lmc":
            lmc.setdefault(key[1], {})[key[2]] = value
        elif key[0] == "margin":
            entry = margins.setdefault(key[1], {"expert": rows[ctx.experts[ctx.names.index(key[1])]]["name"],
                                                "vs_others": {}})
            if key[2] == "vs_init":
                entry["vs_init"] = value
            else:
                entry["vs_others"][key[3]] = value
    unc = {**head, "n_examples": int(x.shape[1]), "points": points,
           "hypervolume": {key[1]: value for key, value in iv.items() if key[0] == "hv"},
           "lmc": lmc, "expert_margins": margins}
    return unc, verdicts(unc)


def verdicts(unc: dict) -> dict:
    """summary.json's "verdicts", from the intervals only: above / below / indistinguishable at the level.

    rs_vs_morl: the RS minus MORL hypervolume interval. lmc: each reward's MEAN gap to the chord (the min
    gap's interval is in "uncertainty" too). experts: the expert of reward k minus the init, and minus the
    other experts on reward k ("above" all of them, "below" at least one, else indistinguishable).
    """
    level = unc["level"]
    out: dict = {}
    if "rs_minus_morl" in unc["hypervolume"]:
        out["rs_vs_morl"] = verdict(unc["hypervolume"]["rs_minus_morl"], level=level)
    if "rs_minus_ensemble" in unc["hypervolume"]:
        out["rs_vs_ensemble"] = verdict(unc["hypervolume"]["rs_minus_ensemble"], level=level)
    out["lmc"] = {name: verdict(v["mean"], level=level) for name, v in unc["lmc"].items()}
    experts = {}
    for name, m in unc["expert_margins"].items():
        entry = {}
        if "vs_init" in m:
            entry["vs_init"] = verdict(m["vs_init"], level=level)
        others = [verdict(v, level=level) for v in m["vs_others"].values()]
        if others:
            # Above all the other experts, or below at least one of them; anything else is undecided.
            entry["vs_others"] = ("above" if all(o == "above" for o in others)
                                  else "below" if "below" in others else f"indistinguishable at {level * 100:g} %")
        experts[name] = entry
    out["experts"] = experts
    return out

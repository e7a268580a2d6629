"""summary.json from the rows of a sweep: hypervolumes, IGD+, spacing, LMC gaps, lam* per preference, bad points,
and an interval on every claim.

Every indicator is computed in one normalised space, stated in the output: each reward is mapped by a
per-task ideal/nadir pair (the rule of SummarySettings.nadir_from, see normalisation.py: from the config, the
init row, the worst point, or else the min/max over all valid points of this run, which is then NOT
comparable across runs), and the hypervolume reference point defaults to the normalised nadir minus
`ref_margin` on every axis. Groups: "rs" (experts + soups on the simplex), "rs_extrapolated" (with the soups
off the simplex, when the grid has any), "experts" (the endpoints only, the baseline for delta-HV), "morl",
"init". lam* is selected on the validation rows (select.py). When the rows carry per-example test rewards,
"uncertainty" holds paired-bootstrap intervals of the points, hypervolumes, LMC gaps and expert margins, and
"verdicts" what those intervals allow one to say (uncertainty.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rs_lightning.front.grids import on_simplex
from rs_lightning.front.lmc import lmc_gaps, summarise_gaps
from rs_lightning.front.metrics import expected_utility, hypervolume, igd_plus, pareto_mask, spacing, sparsity
from rs_lightning.front.normalisation import NormRule
from rs_lightning.front.rows import reward_matrix, reward_names
from rs_lightning.front.select import summary_selection
from rs_lightning.front.settings import SummarySettings
from rs_lightning.front.uncertainty import FrontContext, summarise
from rs_lightning.soup import simplex_lattice

SUMMARY_FILE = "summary.json"
__all__ = ["SUMMARY_FILE", "SummarySettings", "build_summary", "write_outputs", "write_summary"]


def _weights(rows) -> np.ndarray:
    return np.asarray([r["weights"] for r in rows], dtype=np.float64)


def _describe(row: dict) -> dict:
    return {"kind": row["kind"], "name": row["name"], "weights": row.get("weights"), "mu": row.get("mu")}


def build_summary(rows: Sequence[dict], settings: SummarySettings | None = None) -> dict:
    """Score a sweep's rows (see the module docstring); JSON-ready.

    Raises:
        FrontError: selection on validation rows (the default) but the rows have none; per-example rewards
            of different lengths across rows; a nadir rule that leaves no room below the ideal.
    """
    s = settings or SummarySettings()
    s.check()
    names = list(s.rewards) if s.rewards else reward_names(rows)
    if not names:
        raise ValueError("no reward in the rows: did the module log any test/reward/<name> metric?")
    values = reward_matrix(rows, names)
    valid = np.all(np.isfinite(values), axis=1)
    by_kind = {k: [i for i, r in enumerate(rows) if r["kind"] == k]
               for k in ("expert", "soup", "init", "morl", "ensemble")}
    experts = sorted(by_kind["expert"], key=lambda i: int(np.argmax(rows[i]["weights"])))
    rs_all = experts + by_kind["soup"]
    groups = {
        "rs": [i for i in rs_all if on_simplex(rows[i]["weights"])],
        "experts": experts,
        "morl": by_kind["morl"],
        "init": by_kind["init"],
    }
    if len(groups["rs"]) < len(rs_all):
        groups["rs_extrapolated"] = rs_all
    if by_kind["ensemble"]:  # the experts' prediction mixtures: the functional-ensembling baseline
        groups["ensemble"] = experts + [i for i in by_kind["ensemble"] if on_simplex(rows[i]["weights"])]

    out: dict = {
        "rewards": names,
        "n_points": len(rows),
        "n_valid": int(valid.sum()),
        "config_hash": rows[0].get("config_hash") if rows else None,
        "weight_convention": "weights aligned with the experts: theta = sum_i w_i theta_i (2 experts: lam = w_2)",
        "invalid_points": [
            {**_describe(rows[i]), "invalid_rewards": [n for k, n in enumerate(names) if not np.isfinite(values[i, k])]}
            for i in np.where(~valid)[0]
        ],
    }
    if not valid.any():
        out["error"] = "no valid point: every row has a missing or non-finite reward"
        return out

    rule = NormRule.from_settings(s)
    kept = np.where(valid)[0].tolist()
    init = next((i for i in by_kind["init"] if valid[i]), None)
    norm = rule.point(values[valid], kept.index(init) if init is not None else None, names)
    z = norm.apply(values)
    if s.reference is not None:
        ref = norm.apply(np.asarray([s.reference]))[0]
        ref_source = "config (raw units)"
    else:
        ref = np.full(len(names), -float(s.ref_margin))
        ref_source = f"normalised nadir - {s.ref_margin} on every reward"
    out["normalisation"] = {**norm.describe(names), "nadir_from": rule.kind}
    out["reference_point"] = {"raw": norm.invert(ref).tolist(), "normalised": ref.tolist(), "source": ref_source}

    union = z[valid][pareto_mask(z[valid], unique=True)]
    prefs = s.preferences or (simplex_lattice(len(names), 4) if len(names) > 1 else [[1.0]])
    hv, ind = {}, {}
    for g, idx in groups.items():
        pts = z[[i for i in idx if valid[i]]]
        hv[g] = hypervolume(pts, ref) if len(pts) else None
        front = pts[pareto_mask(pts)] if len(pts) else pts
        ind[g] = {
            "n": len(idx),
            "n_valid": int(len(pts)),
            "n_pareto": int(len(front)),
            "igd_plus": igd_plus(pts, union) if len(pts) else None,
            "spacing": spacing(front) if len(front) > 1 else None,
            "sparsity": sparsity(front) if len(front) > 1 else None,
            "expected_utility": expected_utility(pts, prefs) if len(pts) else None,
        }
    diffs = {f"rs_minus_{g}": (hv["rs"] - hv[g]) if hv["rs"] is not None and hv[g] is not None else None
             for g in ("experts", "morl", "init", "ensemble") if g in hv}
    out["hypervolume"] = {**hv, **diffs, "space": "normalised rewards (see normalisation), reference_point.normalised"}
    out["indicators"] = ind
    out["indicators_note"] = (
        "IGD+ against the union non-dominated set of all valid points (normalised, lower is better); spacing: "
        "std of nearest-neighbour cityblock distances over the group's Pareto points; expected_utility: mean "
        "over the preferences of the best <mu, normalised R>"
    )
    union_mask = np.zeros(len(rows), dtype=bool)
    union_mask[np.where(valid)[0][pareto_mask(z[valid])]] = True
    out["pareto_points"] = [_describe(rows[i]) for i in np.where(union_mask)[0]]
    soups = [i for i in by_kind["soup"] if valid[i] and on_simplex(rows[i]["weights"])]
    out["lmc"] = _lmc(rows, values, valid, experts, soups, names)
    out["selection"] = summary_selection(rows, names, rs_all, by_kind["morl"], prefs, s.select_on)
    if by_kind["ensemble"]:
        seconds = {k: [rows[i].get("seconds") for i in by_kind[k] if rows[i].get("seconds") is not None]
                   for k in ("soup", "ensemble")}
        out["cost"] = {f"{k}_seconds_per_point": (float(np.mean(v)) if v else None) for k, v in seconds.items()}
        out["cost"]["note"] = ("an ensemble point decodes with every expert of positive weight at each token "
                               "(N forward passes per token); a soup point with one model")
    ctx = FrontContext(names=names, groups={g: [i for i in groups[g] if valid[i]]
                                            for g in ("rs", "morl", "experts", "init", "ensemble") if g in groups},
                       experts=experts, soups=soups, init=init, rule=rule, reference=s.reference,
                       ref_margin=s.ref_margin)
    out["uncertainty"], out["verdicts"] = summarise(rows, valid, ctx, n_boot=s.n_boot, level=s.level,
                                                    seed=s.boot_seed)
    return out


def _lmc(rows, values, valid, experts, soups, names) -> dict:
    info = {"definition": "R_k(theta(lam)) - sum_i lam_i R_k(theta_i); > 0 = above the chord (LMC holds)"}
    if len(experts) < 2 or not all(valid[i] for i in experts):
        return {**info, "skipped": "needs at least two experts with valid rewards"}
    if not soups:
        return {**info, "skipped": "no valid soup on the simplex"}
    gaps = lmc_gaps(_weights([rows[i] for i in soups]), values[soups], values[experts])
    return {
        **info,
        "per_reward": summarise_gaps(gaps, names),
        "points": [{"name": rows[i]["name"], "weights": rows[i]["weights"], "gaps": g.tolist()}
                   for i, g in zip(soups, gaps)],
    }


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """Write summary.json atomically."""
    from rs_lightning.front.errors import naming_writes
    from rs_lightning.soup.atomic import atomic_file

    path = Path(out_dir) / SUMMARY_FILE
    with naming_writes(path), atomic_file(path) as f:
        json.dump(summary, f, indent=2, allow_nan=False, default=_json_default)
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_outputs(out_dir: str | Path, rows: Sequence[dict], settings: SummarySettings | None = None) -> dict:
    """summary.json plus the plots (front.png for two rewards, radar.png and front_pairs.png for three or more);
    returns the summary."""
    from rs_lightning.front import plots

    summary = build_summary(rows, settings)
    made = []
    if "normalisation" in summary:
        made = plots.plot_all(Path(out_dir), rows, summary)
    summary["plots"] = [p.name for p in made]
    write_summary(out_dir, _finite(summary))
    return summary


def _finite(obj):
    """NaN / inf -> None so summary.json stays strict JSON (e.g. spacing of a one-point front)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj

"""Plots of a sweep: front.png for two rewards, radar.png for three or more (matplotlib, Agg, written atomically).

front.png (raw reward units): the RS curve through the experts and soups, each point labelled by its lam
(two experts) or weights; the chord (straight line, or polygon for N experts) between the experts, which
the RS curve should lie above (LMC); MORL points labelled by mu; the init. radar.png: each reward
normalised to [0, 1] by the summary's normalisation; the soup nearest to uniform weights, each expert,
the MORL run nearest to uniform mu, and the init. When the summary has bootstrap intervals
(summary["uncertainty"]["points"]), every point carries them as error bars (both plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rs_lightning.front.grids import on_simplex
from rs_lightning.front.metrics import Normalisation
from rs_lightning.front.rows import reward_matrix
from rs_lightning.front.uncertainty import point_labels

FRONT_PNG = "front.png"
RADAR_PNG = "radar.png"
PAIRS_PNG = "front_pairs.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display here or on clusters; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from rs_lightning.front.errors import naming_writes
    from rs_lightning.soup.atomic import atomic_file

    with naming_writes(path), atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=130, bbox_inches="tight")
    return path


def _fmt(ws: Sequence[float]) -> str:
    return ",".join(f"{w:.2g}" for w in ws)


def plot_all(out_dir: Path, rows: Sequence[dict], summary: dict) -> list[Path]:
    """The plots that fit the number of rewards; returns the paths written."""
    names = summary["rewards"]
    if len(names) == 2:
        return [plot_front_2d(out_dir / FRONT_PNG, rows, summary)]
    if len(names) >= 3:
        return [plot_radar(out_dir / RADAR_PNG, rows, summary), plot_front_pairs(out_dir / PAIRS_PNG, rows, summary)]
    return []


def _experts(rows, kind, ok) -> list[int]:
    """Valid expert rows in expert order (the index of their one-hot weight)."""
    return sorted(np.where((kind == "expert") & ok)[0].tolist(), key=lambda i: int(np.argmax(rows[i]["weights"])))


def _intervals(rows, summary, names, ok) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{row index: (low, high) per reward} from summary["uncertainty"]["points"]; {} without intervals."""
    points = (summary.get("uncertainty") or {}).get("points") or {}
    index = np.where(ok)[0].tolist()
    out = {}
    for i, label in zip(index, point_labels(rows, index)):
        if label in points and all(n in points[label] for n in names):
            out[i] = (np.asarray([points[label][n]["low"] for n in names]),
                      np.asarray([points[label][n]["high"] for n in names]))
    return out


def _error_bars(ax, vals, intervals, idx, color) -> None:
    idx = [i for i in idx if i in intervals]
    if not idx:
        return
    v = vals[idx]
    lo = np.stack([intervals[i][0] for i in idx])
    hi = np.stack([intervals[i][1] for i in idx])
    # Bars around the plotted (logged) value; clipped at 0 in case the logged mean sits a rounding off the interval.
    err = [np.clip(np.stack([v[:, k] - lo[:, k], hi[:, k] - v[:, k]]), 0.0, None) for k in range(2)]
    ax.errorbar(v[:, 0], v[:, 1], xerr=err[0], yerr=err[1], fmt="none", ecolor=color, elinewidth=0.8, capsize=2,
                alpha=0.7, zorder=3)


def plot_front_2d(path: Path, rows: Sequence[dict], summary: dict) -> Path:
    """RS curve labelled by lam, chord between the experts, MORL points and init, in raw reward units."""
    plt = _pyplot()
    names = summary["rewards"]
    vals = reward_matrix(rows, names)
    ok = np.all(np.isfinite(vals), axis=1)
    kind = np.asarray([r["kind"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 5.2))

    experts = _experts(rows, kind, ok)
    if len(experts) >= 2:
        chord = vals[experts + ([experts[0]] if len(experts) > 2 else [])]
        ax.plot(chord[:, 0], chord[:, 1], ls="--", c="0.55", lw=1.2, label="chord between experts (LMC baseline)")

    rs = [i for i in np.where(np.isin(kind, ["expert", "soup"]) & ok)[0]]
    n_exp = len(rows[rs[0]]["weights"]) if rs else 0
    if rs and n_exp == 2:
        rs.sort(key=lambda i: rows[i]["weights"][1])
        inside = [i for i in rs if on_simplex(rows[i]["weights"])]
        ax.plot(vals[rs, 0], vals[rs, 1], c="C0", lw=1.0, alpha=0.5)
        ax.plot(vals[inside, 0], vals[inside, 1], "o-", c="C0", ms=5, lw=1.8, label="rewarded soups θ(λ)")
        outside = [i for i in rs if i not in inside]
        if outside:
            ax.plot(vals[outside, 0], vals[outside, 1], "o", mfc="none", c="C0", ms=5, label="extrapolated λ")
        for i in rs:
            # Labels inside the (usually concave) curve, MORL labels outside: they do not collide.
            ax.annotate(f"λ={rows[i]['weights'][1]:g}", vals[i], textcoords="offset points", xytext=(-5, -10),
                        ha="right", fontsize=7, color="C0")
    elif rs:
        ax.plot(vals[rs, 0], vals[rs, 1], "o", c="C0", ms=4, label="rewarded soups θ(w)")
    for i in experts:
        ax.plot(*vals[i], "D", c="C3", ms=8, zorder=5)
        ax.annotate(f"expert {rows[i]['name']}", vals[i], textcoords="offset points", xytext=(8, 6),
                    fontsize=8, color="C3")
    ens = sorted(np.where((kind == "ensemble") & ok)[0].tolist(), key=lambda i: rows[i]["weights"][-1])
    if ens:
        ax.plot(vals[ens, 0], vals[ens, 1], "^:", c="C1", ms=5, lw=1.2,
                label="prediction ensembles Σ λ_i p_i (N passes per token)", zorder=3)
    morl = [i for i in np.where((kind == "morl") & ok)[0]]
    if morl:
        ax.plot(vals[morl, 0], vals[morl, 1], "s", c="C2", ms=7, label="MORL (one training per μ)", zorder=4)
        for i in morl:
            label = f"μ={_fmt(rows[i]['mu'])}" if rows[i].get("mu") else rows[i]["name"]
            ax.annotate(label, vals[i], textcoords="offset points", xytext=(6, 4), fontsize=7, color="C2")
    for i in np.where((kind == "init") & ok)[0]:
        ax.plot(*vals[i], "*", c="k", ms=12, label="init θ0", zorder=5)
    intervals = _intervals(rows, summary, names, ok)
    for kinds, color in ((("expert", "soup"), "C0"), (("morl",), "C2"), (("init",), "k")):
        _error_bars(ax, vals, intervals, np.where(np.isin(kind, kinds) & ok)[0].tolist(), color)
    hv = summary.get("hypervolume", {})
    unc = summary.get("uncertainty") or {}
    hv_iv = unc.get("hypervolume") or {}
    parts = [f"{g} {hv[g]:.3f}" + (f" [{hv_iv[g]['low']:.3f}, {hv_iv[g]['high']:.3f}]" if g in hv_iv else "")
             for g in ("rs", "experts", "morl") if hv.get(g) is not None]
    title = "Rewarded soups front" + (f"\nhypervolume (normalised): {', '.join(parts)}" if parts else "")
    if intervals:
        title += (f"\nerror bars: {unc['level'] * 100:g} % paired-bootstrap intervals over {unc['n_examples']} "
                  "test examples")
    ax.set_title(title, fontsize=9 if intervals else 10)
    ax.set_xlabel(f"{names[0]} (higher is better)")
    ax.set_ylabel(f"{names[1]} (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # the init usually sits lower left: let the legend move off it
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _hv_title(summary: dict) -> str:
    hv = summary.get("hypervolume", {})
    hv_iv = (summary.get("uncertainty") or {}).get("hypervolume") or {}
    parts = [f"{g} {hv[g]:.3f}" + (f" [{hv_iv[g]['low']:.3f}, {hv_iv[g]['high']:.3f}]" if g in hv_iv else "")
             for g in ("rs", "experts", "morl", "init") if hv.get(g) is not None]
    return f"hypervolume ({len(summary['rewards'])}-D, normalised): {', '.join(parts)}" if parts else ""


def plot_front_pairs(path: Path, rows: Sequence[dict], summary: dict) -> Path:
    """The N-D front seen pair by pair: one panel per pair of rewards (raw units), soups, experts, MORL, init,
    with their bootstrap intervals; the title gives the N-D hypervolumes (the panels are projections: a soup that
    looks dominated in one panel may be on the N-D front)."""
    from itertools import combinations

    plt = _pyplot()
    names = summary["rewards"]
    vals = reward_matrix(rows, names)
    ok = np.all(np.isfinite(vals), axis=1)
    kind = np.asarray([r["kind"] for r in rows])
    pairs = list(combinations(range(len(names)), 2))
    cols = min(3, len(pairs))
    nrows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 4.0 * nrows + 0.8), squeeze=False)
    intervals = _intervals(rows, summary, names, ok)
    groups = (("soup", dict(marker="o", c="C0", ms=5, ls="none"), "soups θ(w)"),
              ("expert", dict(marker="D", c="C3", ms=8, ls="none"), "experts"),
              ("morl", dict(marker="s", c="C2", ms=7, ls="none"), "MORL (one training per μ)"),
              ("init", dict(marker="*", c="k", ms=12, ls="none"), "init θ0"))
    for ax, (a, b) in zip(axes.flat, pairs):
        for group, style, label in groups:
            idx = np.where((kind == group) & ok)[0].tolist()
            if not idx:
                continue
            ax.plot(vals[idx, a], vals[idx, b], label=label, zorder=4, **style)
            bars = [i for i in idx if i in intervals]
            if bars:
                v = vals[bars][:, [a, b]]
                lo = np.stack([intervals[i][0][[a, b]] for i in bars])
                hi = np.stack([intervals[i][1][[a, b]] for i in bars])
                err = [np.clip(np.stack([v[:, k] - lo[:, k], hi[:, k] - v[:, k]]), 0.0, None) for k in range(2)]
                ax.errorbar(v[:, 0], v[:, 1], xerr=err[0], yerr=err[1], fmt="none", ecolor=style["c"],
                            elinewidth=0.7, capsize=2, alpha=0.6, zorder=3)
            for i in idx:
                if group == "expert":
                    text = rows[i]["name"]
                elif group == "morl":
                    text = f"μ={_fmt(rows[i]['mu'])}" if rows[i].get("mu") else rows[i]["name"]
                elif group == "soup" and len(names) == 3:  # more rewards: too many labels to read
                    text = f"w={_fmt(rows[i]['weights'])}"
                else:
                    continue
                ax.annotate(text, (vals[i, a], vals[i, b]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                            color=style["c"])
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    title = "Rewarded soups over " + ", ".join(names) + ", pair by pair (higher is better)"
    if _hv_title(summary):
        title += "\n" + _hv_title(summary)
    if intervals:
        unc = summary["uncertainty"]
        title += (f"\nerror bars: {unc['level'] * 100:g} % paired-bootstrap intervals over {unc['n_examples']} "
                  "test examples")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1 - 0.6 / fig.get_figheight()))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _nearest(rows, idx, field, target) -> int | None:
    cands = [i for i in idx if rows[i].get(field) is not None and len(rows[i][field]) == len(target)]
    if not cands:
        return None
    return min(cands, key=lambda i: float(np.abs(np.asarray(rows[i][field]) / sum(rows[i][field]) - target).sum()))


def plot_radar(path: Path, rows: Sequence[dict], summary: dict) -> Path:
    """Spider plot on normalised rewards: uniform(-most) soup vs each expert vs MORL uniform(-most) vs init."""
    plt = _pyplot()
    names = summary["rewards"]
    k = len(names)
    norm_info = summary["normalisation"]
    norm = Normalisation(tuple(norm_info["ideal"]), tuple(norm_info["nadir"]))
    vals = norm.apply(reward_matrix(rows, names))
    ok = np.all(np.isfinite(vals), axis=1)
    kind = np.asarray([r["kind"] for r in rows])
    lines: list[tuple[str, int, dict]] = []
    soups = [i for i in np.where((kind == "soup") & ok)[0]]
    if soups:
        n = len(rows[soups[0]]["weights"])
        u = _nearest(rows, soups, "weights", np.full(n, 1.0 / n))
        lines.append((f"soup w=({_fmt(rows[u]['weights'])})", u, dict(c="C0", lw=2.5)))
    for j, i in enumerate(_experts(rows, kind, ok)):
        lines.append((f"expert {rows[i]['name']}", i, dict(c=f"C{3 + j}", lw=1.2, ls="--")))
    morl = [i for i in np.where((kind == "morl") & ok)[0]]
    if morl:
        m = _nearest(rows, morl, "mu", np.full(k, 1.0 / k))
        if m is not None:
            lines.append((f"MORL μ=({_fmt(rows[m]['mu'])})", m, dict(c="C2", lw=2.0)))
    for i in np.where((kind == "init") & ok)[0]:
        lines.append(("init θ0", i, dict(c="k", lw=1.0, ls=":")))
    angles = np.linspace(0, 2 * np.pi, k, endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6.0, 6.0), subplot_kw={"polar": True})
    intervals = _intervals(rows, summary, names, ok)
    for label, i, style in lines:
        v = vals[i].tolist()
        ax.plot(angles + angles[:1], v + v[:1], label=label, **style)
        if i in intervals:
            lo, hi = norm.apply(np.stack(intervals[i]))
            err = np.clip(np.stack([vals[i] - lo, hi - vals[i]]), 0.0, None)
            ax.errorbar(angles, vals[i], yerr=err, fmt="none", ecolor=style["c"], elinewidth=0.8, capsize=2)
    ax.set_xticks(angles)
    ax.set_xticklabels(names)
    title = "rewards normalised by (R - nadir) / (ideal - nadir)"
    if intervals:
        unc = summary["uncertainty"]
        title += f"\nerror bars: {unc['level'] * 100:g} % paired-bootstrap intervals over {unc['n_examples']} examples"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.35, 1.1))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)

"""Front-quality indicators for MAXIMISED rewards: Pareto mask, exact hypervolume, IGD+, spacing, sparsity, EUM.

Every function takes an (n, d) array of reward vectors, larger is better on every axis (the RS convention;
pymoo/moocore minimise, so negate before comparing with them). No dependency beyond numpy.

Indicators depend on the scale of each reward, so a front is compared in a normalised space fixed per
task: `Normalisation(ideal, nadir)` maps the nadir to 0 and the ideal to 1 on every axis.
The hypervolume reference point is then given in the same normalised units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Pairwise dominance is O(n^2 d) memory when broadcast at once; chunk the rows to stay O(chunk * n * d).
_DOMINANCE_CHUNK = 512


def _as_points(points, name: str = "points") -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an (n, d) array of reward vectors, got shape {arr.shape}")
    return arr


def pareto_mask(points, *, unique: bool = False) -> np.ndarray:
    """Which points are non-dominated (maximisation).

    A point is dominated when another is >= on every reward and > on at least one. Exact duplicates do not
    dominate each other, so all copies of a non-dominated point are kept, unless `unique=True` (then only
    the first copy is). Rows with a NaN are never on the front and dominate nothing.

    Args:
        points: (n, d) rewards.
        unique: keep only the first of identical non-dominated rows.

    Returns:
        (n,) bool array, True for points on the Pareto front.
    """
    p = _as_points(points)
    n = p.shape[0]
    finite = np.all(np.isfinite(p), axis=1) if p.shape[1] else np.ones(n, dtype=bool)
    mask = finite.copy()
    q = p[finite]
    if q.shape[0] == 0:
        return mask
    dominated = np.zeros(q.shape[0], dtype=bool)
    for start in range(0, q.shape[0], _DOMINANCE_CHUNK):
        block = q[start : start + _DOMINANCE_CHUNK, None, :]  # (b, 1, d): candidates
        ge = np.all(q[None, :, :] >= block, axis=2)  # (b, n): other j >= candidate i everywhere
        gt = np.any(q[None, :, :] > block, axis=2)
        dominated[start : start + block.shape[0]] = np.any(ge & gt, axis=1)
    keep = ~dominated
    if unique:
        _, first = np.unique(q, axis=0, return_index=True)
        is_first = np.zeros(q.shape[0], dtype=bool)
        is_first[first] = True
        keep &= is_first
    mask[finite] = keep
    return mask


def hypervolume(points, ref) -> float:
    """Exact hypervolume (maximisation): the volume dominated by `points` and dominating `ref`, any number of rewards.

    Computed by moocore (the C library behind pymoo's hypervolume: its exact algorithms, e.g. an O(n log n) sweep in
    2-D and 3-D and the WFG-style recursion beyond; https://multi-objective.github.io/moocore/python/). Points
    that do not strictly dominate `ref` on every reward add nothing (they are dropped), as do rows with a NaN.
    `tests/test_front_metrics.py` checks it against inclusion-exclusion over every subset, Monte Carlo, pymoo and
    botorch.

    Args:
        points: (n, d) rewards, normalised or not (`ref` in the same units).
        ref: (d,) reference point, e.g. the normalised nadir minus a margin.

    Returns:
        The hypervolume (0.0 when no point dominates `ref`).
    """
    p = _as_points(points)
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    if p.shape[0] == 0:
        return 0.0
    if p.shape[1] != r.shape[0]:
        raise ValueError(f"points have {p.shape[1]} rewards but ref has {r.shape[0]}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"ref must be finite, got {r.tolist()}")
    p = p[np.all(np.isfinite(p), axis=1)]
    q = p - r
    q = q[np.all(q > 0, axis=1)]
    if q.shape[0] == 0:
        return 0.0
    return hypervolume_positive(q)


def hypervolume_positive(q: np.ndarray) -> float:
    """Volume of the union of the boxes [0, q_i] (q: (n, d), every entry > 0), by moocore."""
    import moocore

    if q.shape[1] == 1:
        return float(q[:, 0].max())  # moocore wants d >= 2
    return float(moocore.hypervolume(np.ascontiguousarray(q, dtype=np.float64), ref=np.zeros(q.shape[1]),
                                     maximise=True))


def igd_plus(points, reference_front) -> float:
    """IGD+ (maximisation): mean over reference points z of min_a sqrt(sum_k max(z_k - a_k, 0)^2).

    Weakly Pareto-compliant, unlike IGD. Lower is better; 0 when `points` covers the reference front.
    Rows with a NaN in `points` are ignored; NaN if no finite point is left.
    """
    a = _as_points(points)
    z = _as_points(reference_front, "reference_front")
    a = a[np.all(np.isfinite(a), axis=1)]
    if a.shape[0] == 0 or z.shape[0] == 0:
        return float("nan")
    gap = np.clip(z[:, None, :] - a[None, :, :], 0.0, None)  # (|Z|, |A|, d)
    return float(np.mean(np.min(np.sqrt(np.sum(gap**2, axis=2)), axis=1)))


def spacing(points) -> float:
    """Spacing: the population std of each point's cityblock distance to its nearest neighbour.

    Same definition as pymoo's `SpacingIndicator` (divides by n). 0 for a perfectly even front; NaN with
    fewer than two finite points.
    """
    a = _as_points(points)
    a = a[np.all(np.isfinite(a), axis=1)]
    if a.shape[0] < 2:
        return float("nan")
    dist = np.sum(np.abs(a[:, None, :] - a[None, :, :]), axis=2)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(axis=1)
    return float(np.sqrt(np.mean((nearest - nearest.mean()) ** 2)))


def sparsity(points) -> float:
    """PGMORL's sparsity: per reward, sort the front and sum squared consecutive gaps; total / (n - 1)."""
    a = _as_points(points)
    a = a[np.all(np.isfinite(a), axis=1)]
    if a.shape[0] < 2:
        return 0.0
    s = np.sort(a, axis=0)
    return float(np.sum(np.diff(s, axis=0) ** 2) / (a.shape[0] - 1))


def expected_utility(points, preferences) -> float:
    """EUM: mean over preference vectors mu of max over points of <mu, R> (linear scalarisation)."""
    a = _as_points(points)
    a = a[np.all(np.isfinite(a), axis=1)]
    mu = _as_points(preferences, "preferences")
    if a.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.max(mu @ a.T, axis=1)))


@dataclass(frozen=True)
class Normalisation:
    """A fixed per-task affine map of each reward: (R - nadir) / (ideal - nadir), so nadir -> 0, ideal -> 1.

    Attributes:
        ideal: (d,) best value of each reward (the upper end).
        nadir: (d,) worst value of each reward (the lower end).
        source: where the pair comes from, stated in the summary ("config" or "data: ...").
    """

    ideal: tuple[float, ...]
    nadir: tuple[float, ...]
    source: str = "config"

    def __post_init__(self):
        if len(self.ideal) != len(self.nadir):
            raise ValueError(f"ideal has {len(self.ideal)} rewards but nadir has {len(self.nadir)}")
        for k, (hi, lo) in enumerate(zip(self.ideal, self.nadir)):
            if not (math.isfinite(hi) and math.isfinite(lo)) or hi <= lo:
                raise ValueError(f"reward {k}: need finite ideal > nadir, got ideal={hi}, nadir={lo}")

    @classmethod
    def from_points(cls, points, *, pad: float = 0.0) -> Normalisation:
        """Ideal = column max, nadir = column min of the finite rows (a degenerate axis gets width 1)."""
        a = _as_points(points)
        a = a[np.all(np.isfinite(a), axis=1)]
        if a.shape[0] == 0:
            raise ValueError("no finite point to derive a normalisation from")
        hi, lo = a.max(axis=0), a.min(axis=0)
        width = np.where(hi > lo, hi - lo, 1.0)
        hi, lo = hi + pad * width, lo - pad * width
        lo = np.where(hi > lo, lo, hi - 1.0)
        return cls(tuple(hi.tolist()), tuple(lo.tolist()), source="data: min/max over all valid evaluated points")

    def apply(self, points) -> np.ndarray:
        """Normalise (n, d) rewards."""
        a = _as_points(points)
        lo, hi = np.asarray(self.nadir), np.asarray(self.ideal)
        return (a - lo) / (hi - lo)

    def invert(self, points) -> np.ndarray:
        """Map normalised rewards back to raw units."""
        a = np.asarray(points, dtype=np.float64)
        lo, hi = np.asarray(self.nadir), np.asarray(self.ideal)
        return a * (hi - lo) + lo

    def describe(self, names: Sequence[str] | None = None) -> dict:
        """JSON-ready statement of the normalisation (written into summary.json)."""
        return {
            "formula": "(R - nadir) / (ideal - nadir): nadir -> 0, ideal -> 1 on every reward",
            "rewards": list(names) if names is not None else None,
            "ideal": list(self.ideal),
            "nadir": list(self.nadir),
            "source": self.source,
        }

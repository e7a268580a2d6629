"""Weight grids a front is swept over: the 1-D lam sweep (2 experts), the simplex lattice (N), explicit lists.

Convention: a grid is a list of weight vectors aligned with the experts, theta = sum_i w_i theta_i; for two
experts lam is the weight of the SECOND expert, so a sweep row is (1 - lam, lam). Extrapolation (the
paper's lam in [-0.5, 1.5] ablation) widens the range beyond the experts: weights may then be negative
but still sum to 1, and the sweep must be run with `allow_extrapolation`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rs_lightning.front.errors import FrontError
from rs_lightning.soup import lambda_sweep, simplex_lattice, validate_weights

GRID_KINDS = ("auto", "sweep", "lattice", "explicit")


@dataclass
class GridSpec:
    """Which weight vectors to evaluate.

    Attributes:
        kind: "sweep" (2 experts: `points` values of lam from `low` to `high`), "lattice" (N experts: the
            simplex lattice of step 1/`m`, every weight >= `low`), "explicit" (`weights` as given), or
            "auto": sweep for two experts, lattice otherwise.
        points: number of lam values of a sweep (default 11: 0.0, 0.1, ..., 1.0).
        low: sweep: first lam; lattice: the smallest weight (0 = the simplex; -0.25 extrapolates).
        high: sweep: last lam.
        m: lattice resolution (coordinates are multiples of 1/m on the simplex).
        weights: the explicit list of weight vectors.
        include_uniform: add the uniform soup (1/N, ..., 1/N) when the grid lacks it (the radar plot's
            "uniform soup"; e.g. a lattice with m not a multiple of N misses it).
    """

    kind: str = "auto"
    points: int = 11
    low: float = 0.0
    high: float = 1.0
    m: int = 10
    weights: list[list[float]] | None = None
    include_uniform: bool = True


def lattice_grid(n_experts: int, m: int, low: float = 0.0) -> list[list[float]]:
    """The simplex lattice mapped onto {w : w_i >= low, sum w = 1} (low < 0 extrapolates).

    Each lattice point c (on the unit simplex) maps to w = low + (1 - n * low) * c, so for two experts and
    low = -0.5 the lattice with m = 4 gives lam in {-0.5, 0, 0.5, 1, 1.5}, like the 1-D sweep.
    """
    if n_experts * low >= 1.0:
        raise FrontError(f"lattice low={low} leaves no room on the simplex for {n_experts} experts")
    scale = 1.0 - n_experts * low
    return [[round(low + scale * c, 12) + 0.0 for c in point] for point in simplex_lattice(n_experts, m)]


def build_grid(spec: GridSpec, n_experts: int, *, allow_extrapolation: bool = False) -> list[list[float]]:
    """Expand a `GridSpec` into validated weight vectors (duplicates dropped, order kept).

    Raises:
        FrontError: an unknown kind, a sweep for other than two experts, or an empty grid.
        SoupError: a weight vector with the wrong length, off the simplex without `allow_extrapolation`, or
            not summing to 1.
    """
    kind = spec.kind
    if kind not in GRID_KINDS:
        raise FrontError(f"grid kind must be one of {GRID_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "explicit" if spec.weights is not None else ("sweep" if n_experts == 2 else "lattice")
    if kind == "sweep":
        if n_experts != 2:
            raise FrontError(f"a lam sweep needs exactly 2 experts, got {n_experts}: use grid kind 'lattice'")
        if spec.points < 1:
            raise FrontError(f"the grid is empty: grid.points = {spec.points}")
        grid = lambda_sweep(spec.points, spec.low, spec.high)
    elif kind == "lattice":
        if spec.m < 1:
            raise FrontError(f"lattice resolution grid.m must be >= 1, got {spec.m}")
        grid = lattice_grid(n_experts, spec.m, spec.low)
    else:
        grid = [list(w) for w in (spec.weights or [])]
    if not grid:
        raise FrontError("the grid is empty: give at least one weight vector")
    if spec.include_uniform and n_experts > 1:
        grid = [*grid, uniform_weights(n_experts)]
    out, seen = [], set()
    for w in grid:
        ws = validate_weights(w, n_experts, allow_extrapolation=allow_extrapolation)
        key = tuple(round(x, 9) for x in ws)
        if key not in seen:
            seen.add(key)
            out.append(ws)
    return out


def uniform_weights(n_experts: int) -> list[float]:
    """(1/N, ..., 1/N), the last entry adjusted so the sum is exactly 1."""
    w = [round(1.0 / n_experts, 12)] * n_experts
    w[-1] = round(1.0 - sum(w[:-1]), 12)
    return w


def one_hot_index(weights) -> int | None:
    """The expert a weight vector selects alone (exactly one weight 1.0, the rest 0.0), else None."""
    nonzero = [i for i, w in enumerate(weights) if w != 0.0]
    if len(nonzero) == 1 and weights[nonzero[0]] == 1.0:
        return nonzero[0]
    return None


def on_simplex(weights, tol: float = 1e-9) -> bool:
    """True when every weight is >= 0 (the sum is validated elsewhere): an interpolation, not extrapolation."""
    return all(w >= -tol for w in weights)


def weights_label(weights) -> str:
    """A short human name for a soup point: 'lam=0.3' for two experts, 'w=0.2,0.3,0.5' otherwise."""
    if len(weights) == 2:
        return f"lam={weights[1]:g}"
    return "w=" + ",".join(f"{w:g}" for w in weights)

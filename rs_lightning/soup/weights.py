"""Soup weights: validation and the grids a front is swept over.

Convention (everywhere in rs_lightning): weights are a vector aligned with the list of sources/experts,
theta = sum_i w_i theta_i. For two experts a scalar `lam` is the weight of the SECOND expert:
theta(lam) = (1 - lam) theta_1 + lam theta_2, i.e. weights (1 - lam, lam).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from rs_lightning.soup.errors import SoupError

SUM_TOLERANCE = 1e-6


def _brief(value) -> str:
    """A one-line repr, cut short (a tensor's repr spans lines)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def validate_weights(
    weights: Sequence[float], n_sources: int | None = None, *, allow_extrapolation: bool = False
) -> list[float]:
    """Check soup weights and return them as Python floats.

    Args:
        weights: one weight per source.
        n_sources: expected number of weights (the number of sources), if known.
        allow_extrapolation: allow negative weights (e.g. lam = 1.5 -> (-0.5, 1.5)); the sum must still be 1.

    Raises:
        SoupError: wrong count, a non-finite weight, a negative weight without `allow_extrapolation`, or a
            sum that is not 1 within 1e-6.
    """
    if weights is None or isinstance(weights, (str, bytes)):
        raise SoupError(f"weights must be numbers (a sequence, one per source), got {_brief(weights)}")
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError) as err:  # not iterable, or an element that is not a number
        raise SoupError(f"weights must be numbers (a sequence, one per source), got {_brief(weights)}") from err
    if not ws:
        raise SoupError("weights is empty: give one weight per source")
    if n_sources is not None and len(ws) != n_sources:
        raise SoupError(f"got {len(ws)} weights for {n_sources} sources: give one weight per source, in order")
    for i, w in enumerate(ws):
        if not math.isfinite(w):
            raise SoupError(f"weight {i} is {w}: weights must be finite")
        if w < 0 and not allow_extrapolation:
            raise SoupError(
                f"weight {i} is {w} < 0: weights must lie on the simplex "
                "(pass allow_extrapolation=True / --allow-extrapolation to go beyond the experts)"
            )
    total = math.fsum(ws)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise SoupError(f"weights {ws} sum to {total!r}, not 1 (tolerance {SUM_TOLERANCE})")
    return ws


def lambda_sweep(n_points: int = 11, low: float = 0.0, high: float = 1.0) -> list[list[float]]:
    """The 1-D grid for two experts: `n_points` values of lam from `low` to `high`, as weight pairs.

    lam is the weight of the second expert, so the first row is expert 1 when low = 0. A range wider than
    [0, 1] (e.g. -0.5..1.5, the paper's extrapolation ablation) gives negative weights: sweep it with
    extrapolation allowed.
    """
    if n_points < 1:
        raise SoupError(f"n_points must be >= 1, got {n_points}")
    if n_points == 1:
        lams = [low]
    else:
        lams = [low + (high - low) * i / (n_points - 1) for i in range(n_points)]
    # Round away float noise (0.30000000000000004) so rows compare and print cleanly.
    lams = [round(lam, 12) + 0.0 for lam in lams]
    return [[round(1.0 - lam, 12) + 0.0, lam] for lam in lams]


def simplex_lattice(n_experts: int, m: int) -> list[list[float]]:
    """All weight vectors on the simplex with coordinates in {0, 1/m, ..., 1}: C(m + n - 1, n - 1) points.

    Ordered lexicographically by decreasing weight of the first expert (one-hot on expert 1 first).
    """
    if n_experts < 1:
        raise SoupError(f"n_experts must be >= 1, got {n_experts}")
    if m < 1:
        raise SoupError(f"lattice resolution m must be >= 1, got {m}")
    points = []
    for combo in itertools.product(range(m, -1, -1), repeat=n_experts - 1):
        rest = m - sum(combo)
        if rest < 0:
            continue
        points.append([c / m for c in (*combo, rest)])
    return points

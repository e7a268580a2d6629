"""The hand-written exact hypervolume rs_lightning used before moocore (kept for bench_front.py's speed-up).

Slices along the last reward and recurses down to an O(n log n) 2-D sweep: exact for any d, but
O(n^(d-1) log n), so 4-D fronts of a few hundred points took seconds. The library now calls moocore
(rs_lightning.front.metrics.hypervolume); this copy only measures what that changed.
"""

from __future__ import annotations

import numpy as np

from rs_lightning.front.metrics import pareto_mask


def hypervolume_by_slicing(points, ref) -> float:
    """Exact hypervolume (maximisation) of `points` above `ref`, by slicing (the previous implementation)."""
    q = np.asarray(points, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    q = q[np.all(q > 0, axis=1)]
    if q.shape[0] == 0:
        return 0.0
    return float(_hv_positive(q[pareto_mask(q, unique=True)]))


def _hv_positive(q: np.ndarray) -> float:
    """Volume of the union of boxes [0, q_i] (all q > 0), by slicing the last axis."""
    n, d = q.shape
    if d == 1:
        return float(q[:, 0].max())
    if d == 2:
        order = np.argsort(-q[:, 0], kind="stable")
        x, y = q[order, 0], q[order, 1]
        # With x sorted descending, point i newly covers the strip y in (max of earlier y, y_i] at width x_i.
        prev = np.concatenate([[0.0], np.maximum.accumulate(y)[:-1]])
        return float(np.sum(x * np.clip(y - prev, 0.0, None)))
    order = np.argsort(-q[:, -1], kind="stable")
    q = q[order]
    z = np.concatenate([q[:, -1], [0.0]])
    total = 0.0
    for i in range(n):
        height = z[i] - z[i + 1]
        if height <= 0.0:
            continue
        # The slab between two consecutive levels is covered by the points at or above it.
        sub = q[: i + 1, :-1]
        if sub.shape[1] > 2 and sub.shape[0] > 2:
            # Dropping dominated points keeps the recursion small; the 2-D sweep does not need it.
            sub = sub[pareto_mask(sub, unique=True)]
        total += height * _hv_positive(sub)
    return total


"""The paper's linear-mode-connectivity check: is each soup's reward above the chord between the experts?

For a soup theta(lam) = sum_i lam_i theta_i and reward k, the gap is R_k(theta(lam)) - sum_i lam_i R_k(theta_i):
positive means the soup is above the chord (Working Hypothesis 1 of Rame et al. 2023 holds there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lmc_gaps(weights, soup_rewards, expert_rewards) -> np.ndarray:
    """Gaps to the chord, one per soup and reward.

    Args:
        weights: (S, N) soup weights aligned with the experts.
        soup_rewards: (S, K) rewards of each soup.
        expert_rewards: (N, K) rewards of each expert.

    Returns:
        (S, K) array: R_k(theta(lam_s)) - sum_i lam_s,i R_k(theta_i) (NaN where a reward is NaN).
    """
    w = np.asarray(weights, dtype=np.float64)
    r = np.asarray(soup_rewards, dtype=np.float64)
    e = np.asarray(expert_rewards, dtype=np.float64)
    if w.ndim != 2 or r.ndim != 2 or e.ndim != 2:
        raise ValueError("weights (S, N), soup_rewards (S, K) and expert_rewards (N, K) must be 2-D")
    if w.shape[0] != r.shape[0] or w.shape[1] != e.shape[0] or r.shape[1] != e.shape[1]:
        raise ValueError(f"shape mismatch: weights {w.shape}, soup_rewards {r.shape}, expert_rewards {e.shape}")
    return r - w @ e


def summarise_gaps(gaps, names: Sequence[str]) -> dict:
    """Min / mean / max gap per reward over the finite entries, and the fraction of soups at or above the chord."""
    g = np.asarray(gaps, dtype=np.float64).reshape(-1, len(names))
    out = {}
    for k, name in enumerate(names):
        col = g[:, k][np.isfinite(g[:, k])]
        if col.size == 0:
            out[name] = {"min": None, "mean": None, "max": None, "above_chord_fraction": None, "n": 0}
            continue
        out[name] = {
            "min": float(col.min()),
            "mean": float(col.mean()),
            "max": float(col.max()),
            # A tolerance so float noise at the endpoints does not count as "below".
            "above_chord_fraction": float(np.mean(col >= -1e-9 * (1.0 + np.abs(col).max()))),
            "n": int(col.size),
        }
    return out

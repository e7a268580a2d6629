"""Preference selection: the soup weights lam* that maximise a user's weighted reward sum_k mu_k R_k.

This is the paper's a-posteriori choice (RS recipe step 2): evaluate the grid once, then for any mu pick
lam* = argmax_lam sum_k mu_k R_k(theta(lam)) on validation rows, by inference only. The report compares
lam* with lam = mu (Lemma 1: lam = mu is often near-optimal) and with the MORL run trained on mu.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    """The best grid point for one preference.

    Attributes:
        index: row index of lam* in the candidate rows.
        weights: lam*, aligned with the experts.
        score: sum_k mu_k R_k at lam*.
    """

    index: int
    weights: list[float]
    score: float


def _check_mu(mu, n_rewards: int) -> np.ndarray:
    m = np.asarray(mu, dtype=np.float64).reshape(-1)
    if m.shape[0] != n_rewards:
        raise ValueError(f"preference has {m.shape[0]} entries for {n_rewards} rewards: give one per reward")
    if not np.all(np.isfinite(m)) or np.any(m < 0) or m.sum() <= 0:
        raise ValueError(f"preference must be finite, >= 0 and not all zero, got {m.tolist()}")
    return m / m.sum()


def select_lambda(weights, rewards, mu) -> Selection:
    """lam* = the candidate maximising sum_k mu_k R_k (mu normalised to sum 1; ties: the first row).

    Args:
        weights: (S, N) candidate soup weights.
        rewards: (S, K) their rewards (validation rows; rows with a NaN are skipped).
        mu: (K,) preference over the rewards.

    Raises:
        ValueError: no valid row, or a bad preference.
    """
    w = np.asarray(weights, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    m = _check_mu(mu, r.shape[1])
    scores = r @ m
    valid = np.all(np.isfinite(r), axis=1)
    if not valid.any():
        raise ValueError("no valid row to select from (every row has a NaN reward)")
    scores = np.where(valid, scores, -np.inf)
    best = int(np.argmax(scores))
    return Selection(index=best, weights=w[best].tolist(), score=float(scores[best]))


def preference_report(
    weights,
    rewards,
    preferences: Sequence[Sequence[float]],
    *,
    morl: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    tol: float = 1e-9,
) -> list[dict]:
    """lam* for each mu, against lam = mu (Lemma 1) and against the MORL run trained on mu.

    Args:
        weights: (S, N) soup weights of the candidate rows (experts included).
        rewards: (S, K) their rewards.
        preferences: the mu vectors to report.
        morl: (mu, rewards) of each MORL run.
        tol: how close a grid point / MORL mu must be to count as "equal to mu".

    Returns:
        One dict per mu: mu, lambda_star, score, and where defined lambda_eq_mu_score, regret_lambda_eq_mu
        (score(lam*) - score(lam = mu) >= 0), morl_score, rs_minus_morl.
    """
    w = np.asarray(weights, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    out = []
    for mu in preferences:
        m = _check_mu(mu, r.shape[1])
        sel = select_lambda(w, r, m)
        entry: dict = {"mu": m.tolist(), "lambda_star": sel.weights, "score": sel.score}
        entry["lambda_eq_mu_score"] = entry["regret_lambda_eq_mu"] = None
        if w.shape[1] == m.shape[0]:
            match = np.where(np.all(np.abs(w - m) <= tol, axis=1))[0]
            if match.size and np.all(np.isfinite(r[match[0]])):
                s = float(r[match[0]] @ m)
                entry["lambda_eq_mu_score"] = s
                entry["regret_lambda_eq_mu"] = sel.score - s
            entry["lambda_star_minus_mu_l1"] = float(np.abs(np.asarray(sel.weights) - m).sum())
        entry["morl_score"] = entry["rs_minus_morl"] = None
        for morl_mu, morl_r in morl:
            mm = np.asarray(morl_mu, dtype=np.float64)
            mm = mm / mm.sum() if mm.sum() > 0 else mm
            if mm.shape == m.shape and np.all(np.abs(mm - m) <= tol) and np.all(np.isfinite(morl_r)):
                entry["morl_score"] = float(np.asarray(morl_r, dtype=np.float64) @ m)
                entry["rs_minus_morl"] = sel.score - entry["morl_score"]
                break
        out.append(entry)
    return out

"""Preference selection: the soup weights lam* that maximise a user's weighted reward sum_k mu_k R_k.

This is the paper's a-posteriori choice (RS recipe step 2): evaluate the grid once, then for any mu pick
lam* = argmax_lam sum_k mu_k R_k(theta(lam)) on validation rows, by inference only. The report compares
lam* with lam = mu (Lemma 1: lam = mu is often near-optimal) and with the MORL run trained on mu.

Selection reads the validation rows; a sweep without them is an error, unless selection on the test rows
is asked for explicitly (summary.select_on: test, `rs front select --split test`), and then every output
says so (`TEST_NOTE`): lam* picked and scored on the same test examples is optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rs_lightning.front.errors import FrontError
from rs_lightning.front.rows import reward_matrix

TEST_NOTE = "selected on TEST rows (asked for explicitly): optimistic"
VAL_NOTE = "lam* = argmax over the evaluated soups and experts of sum_k mu_k R_k on the validation rows (mu normalised)"
SPLIT_FIELD = {"val": "val_rewards", "test": "rewards"}


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


def split_field(rows: Sequence[dict], split: str, *, how_to_test: str = "front.summary.select_on: test") -> str:
    """The row field lam* is selected on ("val_rewards" / "rewards"); FrontError when validation rows are missing.

    Args:
        rows: the candidate rows (soups and experts).
        split: "val" or "test".
        how_to_test: how the caller asks for test selection (named in the error).
    """
    if split not in SPLIT_FIELD:
        raise FrontError(f"selection split must be 'val' or 'test', got {split!r}")
    if split == "val":
        missing = [r["name"] for r in rows if "val_rewards" not in r]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FrontError(
                f"lam* is selected on validation rows, but these rows have no val_rewards: {shown}. Re-run the "
                f"sweep with front.validate: true, or ask for selection on the test rows explicitly ({how_to_test}; "
                "optimistic)"
            )
    return SPLIT_FIELD[split]


def summary_selection(rows: Sequence[dict], names: Sequence[str], candidates: Sequence[int],
                      morl: Sequence[int], prefs, split: str = "val") -> dict:
    """summary.json's `selection`: lam* per preference on the `split` rows of the candidate (soup/expert) rows."""
    field = split_field([rows[i] for i in candidates], split)

    def has(i):
        vals = rows[i].get(field) or {}
        return all(vals.get(n) is not None for n in names)

    cands = [i for i in candidates if has(i)]
    if not cands:
        return {"split": split, "skipped": f"no soup or expert row with valid {field}"}
    w = np.asarray([rows[i]["weights"] for i in cands], dtype=np.float64)
    r = reward_matrix([rows[i] for i in cands], names, field)
    morl_pairs = [(rows[i]["mu"], reward_matrix([rows[i]], names, field)[0])
                  for i in morl if rows[i].get("mu") is not None and has(i)]
    report = preference_report(w, r, prefs, morl=morl_pairs)
    if split == "val":
        for entry in report:
            idx = cands[int(np.argmin(np.abs(w - np.asarray(entry["lambda_star"])).sum(1)))]
            entry["test_rewards_at_lambda_star"] = rows[idx].get("rewards")
    return {"split": split, "note": VAL_NOTE if split == "val" else TEST_NOTE, "preferences": report}

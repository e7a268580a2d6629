"""Critic-free sequence advantages: PPO-clip with a batch baseline (the batch mean of the scores).

    A_i = z(R_i) - beta * (KL_i - mean_j KL_j),   the same value on every real token of response i

where z(R_i) = (R_i - mean_j R_j) / std_j R_j is the batch z-score of the raw scores and KL_i the summed per-token
KL of response i to the reference. The batch mean is the baseline of both terms; only the score term is divided by
the batch std, the KL term is centred but not rescaled. So this is NOT the z-score of the KL-penalised return
R_i - beta * KL_i (which would divide both terms by the std of the penalised return); beta here weighs the KL
against a unit-variance score.
No value head is needed, so the signal is usable from the first iteration, which matters for short CPU runs (the
offline review configs use it with clipped PPO updates). The paper's own recipe is GAE with a learned value head
(`ppo.gae`); RLOO (`rloo.py`) is the per-prompt baseline alternative: choose with the text module's `advantage`.
"""

from __future__ import annotations

import torch


def sequence_advantages(scores: torch.Tensor, seq_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                        eps: float = 1e-8) -> torch.Tensor:
    """Per-token advantages [B, T] from per-response scores [B] and summed KLs [B].

    Args:
        scores: [B] rewards of the responses.
        seq_kl: [B] summed per-token KL of each response to the reference.
        mask: [B, T] 1 on real response tokens.
        kl_coef: beta.
        eps: added to the variance (a batch of equal scores gives zero advantages, not NaN).
    """
    scores = scores.float()
    centred = scores - scores.mean()
    std = centred.pow(2).mean().add(eps).sqrt() if scores.numel() > 1 else torch.ones((), device=scores.device)
    seq = centred / std - kl_coef * (seq_kl.float() - seq_kl.float().mean())
    return seq[:, None] * mask.to(seq.dtype)

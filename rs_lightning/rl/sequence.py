"""Critic-free sequence advantages: the batch z-score of each response's KL-penalised return.

    A_i = z(R_i) - beta * (KL_i - mean_j KL_j),   the same value on every real token of response i

where z is the batch z-score of the scores and KL_i the summed per-token KL to the reference. No value
head is needed, so the signal is usable from the first iteration, which matters for short CPU runs (the
feasibility study of the offline review task used exactly this with clipped PPO updates). The paper's
own recipe is GAE with a learned value head (`ppo.gae`): choose with the text module's `advantage` arg.
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

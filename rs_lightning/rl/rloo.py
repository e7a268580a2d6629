"""RLOO advantages: k responses per prompt, each judged against the mean of the other k-1 (leave-one-out).

REINFORCE Leave-One-Out as in Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs" (arXiv:2402.14740), and as TRL's RLOOTrainer computes it (huggingface/trl
trl/trainer/rloo_trainer.py, with its defaults: sequence-level KL, no advantage normalisation):

    r_i = score_i - beta * KL_i                          the KL-penalised reward of the whole response i
    A_i = r_i - mean_{j != i, same prompt} r_j          = k / (k - 1) * (r_i - mean_{same prompt} r_j)

A_i is put on every real token of response i; the text module trains on it with the PPO-clip policy loss and no
value head. Leaving the sample out keeps the baseline independent of the response it judges (an unbiased
gradient estimate), which a mean that included it would not.

Row layout: the k responses of a prompt are CONTIGUOUS rows (prompt p owns rows p*k ... p*k + k - 1), what
`repeat_interleave(k)` of a prompt batch gives. TRL stacks k copies of the whole batch instead (`repeat(k, 1)`,
grouping by `reshape(k, -1)`); the two differ only by a permutation of the rows.
"""

from __future__ import annotations

import torch


def rloo_advantages(scores: torch.Tensor, seq_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                    k: int) -> torch.Tensor:
    """Per-token RLOO advantages [B*k, T] (zero outside the mask).

    Args:
        scores: [B*k] rewards of the responses, the k responses of each prompt in contiguous rows.
        seq_kl: [B*k] summed per-token KL of each response to the reference (`kl.sequence_kl`).
        mask: [B*k, T] 1 on real response tokens.
        kl_coef: beta.
        k: responses per prompt, >= 2 (with one response there is no other sample to compare to).

    Raises:
        ValueError: k < 2, or the number of rows is not a multiple of k.
    """
    if k < 2:
        raise ValueError(f"rloo_k must be >= 2 (the baseline is the mean of the OTHER samples of a prompt), got {k}")
    n = scores.shape[0]
    if n % k or seq_kl.shape[0] != n or mask.shape[0] != n:
        raise ValueError(f"rloo_advantages: scores ({n} rows), seq_kl ({seq_kl.shape[0]}) and mask ({mask.shape[0]}) "
                         f"must hold the same number of rows, a multiple of rloo_k={k}")
    reward = (scores.float() - kl_coef * seq_kl.float()).view(-1, k)  # [B, k]: one prompt per row
    baseline = (reward.sum(-1, keepdim=True) - reward) / (k - 1)
    advantage = (reward - baseline).reshape(-1)
    return advantage[:, None] * mask.to(advantage.dtype)

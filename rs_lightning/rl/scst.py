"""Self-critical sequence training (SCST, Rennie et al. 2017) for the captioning task: baselines and loss.

The paper's captioning code (a fork of ExpansionNet v2; Ramé et al. 2023, public code
github.com/alexrame/rewardedsoups) samples k=5
captions per image and uses the leave-one-out mean of the other k-1 rewards as the baseline, with
loss = mean over samples of (r - b) * (-sum_t log p_t). The greedy-decoding baseline of the original SCST
is offered too. Rewards are [B, k]: B images, k sampled captions each.
"""

from __future__ import annotations

import torch


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """Baseline of each sample = mean reward of the OTHER k-1 samples of the same image.

    Leaving the sample out keeps the baseline independent of that sample's action, so the gradient estimate
    stays unbiased (including the sample would shrink every advantage by (k-1)/k).

    Args:
        rewards: [B, k] with k >= 2.

    Returns:
        [B, k].
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"leave_one_out_baseline needs at least 2 samples per input, got k={k}")
    return (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def greedy_baseline(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """Baseline of each sample = reward of the greedy-decoded caption of the same image (original SCST).

    Args:
        rewards: [B, k] rewards of the sampled captions (only its shape is used).
        greedy_rewards: [B] reward of the greedy caption of each image.

    Returns:
        [B, k], greedy_rewards broadcast over the k samples.
    """
    if greedy_rewards.shape != rewards.shape[:1]:
        raise ValueError(f"greedy_rewards must be [B]={tuple(rewards.shape[:1])}, got {tuple(greedy_rewards.shape)}")
    return greedy_rewards.unsqueeze(-1).expand_as(rewards).to(rewards.dtype)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """Log-probability of each sampled caption from its token log-probs.

    Args:
        token_logprobs: [B, k, T] log-probs of the sampled tokens.
        mask: [B, k, T], 1 on real tokens (including EOS, which the paper keeps), 0 on padding.
        length_normalize: divide by the number of real tokens, so that long captions do not get larger
            gradients just for being long (not what the paper did).

    Returns:
        [B, k].
    """
    m = mask.to(token_logprobs.dtype)
    total = (token_logprobs * m).sum(-1)
    if length_normalize:
        total = total / m.sum(-1).clamp_min(1.0)
    return total


def scst_loss(
    logprobs: torch.Tensor,
    rewards: torch.Tensor,
    baseline: torch.Tensor,
    mask: torch.Tensor | None = None,
    length_normalize: bool = False,
) -> torch.Tensor:
    """REINFORCE with a baseline: loss = -mean over B*k samples of (r - b) * log p(caption).

    Args:
        logprobs: either [B, k] summed caption log-probs, or [B, k, T] token log-probs together with `mask`.
        rewards: [B, k] (detached here: rewards are not differentiated).
        baseline: [B, k], e.g. `leave_one_out_baseline(rewards)` (detached here).
        mask: [B, k, T] when `logprobs` holds token log-probs; must be None for [B, k] log-probs.
        length_normalize: with token log-probs, use the per-token mean log-prob instead of the sum
            (see `sequence_logprobs`); the paper uses the sum (False).

    Returns:
        0-dim loss; its gradient raises the log-prob of samples with r > b and lowers the others.
    """
    if mask is None:
        if logprobs.shape != rewards.shape:
            raise ValueError(f"summed logprobs must be [B, k]={tuple(rewards.shape)}, got {tuple(logprobs.shape)}")
        if length_normalize:
            raise ValueError("length_normalize needs token log-probs [B, k, T] and their mask")
        seq_logprobs = logprobs
    else:
        seq_logprobs = sequence_logprobs(logprobs, mask, length_normalize)
    advantage = (rewards - baseline).detach().to(seq_logprobs.dtype)
    return -(advantage * seq_logprobs).mean()

"""PPO for text generation as pure functions: log-probs, KL-shaped rewards, GAE, clipped losses, mini-batches.

This is the PPO of TRL 0.4 (the version the paper used: its public code, github.com/alexrame/rewardedsoups,
llama/) with its
defaults: gamma=1, GAE lambda 0.95, clip ranges 0.2 for the policy and the value, vf_coef=0.1, whitened
advantages. Every [B, T] tensor holds response tokens only, padded on the right, with a mask (1 on real
tokens). Nothing here knows about Lightning or transformers: a task module computes the tensors and calls
these functions.

Deliberate differences from TRL (values on real tokens are identical):
- padded positions are zero in the rewards, KL, advantages and returns (TRL leaves junk there and relies on
  the masked reductions downstream);
- log-probs and entropies of half-precision logits are computed in float32, because the PPO ratio
  exp(logp - old_logp) is meaningless at bf16 precision;
- losses return statistics as detached 0-dim tensors (no host sync) instead of TRL's nested dict.
"""

from __future__ import annotations

import torch

from rs_lightning.rl.kl import KLKind, per_token_kl
from rs_lightning.rl.whiten import masked_mean


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits.

    Computed as logit[label] - logsumexp(logits), which is stable and avoids keeping a second [B, T, V]
    tensor of log-softmax values alive for backward.

    Args:
        logits: [B, T, V]; position t must be the logits that PREDICT labels[:, t] (i.e. already shifted).
        labels: [B, T] token ids, all valid indices (fill padding with any id and mask it out later).

    Returns:
        [B, T], float32 for half-precision logits, else the logits' dtype.
    """
    logits = _upcast(logits)
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    Args:
        logits: [B, T, V]; -inf entries (banned tokens) are allowed and contribute 0.

    Returns:
        [B, T], float32 for half-precision logits.
    """
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    # 0 * -inf would be NaN (and its gradient too): zero the log-prob where the probability is 0.
    logp_finite = logp.masked_fill(~torch.isfinite(logp), 0.0)
    return -(logp.exp() * logp_finite).sum(-1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: KLKind = "kl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every token, plus the reward-model score on the last real token.

    Args:
        scores: [B] scalar reward of each whole response.
        logprobs: [B, T] policy log-probs of the sampled tokens (at rollout time).
        ref_logprobs: [B, T] reference-model log-probs of the same tokens.
        mask: [B, T], 1 on real response tokens; each row needs at least one.
        kl_coef: beta, e.g. `controller.value`.
        kind: per-token KL estimator, see `per_token_kl`.

    Returns:
        (rewards [B, T], kl [B, T]), both zero outside the mask.

    Raises:
        ValueError: a row of the mask is empty (there is no token to put its score on).
    """
    m = mask.to(logprobs.dtype)
    if (m.sum(-1) == 0).any():
        raise ValueError("kl_penalized_rewards: every response needs at least one real token in the mask")
    kl = per_token_kl(logprobs, ref_logprobs, kind) * m
    rewards = -kl_coef * kl
    # Last non-zero mask position of each row (TRL: mask.nonzero()[-1]); works for any mask, not only prefixes.
    positions = torch.arange(1, m.shape[-1] + 1, device=m.device, dtype=m.dtype)
    last = (positions * (m > 0).to(m.dtype)).argmax(-1)
    rows = torch.arange(m.shape[0], device=m.device)
    rewards = rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), computed backwards as in TRL.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * gae_lambda * A_{t+1}, with V and r zeroed outside
    the mask, so the value after the last real token is 0 (the episode ends with the response).

    Args:
        rewards: [B, T] per-token rewards (e.g. from `kl_penalized_rewards`).
        values: [B, T] value-head predictions at rollout time (pass detached tensors).
        mask: [B, T], 1 on real tokens; expected to be a prefix per row (right padding).
        gamma: discount (paper/TRL: 1.0).
        gae_lambda: GAE lambda (paper/TRL: 0.95; not `lam`, which in this project is only a soup weight).

    Returns:
        (advantages [B, T], returns [B, T]) with returns = advantages + values, both zero outside the mask.
        Advantages are not whitened: call `masked_whiten` on the batch you want to normalise over.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.shape[-1]
    last_gae = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * gae_lambda * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * m
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss: masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    The max of the two losses is the pessimistic branch: the update gets no gradient from a token whose
    ratio has already moved past the clip in the direction its advantage pushes.

    Args:
        logprobs: [B, T] current policy log-probs (carry the gradient).
        old_logprobs: [B, T] rollout-time log-probs (detached here).
        advantages: [B, T] usually whitened (detached here).
        mask: [B, T], 1 on real tokens.
        clip_range: epsilon.

    Returns:
        (loss, stats) with stats: "policy_loss", "clipfrac" (fraction of tokens on the clipped branch),
        "approx_kl" (0.5 * mean((logp - old)^2), TRL's approxkl), "policy_kl" (mean(old - logp)),
        "ratio_mean"; all detached 0-dim tensors.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses_unclipped = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(losses_unclipped, losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clipfrac": masked_mean((losses_clipped > losses_unclipped).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio.square(), mask),
            "policy_kl": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (v_clip - R)^2), v_clip = old + clip(v - old).

    Args:
        values: [B, T] current value predictions (carry the gradient).
        old_values: [B, T] rollout-time values (detached here).
        returns: [B, T] GAE returns (detached here).
        mask: [B, T], 1 on real tokens.
        clip_range_value: how far a prediction may move from its rollout value before the clip applies.

    Returns:
        (loss, stats) with stats: "value_loss", "vf_clipfrac" (fraction of tokens where the clipped error is
        the larger one), "value_error" (masked mean of (v - R)^2); detached 0-dim tensors.
    """
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    losses_unclipped = (values - returns).square()
    losses_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(losses_unclipped, losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "vf_clipfrac": masked_mean((losses_clipped > losses_unclipped).to(values.dtype), mask),
            "value_error": masked_mean(losses_unclipped, mask),
        }
    return loss, stats


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total PPO loss = policy loss + vf_coef * value loss (TRL; no entropy bonus, as in the paper).

    Args:
        logprobs, old_logprobs, advantages, mask, clip_range: see `ppo_policy_loss`.
        values, old_values, returns, clip_range_value: see `ppo_value_loss`.
        vf_coef: weight of the value loss (paper/TRL: 0.1).

    Returns:
        (loss, stats): the union of both loss stats, plus "loss".
    """
    policy_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    value_loss, value_stats = ppo_value_loss(values, old_values, returns, mask, clip_range_value)
    loss = policy_loss + vf_coef * value_loss
    stats.update(value_stats)
    stats["loss"] = loss.detach()
    return loss, stats


def minibatch_indices(
    batch_size: int,
    mini_batch_size: int,
    generator: torch.Generator | None = None,
    epochs: int = 1,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """Index sets of the PPO mini-batches: a fresh shuffle of the rollout batch in each epoch.

    Matches TRL 0.4, which wraps the rollout batch in a `DataLoader(shuffle=True)` and loops `ppo_epochs`
    times (the paper: batch 128, mini-batch 4, 4 epochs), keeping a last partial mini-batch.

    Args:
        batch_size: number of rollouts.
        mini_batch_size: rollouts per optimizer step.
        generator: torch RNG for reproducible shuffles.
        epochs: number of passes (TRL's `ppo_epochs`).
        drop_last: drop a last mini-batch smaller than `mini_batch_size` in each epoch.

    Returns:
        `epochs * ceil(batch_size / mini_batch_size)` (or floor with `drop_last`) 1-D long tensors; within an
        epoch they partition range(batch_size).
    """
    if batch_size < 1 or mini_batch_size < 1 or epochs < 0:
        raise ValueError(f"bad sizes: batch_size={batch_size}, mini_batch_size={mini_batch_size}, epochs={epochs}")
    out: list[torch.Tensor] = []
    for _ in range(epochs):
        perm = torch.randperm(batch_size, generator=generator)
        for chunk in perm.split(mini_batch_size):
            if drop_last and len(chunk) < mini_batch_size:
                continue
            out.append(chunk)
    return out

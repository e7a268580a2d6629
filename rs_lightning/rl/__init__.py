"""Pure RL math (no Lightning, no transformers): PPO for the text tasks (GAE, or the critic-free sequence and RLOO
advantages), SCST for captioning.

See `ppo.py` for the conventions ([B, T] response tensors padded on the right, with a mask) and for the
deliberate differences from TRL 0.4, the PPO implementation the paper used.
"""

from rs_lightning.rl.kl import AdaptiveKLController, FixedKLController, per_token_kl, sequence_kl
from rs_lightning.rl.ppo import (
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    logprobs_from_logits,
    minibatch_indices,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from rs_lightning.rl.rloo import rloo_advantages
from rs_lightning.rl.scst import greedy_baseline, leave_one_out_baseline, scst_loss, sequence_logprobs
from rs_lightning.rl.sequence import sequence_advantages
from rs_lightning.rl.whiten import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "gae",
    "greedy_baseline",
    "kl_penalized_rewards",
    "leave_one_out_baseline",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "minibatch_indices",
    "per_token_kl",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "scst_loss",
    "sequence_advantages",
    "sequence_kl",
    "sequence_logprobs",
]

"""KL between the policy and the frozen reference: per-token estimators and the KL-coefficient controllers.

The controllers reproduce TRL 0.4 (`trl.trainer.utils`), which the paper ran with the adaptive controller
on (init 0.2, or 0.05 for the summary tasks; target 6; horizon 10000). TRL feeds the adaptive controller
the batch mean of the per-SEQUENCE summed KL (its `objective/kl`), so `target=6` means 6 nats per
response, not per token: use `sequence_kl(...).mean()` to get the matching number.
"""

from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["kl", "abs", "mse"]


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "kl") -> torch.Tensor:
    """Per-token KL estimate from the log-probs of the sampled tokens (TRL's `_kl_penalty`).

    With tokens sampled from the policy, "kl" (log p - log p_ref) is an unbiased but per-token
    possibly negative estimate of KL(p || p_ref); "abs" and "mse" (0.5 * delta^2) are non-negative
    alternatives with lower variance and some bias.

    Args:
        logprobs: policy log-probs of the sampled tokens, [B, T].
        ref_logprobs: reference-model log-probs of the same tokens, [B, T].
        kind: "kl", "abs" or "mse".

    Returns:
        Tensor [B, T] (not masked: padding positions hold whatever the inputs hold there).
    """
    delta = logprobs - ref_logprobs
    if kind == "kl":
        return delta
    if kind == "abs":
        return delta.abs()
    if kind == "mse":
        return 0.5 * delta.square()
    raise ValueError(f"unknown KL estimator {kind!r}: use 'kl', 'abs' or 'mse'")


def sequence_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: KLKind = "kl"
) -> torch.Tensor:
    """Per-response summed KL, [B]; its batch mean is what TRL passes to the adaptive controller.

    Args:
        logprobs: policy log-probs of the sampled tokens, [B, T].
        ref_logprobs: reference-model log-probs, [B, T].
        mask: [B, T], 1 on real response tokens.
        kind: per-token estimator, see `per_token_kl`.
    """
    kl = per_token_kl(logprobs, ref_logprobs, kind)
    return (kl * mask.to(kl.dtype)).sum(-1)


class FixedKLController:
    """A constant KL coefficient (TRL's `FixedKLController`, used when `adap_kl_ctrl=False`).

    Args:
        kl_coef: the coefficient beta of the per-token penalty -beta * KL.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op, kept so that both controllers can be driven by the same training loop."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), exactly as TRL's `AdaptiveKLController`.

    After each PPO step, with e = clip(current_kl / target - 1, -0.2, 0.2),
    value <- value * (1 + e * n_steps / horizon). The coefficient grows while the KL is above the target
    and shrinks while it is below, by at most 0.2 * n_steps / horizon per update.

    Args:
        init_kl_coef: initial beta (paper: 0.2, or 0.05 for the summary tasks).
        target: target KL in nats per response (see the module docstring).
        horizon: time constant in samples; TRL passes `n_steps = batch_size * num_processes`.
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update the coefficient from the KL measured on the last rollout batch.

        Args:
            current_kl: batch mean of the per-response summed KL (a Python float or 0-dim tensor).
            n_steps: number of samples in that batch, over all processes.
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        # Checkpoints must carry the current beta: restarting from init_kl_coef would change the objective.
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))

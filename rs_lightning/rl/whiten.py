"""Masked statistics over ragged response batches: mean, variance and advantage whitening.

Responses in a PPO batch have different lengths, so every reduction takes a mask (1 on real tokens, 0 on
padding). The formulas follow TRL 0.4 (`trl.core.masked_mean/var/whiten`), which the paper used; the one
deliberate difference is that `masked_whiten` returns zeros outside the mask (TRL leaves
`(0 - mean) / std` there), so padded positions never carry a non-zero advantage even if a caller forgets
to mask a later reduction.
"""

from __future__ import annotations

import torch

# TRL adds this inside the rsqrt so that a constant batch of advantages whitens to 0 instead of NaN.
WHITEN_EPS = 1e-8


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Masks arrive as bool/long attention masks; arithmetic needs the value dtype.
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is non-zero.

    Args:
        x: values, any shape, e.g. [B, T].
        mask: same shape as `x`; 1 on real tokens, 0 on padding (bool, int or float).
        dim: reduce over this dimension only; `None` reduces over everything.

    Returns:
        A 0-dim tensor, or `x` reduced over `dim`.
    """
    m = _as_mask(mask, x)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is non-zero (TRL's `masked_mean`).

    An empty mask gives NaN rather than an error: checking would force a device-to-host sync in every loss
    call. `masked_var`, called once per batch, does check.

    Args:
        x: values, any shape, e.g. [B, T].
        mask: same shape as `x`; 1 on real tokens, 0 on padding.
        dim: reduce over this dimension only; `None` reduces over everything.

    Returns:
        A 0-dim tensor, or `x` reduced over `dim`.
    """
    m = _as_mask(mask, x)
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (TRL's `masked_var`), over all dimensions.

    Args:
        x: values, any shape, e.g. [B, T].
        mask: same shape as `x`; 1 on real tokens, 0 on padding.
        unbiased: apply Bessel's correction n / (n - 1), with n the number of masked positions (TRL's default).

    Returns:
        A 0-dim tensor.

    Raises:
        ValueError: the mask is empty, or holds a single position with `unbiased=True` (TRL would return
            inf there).
    """
    m = _as_mask(mask, x)
    n = m.sum()
    if n.item() < (2 if unbiased else 1):
        raise ValueError(f"masked_var(unbiased={unbiased}) got {int(n.item())} masked positions, too few")
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardize `x` over the masked positions: (x - mean) / sqrt(var + 1e-8), as TRL whitens advantages.

    The variance is the unbiased one, as in TRL, so the whitened values have unbiased variance
    var / (var + 1e-8), i.e. 1 up to the epsilon.

    Note on scope: TRL 0.4 (the paper's version) whitens inside its loss, i.e. over each PPO mini-batch
    (4 responses in the paper); later TRL versions whiten once over the whole rollout batch. Which tensor
    you pass here picks the behaviour.

    Args:
        x: values, e.g. advantages [B, T].
        mask: same shape as `x`; 1 on real tokens, 0 on padding.
        shift_mean: if False, add the mean back (rescale only), as TRL's `shift_mean=False`.

    Returns:
        Tensor shaped like `x`, zero outside the mask (TRL leaves non-zero values there; see module docstring).
    """
    m = _as_mask(mask, x)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m

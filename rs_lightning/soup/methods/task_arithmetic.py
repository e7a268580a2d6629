"""Task vectors merged on top of theta_0: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`.

All four are one computation with different switches, as in mergekit's `GeneralizedTaskArithmeticMerge`
(github.com/arcee-ai/mergekit, mergekit/merge_methods/generalized_task_arithmetic.py):

    tau_i   = theta_i - theta_0                                  task vector of source i
    tau_i  <- sparsify(tau_i)                                    ties: keep the top `density` fraction by |tau|
                                                                 dare: drop each entry with prob. `drop_rate`,
                                                                 rescale the kept ones by 1 / (1 - drop_rate)
    d_i     = w_i tau_i
    m_i     = [sign(d_i) == sign(sum_j d_j)]  (sum >= 0 counts as +)   ties, dare_ties: sign election
    mixed   = sum_i m_i d_i   (/ sum_i w_i m_i where that is non-zero, if normalize)
    theta   = theta_0 + scaling * mixed

- task_arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): no sparsification, no election,
  no normalisation. With weights on the simplex and scaling 1 it IS the linear soup.
- ties (Yadav et al. 2023, "TIES-merging", Sec. 3: trim, elect sign, disjoint merge): magnitude trim to
  `density`, election, normalised by the agreeing weights (the disjoint mean).
- dare_linear / dare_ties (Yu et al. 2024, "Language models are Super Mario", Sec. 3): random drop and rescale,
  then a plain weighted sum / the TIES election. The drop mask is seeded by (`seed`, tensor name): repeatable.

Trimming keeps exactly k = int(density * numel) entries (at least 1), the k largest |tau| (ties between equal
magnitudes broken by `torch.topk`'s order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.methods.base import MergeMethod, TensorContext, key_generator

# mergekit treats a divisor below this as zero (no source agrees on that entry: the mixed delta is 0 there).
DIVISOR_FLOOR = 1e-8


def magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """tau with all but its int(density * numel) largest-magnitude entries set to 0 (at least one kept)."""
    if density >= 1.0 or tau.numel() == 0:
        return tau
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def random_drop(tau: Tensor, drop_rate: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: each entry dropped with probability `drop_rate` (mask drawn on the CPU), kept ones / (1 - p)."""
    if drop_rate == 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= drop_rate
    out = torch.where(keep.to(tau.device), tau, torch.zeros_like(tau))
    return out / (1.0 - drop_rate) if rescale else out


def sign_agreement(weighted: Tensor) -> Tensor:
    """`[K, ...]` mask: entry of source i agrees with the sign of the sum over sources (>= 0 is +); 0 never does."""
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == elected


def task_vector_merge(xs: list[Tensor], weights: list[float], base: Tensor, *, sparsify: str | None,
                      consensus: bool, normalize: bool, scaling: float, density: float = 1.0,
                      drop_rate: float = 0.0, generator_key: tuple[int, str] | None = None) -> Tensor:
    """The generalized task arithmetic above, for one tensor (compute dtype)."""
    taus = [x - base for x in xs]
    if sparsify == "magnitude":
        taus = [magnitude_trim(t, density) for t in taus]
    elif sparsify == "random":
        seed, key = generator_key
        gen = key_generator(seed, key)  # one stream per tensor, the sources drawn in order
        taus = [random_drop(t, drop_rate, gen) for t in taus]
    w = torch.tensor(weights, dtype=base.dtype, device=base.device).view(-1, *([1] * base.dim()))
    weighted = torch.stack(taus) * w
    if consensus:
        agree = sign_agreement(weighted)
        weighted = weighted * agree
    mixed = weighted.sum(0)
    if normalize:
        chosen = agree.to(base.dtype) if consensus else torch.ones_like(weighted)
        divisor = (w * chosen).sum(0)
        divisor = torch.where(divisor.abs() < DIVISOR_FLOOR, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return base + scaling * mixed


def _need_base(base: Tensor | None, name: str) -> Tensor:
    if base is None:
        raise SoupError(f"method '{name}' needs theta_0, the shared initialisation (--base / base=)")
    return base


def task_arithmetic_tensor(xs, weights, base, options, context: TensorContext) -> Tensor:
    return task_vector_merge(xs, weights, _need_base(base, "task_arithmetic"), sparsify=None, consensus=False,
                             normalize=options["normalize"], scaling=options["scaling"])


def ties_tensor(xs, weights, base, options, context: TensorContext) -> Tensor:
    return task_vector_merge(xs, weights, _need_base(base, "ties"), sparsify="magnitude", consensus=True,
                             normalize=options["normalize"], scaling=options["scaling"], density=options["density"])


def dare_linear_tensor(xs, weights, base, options, context: TensorContext) -> Tensor:
    return task_vector_merge(xs, weights, _need_base(base, "dare_linear"), sparsify="random", consensus=False,
                             normalize=options["normalize"], scaling=options["scaling"],
                             drop_rate=options["drop_rate"], generator_key=(options["seed"], context.key))


def dare_ties_tensor(xs, weights, base, options, context: TensorContext) -> Tensor:
    return task_vector_merge(xs, weights, _need_base(base, "dare_ties"), sparsify="random", consensus=True,
                             normalize=options["normalize"], scaling=options["scaling"],
                             drop_rate=options["drop_rate"], generator_key=(options["seed"], context.key))


# Defaults: mergekit's per-method defaults for normalize and scaling ("lambda"); density 0.2 is TIES's k = 20 %
# (Yadav et al. 2023, Sec. 5); drop rate 0.9 is DARE's usual p (Yu et al. 2024, Sec. 4).
TASK_ARITHMETIC = MergeMethod("task_arithmetic", "theta_0 + scaling * sum_i w_i (theta_i - theta_0)",
                              task_arithmetic_tensor, needs_base=True, simplex_weights=False,
                              options={"scaling": 1.0, "normalize": False})
TIES = MergeMethod("ties", "task vectors trimmed to `density` by magnitude, sign election, disjoint mean",
                   ties_tensor, needs_base=True, simplex_weights=False,
                   options={"density": 0.2, "scaling": 1.0, "normalize": True})
DARE_LINEAR = MergeMethod("dare_linear", "task vectors randomly dropped at `drop_rate` and rescaled, summed",
                          dare_linear_tensor, needs_base=True, simplex_weights=False,
                          options={"drop_rate": 0.9, "seed": 0, "scaling": 1.0, "normalize": False})
DARE_TIES = MergeMethod("dare_ties", "DARE's random drop and rescale, then TIES's sign election",
                        dare_ties_tensor, needs_base=True, simplex_weights=False,
                        options={"drop_rate": 0.9, "seed": 0, "scaling": 1.0, "normalize": True})

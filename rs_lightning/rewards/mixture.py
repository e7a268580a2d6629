"""MORL reward: the weighted mean of several rewards, sum_k mu_k norm(R_k) / sum_k mu_k, with explicit normalisation.

MORL (the paper's multi-objective baseline) trains one policy per preference mu on this mixture, where
rewarded soups train one expert per reward. The paper's code used raw logits and the weighted MEAN
(``--reward_formats "0x0.3"``: sum W_i r_i / sum W_i), i.e. ``normalization="none"`` here. Other choices:

- ``"running"``: z-score each component with a running mean/std (Welford / Chan's parallel update), updated on
  TRAINING scores only (``combine(..., update_stats=True)``), with the batch's own scores included before they
  are normalised. The statistics are persistent buffers: they are saved in checkpoints (a resumed run continues
  the same reward scale) and all-reduced across DDP ranks (every rank normalises the same way). Variance is the
  population one; until two samples are seen it is taken as 1. A policy soup must not average these buffers
  (soups of LoRA experts only touch LoRA keys).
- ``"fixed"``: z-score with given per-component ``mean``/``std`` (e.g. measured on the init policy).

Per-component RAW scores are always available (``score_components``) so every reward is logged separately.
``MixtureReward`` mixes text rewards; captioning's raw-score mixture is ``tasks.captioning.rewards.CaptionMixture``,
which checks its components with the same :func:`named_components`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rs_lightning.rewards.base import RewardMetric, TextRewardMetric, check_batch

__all__ = ["MixtureReward", "named_components"]

Normalization = Literal["none", "running", "fixed"]


def named_components(
    components: Mapping[str, RewardMetric] | Sequence[RewardMetric] | Sequence[tuple[str, RewardMetric]],
    family: type[RewardMetric] = RewardMetric,
) -> list[tuple[str, RewardMetric]]:
    """``(name, reward)`` pairs of a mixture's components, checked: unique module-key names, rewards of ``family``.

    Args:
        components: ``{name: reward}``, or a list of rewards (named by their ``name``) or of ``(name, reward)``.
        family: the reward family every component must belong to (the mixture scores one batch with all).
    """
    if isinstance(components, Mapping):
        pairs = list(components.items())
    else:
        pairs = [c if isinstance(c, tuple) else (c.name, c) for c in components]
    if not pairs:
        raise ValueError("a mixture needs at least one component")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"component names must be unique, got {names}; pass a dict or set `name=` on each reward")
    for name, metric in pairs:
        if not isinstance(metric, family):
            raise TypeError(f"component {name!r} is a {type(metric).__name__}, expected a {family.__name__}")
        if not name or "." in name:
            raise ValueError(f"component name {name!r} must be non-empty and contain no '.' (it is a module key)")
    return pairs


class MixtureReward(TextRewardMetric):
    """Weighted mean of component rewards, ``sum_k mu_k norm(R_k) / sum_k mu_k``, per sample.

    Args:
        components: ``{name: reward}``, or a list of rewards (named by their ``name``) or of ``(name, reward)``.
        weights: ``mu``, one non-negative weight per component (not all zero); divided by their sum.
        normalization: ``"none"`` (paper), ``"running"`` or ``"fixed"`` (module docstring).
        mean: per-component means for ``"fixed"``.
        std: per-component standard deviations (> 0) for ``"fixed"``.
        eps: added to the variance before the square root.
        name: log name (default ``"mixture"``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    default_name = "mixture"

    def __init__(
        self,
        components: dict[str, TextRewardMetric] | list[TextRewardMetric],
        weights: list[float],
        normalization: Normalization = "none",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        eps: float = 1e-8,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        pairs = named_components(components, TextRewardMetric)
        k = len(pairs)
        self.components = nn.ModuleDict(pairs)
        self.weights = [float(w) for w in weights]
        if len(self.weights) != k:
            raise ValueError(f"got {len(self.weights)} weights for {k} components {list(self.components)}")
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {self.weights}")
        if normalization not in ("none", "running", "fixed"):
            raise ValueError(f"unknown normalization {normalization!r}; expected 'none', 'running' or 'fixed'")
        self.normalization = normalization
        self.eps = eps
        if normalization == "fixed":
            if mean is None or std is None or len(mean) != k or len(std) != k:
                raise ValueError(f"normalization='fixed' needs `mean` and `std` with {k} values each")
            if any(s <= 0 for s in std):
                raise ValueError(f"fixed std values must be > 0, got {std}")
        elif mean is not None or std is not None:
            raise ValueError(f"`mean`/`std` are only used with normalization='fixed', not {normalization!r}")
        self.fixed_mean = None if mean is None else torch.tensor(mean, dtype=torch.float64)
        self.fixed_std = None if std is None else torch.tensor(std, dtype=torch.float64)
        # Running statistics: buffers, so they live in state_dict (checkpoints) and follow .to(device) for DDP.
        self.register_buffer("stats_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("stats_mean", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("stats_m2", torch.zeros(k, dtype=torch.float64))
        # Evaluation: per-component sums; the weighted total is derived from their means in compute().
        self.add_state("component_total", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def names(self) -> list[str]:
        """Component names, in weight order."""
        return list(self.components)

    def load(self) -> None:
        """Load every component's model."""
        for metric in self.components.values():
            metric.load()

    # -- scoring ----------------------------------------------------------------------------------------------

    def score_components(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """RAW per-sample scores of every component: ``{name: [B] float32 CPU}`` (no state change)."""
        prompts, responses, references = check_batch(prompts, responses, references)
        return {n: m.score(prompts, responses, references) for n, m in self.components.items()}

    def running_stats(self) -> tuple[Tensor, Tensor]:
        """Current running ``(mean, std)``, each ``[K]`` float64 on CPU (std is 1 before two samples)."""
        count = float(self.stats_count)
        mean = self.stats_mean.detach().cpu()
        var = self.stats_m2.detach().cpu() / count if count >= 2 else torch.ones_like(mean)
        return mean, (var + self.eps).sqrt()

    def update_stats(self, components: Mapping[str, Tensor]) -> None:
        """Fold a training batch of raw component scores into the running statistics (synced across ranks)."""
        local = self._local_moments(components).to(self.stats_mean.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.process_group)
        local = local.cpu()
        k = self.stats_mean.numel()
        n_b, s_b, q_b = local[0], local[1 : 1 + k], local[1 + k :]
        if n_b == 0:
            return
        mean_b_shifted = s_b / n_b
        m2_b = (q_b - s_b * mean_b_shifted).clamp_min(0.0)
        n_a = self.stats_count.detach().cpu()
        n = n_a + n_b
        # Chan et al.: merge (n_a, mean_a, M2_a) with the batch; delta is the shifted batch mean itself.
        new_mean = self.stats_mean.detach().cpu() + mean_b_shifted * (n_b / n)
        new_m2 = self.stats_m2.detach().cpu() + m2_b + mean_b_shifted**2 * (n_a * n_b / n)
        self.stats_count.copy_(n)
        self.stats_mean.copy_(new_mean)
        self.stats_m2.copy_(new_m2)

    def _local_moments(self, components: Mapping[str, Tensor]) -> Tensor:
        """``[1 + 2K]`` float64: batch size, then sums of x - mean and of (x - mean)^2 per component."""
        x = self._stack(components)  # [B, K]
        # Shift by the running mean (identical on every rank) so the sum of squares does not cancel.
        shifted = x - self.stats_mean.detach().cpu()
        return torch.cat([torch.tensor([x.shape[0]], dtype=torch.float64), shifted.sum(0), (shifted**2).sum(0)])

    def normalize(self, components: Mapping[str, Tensor]) -> Tensor:
        """Normalised component scores ``[B, K]`` float64 (CPU), per ``normalization``."""
        x = self._stack(components)
        if self.normalization == "none":
            return x
        mean, std = self.running_stats() if self.normalization == "running" else (self.fixed_mean, self.fixed_std)
        return (x - mean) / std

    def combine(self, components: Mapping[str, Tensor], update_stats: bool = False) -> Tensor:
        """Weighted mean of (normalised) component scores.

        Args:
            components: ``{name: [B]}`` raw scores, e.g. from :meth:`score_components`.
            update_stats: fold this batch into the running statistics first: pass ``True`` for TRAINING batches
                only (and only once per batch), never for evaluation.

        Returns:
            ``[B]`` float32 on CPU.
        """
        if update_stats and self.normalization == "running":
            self.update_stats(components)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        return (self.normalize(components) @ weights / weights.sum()).float()

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        return self.combine(self.score_components(prompts, responses, references))

    def _stack(self, components: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.components if n not in components]
        if missing:
            raise KeyError(f"missing component scores {missing}; expected {self.names}")
        return torch.stack([components[n].detach().to("cpu", torch.float64) for n in self.components], dim=-1)

    # -- torchmetrics interface -------------------------------------------------------------------------------

    def update(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None) -> None:
        """Accumulate per-component raw sums (the base ``total`` state is unused here)."""
        x = self._stack(self.score_components(prompts, responses, references))
        self.component_total += x.sum(0).to(self.component_total)
        self.count += x.shape[0]

    def _component_means(self) -> Tensor:
        return self.component_total.detach().cpu() / self.count.detach().cpu()

    def compute(self) -> Tensor:
        """Weighted mean of the normalised per-component means (normalisation is affine, so this is the mean of
        the per-sample mixture scores when the statistics did not move during evaluation)."""
        means = self._component_means()
        return self.combine({n: means[i : i + 1] for i, n in enumerate(self.components)})[0]

    def compute_components(self) -> dict[str, Tensor]:
        """Per-component RAW means ``{name: scalar float32}``, synced across processes like ``compute``."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            means = self._component_means()
        return {n: means[i].float() for i, n in enumerate(self.components)}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights}, normalization={self.normalization!r}"

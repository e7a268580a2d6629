"""The reward interface: every reward is a torchmetrics ``Metric`` with a per-sample ``score`` for training.

A reward plays two roles. During RL it turns a batch of generated texts into one scalar per sample
(``score``: no state change, no gradient, float32 on CPU). During evaluation it is a metric whose
``update``/``compute`` accumulate a mean that torchmetrics syncs across processes (sum states). Both roles
share one scoring path, so a training curve and an evaluation number can never disagree on the formula.

Reward models (classifiers, sentence encoders, lexicons) live OUTSIDE the ``nn.Module`` tree, in a
:class:`HeldObject`: a policy checkpoint must never contain them, and a weight soup must never average them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["HeldObject", "RewardMetric", "check_batch"]


class HeldObject:
    """A slot for a lazily built object that must stay invisible to ``nn.Module`` machinery.

    ``nn.Module.__setattr__`` registers modules and parameters it sees; a plain object is stored as a
    normal attribute, so whatever is held here is not in ``state_dict()``, ``parameters()`` or ``.to()``.
    Pickling (``ddp_spawn``, checkpoint hyper-parameters) drops the object: the receiving process rebuilds it
    lazily instead of shipping model weights. ``deepcopy`` (``Metric.clone``) shares it: it is read-only.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __getstate__(self) -> dict[str, Any]:
        return {"value": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.value = state.get("value")

    def __deepcopy__(self, memo: dict[int, Any]) -> HeldObject:
        return HeldObject(self.value)

    def __copy__(self) -> HeldObject:
        return HeldObject(self.value)


def check_batch(
    prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None
) -> tuple[list[str], list[str], list[str] | None]:
    """Validate and normalise a batch of texts (lists of equal length; a bare string is a mistake).

    Returns:
        ``(prompts, responses, references)`` as lists; ``references`` stays ``None`` when not given.
    """
    for label, seq in (("prompts", prompts), ("responses", responses), ("references", references)):
        if isinstance(seq, str):
            raise TypeError(f"{label} must be a list of strings, got a single string")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if references is not None:
        references = list(references)
        if len(references) != len(responses):
            raise ValueError(f"got {len(references)} references but {len(responses)} responses")
    return prompts, responses, references


class RewardMetric(Metric):
    """Per-sample scores for training (:meth:`score`), a synced mean for evaluation (``update``/``compute``).

    Subclasses implement :meth:`_score` and, when they hold a model, :meth:`load` (lazy, idempotent).
    Logs use ``name``: ``"train/reward/<name>"``, ``"test/reward/<name>"``.

    Args:
        name: name used in logs; defaults to the class's ``default_name``.
        **kwargs: forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    default_name = "reward"

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name or self.default_name
        # Sum states: torchmetrics all-reduces them with "sum" on compute(), so the mean is exact across ranks
        # whatever the per-rank batch counts.
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    # -- scoring ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Build the underlying reward model now (default: nothing to build). Call it in ``setup`` to fail fast."""

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        """Compute the raw scores of a validated batch. Returns a ``[B]`` tensor (any float dtype/device)."""
        raise NotImplementedError

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None
    ) -> Tensor:
        """Score a batch of texts, one scalar per sample.

        Args:
            prompts: ``B`` prompts (what the policy was conditioned on; see each reward for what it reads).
            responses: ``B`` generated texts (decoded, without the prompt).
            references: optional ``B`` reference texts (real review, article, ...), for rewards that use them.

        Returns:
            ``[B]`` float32 tensor on CPU, detached. The metric's states are left unchanged.
        """
        prompts, responses, references = check_batch(prompts, responses, references)
        if not responses:
            return torch.zeros(0, dtype=torch.float32)
        # Load outside inference mode: weights created inside it would be inference tensors forever.
        self.load()
        with torch.inference_mode():
            out = self._score(prompts, responses, references)
        # Clone out of inference mode: callers may use the scores in autograd code (e.g. as advantages).
        out = out.detach().to("cpu", torch.float32).clone()
        if out.shape != (len(responses),):
            raise RuntimeError(f"{type(self).__name__} returned shape {tuple(out.shape)}, expected ({len(responses)},)")
        return out

    # -- torchmetrics interface -------------------------------------------------------------------------------

    def update(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None) -> None:
        """Add the batch's scores to the running sum and count."""
        scores = self.score(prompts, responses, references)
        self.total += scores.sum().to(self.total)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """Mean score over everything seen since the last ``reset`` (NaN when nothing was seen)."""
        return (self.total / self.count).to(torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def _reward_device(self, override: str | torch.device | None) -> torch.device:
        """Where to run the reward model: the explicit override, else wherever the metric was moved."""
        return torch.device(override) if override is not None else self.device

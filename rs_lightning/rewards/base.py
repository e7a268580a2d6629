"""The reward contract: every reward is a torchmetrics ``Metric`` with a per-sample ``score`` for training.

A reward plays two roles. During RL it turns a batch into one scalar per sample (``score``: no state change,
no gradient, float32 on CPU). During evaluation it is a metric whose ``update``/``compute`` accumulate a mean
that torchmetrics syncs across processes (the sum states ``total`` and ``count``, defined here and nowhere
else). Both roles share one scoring path, so a training curve and an evaluation number can never disagree on
the formula.

What a batch holds depends on the task, so each reward belongs to a family that fixes its fields once:

- :class:`TextRewardMetric`: ``score(prompts, responses, references=None)``, one reference string per sample;
- :class:`CaptionRewardMetric`: ``score(candidates, references=None, images=None)``, a LIST of reference
  captions per image, and the ``[B, 3, S, S]`` images for rewards that look at them (CLIPScore).

The family validates the batch into keyword fields (``_check_batch``); a reward implements ``_score(**fields)``.
Every reward of either family is built by name with ``registry.build_reward``.

Reward models (classifiers, sentence encoders, CLIP, lexicons) live OUTSIDE the ``nn.Module`` tree, in a
:class:`HeldObject`: a policy checkpoint must never contain them, and a weight soup must never average them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from rs_lightning.rewards.caption_ngram import check_pairs

__all__ = ["CaptionRewardMetric", "HeldObject", "RewardMetric", "TextRewardMetric", "check_batch", "check_captions"]


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


def check_captions(
    candidates: Sequence[str], references: Sequence[Sequence[str]] | None = None, images: Tensor | None = None
) -> tuple[list[str], list[Sequence[str]] | None, Tensor | None]:
    """Validate a caption batch: ``B`` captions, optionally ``B`` non-empty reference lists and ``B`` images.

    Returns:
        ``(candidates, references, images)``, the sequences as lists; what was not given stays ``None``.
    """
    if isinstance(candidates, str):
        raise ValueError("candidates must be a sequence of captions, got a single string")
    candidates = list(candidates)
    if references is not None:
        references = list(references)
        check_pairs(candidates, references)
    if images is not None and len(images) != len(candidates):
        raise ValueError(f"got {len(images)} images for {len(candidates)} candidate captions")
    return candidates, references, images


class RewardMetric(Metric):
    """Per-sample scores for training (:meth:`score`), a synced mean for evaluation (``update``/``compute``).

    The base of every reward; a reward subclasses one family (:class:`TextRewardMetric`,
    :class:`CaptionRewardMetric`), which defines the batch, and implements ``_score`` and, when it holds a
    model, :meth:`load` (lazy, idempotent). Logs use ``name``: ``"train/reward/<name>"``, ``"test/reward/<name>"``.

    Args:
        name: name used in logs; defaults to the class's ``default_name``.
        **kwargs: forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    default_name = "reward"
    #: the batch field whose length is the number of samples (set by each family)
    sample_field = ""

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

    def _check_batch(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Validate a batch given as the family's ``score`` arguments; return it as keyword fields."""
        raise NotImplementedError(
            f"{type(self).__name__} belongs to no reward family: subclass TextRewardMetric or CaptionRewardMetric"
        )

    def _score(self, **batch: Any) -> Tensor:
        """Compute the raw scores of a validated batch. Returns a ``[B]`` tensor (any float dtype/device)."""
        raise NotImplementedError

    def score(self, *args: Any, **kwargs: Any) -> Tensor:
        """Score a batch, one scalar per sample; the batch is the family's (see the module docstring).

        Returns:
            ``[B]`` float32 tensor on CPU, detached. The metric's states are left unchanged.
        """
        batch = self._check_batch(*args, **kwargs)
        n = len(batch[self.sample_field])
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        # Load outside inference mode: weights created inside it would be inference tensors forever.
        self.load()
        with torch.inference_mode():
            out = self._score(**batch)
        # Clone out of inference mode: callers may use the scores in autograd code (e.g. as advantages).
        out = out.detach().to("cpu", torch.float32).clone()
        if out.shape != (n,):
            raise RuntimeError(f"{type(self).__name__} returned shape {tuple(out.shape)}, expected ({n},)")
        return out

    # -- torchmetrics interface -------------------------------------------------------------------------------

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add the batch's scores (same arguments as :meth:`score`) to the running sum and count."""
        self._accumulate(self.score(*args, **kwargs))

    def add_scores(self, scores: Tensor) -> None:
        """Add already computed per-sample scores `[B]` (from :meth:`score`) to the running sum and count, so a
        caller that also needs the per-sample values scores each batch once."""
        self._accumulate(scores)
        # What torchmetrics' wrapper around `update` records, which this path bypasses: an update happened (else
        # compute() warns "called before the update method" in every evaluation) and a cached compute() is stale.
        self._update_count += 1
        self._computed = None

    def _accumulate(self, scores: Tensor) -> None:
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


class TextRewardMetric(RewardMetric):
    """A text reward: ``score(prompts, responses, references=None)`` / ``update(...)`` with the same arguments.

    ``prompts`` are what the policy was conditioned on (see each reward for what it reads), ``responses`` the
    ``B`` generated texts (decoded, without the prompt), ``references`` optional ``B`` reference texts (real
    review, article, ...). Subclasses implement ``_score(prompts, responses, references)`` on validated lists.
    """

    sample_field = "responses"

    def _check_batch(
        self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None
    ) -> dict[str, Any]:
        prompts, responses, references = check_batch(prompts, responses, references)
        return {"prompts": prompts, "responses": responses, "references": references}


class CaptionRewardMetric(RewardMetric):
    """A caption reward: ``score(candidates, references=None, images=None)`` / ``update(...)`` alike.

    ``candidates`` are ``B`` generated captions, ``references`` ``B`` non-empty lists of reference captions,
    ``images`` the ``[B, 3, S, S]`` images as the captioner saw them. A reward that needs a field it was not
    given raises ``ValueError``; one that reads the images sets ``needs_images`` (callers skip building them
    otherwise). Subclasses implement ``_score(candidates, references, images)``.
    """

    sample_field = "candidates"
    needs_images = False

    def _check_batch(
        self,
        candidates: Sequence[str],
        references: Sequence[Sequence[str]] | None = None,
        images: Tensor | None = None,
    ) -> dict[str, Any]:
        candidates, references, images = check_captions(candidates, references, images)
        return {"candidates": candidates, "references": references, "images": images}

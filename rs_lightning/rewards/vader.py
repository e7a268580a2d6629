"""VADER sentiment reward: the compound polarity of the response, in [-1, 1] (the offline demo's R1).

VADER (``vaderSentiment``) is a rule-based lexicon scorer: no weights, no device, about 0.2 ms per text.
The lexicon is loaded lazily on first use and kept out of the module tree like every reward model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from rs_lightning.rewards.base import HeldObject, TextRewardMetric

__all__ = ["VaderReward"]


class VaderReward(TextRewardMetric):
    """Compound VADER score of the response (``"positive"`` is high), one float in [-1, 1] per sample.

    Args:
        target: text to score: ``"response"`` (default) or ``"prompt_response"`` (prompt + response, e.g. when
            the prompt ends with a human-written prefix that the continuation extends).
        name: log name (default ``"vader"``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    default_name = "vader"

    def __init__(
        self, target: Literal["response", "prompt_response"] = "response", name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        if target not in ("response", "prompt_response"):
            raise ValueError(f"unknown target {target!r}; expected 'response' or 'prompt_response'")
        self.target = target
        self._held = HeldObject()

    def load(self) -> None:
        """Build the VADER analyzer (reads its lexicon files once)."""
        if self._held.value is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._held.value = SentimentIntensityAnalyzer()

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        self.load()
        texts = responses if self.target == "response" else [p + r for p, r in zip(prompts, responses)]
        return torch.tensor([self._held.value.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)

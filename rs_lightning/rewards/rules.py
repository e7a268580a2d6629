"""Rule-based text rewards (length, keywords): model-free, deterministic, for tests and toy trade-offs.

Two such rewards with opposite pulls (e.g. "be short" vs "mention these words") make a cheap
multi-objective problem on which the whole pipeline (PPO, soups, fronts) can be exercised in seconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rs_lightning.rewards.base import TextRewardMetric

__all__ = ["KeywordReward", "LengthReward", "text_length"]


def text_length(text: str, unit: Literal["words", "chars"] = "words") -> int:
    """Length of ``text`` in whitespace-separated words or in characters."""
    if unit == "words":
        return len(text.split())
    if unit == "chars":
        return len(text)
    raise ValueError(f"unknown unit {unit!r}; expected 'words' or 'chars'")


class LengthReward(TextRewardMetric):
    """Reward for the response's length.

    - ``target`` given: ``-|n - target| / target``, 0 at the target and -1 for an empty response (or a response
      twice as long); symmetric and scale-free, so it mixes with other rewards without tuning.
    - ``target=None``: ``n / scale``, the raw length (verbosity), divided by ``scale``.

    Args:
        target: wanted length (> 0) or ``None``.
        unit: ``"words"`` (whitespace split) or ``"chars"``.
        scale: divisor for the ``target=None`` form.
        name: log name (default ``"length"``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    default_name = "length"

    def __init__(
        self,
        target: int | None = None,
        unit: Literal["words", "chars"] = "words",
        scale: float = 1.0,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if target is not None and target <= 0:
            raise ValueError(f"target length must be > 0 or None, got {target}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        text_length("", unit)  # validates unit
        self.target = target
        self.unit = unit
        self.scale = scale

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        n = torch.tensor([text_length(r, self.unit) for r in responses], dtype=torch.float32)
        if self.target is None:
            return n / self.scale
        return -(n - self.target).abs() / self.target


class KeywordReward(TextRewardMetric):
    """Reward for mentioning keywords in the response.

    - ``mode="presence"``: fraction of the keywords that occur at least once, in [0, 1].
    - ``mode="count"``: total number of occurrences of all keywords (capped at ``max_count`` when given).

    Args:
        keywords: words or phrases to look for (non-empty).
        mode: ``"presence"`` or ``"count"``.
        case_sensitive: match case exactly (default: case-insensitive).
        whole_word: match only at word boundaries (``"good"`` does not match ``"goodness"``).
        max_count: cap for the ``"count"`` mode.
        name: log name (default ``"keyword"``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    default_name = "keyword"

    def __init__(
        self,
        keywords: Sequence[str],
        mode: Literal["presence", "count"] = "presence",
        case_sensitive: bool = False,
        whole_word: bool = True,
        max_count: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if isinstance(keywords, str) or not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"keywords must be a non-empty list of non-empty strings, got {keywords!r}")
        if mode not in ("presence", "count"):
            raise ValueError(f"unknown mode {mode!r}; expected 'presence' or 'count'")
        self.keywords = list(keywords)
        self.mode = mode
        self.max_count = max_count
        flags = 0 if case_sensitive else re.IGNORECASE
        # \b only makes sense next to word characters; a keyword like "!" is matched as-is.
        self._patterns = [
            re.compile(
                rf"\b{re.escape(k)}\b" if whole_word and k[0].isalnum() and k[-1].isalnum() else re.escape(k), flags
            )
            for k in self.keywords
        ]

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        counts = torch.tensor([[len(p.findall(r)) for p in self._patterns] for r in responses], dtype=torch.float32)
        if self.mode == "presence":
            return (counts > 0).float().mean(-1)
        total = counts.sum(-1)
        return total if self.max_count is None else total.clamp(max=self.max_count)

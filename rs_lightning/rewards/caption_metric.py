"""`CaptionMetric`: a COCO caption metric as a caption reward (per-sample rewards, synced mean for evaluation).

Strings cannot be all-gathered by torchmetrics, so the metric does not keep captions: each `update` scores
its batch with `caption.score` (or a cached-df `CiderD`) and adds the scores to the sum/count states of
`RewardMetric`, which torchmetrics reduces with "sum" across processes. `compute` is therefore the mean
PER-CAPTION score, which for BLEU and METEOR is not the corpus-level number papers report: use
`caption.evaluate_corpus` for those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rs_lightning.rewards import caption
from rs_lightning.rewards.base import CaptionRewardMetric

__all__ = ["CaptionMetric"]


class CaptionMetric(CaptionRewardMetric):
    """Mean per-caption score of one caption metric, with per-sample `score` for SCST rewards.

    Called as every caption reward: `score(candidates, references, images=None)` (the images are ignored).
    For `cider_d`, `set_cider_corpus` with the training references (SCST) or the evaluated split's references
    (evaluation: the mean per-caption score then equals pycocoevalcap's corpus CIDEr-D on that split).

    Args:
        metric: a name from `caption.METRICS` (bleu1..bleu4, rouge_l, cider_d, meteor, spice).
        name: log name (default: `metric`).
        cider_corpus: for `cider_d` only: reference lists to take document frequencies from once (the
            training references, each image once). Without it df comes from each batch's references, as
            pycocoevalcap computes it.
        tokenize: apply the fast tokeniser (`caption_text.tokenize`) before scoring.
        **kwargs: forwarded to `torchmetrics.Metric`.
    """

    def __init__(
        self,
        metric: str = "cider_d",
        *,
        name: str | None = None,
        cider_corpus: Sequence[Sequence[str]] | None = None,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name or metric, **kwargs)
        if metric not in caption.METRICS:
            raise ValueError(f"unknown caption metric {metric!r}; choose from {', '.join(caption.METRICS)}")
        if cider_corpus is not None and metric != "cider_d":
            raise ValueError(f"cider_corpus only applies to cider_d, not {metric!r}")
        self.metric = metric
        self.tokenize = tokenize
        self._cider = caption.CiderD(cider_corpus, tokenize=tokenize) if cider_corpus is not None else None

    def set_cider_corpus(self, corpus: Sequence[Sequence[str]]) -> None:
        """Take CIDEr-D document frequencies from `corpus` (one reference list per image) from now on; a no-op
        for the other metrics, so callers can pass the corpus to every caption metric."""
        if self.metric == "cider_d":
            self._cider = caption.CiderD(corpus, tokenize=self.tokenize)

    def _score(self, candidates: list[str], references: list[Sequence[str]] | None, images: Tensor | None) -> Tensor:
        if references is None:
            raise ValueError(f"caption metric {self.metric!r} needs the reference captions, got references=None")
        if self._cider is not None:
            values = self._cider.score(candidates, references)
        else:
            values = caption.score(self.metric, candidates, references, tokenize=self.tokenize)
        return torch.tensor(values, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, metric={self.metric!r}"

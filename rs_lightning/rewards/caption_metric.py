"""`CaptionMetric`: a caption score as a torchmetrics Metric (per-sample rewards, synced mean for evaluation).

Strings cannot be all-gathered by torchmetrics, so the metric does not keep captions: each `update` scores
its batch with `caption.score` (or a cached-df `CiderD`) and adds the scores to sum/count states, which
torchmetrics reduces with "sum" across processes. `compute` is therefore the mean PER-CAPTION score, which
for BLEU and METEOR is not the corpus-level number papers report: use `caption.evaluate_corpus` for those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from rs_lightning.rewards import caption


class CaptionMetric(Metric):
    """Mean per-caption score of one caption metric, with per-sample `score` for SCST rewards.

    Args:
        metric: a name from `caption.METRICS` (bleu1..bleu4, rouge_l, cider_d, meteor, spice).
        cider_corpus: for `cider_d` only: reference lists to take document frequencies from once (the
            training references, each image once). Without it df comes from each batch's references, as
            pycocoevalcap computes it.
        tokenize: apply the fast tokeniser (`caption_text.tokenize`) before scoring.
        **kwargs: forwarded to `torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        metric: str = "cider_d",
        *,
        cider_corpus: Sequence[Sequence[str]] | None = None,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if metric not in caption.METRICS:
            raise ValueError(f"unknown caption metric {metric!r}; choose from {', '.join(caption.METRICS)}")
        if cider_corpus is not None and metric != "cider_d":
            raise ValueError(f"cider_corpus only applies to cider_d, not {metric!r}")
        self.metric = metric
        self.tokenize = tokenize
        self._cider = caption.CiderD(cider_corpus, tokenize=tokenize) if cider_corpus is not None else None
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> Tensor:
        """Per-caption scores of a batch, leaving the metric's states unchanged.

        Args:
            candidates: B generated captions.
            references: B non-empty lists of reference captions.

        Returns:
            `[B]` float32 tensor on CPU.
        """
        if self._cider is not None:
            values = self._cider.score(candidates, references)
        else:
            values = caption.score(self.metric, candidates, references, tokenize=self.tokenize)
        return torch.tensor(values, dtype=torch.float32)

    def update(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Add the batch's per-caption scores to the running sum and count."""
        scores = self.score(candidates, references)
        self.total += scores.sum().to(self.total)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """Mean per-caption score since the last `reset` (NaN when nothing was seen)."""
        return (self.total / self.count).to(torch.float32)

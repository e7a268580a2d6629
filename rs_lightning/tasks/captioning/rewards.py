"""Caption rewards for SCST and evaluation: the COCO metrics, CLIPScore, and the MORL mixture.

Every caption reward is a `rewards.base.CaptionRewardMetric`, the same contract as the text rewards (one base
class, one sum/count state, one `registry.build_reward`), with a caption batch:

- `score(candidates, references=None, images=None) -> [B]` float32 CPU scores, no state change (training
  rewards);
- `update(...)` / `compute()`: the mean per-caption score, summed across processes (evaluation,
  `test/reward/<name>`).

The COCO metrics (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR, SPICE) are `rewards.caption_metric.CaptionMetric`,
built by their names. `CLIPScore` is Hessel et al.'s reference-free score (https://arxiv.org/abs/2104.08718),
w * max(cos(image, "A photo depicts" + caption), 0) with w = 2.5, through any open_clip CLIP (no pretrained
CLIP exists offline: tests use a tiny random one). `CaptionMixture` is the MORL reward
sum_i mu_i R_i / sum_i mu_i on RAW scores (no normalisation, as in the paper).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rs_lightning.rewards import caption
from rs_lightning.rewards.base import CaptionRewardMetric, HeldObject
from rs_lightning.rewards.caption_metric import CaptionMetric
from rs_lightning.rewards.mixture import named_components

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "REWARD_NAMES", "CLIPScore", "CaptionMetric", "CaptionMixture",
           "corpus_metrics"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: the caption rewards `registry.build_reward` builds by name alone (the mixture also needs components)
REWARD_NAMES = (*caption.METRICS, "clipscore")


class CLIPScore(CaptionRewardMetric):
    """CLIPScore (Hessel et al. 2021): w * max(cos(E_image, E_text), 0), reference-free.

    The CLIP is built lazily and held outside the module tree (`HeldObject`): it is never in a captioner's
    state dict, checkpoint or soup. Images arrive preprocessed for the CAPTIONER; they are un-normalised with
    `image_mean`/`image_std`, resized to the CLIP's input size and normalised with the CLIP's own statistics.

    Args:
        model: open_clip CLIP config ("ViT-B-32", ... or "clip-tiny", registered by `model.register_tiny_configs`).
        pretrained: open_clip tag (needs the hub) or a local checkpoint; None: random weights (tests only).
        weight: w (2.5 in the paper).
        prefix: text prepended to each caption ("A photo depicts" in the paper).
        image_mean, image_std: the normalisation of the incoming images.
        name: log name (default "clipscore").
        **kwargs: forwarded to `torchmetrics.Metric`.
    """

    default_name = "clipscore"
    needs_images = True

    def __init__(self, model: str = "clip-tiny", pretrained: str | None = None, weight: float = 2.5,
                 prefix: str = "A photo depicts", image_mean: Sequence[float] = OPENAI_MEAN,
                 image_std: Sequence[float] = OPENAI_STD, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.model_name, self.pretrained = model, pretrained
        self.weight, self.prefix = weight, prefix
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._clip = HeldObject()

    def load(self) -> None:
        """Build the CLIP and its tokenizer now (idempotent)."""
        if self._clip.value is not None:
            return
        import open_clip

        from rs_lightning.tasks.captioning.model import register_tiny_configs

        register_tiny_configs()
        # weights_only=True: a pretrained checkpoint is read without running pickled code. It is the default of
        # the pinned open_clip_torch 3.3.0; said here so another version cannot quietly load with full pickle.
        clip = open_clip.create_model(self.model_name, pretrained=self.pretrained, weights_only=True)
        clip = clip.eval().requires_grad_(False)
        self._clip.value = (clip, open_clip.get_tokenizer(self.model_name), clip.visual.preprocess_cfg)

    def _prepare_images(self, images: Tensor, cfg: dict, device: torch.device) -> Tensor:
        shape = (1, -1, 1, 1)
        mean_in = torch.tensor(self.image_mean, device=device).view(shape)
        std_in = torch.tensor(self.image_std, device=device).view(shape)
        x = images.to(device, torch.float32) * std_in + mean_in
        size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(cfg["mean"], device=device).view(shape)
        std = torch.tensor(cfg["std"], device=device).view(shape)
        return (x - mean) / std

    def _score(self, candidates: list[str], references: list[Sequence[str]] | None, images: Tensor | None) -> Tensor:
        if images is None:
            raise ValueError("CLIPScore needs one image per candidate caption, got images=None")
        clip, tokenizer, cfg = self._clip.value
        device = images.device
        # `score` runs this in inference mode: moving the CLIP there would turn its weights into inference tensors.
        with torch.inference_mode(False):
            clip.to(device)
        image_features = F.normalize(clip.encode_image(self._prepare_images(images, cfg, device)), dim=-1)
        texts = [f"{self.prefix} {c}".strip() for c in candidates]
        text_features = F.normalize(clip.encode_text(tokenizer(texts).to(device)), dim=-1)
        cosine = (image_features * text_features).sum(-1)
        return self.weight * cosine.clamp_min(0)


class CaptionMixture(CaptionRewardMetric):
    """The MORL caption reward sum_i mu_i R_i / sum_i mu_i of its components' RAW per-caption scores.

    Args:
        components: `{name: caption reward}`, or a list of caption rewards (named by their `name`).
        weights: mu, one non-negative weight per component, in order (not all zero); divided by their sum.
        name: log name (default "mixture").
        **kwargs: forwarded to `torchmetrics.Metric`.
    """

    default_name = "mixture"

    def __init__(self, components: dict[str, CaptionRewardMetric] | list[CaptionRewardMetric],
                 weights: list[float], name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.components = nn.ModuleDict(named_components(components, CaptionRewardMetric))
        self.weights = [float(w) for w in weights]
        if len(self.weights) != len(self.components):
            raise ValueError(f"got {len(self.weights)} weights for {len(self.components)} components {self.names}")
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"reward weights must be finite, >= 0 and not all zero, got "
                             f"{dict(zip(self.names, self.weights))}")

    @property
    def names(self) -> list[str]:
        """Component names, in weight order."""
        return list(self.components)

    @property
    def needs_images(self) -> bool:  # type: ignore[override]
        return any(c.needs_images for c in self.components.values())

    def load(self) -> None:
        """Load every component's model (outside inference mode, before `score` enters it)."""
        for reward in self.components.values():
            reward.load()

    def score_components(self, candidates: Sequence[str], references: Sequence[Sequence[str]] | None = None,
                         images: Tensor | None = None) -> dict[str, Tensor]:
        """RAW per-caption scores of every component, `{name: [B] float32 CPU}` (no state change)."""
        return {name: reward.score(candidates, references, images) for name, reward in self.components.items()}

    def combine(self, components: Mapping[str, Tensor]) -> Tensor:
        """sum_i mu_i R_i / sum_i mu_i of `{name: scores}` (e.g. from `score_components`), same shape, float32."""
        missing = [n for n in self.components if n not in components]
        if missing:
            raise KeyError(f"missing component scores {missing}; expected {self.names}")
        total = sum(self.weights)
        # float32 products summed in component order: the arithmetic every captioning run so far was trained with.
        return sum(components[n].to(torch.float32) * (w / total) for n, w in zip(self.components, self.weights))

    def _score(self, candidates: list[str], references: list[Sequence[str]] | None, images: Tensor | None) -> Tensor:
        return self.combine(self.score_components(candidates, references, images))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights}"


def corpus_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """pycocoevalcap's corpus numbers (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) with the PTB tokenizer; without
    Java, the fast tokenizer and no METEOR."""
    java = shutil.which("java") is not None
    names = [m for m in caption.DEFAULT_CORPUS_METRICS if java or m != "meteor"]
    values = caption.evaluate_corpus(candidates, references, names, tokenizer="ptb" if java else "fast")
    return {name: float(value) for name, value in values.items()}

"""Caption rewards for SCST and evaluation: the COCO metrics, CLIPScore, and the MORL mixture.

The text task's `RewardMetric` scores one reference string per sample; a caption has a LIST of references and
CLIPScore also needs the image, so captions use this small interface instead, still torchmetrics Metrics:

- `score(candidates, references, images=None) -> [B]` float32 CPU scores, no state change (training rewards);
- `update(...)` / `compute()`: the mean per-caption score, summed across processes (evaluation,
  `test/reward/<name>`).

`CaptionReward` wraps `rewards.caption_metric.CaptionMetric` (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR, SPICE):
for `cider_d` call `set_cider_corpus` with the training references (SCST) or the evaluated split's
references (evaluation: the mean per-caption score then equals pycocoevalcap's corpus CIDEr-D on that split).
`CLIPScore` is Hessel et al.'s reference-free score, w * max(cos(image, "A photo depicts" + caption), 0)
with w = 2.5, through any open_clip CLIP (no pretrained CLIP exists offline: tests use a tiny random one).
`mixture` is the MORL reward sum_i mu_i R_i / sum_i mu_i on RAW scores (no normalisation, as in the paper).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from rs_lightning.rewards import caption
from rs_lightning.rewards.base import HeldObject
from rs_lightning.rewards.caption_metric import CaptionMetric

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_NAMES = (*caption.METRICS, "clipscore")


class CaptionReward(CaptionMetric):
    """A COCO caption metric as a named reward (see the module docstring).

    Args:
        metric: bleu1..bleu4, rouge_l, cider_d, meteor or spice.
        name: log name (default: `metric`).
        cider_corpus: `cider_d` only: reference lists to take document frequencies from.
        **kwargs: forwarded to `CaptionMetric`.
    """

    def __init__(self, metric: str, name: str | None = None, cider_corpus: Sequence[Sequence[str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(metric, cider_corpus=cider_corpus, **kwargs)
        self.name = name or metric

    def set_cider_corpus(self, corpus: Sequence[Sequence[str]]) -> None:
        """Take CIDEr-D document frequencies from `corpus` (one reference list per image) from now on."""
        if self.metric == "cider_d":
            self._cider = caption.CiderD(corpus, tokenize=self.tokenize)

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]],
              images: Tensor | None = None) -> Tensor:
        """`[B]` float32 per-caption scores (`images` is unused)."""
        return super().score(candidates, references)

    def update(self, candidates: Sequence[str], references: Sequence[Sequence[str]],
               images: Tensor | None = None) -> None:
        super().update(candidates, references)


class CLIPScore(Metric):
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
        name: log name.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, model: str = "clip-tiny", pretrained: str | None = None, weight: float = 2.5,
                 prefix: str = "A photo depicts", image_mean: Sequence[float] = OPENAI_MEAN,
                 image_std: Sequence[float] = OPENAI_STD, name: str = "clipscore", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name, self.model_name, self.pretrained = name, model, pretrained
        self.weight, self.prefix = weight, prefix
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._clip = HeldObject()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def load(self) -> None:
        """Build the CLIP and its tokenizer now (idempotent)."""
        if self._clip.value is not None:
            return
        import open_clip

        from rs_lightning.tasks.captioning.model import register_tiny_configs

        register_tiny_configs()
        clip = open_clip.create_model(self.model_name, pretrained=self.pretrained).eval().requires_grad_(False)
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

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]] | None = None,
              images: Tensor | None = None) -> Tensor:
        """`[B]` float32 CLIPScores of `candidates` for `images` (`[B, 3, S, S]`); references are unused."""
        if images is None or len(images) != len(candidates):
            raise ValueError("CLIPScore needs one image per candidate caption")
        self.load()
        clip, tokenizer, cfg = self._clip.value
        device = images.device
        clip.to(device)
        with torch.inference_mode():
            image_features = F.normalize(clip.encode_image(self._prepare_images(images, cfg, device)), dim=-1)
            texts = [f"{self.prefix} {c}".strip() for c in candidates]
            text_features = F.normalize(clip.encode_text(tokenizer(texts).to(device)), dim=-1)
            cosine = (image_features * text_features).sum(-1)
        return (self.weight * cosine.clamp_min(0)).detach().to("cpu", torch.float32).clone()

    def update(self, candidates: Sequence[str], references: Sequence[Sequence[str]] | None = None,
               images: Tensor | None = None) -> None:
        scores = self.score(candidates, references, images)
        self.total += scores.sum().to(self.total)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).to(torch.float32)


def build_reward(name: str, *, clip_model: str = "clip-tiny", clip_pretrained: str | None = None,
                 image_mean: Sequence[float] = OPENAI_MEAN, image_std: Sequence[float] = OPENAI_STD) -> Metric:
    """A reward by name: a COCO metric (`caption.METRICS`) or "clipscore"."""
    if name == "clipscore":
        return CLIPScore(clip_model, clip_pretrained, image_mean=image_mean, image_std=image_std)
    if name not in caption.METRICS:
        raise ValueError(f"unknown caption reward {name!r}; choose from {', '.join(REWARD_NAMES)}")
    return CaptionReward(name)


def corpus_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """pycocoevalcap's corpus numbers (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) with the PTB tokenizer; without
    Java, the fast tokenizer and no METEOR."""
    java = shutil.which("java") is not None
    names = [m for m in caption.DEFAULT_CORPUS_METRICS if java or m != "meteor"]
    values = caption.evaluate_corpus(candidates, references, names, tokenizer="ptb" if java else "fast")
    return {name: float(value) for name, value in values.items()}


def mixture(components: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """MORL reward: sum_i mu_i R_i / sum_i mu_i over RAW per-sample scores.

    Args:
        components: `{name: [...]}` scores of the same shape.
        weights: `{name: mu}`, non-negative, not all zero; every name must be in `components`.

    Returns:
        The weighted mean, same shape as the components.
    """
    total = sum(float(w) for w in weights.values())
    if any(float(w) < 0 for w in weights.values()) or total <= 0:
        raise ValueError(f"reward weights must be >= 0 and not all zero, got {dict(weights)}")
    return sum(components[name].to(torch.float32) * (float(w) / total) for name, w in weights.items())

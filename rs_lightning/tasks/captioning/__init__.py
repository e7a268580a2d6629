"""Image captioning (paper §3.2): CoCa captioners trained with XE, then SCST experts per caption metric.

- `model`: open_clip CoCa loading, the tiny offline configs, tokenizer, image transforms, weight files;
- `decoding`: sampling, greedy and beam search with exact log-probs, teacher forcing;
- `synthetic`, `coco`, `data`: the offline caption set, COCO (Karpathy split), the LightningDataModule;
- `rewards`: COCO metrics and CLIPScore as caption rewards, the MORL mixture (`CaptionMixture`);
- `module`, `schedule`, `export`: the LightningModule (XE and SCST), the paper's optimiser, expert export.

Importing this package is cheap; the names below load their module on first access.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "CaptionDataModule": "data",
    "CaptioningModule": "module",
    "CaptionDecoder": "decoding",
    "CaptionMetric": "rewards",
    "CaptionMixture": "rewards",
    "CLIPScore": "rewards",
    "CaptionTokenizer": "model",
    "ExportCaptioner": "export",
    "KarpathyCOCO": "coco",
    "SyntheticCaptions": "synthetic",
    "export_captioner": "export",
    "load_coca": "model",
    "TINY_COCA": "model",
    "TINY_CLIP": "model",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

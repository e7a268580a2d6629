"""Text tasks (paper §3.1, LLaMA RLHF experiments): prompts, datasets, model loading, the LightningDataModule.

- `model_loading`: `load_causal_lm`, the offline default `OFFLINE_DEFAULT_MODEL` (SmolLM2-135M-Instruct from
  a packaged GGUF), `tiny_random_causal_lm` for tests;
- `prompts`: the Alpaca and chat templates and the reference-prefix trick;
- `datasets`: one function per prompt source with the paper's filters;
- `data`: `PromptDataModule`, left-padded batches with the texts rewards need.

Importing this package is cheap; the names below load their module on first access.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PromptDataModule": "data",
    "LeftPadCollator": "data",
    "load_causal_lm": "model_loading",
    "load_tokenizer": "model_loading",
    "tiny_random_causal_lm": "model_loading",
    "OFFLINE_DEFAULT_MODEL": "model_loading",
    "TINY_RANDOM_MODEL": "model_loading",
    "load_examples": "datasets",
    "build_query": "prompts",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

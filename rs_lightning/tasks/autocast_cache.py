"""Cast each weight once per decode, not once per decoding step, under mixed precision.

Lightning's mixed-precision plugins enter `torch.autocast(..., cache_enabled=False)` around every step
(lightning/pytorch/plugins/precision/amp.py). Without the cache, autocast casts a weight to bf16/fp16 at each use,
so an autoregressive decode of T tokens casts every weight T times: for SmolLM2-135M under `bf16-mixed` on CPU the
casts cost more than the bf16 matmuls save (benchmarks/RESULTS.md, "PPO step throughput").

`weight_cast_cache(model)` re-enters autocast with its cache on for a no-grad decode. Autocast caches the casts of
leaf tensors that require grad (torch/csrc/autograd/autocast_mode.cpp, `cached_cast`), so the frozen base weights
are marked as requiring grad for the duration, under `torch.no_grad()`, where no graph is built, and restored on
exit. A cached cast is the same cast, so decoding gives the same tokens and log-probs bit for bit; only the number
of casts changes. Outside autocast (fp32 runs) the context does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _autocast_device(model: nn.Module) -> str | None:
    """The device type autocast is enabled for that this model's parameters live on, or None."""
    for p in model.parameters():
        kind = p.device.type
        return kind if torch.is_autocast_enabled(kind) else None
    return None


@contextlib.contextmanager
def weight_cast_cache(model: nn.Module) -> Iterator[None]:
    """Around a no-grad decode of `model`: autocast casts each floating weight once and reuses it (see module doc).

    Raises RuntimeError if entered with grad enabled: marking frozen weights as requiring grad would then train them.
    """
    device = _autocast_device(model)
    if device is None:
        yield
        return
    if torch.is_grad_enabled():
        raise RuntimeError("weight_cast_cache is for decoding under torch.no_grad(): grad mode is enabled")
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point() and p.is_leaf
              and not p._is_view()]  # views (FSDP's) are never cached
    dtype = torch.get_autocast_dtype(device)
    try:
        with torch.autocast(device, dtype=dtype, cache_enabled=True):
            for p in frozen:
                p.requires_grad_(True)
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        # The casts must not outlive the decode: the weights change at the next optimiser step or soup.
        torch.clear_autocast_cache()

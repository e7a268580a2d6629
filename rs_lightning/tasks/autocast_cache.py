"""Cast each weight once per decode, not once per decoding step, under mixed precision (text and captioning).

Lightning's mixed-precision plugins enter `torch.autocast(..., cache_enabled=False)` around every step
(lightning/pytorch/plugins/precision/amp.py). Without the cache, autocast casts a weight to bf16/fp16 at each use,
so an autoregressive decode of T tokens casts every weight T times: for SmolLM2-135M under `bf16-mixed` on CPU the
casts cost more than the bf16 matmuls save (benchmarks/RESULTS.md, "PPO step throughput").

`weight_cast_cache(model)` re-enters autocast with its cache on for a no-grad decode. Autocast caches the casts of
leaf tensors that require grad (torch/csrc/autograd/autocast_mode.cpp, `cached_cast`), so the frozen base weights
are marked as requiring grad for the duration, under `torch.no_grad()`, where no graph is built, and restored on
exit. A cached cast is the same cast, so decoding gives the same tokens and log-probs bit for bit; only the number
of casts changes. Outside autocast (fp32 runs) the context does nothing.

`frozen_linear_casts(model)` does the same for a whole training step, forward and backward: each frozen weight of
an `nn.Linear` (a LoRA model's base layers, its LM head) is cast once and the cast stands in for the fp32 weight
until the step ends. Autocast would cast it at every forward (the reference pass, each PPO mini-batch) to the same
values, so the step computes the same numbers; the fp32 weights come back on exit, untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

# ids of the frozen parameters a running `weight_cast_cache` has marked as requiring grad: what reads the flag to
# tell trainable from frozen (a checkpoint that Lightning's SLURM requeue handler writes in the middle of a decode,
# tasks/text/policy.without_frozen) asks `marked_for_casting` first.
_MARKED: set[int] = set()


def marked_for_casting(p: torch.Tensor) -> bool:
    """True while `p` is frozen but marked as requiring grad by `weight_cast_cache`."""
    return id(p) in _MARKED


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
    dtype = torch.get_autocast_dtype(device)
    # Views (FSDP's) are never cached; tensors already in the autocast dtype (frozen_linear_casts) need no cast.
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point() and p.dtype != dtype
              and p.is_leaf and not p._is_view()]
    try:
        with torch.autocast(device, dtype=dtype, cache_enabled=True):
            for p in frozen:
                _MARKED.add(id(p))
                p.requires_grad_(True)
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
            _MARKED.discard(id(p))
        # The casts must not outlive the decode: the weights change at the next optimiser step or soup.
        torch.clear_autocast_cache()


def cast_once_per_decode(method: Callable) -> Callable:
    """Decorator for a no-grad decoding method of an object whose `model` attribute is the module it runs: the
    body runs inside `weight_cast_cache(self.model)`. Put it under `@torch.no_grad()`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with weight_cast_cache(self.model):
            return method(self, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def frozen_linear_casts(model: nn.Module) -> Iterator[None]:
    """Under autocast: the frozen weights (and biases) of `model`'s `nn.Linear` layers are replaced, for the body of
    the context, by their casts to the autocast dtype, made once here; restored on exit. A no-op outside autocast.

    Only plain `nn.Linear` forwards are touched: autocast casts every argument of `F.linear` to its dtype, so the
    pre-cast tensor gives the same result. Other frozen tensors (embeddings, norms) are used in fp32 by autocast and
    are left alone; trainable weights stay fp32 (the optimiser steps them). The base layer of a PEFT LoRA variant
    (DoRA: its weight norm reads the base weight outside the layer's forward, in fp32) is left alone too.
    """
    device = _autocast_device(model)
    if device is None:
        yield
        return
    dtype = torch.get_autocast_dtype(device)
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    casts: dict[int, torch.Tensor] = {}  # one cast per tensor (an LM head tied elsewhere is cast once)
    read_elsewhere = {id(m.base_layer) for m in model.modules() if _is_lora_variant(m)}
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
                    continue
                if id(module) in read_elsewhere:
                    continue
                for name in ("weight", "bias"):
                    p = module._parameters.get(name)
                    if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype or p._is_view():
                        continue
                    cast = casts.get(id(p))
                    if cast is None:
                        cast = casts[id(p)] = p.to(dtype)
                    swapped.append((module, name, p))
                    module._parameters[name] = cast
        yield
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


def _is_lora_variant(module: nn.Module) -> bool:
    """A PEFT LoRA layer whose adapter is a variant (DoRA and later ones: `lora_variant`; `use_dora` in older PEFT)
    that may read its base layer's weight directly, not only through the base layer's forward."""
    if not hasattr(module, "base_layer"):
        return False
    variants = getattr(module, "lora_variant", None) or {}
    dora = getattr(module, "use_dora", None) or {}
    return bool(variants) or any(dora.values())

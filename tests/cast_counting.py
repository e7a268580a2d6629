"""Counting autocast's weight casts: the tests of `rs_lightning.tasks.autocast_cache` (text and captioning)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class WeightCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 casts (`aten._to_copy`) whose input shares storage with one of `weights`: autocast
    casting those weights, or views of them (`count`)."""

    def __init__(self, weights):
        super().__init__()
        self.pointers, self.count = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and args[0].dtype == torch.float32 and args[0].data_ptr() in self.pointers):
            self.count += 1
        return func(*args, **kwargs)

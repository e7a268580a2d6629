"""The attention kernel of a training forward on CPU in half precision: PyTorch's math backend, not flash.

Under bf16 (or fp16) on CPU, `F.scaled_dot_product_attention` picks PyTorch's CPU flash-attention kernel, whose
backward is slow in half precision: on a SmolLM2-135M mini-batch's shape ([4, 9, 82, 64], one thread) forward +
backward took 9.6 ms with it and 4.6 ms with the math backend, against 3.4 ms for flash in fp32 (medians,
benchmarks/bench_cpu_attention.py). Against a float64 reference the math backend is no less accurate (max error
relative to the largest value, on the output and on the q, k, v gradients: flash 3.3e-3 to 8.9e-3, math 3.2e-3
to 4.5e-3, the rounding of bf16 itself; benchmarks/RESULTS.md), so the choice changes the rounding, not the
accuracy; the optimisation phase of a bf16-mixed PPO iteration at batch 16 went from 3.28 to
2.84-2.87 s (benchmarks/RESULTS.md, "PPO step throughput").

Only the forwards whose backward will run (PPO's mini-batches) use it: a no-grad forward (rollouts, the reference
pass, evaluation) keeps flash, whose forward is the faster one. GPUs are left to PyTorch's own choice.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def half_precision_on_cpu(model: nn.Module, device: torch.device | str | None = None) -> bool:
    """Whether `model` computes in bf16/fp16 on CPU: under CPU autocast to a half dtype, or with half weights.

    `device`: where the forward's inputs are, i.e. where it computes (default: the first parameter's device). It
    decides, not the parameters': FSDP with CPU offload keeps parameters on the CPU and computes on the GPU."""
    param = next(model.parameters(), None)
    if param is None:
        return False
    if torch.device(device if device is not None else param.device).type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in HALF:
        return True
    return param.dtype in HALF


def attention_for_backward(model: nn.Module,
                           device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """A context for a forward of `model` on `device` that will be differentiated: the math SDPA backend where
    `model` runs in half precision on CPU (see the module docstring), otherwise nothing changes.

    The backend is chosen when the forward runs, and the backward follows it. (An activation-checkpointed forward
    would recompute outside this context, with flash: keep the two consistent if checkpointing is ever added.)"""
    if not torch.is_grad_enabled() or not half_precision_on_cpu(model, device):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])

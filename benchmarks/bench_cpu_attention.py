"""Attention forward + backward on CPU at the shape of a PPO mini-batch: which SDPA backend
`tasks/cpu_attention.attention_for_backward` should pick in half precision.

Shape: SmolLM2-135M's attention (9 query heads of 64) on a mini-batch of 4 sequences of 82 tokens (a ~58-token
chat prompt + 24 response tokens), with a causal mask that has left padding. Each case times forward + backward of
`F.scaled_dot_product_attention` under one backend (flash or math) and dtype (fp32, bf16).

Run: `OMP_NUM_THREADS=1 pytest benchmarks/bench_cpu_attention.py` (the PPO iteration runs its stages on 1 thread
in `rs demo`); the milliseconds per forward + backward are in the benchmark table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPE = (4, 9, 82, 64)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_forward_backward(benchmark, machine, backend, dtype):
    g = torch.Generator().manual_seed(0)
    b, h, t, d = SHAPE
    q, k, v = (torch.randn(SHAPE, generator=g).to(DTYPES[dtype]).requires_grad_() for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    mask[0, :, :, :5] = False  # row 0 is left-padded by 5 tokens; its pad rows attend to themselves
    mask[0, :, torch.arange(5), torch.arange(5)] = True

    def step():
        with sdpa_kernel([BACKENDS[backend]]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().sum().backward()

    benchmark.extra_info.update(machine=machine, shape=list(SHAPE), threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)

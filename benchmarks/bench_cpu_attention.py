"""Attention on CPU at the shape of a PPO mini-batch: which SDPA backend `tasks/cpu_attention.attention_for_backward`
should pick in half precision, by time and by error.

Shape: SmolLM2-135M's attention (9 query heads of 64) on a mini-batch of 4 sequences of 82 tokens (a ~58-token
chat prompt + 24 response tokens), with a causal mask that has left padding. Each case times
`F.scaled_dot_product_attention` under one backend (flash or math) and dtype (fp32, bf16), forward alone (what the
no-grad rollouts and reference pass run) or forward + backward (what a PPO mini-batch runs). `extra_info["errors"]`
holds each case's max error against a float64 math reference, relative to the reference's largest magnitude, for
the output and the q, k, v gradients.

Run: `OMP_NUM_THREADS=1 pytest benchmarks/bench_cpu_attention.py` (`rs demo` runs each stage on 1 thread); the
milliseconds are in the benchmark table, the errors in `--benchmark-json`'s extra_info.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPE = (4, 9, 82, 64)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs():
    g = torch.Generator().manual_seed(0)
    b, h, t, d = SHAPE
    q, k, v = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    mask[0, :, :, :5] = False  # row 0 is left-padded by 5 tokens; its pad rows attend to themselves
    mask[0, :, torch.arange(5), torch.arange(5)] = True
    return (q, k, v), grad, mask


def output_and_grads(qkv, grad, mask, backend, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in qkv)
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (out.double() * grad).sum().backward()
    return [out.double(), q.grad.double(), k.grad.double(), v.grad.double()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
def test_attention(benchmark, machine, passes, backend, dtype):
    qkv, grad, mask = inputs()
    reference = output_and_grads(qkv, grad, mask, SDPBackend.MATH, torch.float64)
    measured = output_and_grads(qkv, grad, mask, BACKENDS[backend], DTYPES[dtype])
    errors = {name: float((m - r).abs().max() / r.abs().max())
              for name, m, r in zip(("out", "dq", "dk", "dv"), measured, reference)}
    q, k, v = (x.detach().to(DTYPES[dtype]).requires_grad_(passes != "forward") for x in qkv)

    def step():
        with sdpa_kernel([BACKENDS[backend]]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if passes != "forward":
            out.float().sum().backward()

    benchmark.extra_info.update(machine=machine, shape=list(SHAPE), threads=torch.get_num_threads(), errors=errors)
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)

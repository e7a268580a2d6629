"""The training forward's attention kernel under half precision on CPU (tasks/cpu_attention.py): the math SDPA
backend replaces flash only where a backward follows, and the gradients stay those of bf16 attention."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from rs_lightning.tasks.cpu_attention import attention_for_backward, half_precision_on_cpu


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as the rollouts have
    return ids, mask


def attention_ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def forward_backward(model, context: bool):
    ids, mask = batch()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = attention_for_backward(model) if context else torch.enable_grad()
        with ctx:
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    out.logits.float().logsumexp(-1).sum().backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_half_precision_on_cpu_reads_autocast_and_weights():
    model = tiny_llama()
    assert not half_precision_on_cpu(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half_precision_on_cpu(model)
        # Inputs elsewhere (FSDP's CPU offload keeps parameters here and computes on the GPU): not a CPU forward.
        assert not half_precision_on_cpu(model, "cuda")
    assert half_precision_on_cpu(tiny_llama(torch.bfloat16))
    assert not half_precision_on_cpu(torch.nn.Module())  # no parameters: nothing to decide


def test_math_backend_only_for_half_precision_forwards_with_grad():
    model = tiny_llama()
    flash = attention_ops(lambda: forward_backward(model, context=False))
    math = attention_ops(lambda: forward_backward(model, context=True))
    assert any("flash_attention" in k for k in flash), flash
    assert not any("flash_attention" in k for k in math), math
    assert any("_scaled_dot_product_attention_math" in k for k in math), math
    # No grad (rollouts, the reference pass): flash stays, its forward is the faster one.
    ids, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), attention_for_backward(model):
        ops = attention_ops(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
    assert any("flash_attention" in k for k in ops), ops


def test_math_backend_gradients_as_close_to_float64_as_flash():
    model = tiny_llama()
    math, flash = forward_backward(model, context=True), forward_backward(model, context=False)
    reference_model = tiny_llama(torch.float64)
    ids, mask = batch()
    out = reference_model(input_ids=ids, attention_mask=mask, use_cache=False)
    out.logits.logsumexp(-1).sum().backward()
    reference = {n: p.grad for n, p in reference_model.named_parameters() if p.grad is not None}
    assert math.keys() == flash.keys() == reference.keys()
    for name, ref in reference.items():
        scale = ref.abs().max().clamp_min(1e-12)
        err_math = float((math[name] - ref).abs().max() / scale)
        err_flash = float((flash[name] - ref).abs().max() / scale)
        # bf16 rounding (2^-8 relative) through two layers: both backends within a few per cent of float64, and
        # the math backend about as far from it as flash.
        assert err_math < 0.05, (name, err_math)
        assert err_math <= 1.5 * err_flash + 1e-3, (name, err_math, err_flash)


def test_full_precision_forward_untouched():
    model = tiny_llama()
    ids, mask = batch()

    def run():
        with attention_for_backward(model):
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().backward()

    assert any("flash_attention" in k for k in attention_ops(run))

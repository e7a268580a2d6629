"""Under mixed precision, weights cast once (`weight_cast_cache` per decode, `frozen_linear_casts` per training
step) with the same tokens, losses and gradients bit for bit."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from rs_lightning.tasks.autocast_cache import frozen_linear_casts, weight_cast_cache
from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm
from rs_lightning.tasks.text.policy import attach_lora
from rs_lightning.tasks.text.rollout import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cast_counting import WeightCasts  # noqa: E402


@pytest.fixture(scope="module")
def policy():
    base, tokenizer = tiny_random_causal_lm(vocab_size=96, hidden_size=48, num_layers=2)
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                        init_adapter=None, lora_init_seed=0)
    model.eval()
    return model, tokenizer


def _decode(model, tokenizer, cached: bool, steps: int = 7):
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        # cache_enabled=False: what Lightning's bf16-mixed plugin enters around every step.
        if cached:
            with weight_cast_cache(model):
                return generate(model, tokenizer, ids, mask, [steps] * 3, with_logprobs=True)
        return generate(model, tokenizer, ids, mask, [steps] * 3, with_logprobs=True)


def test_same_tokens_and_logprobs_bit_for_bit(policy):
    model, tokenizer = policy
    plain, cached = _decode(model, tokenizer, False), _decode(model, tokenizer, True)
    assert torch.equal(plain.response_ids, cached.response_ids)
    assert torch.equal(plain.logprobs, cached.logprobs)


def test_each_weight_cast_once_per_decode(policy):
    model, tokenizer = policy
    matrices = [p for p in model.parameters() if p.dim() == 2]
    counts = {}
    for cached in (False, True):
        with WeightCasts(matrices) as casts:
            _decode(model, tokenizer, cached, steps=7)
        counts[cached] = casts.count
    n_matrices = len(matrices)
    # Without the cache every matrix but the embedding (a lookup, not cast) is cast at every one of the 7 steps;
    # with it, at most once per decode.
    assert counts[False] >= 7 * (n_matrices - 1)
    assert 0 < counts[True] <= n_matrices


def test_frozen_flags_restored_even_on_error(policy):
    model, _ = policy
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(before.values()) and any(before.values())  # a frozen base and a trainable adapter
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with pytest.raises(ValueError, match="boom"):
            with weight_cast_cache(model):
                assert all(p.requires_grad for p in model.parameters())
                raise ValueError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_does_nothing_outside_autocast_and_refuses_grad_mode(policy):
    model, _ = policy
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with weight_cast_cache(model):  # fp32: no autocast, nothing to cache, grad mode allowed
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with pytest.raises(RuntimeError, match="no_grad"):
            with weight_cast_cache(model):
                pass
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def _loss_and_grads(model, cast: bool):
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with frozen_linear_casts(model) if cast else contextlib.nullcontext():
            logits = model(input_ids=ids).logits
            loss = torch.log_softmax(logits.float(), -1)[..., 5].mean()
            loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _variant(kind: str):
    """A tiny LoRA model: "lora" (the policy fixture's kind), "dora" (its weight norm reads the frozen base weight
    outside the Linear's forward) or "tied" (the LM head is the embedding matrix, as SmolLM2's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "tied")
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=kind == "dora",
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    if kind == "tied":
        assert base.lm_head.weight is base.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("kind", ["lora", "dora", "tied"])
def test_frozen_linear_casts_same_loss_and_grads_bit_for_bit(kind):
    model = _variant(kind)
    model.train()
    loss, grads = _loss_and_grads(model, cast=False)
    loss_cast, grads_cast = _loss_and_grads(model, cast=True)
    assert grads and grads.keys() == grads_cast.keys()
    assert torch.equal(loss, loss_cast)
    for name in grads:
        assert torch.equal(grads[name], grads_cast[name]), name


def test_frozen_linear_casts_swaps_only_frozen_linear_weights_and_restores_them(policy):
    model, _ = policy
    before = {n: p for n, p in model.named_parameters()}
    linear_weights = {f"{m}.weight" for m, mod in model.named_modules() if type(mod) is torch.nn.Linear}
    assert any(n.endswith("base_layer.weight") for n in linear_weights)  # the LoRA-wrapped layers' own Linear
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with frozen_linear_casts(model):
            inside = dict(model.named_parameters(remove_duplicate=False))
            for name, p in before.items():
                if name in linear_weights and not p.requires_grad:
                    assert inside[name].dtype == torch.bfloat16, name
                    assert torch.equal(inside[name], p.to(torch.bfloat16)), name
                else:  # trainable adapters, embeddings, norms: the fp32 parameters themselves
                    assert inside[name] is p, name
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    with frozen_linear_casts(model):  # fp32: nothing swapped
        assert all(a is b for a, b in zip(model.parameters(), before.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with pytest.raises(ValueError, match="boom"):
            with frozen_linear_casts(model):
                raise ValueError("boom")
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p for n, p in before.items())


def test_frozen_linear_casts_leaves_dora_base_layers_alone():
    model = _variant("dora")
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer")]
    assert bases
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), frozen_linear_casts(model):
        assert all(b.weight.dtype == torch.float32 for b in bases)
        assert model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # not a LoRA target


def test_a_checkpoint_taken_during_a_cached_decode_still_leaves_the_frozen_base_out(policy):
    """Lightning's SLURM requeue handler may save a checkpoint in the middle of a decode, while the frozen weights
    are marked as requiring grad: the text module's checkpoint filter must still see them as frozen."""
    from rs_lightning.tasks.text.policy import without_frozen

    model, _ = policy
    outside = set(without_frozen(model, model.state_dict()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with weight_cast_cache(model):
            assert all(p.requires_grad for p in model.parameters())
            inside = set(without_frozen(model, model.state_dict()))
    assert inside == outside and outside
    assert not any("base_layer" in k for k in outside)

"""FSDP wrapping of the PPO policy on CPU (one gloo rank): a bfloat16 base with float32 LoRA factors needs the
LoRA leaves as units of their own (FSDP flattens one dtype per unit), as configs/text/news_summary_fsdp.yaml has
(`model.dtype: bfloat16`)."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist

from rs_lightning.tasks.text import fsdp
from rs_lightning.tasks.text import policy as pol

CPU = torch.device("cpu")  # FSDP v1 runs on CPU (gloo) when told the device explicitly


@pytest.fixture
def one_rank(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_lora_leaves_get_their_own_units_next_to_a_bf16_base(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    base, _ = tiny_random_causal_lm()
    model = pol.attach_lora(base.to(torch.bfloat16), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                            init_adapter=None, lora_init_seed=0)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}  # PEFT keeps the factors in float32 next to the bf16 base
    layers = ModuleWrapPolicy({LlamaDecoderLayer})
    with pytest.raises(ValueError, match="uniform dtype"):
        FSDP(copy.deepcopy(model), auto_wrap_policy=layers, use_orig_params=True, device_id=CPU)
    wrapped = FSDP(model, auto_wrap_policy=fsdp.lora_aware_policy(model, layers), use_orig_params=True, device_id=CPU)
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    assert len(units) == 1 + 2 + 2 * 2 * 2  # root, 2 decoder layers, lora_A/lora_B of q_proj/v_proj in each
    ids = torch.randint(3, 500, (2, 7))
    logits = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    assert all(bool(g.abs().sum() > 0) for n, g in grads.items() if "lora_B" in n)  # A is random, B starts at 0

"""The text policy: a causal LM with a trainable LoRA, its frozen KL reference, and (for GAE) a scalar value head.

- Fresh LoRA: created under a fixed `lora.init_seed` (independent of the run's seed), so every expert and
  MORL run of an experiment starts from the SAME A and B at step 0. A soup of factors is only meaningful
  from a shared theta_0. Its KL reference is the base model itself, reached by disabling the adapter.
- Existing adapter (the paper starts PPO from an SFT LoRA, Alpaca-LoRA), KL reference `kl.reference`:
  "init" (our default): the adapter is loaded twice, once as the trainable "default" adapter and once, frozen,
  as the "reference" adapter, so the KL is measured to the SFT policy (no second copy of the base weights);
  "base": loaded once, and the reference is the base model with the adapter disabled. "base" is what the paper
  ran: TRL 0.4's PPOTrainer.step computes a PEFT policy's reference log-probs under
  `pretrained_model.disable_adapter()` (huggingface/trl trl/trainer/ppo_trainer.py) and leaves the `ref_model`
  it is given unused, so the reference was the base LLaMA, not Alpaca-LoRA.
- Value head: a linear layer on the last hidden state, initialised under the same fixed seed; only the "gae"
  advantage builds one (the critic-free "sequence" and "rloo" have none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from rs_lightning.tasks.autocast_cache import marked_for_casting

REFERENCE_ADAPTER = "reference"


class ValueHead(nn.Module):
    """Scalar value per position: hidden [B, T, H] -> values [B, T]."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def attach_lora(
    base: nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str],
    init_adapter: str | None,
    lora_init_seed: int,
    frozen_reference: bool = True,
) -> nn.Module:
    """Wrap `base` in a PeftModel: a fresh seeded LoRA, or `init_adapter` trainable (plus a frozen copy of it as
    the KL reference when `frozen_reference`; without it the reference is the base model)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, init_adapter, adapter_name="default", is_trainable=True)
        if frozen_reference:
            model.load_adapter(init_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter("default")
            freeze_reference(model)
        return model
    fan_in_fan_out = getattr(base.config, "model_type", "") == "gpt2"  # GPT-2 uses Conv1D layers
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_init_seed)
        return get_peft_model(base, config)


def freeze_reference(model: nn.Module) -> None:
    """peft's set_adapter can flip requires_grad on; keep the reference adapter frozen."""
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name or name.endswith(f".{REFERENCE_ADAPTER}"):
            param.requires_grad_(False)


def make_value_head(hidden_size: int, seed: int) -> ValueHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ValueHead(hidden_size)


@contextlib.contextmanager
def reference_policy(model: nn.Module, kind: str = "init") -> Iterator[None]:
    """Inside this block `model` computes the KL reference: with kind "init", the frozen copy of the initial adapter
    when there is one (else the base model: a fresh LoRA starts as the base model); with kind "base", the base
    model (every adapter disabled)."""
    if kind not in ("init", "base"):
        raise ValueError(f"model.kl.reference must be 'init' or 'base', got {kind!r}")
    adapters = getattr(model, "peft_config", {})
    if kind == "init" and REFERENCE_ADAPTER in adapters:
        # inference_mode: switching adapters must not make the reference trainable, even for a moment.
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter("default")  # trainable again; peft freezes the inactive reference
            freeze_reference(model)
    else:
        with model.disable_adapter():
            yield


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def without_frozen(module: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of `module`'s `state_dict` that training changes: trainable parameters (the adapter, the value
    head) and buffers (reward statistics). The frozen base model (and a frozen reference adapter) is left out: a
    checkpoint rebuilds it from the config, so it stays megabytes for a 7B policy."""
    # A frozen weight marked for autocast's cache during a decode is still frozen (a checkpoint may be written then).
    keep = {clean_name(n) for n, p in module.named_parameters() if p.requires_grad and not marked_for_casting(p)}
    keep |= {clean_name(n) for n, _ in module.named_buffers()}
    return {k: v for k, v in state_dict.items() if clean_name(k) in keep}

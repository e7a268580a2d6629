"""FSDP for the PPO policy: the policy and the value head become FSDP roots of their own (in `configure_model`).

Why not let Lightning wrap the whole LightningModule, as it does by default: PPO runs ppo_epochs x mini-batches
forward/backward passes inside ONE `training_step`, and Lightning runs `training_step` inside the root unit's
forward. Every backward then happens before that forward returns, which FSDP (v1) does not support. Seen on an
H100 with configs/text/news_summary_fsdp.yaml's strategy: "Expects BACKWARD_PRE or BACKWARD_POST state but got
HandleTrainingState.FORWARD" (a trainable parameter in the root unit), then, with the value head wrapped apart,
"Cannot manually unshard parameters during forward/backward" at export: the root's end-of-backward callback,
which finalises gradients and resets the units' states, never ran. With the policy as its own root, each
`response_forward` is a complete root forward and its backward follows it, as FSDP expects. Lightning leaves a
module that already holds FSDP units as it is (its auto_wrap_policy then applies to the policy here).

- Generation calls `policy.generate`, which bypasses the root's forward: the root unit's own parameters
  (embeddings, final norm, LM head) are gathered around it with `summon_full_params(recurse=False)`; the
  decoder layers gather themselves in their forwards.
- Export gathers full state dicts with FSDP's state-dict API on every rank (a collective), rank 0 writes.
"""

from __future__ import annotations

import contextlib

from torch import Tensor, nn


def _fsdp_strategy(module):
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    from lightning.pytorch.strategies import FSDPStrategy

    return trainer.strategy if isinstance(trainer.strategy, FSDPStrategy) else None


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside an FSDP wrapper (the PeftModel), or `model` itself."""
    return model.module if is_sharded(model) else model


def shard_policy(module) -> bool:
    """Under an FSDPStrategy, wrap `module.policy` (with the strategy's auto-wrap policy) and `module.value_head`
    as FSDP roots, once; return whether the module is sharded. Call from `configure_model`."""
    strategy = _fsdp_strategy(module)
    if strategy is None:
        return False
    if is_sharded(module.policy):
        return True
    from torch.distributed.fsdp import FullyShardedDataParallel

    common = dict(cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
                  sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device.index)
    kwargs = {**strategy.kwargs, "use_orig_params": True}  # frozen base + trainable LoRA share units
    module.policy = FullyShardedDataParallel(module.policy, **common, **kwargs)
    kwargs.pop("auto_wrap_policy", None)
    module.value_head = FullyShardedDataParallel(module.value_head, **common, **kwargs)
    return True


def generation_context(policy: nn.Module):
    """Around `policy.generate`: gather the root unit's parameters (a no-op without FSDP)."""
    if not is_sharded(policy):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(policy, recurse=False, writeback=False)


def full_state_dicts(module, world_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """(policy, value head) full state dicts, gathered on rank 0 (empty elsewhere); None without FSDP.
    A collective: every rank must call it."""
    if not is_sharded(module.policy):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    config = FullStateDictConfig(offload_to_cpu=world_size > 1, rank0_only=True)  # one rank runs NO_SHARD
    states = []
    for part in (module.policy, module.value_head):
        with FullyShardedDataParallel.state_dict_type(part, StateDictType.FULL_STATE_DICT, config):
            # Names as the unwrapped module has them (PEFT filters the adapter out of them by name).
            states.append({clean_name(k): v for k, v in part.state_dict().items()})
    return states[0], states[1]


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")

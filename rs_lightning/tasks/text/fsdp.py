"""FSDP for the PPO policy: the policy and the value head (GAE only) become FSDP roots of their own (in
`configure_model`); the critic-free advantages have no value head, only the policy is wrapped.

Why not let Lightning wrap the whole LightningModule, as it does by default: PPO runs ppo.epochs x mini-batches
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

from rs_lightning.tasks.text import policy as pol


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
    (unless it is None: critic-free advantages) as FSDP roots, once; return whether the module is sharded. Call from
    `configure_model`."""
    strategy = _fsdp_strategy(module)
    if strategy is None:
        return False
    if is_sharded(module.policy):
        return True
    from torch.distributed.fsdp import FullyShardedDataParallel

    if module.settings.ppo.max_grad_norm is not None:
        raise ValueError("model.ppo.max_grad_norm is not supported under FSDP yet: clipping needs one norm over the "
                         "policy and value-head roots (Lightning's clip_gradients refuses FSDP); set it to null")
    common = dict(cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
                  sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device.index)
    kwargs = {**strategy.kwargs, "use_orig_params": True}  # frozen base + trainable LoRA share units
    kwargs["auto_wrap_policy"] = lora_aware_policy(module.policy, kwargs.get("auto_wrap_policy"))
    module.policy = FullyShardedDataParallel(module.policy, **common, **kwargs)
    kwargs.pop("auto_wrap_policy", None)
    if module.value_head is not None:
        module.value_head = FullyShardedDataParallel(module.value_head, **common, **kwargs)
    return True


def lora_aware_policy(policy: nn.Module, base_policy):
    """The strategy's auto-wrap policy (a set of layer classes, as Lightning's ModuleWrapPolicy holds) plus every
    LoRA leaf (lora_A / lora_B / lora_embedding_* Linears) as a unit of its own.

    Why: FSDP flattens a unit's parameters into one tensor of one dtype, and PEFT keeps LoRA weights in float32
    next to a bfloat16 base (`model.dtype: bfloat16`): a decoder layer holding both is refused ("Must flatten
    tensors with uniform dtype"). PEFT's own FSDP recipe wraps the adapter leaves apart in the same way. Another
    kind of policy (a callable) is used as given."""
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

    if base_policy is not None and not isinstance(base_policy, ModuleWrapPolicy):
        return base_policy
    classes = tuple(base_policy._module_classes) if base_policy is not None else ()
    lora_leaves = {id(m) for name, m in policy.named_modules()
                   if ".lora_" in f".{name}" and not list(m.children()) and list(m.parameters(recurse=False))}
    return CustomPolicy(lambda m: isinstance(m, classes) or id(m) in lora_leaves)


def generation_context(policy: nn.Module):
    """Around `policy.generate`: gather the root unit's parameters (a no-op without FSDP)."""
    if not is_sharded(policy):
        return contextlib.nullcontext()
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    # generate bypasses the root's forward, which would make FSDP's unshard stream wait for the last optimizer
    # step on the compute stream: wait here instead.
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()
    return FullyShardedDataParallel.summon_full_params(policy, recurse=False, writeback=False)


def full_state_dicts(module, world_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor] | None] | None:
    """(policy, value head) full state dicts, gathered on rank 0 (empty elsewhere); the value head's is None when
    the module has none (critic-free advantages); None without FSDP. A collective: every rank must call it."""
    if not is_sharded(module.policy):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    config = FullStateDictConfig(offload_to_cpu=world_size > 1, rank0_only=True)  # one rank runs NO_SHARD
    states: list[dict[str, Tensor] | None] = []
    for part in (module.policy, module.value_head):
        if part is None:
            states.append(None)
            continue
        with FullyShardedDataParallel.state_dict_type(part, StateDictType.FULL_STATE_DICT, config):
            # Names as the unwrapped module has them (PEFT filters the adapter out of them by name).
            states.append({pol.clean_name(k): v for k, v in part.state_dict().items()})
    return states[0], states[1]


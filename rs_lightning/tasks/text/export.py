"""Expert export: the trained adapter in PEFT format (plus the value head of GAE runs), for `rs soup` / `rs front`.

Layout of an exported expert folder:
    adapter_config.json, adapter_model.safetensors   the "default" LoRA (PEFT format; loads with
                                                     PeftModel.from_pretrained and `rs_lightning.soup.lora`)
    value_head.safetensors                           the scalar value head (ignored by soups, as in the paper);
                                                     absent for the critic-free advantages, which have none
    expert.json                                      rewards, mu, base model, advantage, KL reference, PPO iterations
Written atomically (temp folder, then rename), so a crash never leaves a half-written expert.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from rs_lightning.soup.atomic import atomic_dir
from rs_lightning.tasks.text import fsdp


def export_expert(module, dirpath: str | os.PathLike, *, overwrite: bool = True, states=None) -> Path:
    """Write `module`'s trainable adapter and value head (if it has one) to `dirpath` (a TextPPOModule).

    `states`: (policy, value head or None) full state dicts gathered from FSDP units (`fsdp.full_state_dicts`);
    None reads the live module."""
    dirpath = Path(dirpath)
    if states is None:
        states = (None, None if module.value_head is None else module.value_head.state_dict())
    policy_state, head_state = states
    with atomic_dir(dirpath, overwrite=overwrite) as tmp:
        if policy_state is None:
            module.policy.save_pretrained(str(tmp), selected_adapters=["default"], save_embedding_layers=False)
        else:
            _save_gathered_adapter(fsdp.unwrap(module.policy), policy_state, tmp, dirpath)
        if head_state is not None:
            head = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
            save_file(head, str(tmp / "value_head.safetensors"))
        settings = module.settings
        # Flat keys, as experts exported before the settings had groups wrote them: readers need not know the groups.
        info = {
            "base_model": module.hparams.model,
            "rewards": module.reward_names,
            "reward_weights": module.objective.weights,
            "reward_normalization": settings.scoring.normalization,
            "init_adapter": settings.lora.init_adapter,
            "advantage": settings.ppo.advantage,
            "kl_reference": settings.kl.reference,
            "lora_init_seed": settings.lora.init_seed,
            "ppo_iterations": module.ppo_iteration,
        }
        (tmp / "expert.json").write_text(json.dumps(info, indent=2) + "\n")
    return dirpath


def adapter_tensors(state: dict, adapter: str = "default") -> dict:
    """One LoRA adapter in PEFT's saved form, out of a full model state dict: its `lora_` tensors with the adapter
    name dropped ("...q_proj.lora_A.default.weight" -> "...q_proj.lora_A.weight")."""
    tag = f".{adapter}."
    return {k.replace(tag, "."): v for k, v in state.items() if "lora_" in k and tag in k}


def _save_gathered_adapter(peft_model, state: dict, tmp: Path, dirpath: Path) -> None:
    """adapter_model.safetensors + adapter_config.json from a gathered (FSDP) state dict. Not through PEFT's
    save_pretrained: some PEFT versions select the adapter by the live module names, which carry FSDP's wrapper
    segments, and saved nothing (seen on an H100)."""
    tensors = adapter_tensors(state)
    if not tensors:
        names = [k for k in state if "lora_" in k][:3] or list(state)[:3]
        raise RuntimeError(f"the gathered policy state ({len(state)} tensors, e.g. {names}) holds no tensor of "
                           f"the 'default' LoRA adapter: nothing to export to {dirpath}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.inference_mode = True  # as PEFT's save_pretrained writes it
    config.save_pretrained(str(tmp))


class ExportExpert(Callback):
    """Export the expert at the end of training (and every `every_n_iterations` PPO iterations, if set).

    Args:
        dirpath: target folder; default `<trainer.default_root_dir>/expert`. Periodic exports go to
            `<dirpath>_trajectory/iteration_<n>` so a run's trajectory can be souped too.
        every_n_iterations: also export every n PPO iterations (None: only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_iterations: int | None = None) -> None:
        self.dirpath = dirpath
        self.every_n_iterations = every_n_iterations

    def _target(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "expert"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_iterations
        if n and pl_module.ppo_iteration % n == 0:
            target = self._target(trainer)
            step = f"iteration_{pl_module.ppo_iteration}"
            states = fsdp.full_state_dicts(pl_module, trainer.world_size)  # a collective under FSDP
            if trainer.is_global_zero:
                export_expert(pl_module, target.parent / f"{target.name}_trajectory" / step, states=states)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        states = fsdp.full_state_dicts(pl_module, trainer.world_size)
        if trainer.is_global_zero:
            path = export_expert(pl_module, self._target(trainer), states=states)
            print(f"exported expert adapter to {path}")


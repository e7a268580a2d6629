"""Expert export: the trained adapter in PEFT format plus the value head, ready for `rs soup` / `rs front`.

Layout of an exported expert folder:
    adapter_config.json, adapter_model.safetensors   the "default" LoRA (PEFT format; loads with
                                                     PeftModel.from_pretrained and `rs_lightning.soup.lora`)
    value_head.safetensors                           the scalar value head (ignored by soups, as in the paper)
    expert.json                                      rewards, mu, base model, PPO iterations
Written atomically (temp folder, then rename), so a crash never leaves a half-written expert.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from rs_lightning.soup.atomic import atomic_dir


def export_expert(module, dirpath: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write `module`'s trainable adapter and value head to `dirpath` (a TextPPOModule)."""
    dirpath = Path(dirpath)
    with atomic_dir(dirpath, overwrite=overwrite) as tmp:
        module.policy.save_pretrained(str(tmp), selected_adapters=["default"], save_embedding_layers=False)
        head = {k: v.detach().cpu().contiguous() for k, v in module.value_head.state_dict().items()}
        save_file(head, str(tmp / "value_head.safetensors"))
        hp = module.hparams
        info = {
            "base_model": hp.model,
            "rewards": module.reward_names,
            "reward_weights": module.objective.weights,
            "reward_normalization": hp.reward_normalization,
            "init_adapter": hp.init_adapter,
            "lora_init_seed": hp.lora_init_seed,
            "ppo_iterations": module.ppo_iteration,
        }
        (tmp / "expert.json").write_text(json.dumps(info, indent=2) + "\n")
    return dirpath


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
            with full_parameters(trainer):  # every rank enters (a collective under FSDP); rank 0 writes
                if trainer.is_global_zero:
                    export_expert(pl_module, target.parent / f"{target.name}_trajectory" / step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        with full_parameters(trainer):
            if trainer.is_global_zero:
                path = export_expert(pl_module, self._target(trainer))
                print(f"exported expert adapter to {path}")


def full_parameters(trainer: L.Trainer):
    """Under FSDP, gather the full (unsharded) parameters on rank 0 for the duration; otherwise do nothing.
    Must be entered on every rank. Untested without GPUs."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True,
                                                       offload_to_cpu=True)

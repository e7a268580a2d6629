"""Per-example rewards of one evaluation, collected from what the task's evaluation steps return.

Contract (for any task swept by `rs front`): `test_step` and `validation_step` RETURN
`{"rewards": {name: Tensor[B]}}`, the per-example scores of exactly the rewards they log as
`test/reward/<name>` (`val/reward/<name>`), in dataloader order. Lightning hands that return value to
callbacks as `outputs` of `on_test_batch_end` / `on_validation_batch_end`, so the sweep reads it through a
callback and never through the task's internals. A task that returns nothing simply gives rows without
per-example values (the summary then has no intervals and says so).

Evaluation loaders are not shuffled, so example j is the same input at every point of the sweep: the
paired bootstrap of uncertainty.py relies on it, and a shuffling sampler is refused here. Under DDP each
rank sees the interleaved shard of Lightning's DistributedSampler (shuffle off for evaluation, padded to
equal shards); the shards are gathered and re-interleaved into dataloader order (see `interleave_ranks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from rs_lightning.front.errors import FrontError

REWARDS_KEY = "rewards"


def interleave_ranks(gathered: Tensor, total: int | None) -> Tensor:
    """Dataloader order from per-rank shards: rank r held examples r, r + W, r + 2W, ... (DistributedSampler).

    Args:
        gathered: (W, n_local) values, row r from rank r.
        total: the dataset's length; the sampler pads the last shards by repeating the first examples,
            so everything past `total` is a repeat and is dropped. None keeps all.

    Returns:
        (total,) values in dataloader order.
    """
    order = gathered.transpose(0, 1).reshape(-1)
    return order if total is None else order[:total]


def _is_shuffled(dataloader) -> bool:
    from torch.utils.data import RandomSampler

    sampler = getattr(dataloader, "sampler", None)
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return any(isinstance(s, RandomSampler) or bool(getattr(s, "shuffle", False)) for s in (sampler, inner))


class PerExampleCollector(Callback):
    """Collects `outputs["rewards"]` of every test / validation batch; `values()` after the stage.

    A module-level class (not built inside a function) so that it pickles, as `ddp_spawn` needs.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}
        self.loader_of: dict[str, int] = {}
        self.gathered: dict[str, Tensor] | None = None

    def _collect(self, stage: str, outputs, dataloader_idx: int, n_loaders: int) -> None:
        rewards = outputs.get(REWARDS_KEY) if isinstance(outputs, Mapping) else None
        if rewards is None:
            return
        if not isinstance(rewards, Mapping):
            raise FrontError(f"{stage}_step returned {REWARDS_KEY!r} as {type(rewards).__name__}: give a "
                             "dict {reward name: Tensor[B]} of per-example scores")
        # With several loaders Lightning suffixes the logged names; keep the per-example names aligned.
        suffix = f"/dataloader_idx_{dataloader_idx}" if n_loaders > 1 else ""
        for name, value in rewards.items():
            t = torch.as_tensor(value).detach()
            if t.ndim != 1:
                raise FrontError(f"{stage}_step returned {REWARDS_KEY}[{name!r}] with shape {tuple(t.shape)}: "
                                 "give one score per example, a 1-D Tensor[B]")
            self.parts.setdefault(f"{name}{suffix}", []).append(t.to("cpu", torch.float64))
            self.loader_of[f"{name}{suffix}"] = dataloader_idx

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect("test", outputs, dataloader_idx, len(trainer.num_test_batches))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._collect("validation", outputs, dataloader_idx, len(trainer.num_val_batches))

    def on_test_epoch_end(self, trainer, pl_module):
        self._finish(trainer, pl_module, trainer.test_dataloaders, "test")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, trainer.val_dataloaders, "validation")

    def _finish(self, trainer, pl_module, dataloaders, stage: str) -> None:
        loaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
        if self.parts and any(_is_shuffled(dl) for dl in loaders if dl is not None):
            raise FrontError(f"the {stage} dataloader shuffles: example j would not be the same input at "
                             "every point, so per-example rewards cannot be paired; use shuffle=False")
        local = {name: torch.cat(parts) for name, parts in sorted(self.parts.items())}
        if trainer.world_size > 1 and local:
            # A collective: every rank calls it for the same names in the same (sorted) order.
            local = {name: interleave_ranks(trainer.strategy.all_gather(v.to(pl_module.device)).cpu(),
                                            _dataset_length(loaders[self.loader_of[name]]))
                     for name, v in local.items()}
        self.gathered = local

    def values(self) -> dict[str, list[float | None]]:
        """{name: [score per example]} of the last stage (non-finite -> None, strict JSON); {} if none."""
        return {name: [x if math.isfinite(x) else None for x in v.tolist()]
                for name, v in (self.gathered or {}).items()}


def collector_callback() -> PerExampleCollector:
    """A Lightning callback that keeps each evaluation step's returned per-example rewards, in batch order."""
    return PerExampleCollector()


def _dataset_length(dataloader) -> int | None:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return None

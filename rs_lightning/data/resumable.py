"""Training order that resumes exactly, at an epoch boundary or in the middle of an epoch.

Lightning restores the model, the optimizer and its loop counters from a checkpoint, but a plain DataLoader
restarts its epoch from the first batch: a run killed after batch k of an epoch and resumed from a checkpoint
taken there trained on batches 0, 1, ... again as if they were k, k + 1, ... (measured on the text task: the
resumed run saw the epoch's first prompts where the uninterrupted run saw its third batch), and a seeded
`shuffle=True` loader restarts its permutation from the seed, so a resumed epoch e repeats epoch 0's order.

- `EpochShuffleSampler`: the order of epoch e is a permutation seeded by (seed, e) alone.
- `ResumableDataLoader`: a DataLoader that, in the epoch a run restarted in, first draws (and drops) the
  batches this rank had already trained on. Skipping per rank, after the DDP split, keeps every rank on its own
  batches; skipping inside the sampler cannot (Lightning's DistributedSamplerWrapper sizes itself from the
  sampler's length once, and indexes past a shortened order). Dropped batches are loaded and collated: cheap
  for prompts.
- `resume_point(datamodule)`: (epoch, batches done) when Lightning restarts mid-epoch, from the loop counters it
  restored before it asks for the train dataloader.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh random permutation each epoch, seeded by `seed + epoch` (Lightning calls `set_epoch`).

    Args:
        size: number of samples.
        seed: base seed of the permutations.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that drops the first `resume_batches` batches of epoch `resume_epoch` (a run restarted in the
    middle of that epoch) and is a plain DataLoader otherwise. The epoch is read from the sampler's `epoch`
    (set by Lightning through `set_epoch`, also on its DDP wrapper). The two arguments are constructor
    arguments so that Lightning's re-instantiation under DDP (with a distributed sampler) keeps them."""

    def __init__(self, *args, resume_epoch: int | None = None, resume_batches: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if resume_batches < 0:
            raise ValueError(f"resume_batches must be >= 0, got {resume_batches}")
        self.resume_epoch, self.resume_batches = resume_epoch, resume_batches

    def __iter__(self):
        iterator = super().__iter__()
        if not self.resume_batches:
            return iterator
        return _SkipOnFirstNext(iterator, lambda: self.resume_batches
                                if getattr(self.sampler, "epoch", None) == self.resume_epoch else 0)


class _SkipOnFirstNext:
    """Wraps a DataLoader iterator; at the first `next`, drops `count()` batches. Lazily: Lightning creates the
    iterator of a resumed epoch before it calls `set_epoch`, and the sampler draws its order at the first batch."""

    def __init__(self, iterator, count):
        self._iterator, self._count = iterator, count

    def __iter__(self):
        return self

    def __next__(self):
        if self._count is not None:
            skip, self._count = self._count(), None
            for _ in range(skip):  # the batches this rank trained on before the restart
                next(self._iterator)
        return next(self._iterator)

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)


def resume_point(datamodule) -> tuple[int | None, int]:
    """(epoch, batches this rank finished in it) if the datamodule's trainer restarts in the middle of an epoch,
    else (None, 0). Call from `train_dataloader`: Lightning has restored its loops from the checkpoint by then."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return None, 0
    fit_loop = trainer.fit_loop
    # Lightning's own test for a mid-epoch restart (FitLoop.update_restart_stage, which runs only after the
    # dataloader is built): the epoch was started but not processed; its index is the number processed.
    epochs = fit_loop.epoch_progress.total
    if not (fit_loop.restarting and epochs.started == epochs.ready and epochs.processed == epochs.started - 1
            and epochs.completed == epochs.processed):
        return None, 0
    return epochs.processed, fit_loop.epoch_loop.batch_progress.current.processed

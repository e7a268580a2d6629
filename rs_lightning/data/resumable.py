"""Training order that resumes exactly, at an epoch boundary or in the middle of an epoch.

Lightning restores the model, the optimizer and its loop counters from a checkpoint, but a plain DataLoader
restarts its epoch from the first batch: a run killed after batch k of an epoch and resumed from a checkpoint
taken there trained on batches 0, 1, ... again as if they were k, k + 1, ... (measured on the text task: the
resumed run saw the epoch's first prompts where the uninterrupted run saw its third batch), and a seeded
`shuffle=True` loader restarts its permutation from the seed, so a resumed epoch e repeats epoch 0's order.

- `EpochShuffleSampler`: the order of epoch e is a permutation seeded by (seed, e) alone (the text family; the
  captioning family keeps its seeded shuffling loader, see its datamodule).
- `ResumableDataLoader`: a DataLoader that, in the epoch a run restarted in, first draws (and drops) the
  batches this rank had already trained on. Skipping per rank, after the DDP split, keeps every rank on its own
  batches; skipping inside the sampler cannot (Lightning's DistributedSamplerWrapper sizes itself from the
  sampler's length once, and indexes past a shortened order). Dropped batches are loaded and collated: cheap
  for prompts.
- `ResumableTrainOrder`: a datamodule mixin that writes (epoch, batches done) into every checkpoint and hands
  it to its train loader on resume.
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
    """A DataLoader that, in the epoch a run restarted in, drops the batches of that epoch this rank had finished
    (`resume_source.resume_pending`, set from the checkpoint by `ResumableTrainOrder`); a plain DataLoader
    otherwise.

    The skip waits for the first batch: Lightning may make the resumed epoch's iterator before it calls
    `set_epoch`, and the sampler draws its order at the first batch; it applies only if the sampler's epoch is the
    checkpoint's. `resume_source` is a constructor argument so that Lightning's re-instantiation under DDP (with a
    distributed sampler) keeps it.

    Args:
        resume_source: the datamodule (a `ResumableTrainOrder`); None: never skip.
    """

    def __init__(self, *args, resume_source=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_source = resume_source

    def __iter__(self):
        iterator = super().__iter__()
        if getattr(self.resume_source, "resume_pending", None) is None:
            return iterator
        return _SkipOnFirstNext(iterator, self._batches_to_skip)

    def _batches_to_skip(self) -> int:
        epoch, done = self.resume_source.resume_pending
        if getattr(self.sampler, "epoch", None) != epoch:
            return 0
        self.resume_source.resume_pending = None  # once: later epochs run whole
        return done


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


class ResumableTrainOrder:
    """Datamodule mixin: the checkpoint records how far into its epoch the run was (Lightning saves a datamodule's
    `state_dict` in every checkpoint and gives it back to `load_state_dict` on resume); the train loader
    (`ResumableDataLoader(resume_source=self)`) then drops the finished batches of that epoch.

    Read from Lightning's loop counters when the checkpoint is written, so it does not depend on when Lightning
    builds or iterates the loader on resume. A checkpoint written between epochs records nothing."""

    resume_pending: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        fit_loop = trainer.fit_loop
        done = fit_loop.epoch_loop.batch_progress.current.processed
        if not 0 < done < trainer.num_training_batches:
            return {}  # between epochs (or at an epoch's last batch): Lightning resumes at an epoch's start
        return {"train_epoch": fit_loop.epoch_progress.current.processed, "train_batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.resume_pending = (int(state["train_epoch"]), int(state["train_batches_done"]))

"""Exact resume of the training order: one order per (seed, epoch), and a mid-epoch restart that drops, per rank,
the batches that rank had trained on, also after Lightning rebuilds the loader for DDP."""

import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader

from rs_lightning.data.resumable import EpochShuffleSampler, ResumableDataLoader


def test_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    b.set_epoch(2)
    b.set_epoch(0)  # going back gives the same order: no hidden generator state
    assert list(a) == list(b) and sorted(a) == list(range(50))
    a.set_epoch(1)
    assert list(a) != list(b)


def _ids(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_restart_drops_each_rank_s_finished_batches_in_its_epoch_only(world):
    data = torch.arange(48)  # 48 = a multiple of world * batch: no padding in the DDP split
    batch, done, epoch = 4, 2, 1
    for rank in range(world):
        loaders = []
        for resume in ({}, {"resume_epoch": epoch, "resume_batches": done}):
            with _replace_dunder_methods(DataLoader, "dataset"):  # as Lightning builds a train dataloader
                loader = ResumableDataLoader(data, batch_size=batch, sampler=EpochShuffleSampler(48, seed=5),
                                             **resume)
            if world > 1:  # what Lightning does under DDP: the same loader class, rebuilt on a distributed sampler
                sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=world, rank=rank, shuffle=False)
                loader = _update_dataloader(loader, sampler)
            assert isinstance(loader, ResumableDataLoader) and loader.resume_batches == resume.get("resume_batches", 0)
            loaders.append(loader)
        plain, resumed = loaders
        assert _ids(resumed, epoch) == _ids(plain, epoch)[done:], (world, rank)
        assert _ids(resumed, epoch + 1) == _ids(plain, epoch + 1)  # later epochs whole
        assert _ids(resumed, 0) == _ids(plain, 0)


def test_bad_resume_argument():
    with pytest.raises(ValueError, match="resume_batches must be >= 0"):
        ResumableDataLoader(torch.arange(4), resume_batches=-1)

"""Exact resume of the training order: one order per (seed, epoch), and a mid-epoch restart that drops, per rank,
the batches that rank had trained on, also after Lightning rebuilds the loader for DDP."""

from types import SimpleNamespace

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


def _restart(epoch: int, done: int) -> SimpleNamespace:
    """A datamodule resumed from a checkpoint written after `done` batches of epoch `epoch`."""
    return SimpleNamespace(resume_pending=(epoch, done))


def _ids(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_restart_drops_each_rank_s_finished_batches_in_its_epoch_only(world):
    data = torch.arange(48)  # 48 = a multiple of world * batch: no padding in the DDP split
    batch, done, epoch = 4, 2, 1
    for rank in range(world):
        loaders = []
        for resume in ({}, {"resume_source": _restart(epoch, done)}):
            with _replace_dunder_methods(DataLoader, "dataset"):  # as Lightning builds a train dataloader
                loader = ResumableDataLoader(data, batch_size=batch, sampler=EpochShuffleSampler(48, seed=5),
                                             **resume)
            if world > 1:  # what Lightning does under DDP: the same loader class, rebuilt on a distributed sampler
                sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=world, rank=rank, shuffle=False)
                loader = _update_dataloader(loader, sampler)
            assert isinstance(loader, ResumableDataLoader) and loader.resume_source is resume.get("resume_source")
            loaders.append(loader)
        plain, resumed = loaders
        assert _ids(resumed, epoch) == _ids(plain, epoch)[done:], (world, rank)
        assert _ids(resumed, epoch + 1) == _ids(plain, epoch + 1)  # later epochs whole
        assert _ids(resumed, 0) == _ids(plain, 0)


def test_no_restart_no_skip_and_the_skip_happens_once():
    def loader(source):
        return ResumableDataLoader(torch.arange(12), batch_size=4, sampler=EpochShuffleSampler(12, seed=1),
                                   resume_source=source)

    assert len(_ids(loader(SimpleNamespace(resume_pending=None)), 0)) == 3
    resumed = loader(_restart(0, 2))
    assert len(_ids(resumed, 0)) == 1 and len(_ids(resumed, 0)) == 3  # a second pass over epoch 0 is whole


def test_checkpoint_state_round_trip():
    from rs_lightning.data.resumable import ResumableTrainOrder

    fit_loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=1)),
                               epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
                                   current=SimpleNamespace(processed=3))))
    saved = ResumableTrainOrder()
    saved.trainer = SimpleNamespace(fit_loop=fit_loop, num_training_batches=5)
    loaded = ResumableTrainOrder()
    loaded.load_state_dict(saved.state_dict())
    assert loaded.resume_pending == (1, 3)
    assert ResumableTrainOrder().state_dict() == {} and ResumableTrainOrder().resume_pending is None
    saved.trainer.num_training_batches = 3  # written after the epoch's last batch: nothing to skip on resume
    assert saved.state_dict() == {}


"""One quiet evaluation per sweep point: `trainer.test` (or `validate`) and the logged rewards it returns.

Lightning prints tables, banners and data-loader advice on every call; a sweep calls it once per point,
so these helpers silence that (the sweep shows one tqdm bar instead), count the evaluated samples, pass on
the per-example rewards the evaluation steps returned (per_example.py), and refuse a call that did not
finish (an interrupted test must never become a row).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import NamedTuple

from rs_lightning.front.errors import FrontError

REWARD_PREFIX = "reward/"


def counter_callback():
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.data import extract_batch_size

    class SampleCounter(Callback):
        """Counts evaluated samples per stage (the `samples` field of a row)."""

        def __init__(self):
            self.n = 0

        def _count(self, batch) -> None:
            try:
                self.n += int(extract_batch_size(batch))
            except Exception:  # noqa: BLE001 - an unsized batch only loses the count, never the point
                pass

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self._count(batch)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                self._count(batch)

    return SampleCounter()


def quiet_trainer(**overrides):
    """A Trainer that prints nothing per point (no progress bar, model summary, logger or checkpoints)."""
    from lightning.pytorch import Trainer

    kwargs = dict(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    kwargs.update(overrides)
    with quiet_lightning():
        return Trainer(**kwargs)


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-call info lines and data-loader advice while the sweep's own bar runs."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


class Evaluation(NamedTuple):
    """What one `trainer.test` / `trainer.validate` gave: logged rewards, sample count, per-example rewards."""

    rewards: dict[str, float]
    samples: int | None
    per_example: dict[str, list[float | None]]


def evaluate(trainer, module, datamodule, stage: str, counter, collector=None) -> Evaluation:
    """Run `trainer.test` (stage "test") or `trainer.validate`; return its `Evaluation`.

    Every logged `test/reward/<name>` (`val/reward/<name>`) is a reward; with several dataloaders the
    name keeps Lightning's "/dataloader_idx_<k>" suffix. `collector` (per_example.collector_callback,
    already attached to the trainer) supplies the per-example rewards the evaluation steps returned.
    """
    from lightning.pytorch.trainer.states import TrainerStatus

    counter.n = 0
    if collector is not None:
        collector.reset()
    run = trainer.test if stage == "test" else trainer.validate
    results = run(module, datamodule=datamodule, verbose=False)
    if trainer.state.status != TrainerStatus.FINISHED or trainer.interrupted:
        raise FrontError(f"trainer.{stage} did not finish (interrupted): the point is not recorded")
    prefix = f"{stage}/{REWARD_PREFIX}" if stage == "test" else f"val/{REWARD_PREFIX}"
    rewards: dict[str, float] = {}
    for per_loader in results or []:
        for key, value in per_loader.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                # A metric logged with on_step=True as well comes back as "<name>_epoch".
                rewards[name.removesuffix("_epoch")] = float(value)
    per_example = collector.values() if collector is not None else {}
    return Evaluation(rewards, counter.n or None, per_example)

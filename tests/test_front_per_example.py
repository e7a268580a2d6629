"""The sweep keeps the per-example rewards a task's evaluation steps return (rs_lightning.front.per_example),
validates by default, and refuses tasks that break the contract, all on the quadratic toy (seconds)."""

import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from rs_lightning.front import Checkpoint, FrontError, SummarySettings, build_summary, run_sweep
from rs_lightning.front.summary import write_outputs
from rs_lightning.tasks.toy.quadratic import QuadraticData, QuadraticRewards, write_checkpoints

N_TEST = 7  # batches of 3: the last one is short


class PerExample(QuadraticRewards):
    """Example j (the loader yields its index) scores R_i(theta) + 0.01 * j * (i + 1): order is checkable."""

    def _log_rewards(self, batch, metrics, stage):
        scores = {}
        for i, name in enumerate(self.names):
            scores[name] = self.rewards()[i] + 0.01 * batch * (i + 1)
            metrics[name].update(scores[name])
            self.log(f"{stage}/reward/{name}", metrics[name], on_step=False, on_epoch=True)
        return {"rewards": scores}


class Silent(QuadraticRewards):
    """Logs its rewards but returns nothing from its evaluation steps (an older task)."""

    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)


class WrongNames(QuadraticRewards):
    def test_step(self, batch, batch_idx):
        out = super().test_step(batch, batch_idx)
        return {"rewards": {"r1": out["rewards"]["r1"], "extra": out["rewards"]["r2"]}}


class NotPerExample(QuadraticRewards):
    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)
        return {"rewards": {n: self.rewards()[i] for i, n in enumerate(self.names)}}  # a scalar per batch


class NoValidation(QuadraticRewards):
    validation_step = None


class ShuffledData(QuadraticData):
    def test_dataloader(self):
        return DataLoader(torch.arange(N_TEST, dtype=torch.float32), batch_size=3, shuffle=True)


def make(cls=PerExample, data_cls=QuadraticData):
    module = cls(optima=[[1.0, 0.0], [0.0, 1.0]], etas=[1.0, 3.0], names=["r1", "r2"], init=[0.2, 0.2])
    return module, data_cls(n_samples=N_TEST, batch_size=3)


@pytest.fixture
def ckpts(tmp_path):
    module, _ = make(QuadraticRewards)
    paths = [tmp_path / "ckpt" / f"e{i}.safetensors" for i in range(2)]
    write_checkpoints(module, paths, tmp_path / "ckpt" / "init.safetensors",
                      [(tmp_path / "ckpt" / "m.safetensors", [0.5, 0.5])])
    return {"experts": [Checkpoint(str(p), name=f"r{i + 1}") for i, p in enumerate(paths)],
            "init": Checkpoint(str(tmp_path / "ckpt" / "init.safetensors")),
            "morl": [Checkpoint(str(tmp_path / "ckpt" / "m.safetensors"), mu=[0.5, 0.5])]}


def sweep(tmp_path, ckpts, cls=PerExample, data_cls=QuadraticData, out="run", **kw):
    module, data = make(cls, data_cls)
    kw.setdefault("init", ckpts["init"])
    kw.setdefault("morl", ckpts["morl"])
    return run_sweep(module, data, ckpts["experts"], [[0.5, 0.5]], tmp_path / out, progress=False, **kw), module


def test_rows_keep_per_example_rewards_in_loader_order_for_test_and_validation(tmp_path, ckpts):
    rows, module = sweep(tmp_path, ckpts)  # front.validate defaults to True
    assert [r["kind"] for r in rows] == ["expert", "expert", "soup", "init", "morl"]
    j = np.arange(N_TEST)
    for r in rows:
        assert r["val_rewards"] is not None and r["val_valid"]
        theta = module.soup_theta(r["weights"]) if r["weights"] else None
        for field in ("per_example", "val_per_example"):
            assert set(r[field]) == {"r1", "r2"}
            for i, name in enumerate(("r1", "r2")):
                values = np.asarray(r[field][name])
                assert values.shape == (N_TEST,)
                # Loader order: the per-example offset grows with the example index.
                assert np.diff(values) == pytest.approx(np.full(N_TEST - 1, 0.01 * (i + 1)), abs=1e-6)
                assert values.mean() == pytest.approx(r["rewards"][name], abs=1e-6)
                if theta is not None:
                    base = module.closed_form_rewards(theta)[i]
                    assert values == pytest.approx(base + 0.01 * j * (i + 1), abs=1e-5)
    summary = write_outputs(tmp_path / "run", rows, SummarySettings(n_boot=100))
    assert summary["uncertainty"]["n_examples"] == N_TEST
    assert summary["selection"]["split"] == "val"
    # Every point moves by the same per-example offset: paired differences have zero-width intervals.
    margin = summary["uncertainty"]["expert_margins"]["r1"]["vs_others"]["r2"]
    assert margin["low"] == pytest.approx(margin["high"], abs=1e-6)  # float32 scores
    assert summary["plots"] == ["front.png"]


def test_a_task_that_returns_nothing_gives_rows_without_intervals(tmp_path, ckpts):
    rows, _ = sweep(tmp_path, ckpts, cls=Silent)
    assert all("per_example" not in r and "val_per_example" not in r for r in rows)
    summary = build_summary(rows)
    assert "no per-example rewards" in summary["uncertainty"]["skipped"]


def test_contract_violations_are_clear_errors(tmp_path, ckpts):
    with pytest.raises(FrontError, match=r"per-example rewards \['extra', 'r1'\] but logged \['r1', 'r2'\]"):
        sweep(tmp_path, ckpts, cls=WrongNames, out="a")
    with pytest.raises(FrontError, match=r"rewards\['r1'\] with shape \(\).*1-D Tensor\[B\]"):
        sweep(tmp_path, ckpts, cls=NotPerExample, out="b")
    with pytest.raises(FrontError, match="test dataloader shuffles"):
        sweep(tmp_path, ckpts, data_cls=ShuffledData, out="c", validate=False)


def test_validation_is_the_default_and_a_module_without_it_is_refused_before_any_point(tmp_path, ckpts):
    with pytest.raises(FrontError, match="front.validate is true.*no `validation_step`.*select_on: test"):
        sweep(tmp_path, ckpts, cls=NoValidation)
    assert not (tmp_path / "run" / "front.jsonl").exists()
    rows, _ = sweep(tmp_path, ckpts, cls=NoValidation, validate=False)
    assert all("val_rewards" not in r for r in rows)
    with pytest.raises(FrontError, match="no val_rewards"):
        build_summary(rows)
    assert build_summary(rows, SummarySettings(select_on="test"))["selection"]["split"] == "test"


class DumpCollected(Callback):
    """Writes what the collector gathered on global rank 0 (ddp_spawn runs the test in child processes)."""

    def __init__(self, collector, out):
        self.collector, self.out = collector, str(out)

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump(self.collector.values(), f)


def test_ddp_ranks_are_gathered_back_into_dataloader_order(tmp_path):
    """2 CPU ranks (ddp_spawn, gloo), 7 examples in batches of 2: the sampler pads rank 1 with example 0."""
    import lightning as L

    from rs_lightning.front.per_example import collector_callback

    module, data = make()
    data.hparams.batch_size = 2
    collector = collector_callback()
    out = tmp_path / "collected.json"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[collector, DumpCollected(collector, out)])
    trainer.test(module, data, verbose=False)
    got = json.loads(out.read_text())
    base = module.closed_form_rewards([0.2, 0.2])
    for i, name in enumerate(("r1", "r2")):
        assert got[name] == pytest.approx([base[i] + 0.01 * j * (i + 1) for j in range(N_TEST)], abs=1e-5)

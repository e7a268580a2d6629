"""The offline recipe learns (slow: ~5 min on 2 CPU cores): XE with configs/captioning/xe_init.yaml captions
held-out synthetic images far above chance, then SCST with scst_bleu1.yaml raises BLEU-1 over that init.

The fast check that runs by default is `test_captioning_module.py::test_xe_captions_held_out_images_far_above_an
_untrained_model` (100 XE steps)."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rs_lightning.rewards import caption
from rs_lightning.tasks.captioning.data import CaptionDataModule
from rs_lightning.tasks.captioning.export import ExportCaptioner
from rs_lightning.tasks.captioning.module import CaptioningModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "captioning"
COLOURS = ("red", "green", "blue", "yellow")


def _from_config(name: str, decoding: dict | None = None, **model_overrides):
    """The config's module with `model_overrides` (top-level keys) and `decoding` (fields of that group) set."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    args = {**cfg["model"]["init_args"], "corpus_metrics": False, **model_overrides}
    args["decoding"] = {**args.get("decoding", {}), **(decoding or {})}
    model = CaptioningModule(**args)
    return model, CaptionDataModule(**cfg["data"]["init_args"]), cfg["trainer"]["max_epochs"]


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **kwargs)


def _test(module, dm) -> dict[str, float]:
    return {k: float(v) for k, v in _trainer().test(module, dm, verbose=False)[0].items()}


@pytest.mark.slow
def test_xe_then_scst_bleu1(tmp_path):
    torch.set_num_threads(1)
    init = tmp_path / "init.safetensors"
    L.seed_everything(0)
    module, dm, epochs = _from_config("xe_init.yaml", decoding={"eval_decoding": "beam"})
    _trainer(max_epochs=epochs, callbacks=[ExportCaptioner(str(init))]).fit(module, dm)
    xe = _test(module, dm)

    # chance: ONE caption for every image, the training reference with the best test CIDEr-D (an oracle
    # constant: 0.82 for the default sizes, where an untrained model scores 0.0)
    test_refs = dm.dataset("test").references
    cider = caption.CiderD(test_refs)
    pool = sorted({c for refs in dm.train_references()[:100] for c in refs})
    best_constant = max(sum(cider.score([c] * len(test_refs), test_refs)) / len(test_refs) for c in pool)
    assert xe["test/reward/cider_d"] > max(1.0, 1.5 * best_constant), (xe, best_constant)
    hits = sum(any(c in row["caption"] and any(c in r for r in row["references"]) for c in COLOURS)
               for row in module.test_captions)
    assert hits >= 0.8 * len(module.test_captions)

    L.seed_everything(0)
    expert, dm, _ = _from_config("scst_bleu1.yaml", init_checkpoint=str(init))
    _trainer(max_epochs=1).fit(expert, dm)
    scst = _test(expert, dm)
    assert scst["test/reward/bleu1"] > xe["test/reward/bleu1"] + 0.01, (xe, scst)

"""Export a captioner (XE init, SCST expert or MORL run) as one safetensors file of its full state dict.

The file holds `module.model.state_dict()`: every parameter and persistent buffer of the CoCa under open_clip's
key names, the same tensors `CaptioningModule.soup_state_dict()` exposes, so `rs soup` and `rs front` can
interpolate exported experts directly and `open_clip.create_model(name, pretrained=path)` loads one. The header
metadata records how it was trained (stage, rewards, mu, init checkpoint, steps, output vocabulary).

    trainer:
      callbacks:
        - class_path: rs_lightning.tasks.captioning.export.ExportCaptioner
          init_args: {path: runs/captioning/synthetic/init/model.safetensors}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from rs_lightning.tasks.captioning.model import save_weights


def export_captioner(module, path: str | os.PathLike) -> Path:
    """Write `module.model`'s state dict to `path` (a `CaptioningModule`), atomically."""
    hp = module.hparams
    vocab = module.vocab_ids
    metadata = {
        "format": "rs_lightning.captioning/1",
        "model": hp.model,
        "stage": hp.stage,
        "rewards": json.dumps(list(hp.rewards)),
        "reward_weights": json.dumps(module.reward_weights),
        "init_checkpoint": str(hp.init_checkpoint or ""),
        "pretrained": str(hp.pretrained or ""),
        "optimizer_steps": str(module.global_step),
        "vocab": json.dumps(vocab.tolist() if vocab is not None else None),
    }
    return save_weights(module.model, path, metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of an exported captioner (empty for a plain safetensors file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def check_vocab(path: str | os.PathLike, vocab) -> None:
    """Raise if the export at `path` was trained with an output vocabulary other than `vocab` (`[V']` ids).

    The vocabulary is derived from the training references, so a different data config gives another policy.
    Files without the metadata (plain open_clip checkpoints, Lightning .ckpt) are not checked.
    """
    if not str(path).endswith(".safetensors"):
        return
    saved = json.loads(read_metadata(path).get("vocab", "null"))
    if saved is not None and saved != vocab.tolist():
        raise ValueError(f"{path} was trained with another output vocabulary ({len(saved)} ids, here "
                         f"{len(vocab)}): use the data config of the XE run")


class ExportCaptioner(Callback):
    """Export the captioner at the end of training.

    Args:
        path: the safetensors file; default `<trainer.default_root_dir>/model.safetensors`.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    def target(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / "model.safetensors"

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            path = export_captioner(pl_module, self.target(trainer))
            print(f"exported captioner to {path}")

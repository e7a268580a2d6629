"""Expert / init / MORL checkpoints for a sweep, and where their tensors go in the live module.

Loading goes through the soup engine's readers (`rs_lightning.soup.io.open_source`: .safetensors files,
HF folders, Lightning .ckpt with a key prefix, torch .pt/.bin, PEFT adapter folders), behind the one
function `load_checkpoint`, so any format the engine learns is sweepable here too.

The target protocol (how a task says which of its tensors a soup writes into):

- If the LightningModule defines `soup_state_dict(self) -> Mapping[str, Tensor]`, that mapping is the
  target: the module's LIVE tensors (sharing storage with its parameters/buffers, e.g. from
  `self.state_dict()` entries or `param.data`) under the CHECKPOINT's key names. A LoRA task returns its
  PEFT adapter tensors renamed to the names PEFT saves (".lora_A.default.weight" -> ".lora_A.weight"), so
  every key of an adapter folder lands on its tensor, and the sweep interpolates LoRA factors in place
  (the paper's "factors" soup).
- Otherwise the target is `module.state_dict()`, optionally restricted to the keys under `target_prefix`
  with the prefix stripped (e.g. "model." when the task holds a Hugging Face model as `self.model` and the
  experts are HF folders).

The hook is called again before every point, because Lightning may move the module to another device
(new storage) between points. Every key of every checkpoint must exist in the target with the same shape
and dtype; a mismatch is an error before any point runs, never a silent partial load. Target keys that no
checkpoint has (a frozen base model under LoRA adapters) keep their loaded values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from rs_lightning.front.errors import FrontError
from rs_lightning.soup import SoupError, check_compatible


@dataclass
class Checkpoint:
    """One checkpoint of a sweep.

    Attributes:
        path: file or folder (anything `rs_lightning.soup.io.open_source` reads).
        name: label in rows and plots (default: the file name without suffix).
        prefix: keep only the checkpoint's keys under this prefix, stripped (e.g. "model." in a .ckpt).
        mu: MORL runs only: the preference over the rewards it was trained on (sum_k mu_k R_k).
    """

    path: str | None = None
    name: str | None = None
    prefix: str | None = None
    mu: list[float] | None = None
    state_dict: Mapping[str, Tensor] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.path:
            base = os.path.basename(os.path.normpath(self.path))
            stem, ext = os.path.splitext(base)
            return stem if ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else base
        return "checkpoint"

    def where(self) -> str:
        return f"{self.label} ({self.path})" if self.path else self.label


def load_checkpoint(ckpt: Checkpoint, *, cache: bool = True) -> Mapping[str, Tensor]:
    """The tensors of a checkpoint, name -> tensor (prefix applied).

    Args:
        ckpt: the checkpoint (an in-memory `state_dict` wins over `path`).
        cache: read every tensor into memory now (one disk read per checkpoint for the whole sweep);
            False keeps the engine's lazy mapping (re-read from disk at every point, less memory).
    """
    if ckpt.state_dict is not None:
        sd = ckpt.state_dict
        if ckpt.prefix:
            sd = {k[len(ckpt.prefix) :]: v for k, v in sd.items() if k.startswith(ckpt.prefix)}
        return sd
    if not ckpt.path:
        raise FrontError(f"checkpoint {ckpt.label!r} has neither a path nor a state dict")
    from rs_lightning.soup.io import open_source

    source = open_source(ckpt.path, prefix=ckpt.prefix)
    if not cache:
        return source
    with source:
        return {k: source[k] for k in source}


def fingerprint(ckpt: Checkpoint) -> list:
    """What identifies a checkpoint in the config hash: path, prefix and total size on disk."""
    size = None
    if ckpt.path and os.path.exists(ckpt.path):
        if os.path.isdir(ckpt.path):
            size = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ckpt.path) for f in sorted(files)
            )
        else:
            size = os.path.getsize(ckpt.path)
    return [ckpt.path, ckpt.prefix, size, ckpt.mu]


def soup_target(module, target_prefix: str | None = None) -> Mapping[str, Tensor]:
    """The live tensors a soup is written into (see the module docstring for the protocol)."""
    hook = getattr(module, "soup_state_dict", None)
    target = hook() if callable(hook) else module.state_dict()
    if target_prefix:
        target = {k[len(target_prefix) :]: v for k, v in target.items() if k.startswith(target_prefix)}
    return target


def check_fit(target: Mapping[str, Tensor], named: Sequence[tuple[Checkpoint, Mapping[str, Tensor]]]) -> int:
    """Check that the checkpoints agree with each other and with the module; return the number of keys.

    Raises:
        FrontError: naming the checkpoint and the key that does not fit.
    """
    if not named:
        raise FrontError("no expert checkpoints given: a front needs at least one (usually one per reward)")
    hint = (
        "If the checkpoint keeps the weights under a prefix, set `prefix` on it (e.g. 'model.' for a Lightning "
        ".ckpt); if the module holds them under one, set front.target_prefix; a LoRA task defines "
        "soup_state_dict() (see rs_lightning/front/checkpoints.py)."
    )
    try:
        keys = check_compatible([sd for _, sd in named])
    except SoupError as err:
        labels = ", ".join(f"source {i} = {c.where()}" for i, (c, _) in enumerate(named))
        raise FrontError(f"the checkpoints do not match each other: {err} [{labels}]") from err
    first = named[0][0]
    sample = ", ".join(list(target)[:3])
    for key in keys:
        info = named[0][1]
        if key not in target:
            raise FrontError(
                f"key '{key}' of checkpoint {first.where()} is not among the module's weights "
                f"(the module has {len(target)} keys, e.g. {sample}). {hint}"
            )
        t, s = target[key], info[key]
        if tuple(t.shape) != tuple(s.shape):
            raise FrontError(
                f"key '{key}': checkpoint {first.where()} has shape {tuple(s.shape)}, the module has "
                f"{tuple(t.shape)}: these experts were not trained from this model"
            )
        if t.dtype != s.dtype:
            raise FrontError(
                f"key '{key}': checkpoint {first.where()} has dtype {s.dtype}, the module has {t.dtype}; "
                "load the module in the checkpoints' dtype (e.g. trainer.precision / the task's dtype argument)"
            )
    return len(keys)

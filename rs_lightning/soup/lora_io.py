"""PEFT LoRA adapters on disk and in a live model: `LoraAdapter`, `load_adapter`, `save_adapter`,
`live_adapter_state`. The soups themselves are in `rs_lightning.soup.lora`, which re-exports these.

Reading: adapter_model.safetensors with safetensors, adapter_model.bin only through the package's one
safe unpickler (`rs_lightning.soup.ckpt`). Writing: atomic, locked, refused where it cannot be written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
from torch import Tensor

from rs_lightning.soup.atomic import atomic_dir, explained_write_errors
from rs_lightning.soup.ckpt import load_torch_state_dict
from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.paths import check_output

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
SOUP_JSON_NAME = "soup.json"
PREFIX = "base_model.model."  # PEFT's prefix in saved adapter keys, before the base model's own names


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in memory.

    Attributes:
        config: contents of adapter_config.json.
        state_dict: tensors as in adapter_model.safetensors (PEFT key names, e.g.
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").
        path: the folder it was loaded from, if any (used in error messages).
    """

    config: dict
    state_dict: dict[str, Tensor]
    path: str | None = None


def is_peft_adapter_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a folder with adapter_config.json and adapter_model.safetensors (or .bin)."""
    p = Path(path)
    has_weights = any((p / n).is_file() for n in (SAFETENSORS_NAME, BIN_NAME))
    return p.is_dir() and (p / CONFIG_NAME).is_file() and has_weights


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Load a PEFT adapter folder (as written by `save_pretrained`) to CPU.

    Raises:
        SoupError: naming the file that is missing or cannot be read.
    """
    p = Path(path)
    if not p.is_dir():
        raise SoupError(f"adapter folder {p} does not exist or is not a folder")
    cfg_file = p / CONFIG_NAME
    if not cfg_file.is_file():
        raise SoupError(f"{cfg_file} is missing: {p} is not a PEFT adapter folder")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as err:
        raise SoupError(f"cannot read {cfg_file}: {err}") from err
    if not isinstance(config, dict):
        raise SoupError(f"{cfg_file} must hold a JSON object, got {type(config).__name__}")
    weights_file = next((p / n for n in (SAFETENSORS_NAME, BIN_NAME) if (p / n).is_file()), None)
    if weights_file is None:
        raise SoupError(f"{p / SAFETENSORS_NAME} is missing (and no {BIN_NAME} either): no adapter weights")
    if weights_file.name == SAFETENSORS_NAME:
        try:
            state = safetensors.torch.load_file(str(weights_file), device="cpu")
        except Exception as err:  # safetensors raises assorted types on corrupt files
            raise SoupError(f"cannot read the adapter weights {weights_file}: {err}") from err
    else:  # a pickle: only through the package's one safe loader
        state = load_torch_state_dict(weights_file, lightning=False)
    bad = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise SoupError(f"{weights_file}: entry '{bad}' is a {type(state[bad]).__name__}, not a tensor")
    return LoraAdapter(config=config, state_dict=dict(state), path=str(p))


def save_adapter(
    adapter: LoraAdapter, path: str | os.PathLike, *, overwrite: bool = False, extra_json: dict | None = None
) -> None:
    """Write `adapter` as a PEFT folder (loadable by `PeftModel.from_pretrained`), atomically.

    Args:
        adapter: what to write.
        path: the output folder.
        overwrite: replace an existing folder.
        extra_json: if given, also written to soup.json (e.g. the weights and sources of a soup).

    Raises:
        SoupError: a location that cannot be written (see `rs_lightning.soup.paths.check_output`), or another
            process writing it. FileExistsError: `path` exists and not `overwrite`. OSError (disk full...):
            nothing is left behind.
    """
    check_output(path, overwrite=overwrite, flag="adapter folder")
    with explained_write_errors(path, "the adapter"), atomic_dir(path, overwrite=overwrite, lock=True) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
        # safetensors refuses views and shared storage: give it plain contiguous copies.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapter.state_dict.items()}
        safetensors.torch.save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        if extra_json is not None:
            (tmp / SOUP_JSON_NAME).write_text(json.dumps(extra_json, indent=2, sort_keys=True) + "\n")


def live_adapter_state(peft_model, adapter_name: str = "default") -> dict[str, Tensor]:
    """The LIVE adapter tensors of a PeftModel under the names PEFT saves them with (what soups write into).

    PEFT keeps "...lora_A.default.weight" in the module but writes "...lora_A.weight" to adapter_model.safetensors;
    `get_peft_model_state_dict` does that renaming and returns views of the parameters, so writing into them
    updates the model. `save_embedding_layers=False`: a LoRA on lm_head must not drag the frozen base lm_head or
    embedding matrices in (peft's "auto" saves them), where soups would average identical copies of base weights.

    Raises:
        SoupError: if PEFT returned copies (a soup written into them would never reach the model).
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    live = {t.data_ptr() for t in [*peft_model.parameters(), *peft_model.buffers()]}
    copied = [k for k, v in state.items() if v.numel() and v.data_ptr() not in live]
    if copied:
        raise SoupError(
            f"PEFT returned a copy of '{copied[0]}' (not the live parameter): this peft version cannot be "
            "souped in place; write the task's soup_state_dict() from named_parameters() instead"
        )
    return state

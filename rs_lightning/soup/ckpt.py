"""Torch checkpoints (Lightning `.ckpt`, `.pt`/`.pth`/`.bin`) read safely, as state dicts.

`torch.load(weights_only=True, mmap=True)`: no pickled code runs and only the tensors that are used are
paged in. Lightning pickles hyper-parameters and loop state next to the weights (e.g. a `pathlib.Path`
init argument), which `weights_only` refuses. Those globals are listed first
(`get_unsafe_globals_in_checkpoint`) and allow-listed as inert stand-ins that keep their arguments and
run nothing, so a real Lightning checkpoint loads without `weights_only=False`. Globals that torch
blocks outright (e.g. `os.system`) still fail, with a clear error.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError


class _Inert:
    """Stands in for a pickled object that `weights_only` refuses; it keeps the arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path):
    if not zipfile.is_zipfile(path):
        # Legacy (pre-1.6) serialization or not a torch file at all: plain weights_only, no mmap.
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # garbage can fail in any way (UnpicklingError, IndexError, EOFError...)
            raise SoupError(
                f"{path} is neither a zip-format torch checkpoint nor a legacy one that loads with "
                f"weights_only=True (corrupt, or not a torch file?): {err}"
            ) from err
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(f"Inert[{n}]", (_Inert,), {}), n) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise SoupError(
            f"{path}: cannot be loaded with torch.load(weights_only=True), even with inert stand-ins for its "
            f"non-tensor objects (it pickles something torch always refuses, e.g. a call into os): {err}"
        ) from err
    except Exception as err:
        raise SoupError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {err}") from err


def load_torch_state_dict(path: Path, *, lightning: bool) -> Mapping[str, Tensor]:
    """The state dict of a torch checkpoint: its "state_dict" entry, or (not `lightning`) the object itself.

    Raises:
        SoupError: naming the file, when it cannot be read safely or holds no state dict.
    """
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    if lightning:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise SoupError(f"{path} has no 'state_dict': not a Lightning checkpoint? (it holds {keys})")
    if isinstance(obj, Mapping):
        return obj
    raise SoupError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")

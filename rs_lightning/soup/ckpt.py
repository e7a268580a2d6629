"""Torch checkpoints (Lightning `.ckpt`, `.pt`/`.pth`/`.bin`) read safely, as state dicts.

`torch.load(weights_only=True, mmap=True)`: no pickled code runs and only the tensors that are used are
paged in. Lightning pickles hyper-parameters and loop state next to the weights (e.g. a `pathlib.Path`
init argument), which `weights_only` refuses. Those globals are listed first
(`get_unsafe_globals_in_checkpoint`) and allow-listed as inert stand-ins that keep their arguments and
run nothing, so a real Lightning checkpoint loads without `weights_only=False`. Globals that torch
blocks outright (e.g. `os.system`) still fail, with a clear error.

This is the package's ONE reader of pickled files: every torch file a user names (`rs soup` sources and
`--base`, PEFT `adapter_model.bin`, the captioner's `init_checkpoint`, the front's checkpoints) goes through
`safe_torch_load`, directly or via `rs_lightning.soup.io.open_source`. A test greps the package for any
other `torch.load` / `pickle.load`.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError

# Globals no checkpoint has a reason to pickle: calls that run code, touch files or processes. They would be
# harmless as inert stand-ins, but a file that names them was built to attack: refuse it and say so.
_HOSTILE_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pty", "socket", "ctypes",
    "pickle", "_pickle", "marshal", "code", "codeop", "webbrowser", "multiprocessing", "signal", "pathlib",
    "io", "_io", "tempfile", "asyncio", "threading", "_thread", "platform",
}  # fmt: skip
_HOSTILE_BUILTINS = {
    "exec", "eval", "compile", "__import__", "open", "getattr", "setattr", "delattr", "globals", "locals",
    "vars", "breakpoint", "input", "help", "memoryview", "__builtins__",
}  # fmt: skip
# pathlib's path CLASSES are what Lightning pickles for Path hyper-parameters; only their methods are hostile.
_PATH_CLASSES = {"pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath",
                 "pathlib.PurePosixPath", "pathlib.PureWindowsPath"}


def _py3_name(name: str) -> str:
    # Protocol-2 pickles (torch.save's default) spell some globals the Python 2 way, e.g. subprocess.call as
    # "commands.call"; the unpickler maps them back, so judge (and name) the Python 3 global.
    module, _, attr = name.rpartition(".")
    py3 = (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), py3)
    return f"{module}.{attr}"


def _hostile(name: str) -> bool:
    if name in _PATH_CLASSES:
        return False
    module, _, attr = name.rpartition(".")
    if module == "builtins":
        return attr in _HOSTILE_BUILTINS
    return module.split(".")[0] in _HOSTILE_MODULES


class _Inert:
    """Stands in for a pickled object that `weights_only` refuses; it keeps the arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _reason(err: BaseException) -> str:
    """The informative line of a (multi-line) torch.load error, so messages stay on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    boiler = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")
    useful = [line for line in lines if not line.startswith(boiler)]
    text = (useful or lines or [type(err).__name__])[0].removeprefix("WeightsUnpickler error: ")
    return text if len(text) <= 240 else text[:237] + "..."


def safe_torch_load(path: str | Path):
    """`torch.load` of a user-named file without running any pickled code (see the module docstring).

    Raises:
        SoupError: naming the file, when it cannot be read this way (corrupt, not torch, or it pickles a call
            torch refuses, e.g. into os).
    """
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise SoupError(f"cannot read {path}: {err.strerror or err}") from err
    if not is_zip:
        # Legacy (pre-1.6) serialization or not a torch file at all: plain weights_only, no mmap.
        try:
            with warnings.catch_warnings():  # torch warns about old pickle protocols: noise for a user
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # garbage can fail in any way (UnpicklingError, IndexError, EOFError...)
            raise SoupError(
                f"{path} is neither a zip-format torch checkpoint nor a legacy one that loads with "
                f"weights_only=True (corrupt, not a torch file, or it pickles code): {_reason(err)}"
            ) from err
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        hostile = [n for n in map(_py3_name, names) if _hostile(n)]
        if hostile:
            raise SoupError(
                f"{path} pickles a call to {', '.join(hostile[:3])}, which no checkpoint needs: refusing it "
                "(it may be built to run code when loaded; nothing from it was executed)"
            )
        stand_ins = [(type(f"Inert[{n}]", (_Inert,), {}), n) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except SoupError:
        raise
    except pickle.UnpicklingError as err:
        raise SoupError(
            f"{path}: cannot be loaded with torch.load(weights_only=True), even with inert stand-ins for its "
            f"non-tensor objects (it pickles something torch always refuses, e.g. a call into os): {_reason(err)}"
        ) from err
    except Exception as err:
        raise SoupError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {_reason(err)}") from err


def load_torch_state_dict(path: Path, *, lightning: bool) -> Mapping[str, Tensor]:
    """The state dict of a torch checkpoint: its "state_dict" entry, or (not `lightning`) the object itself.

    Raises:
        SoupError: naming the file, when it cannot be read safely or holds no state dict.
    """
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    if lightning:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise SoupError(f"{path} has no 'state_dict': not a Lightning checkpoint? (it holds {keys})")
    if isinstance(obj, Mapping):
        return obj
    raise SoupError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")

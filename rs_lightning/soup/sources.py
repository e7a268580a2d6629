"""Checkpoints of every supported format, opened as lazy name -> tensor mappings.

`open_source(path, prefix=...)` returns a `Source`: key listing, shapes and dtypes come from metadata,
and a tensor is read from disk only when it is accessed. Formats:

- `.safetensors` file, or a Hugging Face model folder (`model.safetensors`, or shards listed in
  `model.safetensors.index.json`): truly lazy. A tensor is read with one positioned read into a fresh
  buffer rather than through a memory map, because the pages a map touches stay in the process's RSS
  until the map is closed; reading K models through maps shows up as K x the model in RSS, which would
  hide whether the streaming merge really holds only a few tensors at a time.
- Lightning `.ckpt` (its `state_dict`) and torch `.pt`/`.pth`/`.bin` state dicts: read safely by
  `rs_lightning.soup.ckpt` (`weights_only=True`, memory-mapped).
- a PEFT adapter folder (`adapter_config.json`): read by `rs_lightning.soup.lora.load_adapter`.

`prefix` selects the keys that start with it and strips it, e.g. `policy.` for a LightningModule whose
network is `self.policy`.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from rs_lightning.soup.ckpt import load_torch_state_dict
from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.paths import short
from rs_lightning.soup.safetensors_format import (  # noqa: F401 - re-exported: writer, io and tests use them here
    DTYPE_NAMES,
    INDEX_FILE,
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    TensorInfo,
    byte_view,
    read_header,
    read_index,
)

ADAPTER_CONFIG = "adapter_config.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class Source(Mapping[str, Tensor]):
    """name -> tensor of one checkpoint. `info` and `infos` never read tensor data.

    Attributes:
        path: the file or folder that was opened.
        kind: "safetensors", "sharded-safetensors", "lightning-ckpt", "torch" or "peft-adapter".
        adapter: the `LoraAdapter` for a PEFT adapter folder, else None.
    """

    path: Path
    kind: str
    adapter = None

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def infos(self) -> dict[str, TensorInfo]:
        return {name: self.info(name) for name in self}

    @property
    def total_bytes(self) -> int:
        return sum(self.info(name).nbytes for name in self)

    @property
    def folder(self) -> Path | None:
        """The model folder when the source is one (its config files are worth copying), else None."""
        return self.path if self.path.is_dir() else None

    def close(self) -> None:
        """Release open files; the mapping stays usable and reopens them on the next access."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, kind={self.kind!r}, tensors={len(self)})"


class SafetensorsSource(Source):
    """A `.safetensors` file or a (sharded) HF folder; each access reads one tensor from disk."""

    def __init__(self, path: Path, files: list[Path], kind: str, owners: Mapping[str, Path] | None = None):
        self.path, self.kind, self._files = path, kind, files
        self._entries: dict[str, tuple[int, TensorInfo, int, int]] = {}
        self._handles: dict[int, object] = {}
        found: list[tuple[int, int, str]] = []
        for fi, file in enumerate(files):
            for name, (info, start, end) in read_header(file).items():
                if owners is not None and owners.get(name) != file:
                    continue  # the index is the authority on which shard holds a tensor
                self._entries[name] = (fi, info, start, end)
                found.append((fi, start, name))
        if owners is not None:
            missing = [n for n in owners if n not in self._entries]
            if missing:
                raise SoupError(f"{path}: tensor '{missing[0]}' listed in {INDEX_FILE} is not in {owners[missing[0]]}")
        # File order then offset order, so a pass over the keys reads each file front to back.
        self._order = [name for _, _, name in sorted(found)]

    def __getitem__(self, name: str) -> Tensor:
        fi, info, start, end = self._entries[name]
        data = torch.empty(end - start, dtype=torch.uint8)
        try:
            f = self._handles.get(fi)
            if f is None:
                f = self._handles[fi] = open(self._files[fi], "rb", buffering=0)
            if end > start:
                view, pos = byte_view(data), 0
                while pos < len(view):  # a read may return fewer bytes than asked (e.g. > 2 GiB on Linux)
                    f.seek(start + pos)
                    n = f.readinto(view[pos:])
                    if not n:
                        raise SoupError(f"{self._files[fi]}: file ends inside tensor '{name}' (truncated?)")
                    pos += n
        except OSError as err:
            raise SoupError(f"cannot read tensor '{name}' from {self._files[fi]}: {err.strerror or err}") from err
        return data.view(info.dtype).reshape(info.shape)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._entries

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class StateDictSource(Source):
    """A state dict already loaded (or memory-mapped by `torch.load(mmap=True)`)."""

    def __init__(self, path: Path, kind: str, state_dict: Mapping[str, Tensor], adapter=None):
        self.path, self.kind, self.adapter = path, kind, adapter
        self._sd = dict(state_dict)
        for name, value in self._sd.items():
            if not isinstance(value, Tensor):
                raise SoupError(f"{path}: entry '{name}' of the state dict is a {type(value).__name__}, not a tensor")

    def __getitem__(self, name: str) -> Tensor:
        return self._sd[name]

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __contains__(self, name: object) -> bool:
        return name in self._sd

    def __len__(self) -> int:
        return len(self._sd)


class PrefixedSource(Source):
    """The keys of `inner` that start with `prefix`, with the prefix stripped."""

    def __init__(self, inner: Source, prefix: str):
        self.inner, self.prefix = inner, prefix
        self.path, self.kind, self.adapter = inner.path, inner.kind, inner.adapter
        self._names = {name[len(prefix):]: name for name in inner if name.startswith(prefix)}
        if not self._names:
            heads = sorted({name.split(".", 1)[0] + ("." if "." in name else "") for name in inner})
            raise SoupError(
                f"prefix '{prefix}' matches no key of {inner.path}; its keys start with: "
                + ", ".join(heads[:8]) + (" ..." if len(heads) > 8 else "")
            )

    def __getitem__(self, name: str) -> Tensor:
        return self.inner[self._names[name]]

    def info(self, name: str) -> TensorInfo:
        return self.inner.info(self._names[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def close(self) -> None:
        self.inner.close()


def open_source(path: str | Path, *, prefix: str | None = None) -> Source:
    """Open a checkpoint of any supported format as a lazy name -> tensor mapping.

    Args:
        path: a `.safetensors` file, a HF model folder (single or sharded safetensors, or
            `pytorch_model.bin`), a PEFT adapter folder, a Lightning `.ckpt`, or a `.pt`/`.pth`/`.bin` file.
        prefix: keep only the keys starting with it, stripped (e.g. "policy.").

    Raises:
        SoupError: naming the path, for a missing path, an unknown format, a corrupt file, or a prefix
            that matches no key.
    """
    if path is None or str(path) == "":
        raise SoupError(f"a source path is empty ({path!r})")
    path = Path(path)
    check_input_path(path)
    source = _open(path)
    return PrefixedSource(source, prefix) if prefix else source


def check_input_path(path: Path) -> None:
    """Refuse, naming it, an input that is missing, unreadable by name, or not a file/folder (a FIFO would
    block the first read forever, a device would be read as weights)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise SoupError(f"source {short(path)} is a dangling symlink (its target does not exist)") from None
        raise SoupError(f"no such file or folder: {short(path)}") from None
    except OSError as err:  # ENAMETOOLONG, ELOOP, EACCES on a parent folder...
        raise SoupError(f"cannot use source {short(path)}: {err.strerror or err}") from err
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SoupError(f"source {short(path)} is not a regular file or folder (a pipe or a device?)")


def _open(path: Path) -> Source:
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            from rs_lightning.soup import lora

            adapter = lora.load_adapter(path)
            return StateDictSource(path, "peft-adapter", adapter.state_dict, adapter=adapter)
        if (path / INDEX_FILE).is_file():
            owners = read_index(path)
            files = sorted(set(owners.values()))
            return SafetensorsSource(path, files, "sharded-safetensors", owners)
        if (path / SINGLE_FILE).is_file():
            return SafetensorsSource(path, [path / SINGLE_FILE], "safetensors")
        if (path / "pytorch_model.bin").is_file():
            return StateDictSource(path, "torch", load_torch_state_dict(path / "pytorch_model.bin", lightning=False))
        raise SoupError(
            f"{path} is a folder without {SINGLE_FILE}, {INDEX_FILE}, pytorch_model.bin or {ADAPTER_CONFIG}: "
            "not a model or adapter folder"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsSource(path, [path], "safetensors")
    if suffix == ".ckpt":
        return StateDictSource(path, "lightning-ckpt", load_torch_state_dict(path, lightning=True))
    if suffix in TORCH_SUFFIXES:
        return StateDictSource(path, "torch", load_torch_state_dict(path, lightning=False))
    raise SoupError(
        f"{path}: unknown checkpoint format '{suffix or path.name}' (supported: .safetensors, a HF model "
        f"folder, a PEFT adapter folder, a Lightning .ckpt, {'/'.join(TORCH_SUFFIXES)})"
    )

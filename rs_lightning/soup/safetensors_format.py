"""The safetensors format as the soup engine reads it: dtype names, file names, and checked headers.

`read_header` validates everything a later positioned read relies on (header length, JSON, dtypes, offsets
inside the file), so a corrupt or hostile file is refused with its name before any tensor is read.
`read_index` refuses an index whose shards are not plain file names of the model folder ("../x" would read,
and let a soup overwrite, files the user never named).
"""

from __future__ import annotations

import ctypes
import json
import math
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"),
        ("I32", "int32"), ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"), ("F16", "float16"),
        ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"), ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"), ("C64", "complex64"),
    ]
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors refuses headers above 100 MB; a larger length field means a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def byte_view(t: Tensor) -> memoryview:
    """A writable, zero-copy view of the bytes of a contiguous CPU tensor (keep `t` alive while used)."""
    buf = (ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return memoryview(buf).cast("B")


def read_header(file: Path) -> dict[str, tuple[TensorInfo, int, int]]:
    """name -> (info, absolute start, absolute end) from a safetensors header, with every check that
    lets a later read trust the offsets."""
    try:
        size = file.stat().st_size
        if not stat.S_ISREG(file.stat().st_mode):
            raise SoupError(f"{file} is not a regular file (a pipe or a device?)")
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_start, entries = 8 + n, {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(spec["dtype"])
            if dtype is None:
                raise ValueError(f"tensor '{name}' has unsupported dtype {spec['dtype']!r}")
            info = TensorInfo(tuple(int(d) for d in spec["shape"]), dtype)
            start, end = (int(o) for o in spec["data_offsets"])
            if end - start != info.nbytes or start < 0 or data_start + end > size:
                raise ValueError(f"tensor '{name}' has offsets {[start, end]} that do not fit its shape or the file")
            entries[name] = (info, data_start + start, data_start + end)
    except SoupError:
        raise
    except OSError as err:
        raise SoupError(f"cannot read {file}: {err.strerror or err}") from err
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:  # JSONDecodeError: ValueError
        raise SoupError(f"{file} is not a valid safetensors file (corrupt or truncated?): {err}") from err
    return entries


def read_index(folder: Path) -> dict[str, Path]:
    index_path = folder / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        owners = {str(name): folder / str(file) for name, file in weight_map.items()}
    except OSError as err:
        raise SoupError(f"cannot read {index_path}: {err.strerror or err}") from err
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SoupError(f"{index_path} is not a valid index (needs a 'weight_map' object): {err}") from err
    for name, file in weight_map.items():
        # Shards are files of the folder itself: "../x" or "/abs" would read (and let a soup overwrite)
        # files the user never named.
        if Path(str(file)).name != str(file) or str(file) in ("", ".", ".."):
            raise SoupError(f"{index_path}: tensor '{name}' points to '{file}', which is not a file name in {folder}")
    for file in sorted(set(owners.values())):
        if not file.is_file():
            raise SoupError(f"{index_path} lists shard {file.name}, which is missing from {folder}")
    return owners

"""Write state dicts as Hugging Face safetensors folders, shard by shard, atomically.

Layout (what `transformers.from_pretrained` and `open_source` read): one `model.safetensors` when the
tensors fit in one shard, else `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}), and `soup.json` describing the soup.

Shards are planned from shapes and dtypes before any data exists, so each shard's header is written
first and tensors are then streamed into it one at a time: the writer never holds a shard in memory when
it is given a mapping or a plan. The whole folder is built in a temporary sibling and renamed into place
(`atomic_dir`): a failure or a kill leaves no partial output.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import rs_lightning
from rs_lightning.soup.atomic import atomic_dir, explained_write_errors
from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.paths import check_output
from rs_lightning.soup.sources import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, TensorInfo, byte_view

# The Hugging Face default ("5GB" = 5e9 bytes).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SOUP_FILE = "soup.json"
Layout = list[tuple[str, TensorInfo]]
# Files of a model folder that are weights (rewritten by us), not configuration (copied as they are).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", SOUP_FILE}


@dataclass
class SaveResult:
    """What a save wrote: the folder, its weight files, the tensor count and bytes, and the seconds."""

    path: Path
    files: list[str] = field(default_factory=list)
    n_tensors: int = 0
    total_bytes: int = 0
    seconds: float = 0.0

    def summary(self, what: str = "") -> str:
        label = f" ({what})" if what else ""
        return (
            f"wrote {self.path}{label}: {self.n_tensors} tensors, {self.total_bytes / 1e6:.1f} MB in "
            f"{len(self.files)} file(s), {self.seconds:.2f} s"
        )


def plan_shards(layout: Sequence[tuple[str, TensorInfo]], max_shard_bytes: int) -> list[Layout]:
    """Split `layout` greedily, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets
    a shard of its own). Within a shard, wider dtypes come first so every tensor is aligned to its
    element size, as safetensors itself does."""
    if max_shard_bytes <= 0:
        raise SoupError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[Layout] = [[]]
    size = 0
    for name, info in layout:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    # An empty state dict still gets one (empty) file, so the output is a loadable folder.
    return [sorted(s, key=lambda e: -e[1].dtype.itemsize) for s in shards if s] or [[]]


def _shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_index(folder: Path, names: list[str], shards: Sequence[Layout]) -> None:
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(info.nbytes for layout in shards for _, info in layout)},
            "weight_map": {t: name for name, layout in zip(names, shards) for t, _ in layout},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _header_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    # transformers refuses safetensors files whose metadata lacks "format": "pt".
    return {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}


def _write_file(file: Path, layout: Layout, tensors: Iterator[tuple[str, Tensor]], metadata: dict) -> None:
    """Write one safetensors file: the header from `layout`, then the next len(layout) tensors of
    `tensors` (which must come in layout order), each dropped once written."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, info in layout:
        if info.dtype not in DTYPE_NAMES:
            raise SoupError(f"tensor '{name}' has dtype {info.dtype}, which safetensors cannot store")
        header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data block starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, info in layout:
            got_name, t = next(tensors)
            if got_name != name or tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise SoupError(
                    f"internal: expected tensor '{name}' {info.shape} {info.dtype}, got '{got_name}' "
                    f"{tuple(t.shape)} {t.dtype}"
                )
            if info.nbytes:
                t = t.detach().to("cpu").contiguous()
                f.write(byte_view(t))
            del t
        f.flush()
        os.fsync(f.fileno())


def write_planned(folder: Path, shards: Sequence[Layout], tensors: Iterable[tuple[str, Tensor]],
                  metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write `tensors` (in the order of the flattened `shards`) into `folder`; return the file names.

    Args:
        folder: an existing (temporary) folder.
        shards: the plan from `plan_shards`.
        tensors: (name, tensor) pairs, produced lazily, in plan order.
        metadata: string metadata for every safetensors header ("format": "pt" is always added).
    """
    meta = _header_metadata(metadata)
    names = _shard_names(len(shards))
    it = iter(tensors)
    for name, layout in zip(names, shards):
        _write_file(folder / name, layout, it, meta)
    _write_index(folder, names, shards)
    return names


def soup_record(sources: Sequence, weights: Sequence[float], **fields) -> dict:
    """The content of `soup.json`: what was souped with what, so an output explains itself."""
    return {
        "method": "rewarded soup (weight interpolation)",
        "convention": "theta = sum_i weights[i] * theta(sources[i])",
        "sources": [str(s) for s in sources],
        "weights": [float(w) for w in weights],
        **fields,
        "rs_lightning_version": rs_lightning.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_model_files(src: Path, dst: Path, *, dtype: torch.dtype | None = None) -> list[str]:
    """Copy the non-weight files of a model folder (config, tokenizer, generation config) into `dst`,
    so the soup loads with `from_pretrained` like its sources; a cast updates config.json's dtype."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in _NOT_COPIED or f.suffix.lower() in _WEIGHT_SUFFIXES:
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    config = dst / "config.json"
    if dtype is not None and config.is_file():
        cfg = json.loads(config.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(cfg, indent=2) + "\n")
    return copied


def save_safetensors(
    state_dict_or_iterator: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
    soup_info: Mapping | None = None,
    overwrite: bool = False,
    copy_from: str | os.PathLike | None = None,
    config_dtype: torch.dtype | None = None,
) -> SaveResult:
    """Save tensors as a HF safetensors folder (single file or shards + index), atomically.

    Args:
        state_dict_or_iterator: name -> tensor, or an iterable of (name, tensor) pairs. A mapping is
            streamed into pre-planned shards; pairs are buffered one shard at a time (their sizes are not
            known in advance).
        out_dir: the output folder; it appears complete or not at all.
        max_shard_bytes: the largest shard (a bigger single tensor gets a shard of its own).
        metadata: string metadata written into every safetensors header.
        soup_info: when given, written as `soup.json` (see `soup_record`).
        overwrite: replace an existing `out_dir`.
        copy_from: a model folder whose config/tokenizer files are copied next to the weights.
        config_dtype: the dtype to record in the copied config.json (after a cast).

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
        SoupError: a value that is not a tensor or has a dtype safetensors cannot store, an output location
            that cannot be written, another process writing it.
        OSError: writing failed (e.g. disk full); nothing is left behind.
    """
    start = time.perf_counter()
    result = SaveResult(Path(out_dir) if out_dir is not None else None)
    check_output(out_dir, overwrite=overwrite, flag="out_dir")
    if isinstance(state_dict_or_iterator, Mapping):
        bad = next((k for k, v in state_dict_or_iterator.items() if not isinstance(v, Tensor)), None)
        if bad is not None:
            raise SoupError(f"tensor '{bad}' is a {type(state_dict_or_iterator[bad]).__name__}, not a tensor")
    with explained_write_errors(out_dir), atomic_dir(out_dir, overwrite=overwrite, lock=True) as tmp:
        if isinstance(state_dict_or_iterator, Mapping):
            sd = state_dict_or_iterator
            shards = plan_shards([(k, TensorInfo(tuple(t.shape), t.dtype)) for k, t in sd.items()], max_shard_bytes)
            result.files = write_planned(tmp, shards, ((k, sd[k]) for s in shards for k, _ in s), metadata)
        else:
            shards = _write_buffered(tmp, state_dict_or_iterator, max_shard_bytes, metadata)
            result.files = sorted(f.name for f in tmp.glob("*.safetensors"))
        result.n_tensors = sum(len(s) for s in shards)
        result.total_bytes = sum(info.nbytes for s in shards for _, info in s)
        if copy_from is not None and Path(copy_from).is_dir():
            copy_model_files(Path(copy_from), tmp, dtype=config_dtype)
        if soup_info is not None:
            (tmp / SOUP_FILE).write_text(json.dumps(dict(soup_info), indent=2) + "\n")
    result.seconds = time.perf_counter() - start
    return result


def _write_buffered(folder: Path, pairs: Iterable[tuple[str, Tensor]], max_shard_bytes: int,
                    metadata: Mapping[str, str] | None) -> list[Layout]:
    """Hold at most one shard of tensors, write each shard under a provisional name, then rename them
    once their count is known."""
    shards: list[Layout] = []
    buffer: dict[str, Tensor] = {}
    seen: set[str] = set()
    size = 0
    meta = _header_metadata(metadata)

    def flush() -> None:
        layout = plan_shards([(k, TensorInfo(tuple(t.shape), t.dtype)) for k, t in buffer.items()], 1 << 62)[0]
        _write_file(folder / f"shard-{len(shards):05d}.part", layout, ((k, buffer[k]) for k, _ in layout), meta)
        shards.append(layout)
        buffer.clear()

    for name, t in pairs:
        if name in seen:
            raise SoupError(f"tensor '{name}' is given twice")
        if not isinstance(t, Tensor):
            raise SoupError(f"tensor '{name}' is a {type(t).__name__}, not a tensor")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if buffer and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        buffer[name] = t
        size += nbytes
    if buffer or not shards:
        flush()
    names = _shard_names(len(shards))
    for i, name in enumerate(names):
        os.rename(folder / f"shard-{i:05d}.part", folder / name)
    _write_index(folder, names, shards)
    return shards

"""Checkpoint I/O of the soup engine: read sources of every format, merge them streaming, save atomically.

The public surface lives here; the code is split by job:
- `sources.py`: `open_source` (safetensors file or HF folder, sharded or not; PEFT adapter folder;
  Lightning `.ckpt`; torch `.pt`/`.bin`) as lazy name -> tensor mappings with metadata-only shapes/dtypes.
- `ckpt.py`: torch/Lightning checkpoints loaded with `weights_only=True` (no pickled code runs).
- `writer.py`: `save_safetensors` (single file or HF shards + index, `soup.json`, atomic).
- `streaming.py`: `merge_files`, the out-of-core soup theta = sum_i w_i theta_i.
"""

from rs_lightning.soup.sources import Source, TensorInfo, open_source
from rs_lightning.soup.streaming import check_sources, merge_files, parse_dtype
from rs_lightning.soup.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    SOUP_FILE,
    SaveResult,
    copy_model_files,
    save_safetensors,
    soup_record,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "SOUP_FILE",
    "SaveResult",
    "Source",
    "TensorInfo",
    "check_sources",
    "copy_model_files",
    "merge_files",
    "open_source",
    "parse_dtype",
    "save_safetensors",
    "soup_record",
]

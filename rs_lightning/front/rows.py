"""`front.jsonl`: one JSON row per evaluated point, appended and fsynced as each point finishes.

A row: {"kind": soup|expert|init|morl, "name", "weights" (aligned with the experts; null for init/morl),
"mu" (MORL preference or null), "rewards" {name: float|null}, "val_rewards" (when validation rows are
computed), "valid", "invalid_rewards", "samples", "seconds", "config_hash", and when the task's evaluation
steps return them (per_example.py) "per_example" / "val_per_example" {name: [float|null per example, in
dataloader order]}}. Non-finite rewards are stored as null with valid = false, so one NaN never breaks the
JSON or the summary.

Resume: re-opening the store reads the rows already there (a line cut by a kill is dropped) and the sweep
skips their points, so a killed sweep loses at most the point in progress. Rows from another config hash
are an error: the values would not be comparable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rs_lightning.front.errors import FrontError

FRONT_FILE = "front.jsonl"
TIMING_FIELDS = ("seconds",)


def point_key(kind: str, name: str, weights: Sequence[float] | None) -> str:
    """Identity of a point across runs (kind, name, weights rounded to 12 digits)."""
    ws = None if weights is None else [round(float(w), 12) + 0.0 for w in weights]
    return json.dumps([kind, name, ws])


def row_key(row: dict) -> str:
    return point_key(row["kind"], row["name"], row.get("weights"))


def clean_rewards(values: dict[str, float], expected: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """Replace non-finite or missing rewards by None; return (rewards, names of the invalid ones)."""
    out, bad = {}, []
    for name in list(values) + [n for n in expected if n not in values]:
        v = values.get(name)
        if v is None or not math.isfinite(float(v)):
            out[name] = None
            bad.append(name)
        else:
            out[name] = float(v)
    return out, bad


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a front.jsonl (an unterminated last line, cut by a kill, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    complete = lines[:-1]  # the text after the last newline is either "" or a cut line
    rows = []
    for i, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise FrontError(f"{path}:{i} is not a JSON row ({err}); fix or remove the file") from err
    return rows


class RowStore:
    """Append-only, crash-safe row file for one sweep configuration.

    Args:
        path: the front.jsonl file.
        config_hash: hash of what the rows' values depend on; rows on disk must carry the same one.
        overwrite: start from an empty file instead of resuming.
    """

    def __init__(self, path: str | os.PathLike, config_hash: str, *, overwrite: bool = False):
        self.path = Path(path)
        self.config_hash = config_hash
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        self._drop_cut_tail()
        self.rows = read_rows(self.path)
        other = sorted({r.get("config_hash") for r in self.rows} - {config_hash}, key=str)
        if other:
            raise FrontError(
                f"{self.path} holds rows computed with config hash {other[0]}, but this config hashes to "
                f"{config_hash}: the model, data, trainer or checkpoints changed. Use a new output folder "
                "(--front.out_dir) or pass --overwrite to start this one again."
            )
        self._by_key = {row_key(r): r for r in self.rows}

    def _drop_cut_tail(self) -> None:
        # A kill during a write can leave a line without its newline; appending after it would glue two
        # rows together, so cut the file back to its last complete line first.
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def get(self, key: str) -> dict | None:
        return self._by_key.get(key)

    def append(self, row: dict) -> None:
        """Write one row and make it durable (flush + fsync) before returning."""
        row = {**row, "config_hash": self.config_hash}
        line = json.dumps(row, allow_nan=False) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self._by_key[row_key(row)] = row


def reward_names(rows: Sequence[dict], field: str = "rewards") -> list[str]:
    """Reward names in first-seen order over the rows."""
    names: dict[str, None] = {}
    for r in rows:
        for name in r.get(field) or {}:
            names.setdefault(name, None)
    return list(names)


def reward_matrix(rows: Sequence[dict], names: Sequence[str], field: str = "rewards") -> np.ndarray:
    """(len(rows), len(names)) float array; NaN where a reward is null or absent."""
    out = np.full((len(rows), len(names)), np.nan)
    for i, r in enumerate(rows):
        vals = r.get(field) or {}
        for k, name in enumerate(names):
            v = vals.get(name)
            if v is not None:
                out[i, k] = float(v)
    return out


def strip_timing(row: dict) -> dict:
    """A row without its timing fields (for comparing two runs of the same sweep)."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def stable_hash(obj) -> str:
    """A short sha256 of a JSON-able object (keys sorted; unknown objects by their str)."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

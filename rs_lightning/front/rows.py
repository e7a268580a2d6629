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
from rs_lightning.soup.paths import make_parents, remove_empty

FRONT_FILE = "front.jsonl"
KINDS = ("soup", "expert", "init", "morl", "ensemble")
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
    """Rows of a front.jsonl (an unterminated last line, cut by a kill, is ignored); each one is checked.

    Raises:
        FrontError: naming the file and line of a line that is not JSON or not a row (see `check_row`).
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise FrontError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from err
    lines = text.split("\n")
    complete = lines[:-1]  # the text after the last newline is either "" or a cut line
    rows = []
    for i, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FrontError(f"{path}:{i} is not a JSON row ({err}); fix or remove the file") from err
        problem = check_row(row)
        if problem:
            raise FrontError(f"{path}:{i}: {problem}; not a row `rs front` wrote: fix or remove the line")
        rows.append(row)
    return rows


def _numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)


def check_row(row) -> str | None:
    """What makes `row` unusable as a front row (a JSON object with a known kind, a name, weights aligned with
    the experts for soups and experts, rewards as a name -> number|null object), or None if it is fine."""
    if not isinstance(row, dict):
        return f"the row is a JSON {type(row).__name__}, not an object"
    for key in ("kind", "name", "rewards"):
        if key not in row:
            return f"the row has no {key!r}"
    if row["kind"] not in KINDS:
        return f"kind {row['kind']!r} is not one of {', '.join(KINDS)}"
    if not isinstance(row["name"], str):
        return f"name {row['name']!r} is not a string"
    weights = row.get("weights")
    if row["kind"] in ("soup", "expert", "ensemble") and not (_numbers(weights) and weights):
        return f"{row['kind']} row {row['name']!r} has weights {weights!r}, not a list of numbers"
    if row.get("mu") is not None and not _numbers(row["mu"]):
        return f"row {row['name']!r} has mu {row['mu']!r}, not a list of numbers"
    for field in ("rewards", "val_rewards"):
        values = row.get(field, {})
        if not isinstance(values, dict) or not all(v is None or _numbers([v]) for v in values.values()):
            return f"row {row['name']!r} has {field} {values!r}, not an object of numbers (or null)"
    return None


class RowStore:
    """Append-only, crash-safe row file for one sweep configuration.

    Opening only reads: the file (and its folder) are created, or with `overwrite` emptied, by the first
    `append`, so a sweep refused before its first row leaves the folder as it was.

    Args:
        path: the front.jsonl file.
        config_hash: hash of what the rows' values depend on; rows on disk must carry the same one.
        overwrite: start from an empty file instead of resuming.
    """

    def __init__(self, path: str | os.PathLike, config_hash: str, *, overwrite: bool = False):
        self.path = Path(path)
        self.config_hash = config_hash
        self._truncate = overwrite and self.path.exists()
        self._end: int | None = None  # where the next row goes, once known (this process is the only writer)
        self.rows = [] if overwrite else read_rows(self.path)
        other = sorted({r.get("config_hash") for r in self.rows} - {config_hash}, key=str)
        if other:
            raise FrontError(
                f"{self.path} holds rows computed with config hash {other[0]}, but this config hashes to "
                f"{config_hash}: the model, data, trainer, checkpoints or merge method changed. Use a new output "
                "folder (--front.out_dir) or pass --overwrite to start this one again."
            )
        self._by_key = {row_key(r): r for r in self.rows}

    def _complete_lines(self) -> int:
        # A kill during a write can leave a line without its newline; appending after it would glue two
        # rows together, so the next write starts at the end of the last complete line.
        if self._end is not None:
            return self._end
        if self._truncate or not self.path.exists():
            return 0
        return self.path.read_bytes().rfind(b"\n") + 1

    def get(self, key: str) -> dict | None:
        return self._by_key.get(key)

    def append(self, row: dict) -> None:
        """Write one row and make it durable (flush + fsync) before returning.

        Raises:
            OSError: naming the file (disk full, I/O error); the file is as it was before the call (a file this
                call created is removed).
        """
        row = {**row, "config_hash": self.config_hash}
        line = (json.dumps(row, allow_nan=False) + "\n").encode()
        existed = self.path.exists()
        created = make_parents(self.path.parent) if not existed else []
        end = self._complete_lines()
        try:
            with open(self.path, "r+b" if existed else "wb") as f:
                f.seek(end)
                f.truncate()
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            self._undo(existed, end, created)
            raise OSError(err.errno, f"cannot write {self.path}: {err.strerror or err}") from err
        self._truncate, self._end = False, end + len(line)
        self.rows.append(row)
        self._by_key[row_key(row)] = row

    def _undo(self, existed: bool, end: int, created: list[Path]) -> None:
        """Put the file back as it was before a failed append (best effort: the disk may still be full)."""
        try:
            if existed and not self._truncate:
                os.truncate(self.path, end)
            elif not existed:
                self.path.unlink(missing_ok=True)
                remove_empty(created)
        except OSError:
            pass


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

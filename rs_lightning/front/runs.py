"""A run folder: where `rs front` may write one, and reading a finished (or partial) one back.

    check_run_folder("runs/front/x", "front.out_dir")     # before any work: a folder we can create or write in
    run = load_run("runs/front/x")                        # rows of this run's points, run.json, its settings

`load_run` is what `rs front select` and `rs front report` read. Everything is checked on the way in, with
messages that name the file (and line): a front.jsonl line that is not a row (rows.check_row), a run.json
that is not a JSON object, summary settings it does not know or that fail `SummarySettings.check`, soup
weights that do not match the run's experts. The rows are those of the points run.json lists, in the
sweep's order: front.jsonl also keeps the rows of earlier, wider grids (resume cache), which are not part of
this run, so `rs front report` scores exactly the rows the sweep's own summary.json scored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rs_lightning.front.errors import FrontError
from rs_lightning.front.rows import FRONT_FILE, point_key, read_rows, row_key
from rs_lightning.front.settings import SummarySettings

RUN_FILE = "run.json"


def check_run_folder(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, in milliseconds, a run folder that cannot be written (`flag` names it in the message): a file,
    a folder under a file or a dangling symlink, a read-only or forbidden location, a name too long."""
    from rs_lightning.soup.paths import check_output

    p = Path(os.path.abspath(path))
    if os.path.lexists(p) and not p.is_dir():
        raise FrontError(f"{flag} {p} exists and is not a folder: a run is written as a folder of files")
    check_output(p, overwrite=True, flag=flag)  # the parent side: under a file, read-only, too long, root
    if p.is_dir():
        check_writable(p, flag)
    return p


def check_writable(folder: Path, flag: str) -> None:
    """Refuse an existing folder this process cannot create files in."""
    if os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "read-only filesystem" if read_only else "permission denied"
    raise FrontError(f"{flag} {folder}: cannot write in {folder} ({why})")


@dataclass
class Run:
    """A run folder read back: `rows` of this run's points (sweep order), `info` (run.json, {} if absent),
    `settings` (its summary settings, checked), `ignored` (rows of front.jsonl that belong to no point of it)."""

    folder: Path
    rows: list[dict]
    info: dict = field(default_factory=dict)
    settings: SummarySettings = field(default_factory=SummarySettings)
    ignored: int = 0


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read and check a run folder (see the module docstring).

    Raises:
        FrontError: naming the folder or file (and line) and what is wrong with it.
    """
    folder = Path(run_dir)
    if not folder.exists():
        raise FrontError(f"{folder}: no such run folder (give the front.out_dir of a sweep)")
    if not folder.is_dir():
        raise FrontError(f"{folder} is not a folder: give the front.out_dir of a sweep")
    if not (folder / FRONT_FILE).is_file():
        raise FrontError(f"{folder} has no {FRONT_FILE}: not a front run folder (run `rs front --config ...`)")
    rows = read_rows(folder / FRONT_FILE)
    info = read_info(folder / RUN_FILE)
    settings = settings_of(info, folder / RUN_FILE)
    mine = _this_run(rows, info, folder / RUN_FILE)
    _check_weights(mine, info, folder)
    return Run(folder, mine, info, settings, ignored=len(rows) - len(mine))


def read_info(path: Path) -> dict:
    """run.json as a dict ({} when the file is absent)."""
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FrontError(f"{path} is not valid JSON ({err}): re-run the sweep (`rs front --config ...`) to "
                         "rewrite it") from err
    if not isinstance(info, dict):
        raise FrontError(f"{path} must hold a JSON object, got a {type(info).__name__}: re-run the sweep to rewrite it")
    experts = info.get("experts", [])
    if not isinstance(experts, list) or not all(isinstance(e, dict) for e in experts):
        raise FrontError(f"{path}: 'experts' must be a list of objects, got {experts!r}")
    return info


def settings_of(info: dict, path: Path) -> SummarySettings:
    """The checked SummarySettings of run.json's `summary_settings`."""
    given = info.get("summary_settings") or {}
    if not isinstance(given, dict):
        raise FrontError(f"{path}: summary_settings must be a JSON object, got {given!r}")
    known = {f.name for f in dataclasses.fields(SummarySettings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise FrontError(f"{path}: summary_settings.{unknown[0]} is not a summary setting "
                         f"(known: {', '.join(sorted(known))})")
    try:
        settings = SummarySettings(**given)
        settings.check()
    except (TypeError, ValueError) as err:
        raise FrontError(f"{path}: {err}") from err
    return settings


def _this_run(rows: list[dict], info: dict, path: Path) -> list[dict]:
    points = info.get("points")
    if points is None:  # a run.json from before the points were recorded: every row is this run's
        return rows
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 3 for p in points):
        raise FrontError(f"{path}: 'points' must be a list of [kind, name, weights] entries")
    by_key = {row_key(r): r for r in rows}
    return [by_key[k] for k in (point_key(*p) for p in points) if k in by_key]


def _check_weights(rows: list[dict], info: dict, folder: Path) -> None:
    n = len(info.get("experts") or []) or None
    for row in rows:
        weights = row.get("weights")
        if row["kind"] not in ("soup", "expert"):
            continue
        n = n or len(weights)
        if len(weights) != n:
            raise FrontError(f"{folder / FRONT_FILE}: row {row['name']!r} has {len(weights)} weights but the run has "
                             f"{n} experts: the file mixes runs; fix or remove it")

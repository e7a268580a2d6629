"""Output paths of the soup engine: checked before any work, so a bad `--out` fails in milliseconds.

`check_output` refuses, with a one-line message naming the path:
- the filesystem root, a name longer than the filesystem allows, a folder under an existing file or a
  dangling symlink, a location that cannot be written (read-only filesystem, permissions);
- an output that IS, CONTAINS or LIES INSIDE an input (a source or a base model), compared on resolved
  paths (symlinks followed) and on (device, inode) so a bind mount or a symlinked HF cache blob is caught
  too. With `--overwrite` such an output would be deleted before the soup is renamed into place, i.e. the
  inputs would be destroyed; without it the soup would be written into a model folder. Always refused.

`sibling_stem`, `make_parents` and `remove_empty` are shared by `atomic.py` and `lock.py`: hidden siblings
of an output (temporaries, lock file) and the parent folders a failed write must not leave behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from rs_lightning.soup.errors import SoupError

# Linux's NAME_MAX / PATH_MAX, used when the filesystem cannot be asked (pathconf).
NAME_MAX = 255
PATH_MAX = 4096
# Hidden siblings are ".<stem>.tmp-<pid>-<random>": keep the stem short enough that they fit NAME_MAX.
_STEM_MAX = 120


def short(path: str | os.PathLike, limit: int = 120) -> str:
    """`path` for a message: long names are cut in the middle so the message stays one readable line."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-(limit // 3):]} ({len(text)} chars)"


def sibling_stem(dest: Path) -> str:
    """The name part of `dest`'s hidden siblings: its name, or a cut name + hash when the name is long."""
    name = dest.name
    if len(name) <= _STEM_MAX:
        return name
    return f"{name[:80]}~{hashlib.sha1(name.encode(errors='surrogateescape')).hexdigest()[:10]}"


def absolute(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` made absolute and normalised WITHOUT following symlinks ("." becomes the current folder's
    name, so its siblings live next to it, not inside it)."""
    if path is None or str(path) == "":
        raise SoupError(f"the {what} path is empty")
    p = Path(os.path.abspath(os.fspath(path)))
    if p.parent == p:
        raise SoupError(f"the {what} cannot be the filesystem root ({p})")
    return p


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, outermost first."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:  # created meanwhile by another process: fine, it is not ours to remove
            missing.remove(d)
    return list(reversed(missing))


def remove_empty(created: Iterable[Path]) -> None:
    """Remove folders `make_parents` created, innermost first, as long as they are still empty."""
    for d in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            return


def _name_max(existing: Path) -> tuple[int, int]:
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return NAME_MAX, PATH_MAX


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p):
        p = p.parent
    return p


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(p: Path) -> tuple[list[Path], set[tuple[int, int]]]:
    """`p` resolved with its ancestors, and the (device, inode) of those that exist."""
    resolved = p.resolve()
    chain = [resolved, *resolved.parents]
    return chain, {i for i in map(_identity, chain) if i is not None}


def input_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The inputs and, for folders, the files directly inside them (a HF cache folder's weights are
    symlinks to blobs elsewhere: the blob is an input too)."""
    out = []
    for item in inputs:
        p = Path(item)
        out.append(p)
        try:
            if p.is_dir():
                out.extend(c for c in p.iterdir() if c.is_file())
        except OSError:
            pass  # an unreadable input is reported by the reader, not here
    return out


def check_overlap(out: Path, inputs: Iterable[str | os.PathLike], *, flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of `inputs`."""
    out_chain, out_ids = _chain(out)
    out_res, out_id = out_chain[0], _identity(out_chain[0])
    for item in input_paths(inputs):
        in_chain, in_ids = _chain(item)
        in_res, in_id = in_chain[0], _identity(in_chain[0])
        if in_res == out_res or (in_id is not None and in_id == out_id):
            relation = "is"
        elif out_res in in_chain[1:] or (out_id is not None and out_id in in_ids - {in_id}):
            relation = "contains"
        elif in_res in out_chain[1:] or (in_id is not None and in_id in out_ids - {out_id}):
            relation = "lies inside"
        else:
            continue
        raise SoupError(
            f"{flag} {short(out)} {relation} the input {short(item)}: writing there would overwrite or pollute "
            "an input (refused with or without --overwrite); write the soup to another folder"
        )


def check_output(
    out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
    flag: str = "--out", folder: bool = True,
) -> Path:  # fmt: skip
    """Check that the soup can be written at `out`; return it as an absolute path.

    Args:
        out: the output folder (or file, with `folder=False`).
        inputs: sources and base model it must not overlap.
        overwrite: an existing output may be replaced (otherwise FileExistsError).
        flag: how the output is named in messages ("--out", "out_dir"...).
        folder: the output is a folder (an existing file there is refused, even with overwrite).

    Raises:
        SoupError: naming the path and the problem. FileExistsError: `out` exists and not `overwrite`.
    """
    p = absolute(out, flag)
    existing = _nearest_existing(p)
    name_max, path_max = _name_max(existing if existing.is_dir() else existing.parent)
    long_part = next((part for part in p.parts if len(part.encode(errors="surrogateescape")) > name_max), None)
    if long_part is not None:
        raise SoupError(f"{flag} {short(out)}: the name {short(long_part, 60)} is longer than the {name_max} "
                        "characters the filesystem allows")
    if len(str(p)) >= path_max:
        raise SoupError(f"{flag} {short(out)} is longer than the {path_max} characters a path may have")
    if existing != p:
        if os.path.islink(existing) and not existing.exists():
            raise SoupError(f"{flag} {short(out)}: {short(existing)} is a dangling symlink")
        if not existing.is_dir():
            raise SoupError(f"{flag} {short(out)}: {short(existing)} is a file, so no folder can be created under it")
    check_overlap(p, inputs, flag=flag)  # before "exists": destroying an input is the error that matters
    if existing == p and folder and not p.is_dir():
        raise SoupError(f"{flag} {short(out)} exists and is not a folder: the soup is written as a folder")
    parent = existing if existing != p else p.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only filesystem" if _read_only(parent) else "permission denied"
        raise SoupError(f"{flag} {short(out)}: cannot write in {short(parent)} ({why})")
    if os.path.lexists(p) and not overwrite:
        raise FileExistsError(f"output folder already exists: {out} (pass overwrite=True / --overwrite)")
    return p


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError as err:
        return err.errno == errno.EROFS

"""Atomic writes: build an output in a temporary sibling, then rename it into place.

A failure or a kill while writing leaves either the previous output or nothing, never a partial file
or folder. The temporary lives in the destination's parent so the final `os.replace` / `os.rename` is a
same-filesystem rename (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, *, directory: bool) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the output the permissions a plain mkdir/open would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `dest` when the block exits without an exception.

    Args:
        dest: the final folder.
        overwrite: replace an existing `dest`; otherwise an existing `dest` is an error.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"output folder already exists: {dest} (pass overwrite=True / --overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if dest.exists():
            # Move the old output aside first so the swap never leaves `dest` missing for long
            # and a failure below keeps the old one.
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Yield an open temporary file that replaces `dest` when the block exits without an exception."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(Path(tmp), directory=False)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

"""Atomic writes: build an output in a temporary sibling, then rename it into place.

A failure or a kill while writing leaves either the previous output or nothing, never a partial file
or folder. The temporary lives in the destination's parent so the final `os.replace` / `os.rename` is a
same-filesystem rename (atomic on POSIX).

Temporaries are named `.<name>.tmp-<pid>-<random>` (and `.<name>.old-<pid>-<random>` for an output being
replaced), so a process killed with SIGKILL, which runs no cleanup, leaves something the next write to the
same path recognises as its own: a temporary whose pid is no longer running is removed, an interrupted
replacement is rolled back (the previous output is put back), and a note says so on stderr. Parent folders
created for an output that then fails are removed again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from rs_lightning.soup.paths import absolute, make_parents, remove_empty, short, sibling_stem

Notify = Callable[[str], None]
# errno values that mean "the machine ran out of something", not "the user asked for something wrong".
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, *, directory: bool) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the output the permissions a plain mkdir/open would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _prefix(dest: Path, kind: str) -> str:
    return f".{sibling_stem(dest)}.{kind}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (ours included; one we may not signal exists too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: str | os.PathLike, *, directory: bool = True, notify: Notify | None = _note) -> list[Path]:
    """Remove the temporaries a killed writer of `dest` left next to it; return what was removed.

    Only entries of this output's own kind are touched (its name, "tmp"/"old", folder or file as `directory`
    says) and only when their pid is not running. An "old" folder whose `dest` is missing holds the previous
    output of a replacement killed half-way: it is put back at `dest`.
    """
    dest = absolute(dest)
    head = f".{sibling_stem(dest)}."
    pattern = re.compile(rf"{re.escape(head)}(tmp|old)-(\d+)-[^/]+")
    removed: list[Path] = []
    try:  # scandir + a prefix test: cheap even next to thousands of files (the front writes many)
        with os.scandir(dest.parent) as it:
            entries = [dest.parent / e.name for e in it if e.name.startswith(head)]
    except OSError:
        return removed
    for entry in sorted(entries):
        m = pattern.fullmatch(entry.name)
        if not m or pid_alive(int(m.group(2))) or entry.is_symlink():
            continue
        kind, pid = m.group(1), m.group(2)
        if kind == "old" and directory and entry.is_dir():
            previous = entry / "x"
            if os.path.lexists(previous) and not os.path.lexists(dest):
                os.rename(previous, dest)
                if notify:
                    notify(f"restored {short(dest)} from {short(entry)} (pid {pid} was killed while replacing it)")
            shutil.rmtree(entry, ignore_errors=True)
        elif kind == "tmp" and directory and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif kind == "tmp" and not directory and entry.is_file():
            entry.unlink(missing_ok=True)
        else:
            continue
        removed.append(entry)
        if notify and kind == "tmp":
            notify(f"removed stale temporary {short(entry)} (left by pid {pid}, which is no longer running)")
    return removed


@contextlib.contextmanager
def atomic_dir(
    dest: str | os.PathLike, *, overwrite: bool = False, lock: bool = False, what: str = "output folder",
    notify: Notify | None = _note,
) -> Iterator[Path]:  # fmt: skip
    """Yield a temporary folder that becomes `dest` when the block exits without an exception.

    Args:
        dest: the final folder.
        overwrite: replace an existing `dest`; otherwise an existing `dest` is an error.
        lock: hold `rs_lightning.soup.lock.output_lock(dest)` meanwhile (one writer per output).
        what: how `dest` is named in messages.
        notify: receives a line for each stale temporary cleaned up (None: silent).
    """
    dest = absolute(dest, what)
    if lock:
        from rs_lightning.soup.lock import output_lock

        guard = output_lock(dest, what=what)
    else:
        guard = contextlib.nullcontext()
    with guard:
        created = make_parents(dest.parent)
        try:
            clean_stale(dest, directory=True, notify=notify)
            if os.path.lexists(dest) and not overwrite:
                raise FileExistsError(f"{what} already exists: {dest} (pass overwrite=True / --overwrite)")
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest, "tmp"), dir=dest.parent))
            try:
                yield tmp
                _publish_mode(tmp, directory=True)
                if os.path.lexists(dest):
                    _replace(tmp, dest)
                else:
                    os.rename(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except BaseException:
            remove_empty(created)
            raise


def _replace(tmp: Path, dest: Path) -> None:
    """Swap `tmp` in for the existing `dest`; on failure the old `dest` is back where it was."""
    # Move the old output aside first so the swap never leaves `dest` missing for long and a failure
    # below keeps the old one (a kill in between is rolled back by the next write: `clean_stale`).
    old = Path(tempfile.mkdtemp(prefix=_prefix(dest, "old"), dir=dest.parent))
    try:
        os.rename(dest, old / "x")
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old / "x", dest)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Yield an open temporary file that replaces `dest` when the block exits without an exception."""
    dest = absolute(dest, "output file")
    created = make_parents(dest.parent)
    try:
        clean_stale(dest, directory=False)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(dest, "tmp"), dir=dest.parent)
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
    except BaseException:
        remove_empty(created)
        raise


@contextlib.contextmanager
def explained_write_errors(dest: str | os.PathLike, what: str = "the soup") -> Iterator[None]:
    """Re-raise an OSError met while writing `dest` as the same type, with a message that names `dest`
    (not a temporary file the user never sees) and says that nothing was left behind."""
    try:
        yield
    except OSError as err:
        if err.errno is None or isinstance(err, FileExistsError):
            raise
        message = f"cannot write {what} to {short(dest)}: {err.strerror} (nothing was written)"
        raise type(err)(err.errno, message) from err

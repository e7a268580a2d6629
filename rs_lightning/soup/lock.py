"""One writer per output: an advisory lock on a hidden file next to the output.

    with output_lock(out_dir, what="run folder"):
        ...  # a second process locking the same path gets OutputInUse("... in use by pid N ...") at once

The lock is `fcntl.flock` on `<parent>/.<name>.lock`, which also holds the owner's pid for the message. The
kernel drops a flock when its process dies, so a killed writer never leaves a stale lock, only a file that
the next writer reuses. The file is removed on release; a writer that opened it just before that removal
checks after locking that the path still names the file it locked, and retries otherwise (the usual
"lock, then verify the inode" protocol), so two writers can never both believe they hold the lock.

Re-entrant within a thread (the CLI locks the whole run, the writer it calls locks again); another
thread of the same process is refused like another process. Without fcntl (not POSIX) it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.paths import absolute, make_parents, remove_empty, short, sibling_stem

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: dict[str, list[int]] = {}  # lock file -> [fd, depth, thread id]
_mutex = threading.Lock()


class OutputInUse(SoupError):
    """Another process (pid in `.pid`, None if unknown) is writing the same output."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


def lock_file(dest: str | os.PathLike) -> Path:
    """Where the lock of output `dest` lives: a hidden sibling, so locking never touches `dest` itself."""
    dest = absolute(dest)
    return dest.parent / f".{sibling_stem(dest)}.lock"


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _acquire(path: Path, dest: Path, what: str) -> int:
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "another process"
            raise OutputInUse(
                f"{what} {short(dest)} is in use by {who}, which is writing it now (lock {short(path)}): wait for "
                "it to finish or write elsewhere",
                pid,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file we locked: lock the current one instead
    raise OutputInUse(f"{what} {short(dest)}: could not take the lock {short(path)} (it keeps being replaced)")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Hold the write lock of output `path` for the block; yield `path` as an absolute path.

    Missing parent folders are created (the lock file lives in the parent) and removed again, if still
    empty, when the block fails.

    Raises:
        OutputInUse: another process or thread holds it.
    """
    dest = absolute(path, what)
    if fcntl is None:
        yield dest
        return
    lp = lock_file(dest)
    key, me = str(lp), threading.get_ident()
    with _mutex:
        entry = _held.get(key)
        if entry is not None and entry[2] == me:
            entry[1] += 1
    if entry is not None:
        if entry[2] != me:
            raise OutputInUse(f"{what} {short(dest)} is in use by another thread of this process (pid {os.getpid()})")
        try:
            yield dest
        finally:
            with _mutex:
                entry[1] -= 1
        return
    created = make_parents(dest.parent)
    ok = False
    try:
        fd = _acquire(lp, dest, what)
        with _mutex:
            _held[key] = [fd, 1, me]
        try:
            yield dest
            ok = True
        finally:
            with _mutex:
                del _held[key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lp)  # while still locked: see the module docstring
            os.close(fd)
    finally:
        if not ok:
            remove_empty(created)

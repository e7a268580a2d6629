"""The error type of the front sweep: a bad config, grid, checkpoint set or run folder, said before any point runs;
and `naming_writes`, which makes a failed write of a run file say which file (not a temporary's name)."""

import contextlib
import os
from collections.abc import Iterator

from rs_lightning.soup.errors import SoupError


class FrontError(SoupError):
    """A sweep that cannot run or resume as asked (subclasses SoupError, hence ValueError)."""


@contextlib.contextmanager
def naming_writes(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError of the block as "cannot write PATH: <reason>", same errno (the CLI's exit code)."""
    try:
        yield
    except OSError as err:
        if err.errno is None or str(err).startswith("cannot write "):
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err

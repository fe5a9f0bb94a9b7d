"""Cache files that several processes may write at once (build-defaults --jobs, pytest -n): the
MNIST array copy and the fitted classifiers beside the data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new file of this call beside ``path`` (`.NAME.PID.RANDOM.part`), created exclusively and
    with 0666 less the umask, as any other new file (mkstemp's 0600 made the published cache file
    unreadable to the other users of a shared data folder)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def publish_cache_file(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """Write ``path`` through a temporary file of this call beside it, renamed into place once whole.

    Two processes filling the same cache each rename a whole file of their own, and a reader never
    opens a part of one (a fixed temporary name let the second writer truncate the file the first
    was about to rename). The file has the permissions of any new file (0666 less the umask). False
    where the folder cannot take it (a read-only cache: the caller computes it again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = _create_beside(path)
    except OSError:
        return False
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        tmp.replace(path)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return True

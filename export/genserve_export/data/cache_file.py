"""Cache files that several processes may write at once (build-defaults --jobs, pytest -n): the
MNIST array copy and the fitted classifiers beside the data."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def publish_cache_file(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """Write ``path`` through a temporary file of this call beside it, renamed into place once whole.

    Two processes filling the same cache each rename a whole file of their own, and a reader never
    opens a part of one (a fixed temporary name let the second writer truncate the file the first
    was about to rename). False where the folder cannot take it (a read-only cache: the caller
    computes it again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError:
        return False
    tmp = Path(tmp_name)
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

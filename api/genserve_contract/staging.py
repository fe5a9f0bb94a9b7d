"""A file of this call created beside another, to be renamed over it once whole: the one way the
client (its pictures and merged manifests) and export (cards, cache files) stage a file, so that two
runs at once never share a temporary name (a fixed one let the second truncate the file the first
was about to rename). Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

# The temporary name stays within NAME_MAX (255 bytes) however long the target's own name is.
_NAME_BYTES_KEPT = 200


def create_beside(target: Path, mode: int = 0o666, suffix: str = ".tmp") -> tuple[int, Path]:
    """(fd open to write, path) of a new file beside `target`, `.NAME.PID.RANDOM<suffix>`: created
    exclusively, so a name already there (a link planted in a shared folder, another run's file) is
    never opened, written through or renamed into place; with `mode` less the umask from the start
    (0666: as any new file; mkstemp's 0600 made a published cache unreadable to the other users of a
    shared folder, and a private file's new contents must never be readable by others while written).
    Raises FileExistsError after 100 names taken, else the OSError of the create."""
    stem = target.name.encode()[:_NAME_BYTES_KEPT].decode(errors="ignore")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{stem}.{os.getpid()}.{os.urandom(4).hex()}{suffix}")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")

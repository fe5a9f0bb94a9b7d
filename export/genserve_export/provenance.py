"""Where a model came from: source commit, library versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

# The code that decides what a build writes, relative to the repository root: the export package and
# the contract it writes to. Not the whole tree: a build writes models/ itself, and the next recipe
# of the same build would read +dirty.
SOURCE_PATHS = ("export/genserve_export", "api/genserve_contract")


def source_commit(repo_dir: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the source tree (``+dirty`` if SOURCE_PATHS have changes), else
    "uncommitted": also for an installed copy (site-packages), even in a venv inside some git
    repository, whose HEAD is not this code's source."""
    cwd = repo_dir or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        root = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *SOURCE_PATHS],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    if Path(cwd).resolve() != (Path(root) / SOURCE_PATHS[0]).resolve():
        return "uncommitted"  # not a checkout's export/genserve_export: git answered for another tree
    return f"{head}+dirty" if dirty else head

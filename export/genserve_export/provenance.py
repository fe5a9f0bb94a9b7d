"""Where a model came from: source commit, library versions."""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_commit(repo_dir: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the source tree (``+dirty`` if it has changes), else "uncommitted"."""
    cwd = repo_dir or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return f"{head}+dirty" if dirty else head

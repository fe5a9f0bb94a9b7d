"""argparse types shared by the three command lines (genserve-server, genserve-client,
genserve-export). Standard library only."""

from __future__ import annotations

import argparse
from pathlib import Path


def nonempty_path_text(text: str) -> str:
    """argparse type of a path flag kept as text: not empty. An empty value (`--models "$MODELS"`,
    `--tls-ca "$CA"` with the variable unset) is Path(".") as a Path, the working folder (served as a
    model repository, a bulk job written into it), or is falsy where a flag is tested for being
    given (a plaintext connection where TLS was asked for, a cache turned off) without a word."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty value")
    return text


def nonempty_path(text: str) -> Path:
    """argparse type of a path flag: a Path, not empty (nonempty_path_text)."""
    return Path(nonempty_path_text(text))

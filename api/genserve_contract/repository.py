"""Repository-wide rules: names, versions, the card format, fp32/fp16 tolerances and file digests."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Final

# A model directory name (what clients send) and a version directory name.
NAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9-]*$")
VERSION_PATTERN: Final = re.compile(r"^[1-9][0-9]*$")
CARD_FORMAT_VERSION: Final = 1
# Largest |ONNX - PyTorch| export accepts for model.onnx.
FP32_ATOL: Final = 1e-4
# Largest |fp16 - fp32| for model.fp16.onnx: export writes it only within this, and the server's
# load-time check serves fp32 beyond it (config.json runtime.fp16_atol may change the latter).
FP16_ATOL: Final = 1e-2


def latest_version_dir(entry: Path) -> Path | None:
    """The highest-numbered version directory of a repository entry that holds a ``model.onnx``
    (None if there is none)."""
    if not entry.is_dir():
        return None
    versions = [p for p in entry.iterdir() if VERSION_PATTERN.match(p.name) and (p / "model.onnx").is_file()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

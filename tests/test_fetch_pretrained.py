"""scripts/fetch_pretrained.sh (make pretrained), with a stand-in npm on PATH: no network."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_pretrained.sh"


def _run(tmp_path: Path, npm_body: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + npm_body)
    npm.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PRETRAINED_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_a_download_that_fails_part_way_leaves_no_tarball_for_the_next_run_to_refuse(tmp_path: Path) -> None:
    """npm pack wrote the tarball straight into the cache: one that failed or was stopped part-way
    left a partial file there, and every later run skipped the download (the file exists) and then
    refused it as a changed package, until someone deleted it by hand."""
    partial = "printf partial > upscalerjs-esrgan-thick-1.0.0.tgz\nexit 1\n"
    first = _run(tmp_path, partial)
    assert first.returncode != 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # nothing kept, no work folder
    again = _run(tmp_path, 'echo "npm $*" >> "$PRETRAINED_CACHE/../calls"\nexit 1\n')
    assert (
        again.returncode != 0
        and "npm pack --silent @upscalerjs/esrgan-thick@1.0.0" in (tmp_path / "calls").read_text()
    )  # the next run fetches it again


def test_a_tarball_of_another_sha256_is_refused_and_not_kept(tmp_path: Path) -> None:
    changed = _run(tmp_path, "printf changed > upscalerjs-esrgan-thick-1.0.0.tgz\n")
    assert changed.returncode != 0 and "unexpected sha256" in changed.stderr, changed.stderr
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []

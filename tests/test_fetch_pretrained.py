"""scripts/fetch_pretrained.sh (make pretrained), with a stand-in npm on PATH: no network."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_pretrained.sh"


def _run(
    tmp_path: Path, npm_body: str, script: Path = SCRIPT, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
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
        [*prefix, "bash", str(script)], capture_output=True, text=True, env=env, timeout=60, check=False
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


def _script_for(tmp_path: Path, tarballs: dict[str, bytes]) -> Path:
    """A copy of the script whose recorded sha256s are those of `tarballs` (name -> contents): the
    real packages' bytes are not here, and a cache that holds every tarball needs them."""
    text = SCRIPT.read_text()
    for name, data in tarballs.items():
        text, count = re.subn(
            rf"({re.escape(name)}) [0-9a-f]{{64}}", rf"\1 {hashlib.sha256(data).hexdigest()}", text
        )
        assert count == 1, name
    script = tmp_path / "scripts" / SCRIPT.name
    script.parent.mkdir()
    script.write_text(text)
    return script


def _without_root_privileges() -> tuple[str, ...]:
    """A command prefix under which file permissions bind (root writes into a read-only folder)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the script without root's capabilities")
    return ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


TARBALLS = {"upscalerjs-esrgan-thick-1.0.0.tgz": b"thick", "upscalerjs-esrgan-slim-1.0.0.tgz": b"slim"}


def test_a_read_only_cache_that_holds_every_tarball_is_checked_and_accepted(tmp_path: Path) -> None:
    """A cache filled once and then read-only (a CI cache restored read-only, a volume mounted :ro):
    every run made its download folder in the cache first, so `set -e` stopped it at mktemp though
    there was nothing to fetch."""
    script = _script_for(tmp_path, TARBALLS)
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, data in TARBALLS.items():
        (cache / name).write_bytes(data)
    cache.chmod(0o555)
    try:
        run = _run(tmp_path, "exit 1\n", script, _without_root_privileges())
    finally:
        cache.chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("ok ") == 2 and "npm pack" not in run.stdout, run.stdout


def test_a_partial_tarball_left_by_an_older_run_is_fetched_again(tmp_path: Path) -> None:
    """Runs before the download folder wrote straight into the cache: a cache holding a partial
    tarball from one of them was still refused by every run (the file exists, so no fetch) until
    someone deleted it by hand. A cached tarball of another sha256 is fetched again, checked."""
    script = _script_for(tmp_path, TARBALLS)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "upscalerjs-esrgan-thick-1.0.0.tgz").write_bytes(b"thi")  # stopped part-way
    npm = 'case "$3" in\n  *thick*) printf thick > upscalerjs-esrgan-thick-1.0.0.tgz ;;\n'
    npm += "  *slim*) printf slim > upscalerjs-esrgan-slim-1.0.0.tgz ;;\nesac\n"
    run = _run(tmp_path, npm, script)
    assert run.returncode == 0, run.stderr
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == TARBALLS

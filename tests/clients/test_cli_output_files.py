"""The files `genserve-client` writes outside a bulk job (sample/interpolate images, grids and other
pictures, upscale/translate outputs, verify's merged manifest) on a disk that refuses the write: the
error names the file it was writing (the OS's write errors name none) and no partial file is left
under its name for the next tool to take for a whole one (docs/client.md: a write error is exit 1)."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_fakes import FakeServer, cli_main

# Writes past this many bytes fail (EFBIG) as a full disk's do (ENOSPC): after a short write, with
# an error that names no file. Every image and manifest the tests write is larger.
LIMIT_BYTES = 16


@contextlib.contextmanager
def writes_fail_past_the_limit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_sample_images_on_a_full_disk_name_the_file_and_leave_no_partial_one(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    out = tmp_path / "out"
    with writes_fail_past_the_limit():
        code, stdout, err = cli_main(
            capsys, *t, "sample", "--model", "fake-gen", "--n", "2", "--seed", "5", "--out", str(out)
        )
    assert code == 1, (stdout, err)
    assert f"'{out / 'fake-gen_0000_seed5.png'}'" in err, err
    assert "Traceback" not in err
    assert leftovers(out) == [], "a partial image is left under the name of a whole one"


def test_a_grid_on_a_full_disk_names_the_file_and_leaves_no_partial_one(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    grid = tmp_path / "grid.png"
    with writes_fail_past_the_limit():
        code, stdout, err = cli_main(
            capsys, *t, "sample", "--model", "fake-gen", "--n", "2", "--seed", "5", "--grid", str(grid)
        )
    assert code == 1, (stdout, err)
    assert f"'{grid}'" in err, err
    assert leftovers(tmp_path) == []


def test_verifys_merged_manifest_on_a_full_disk_names_the_file_and_leaves_no_partial_one(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    job = tmp_path / "job"
    code, stdout, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(job))
    assert code == 0, err
    merged = tmp_path / "merged" / "manifest.jsonl"
    merged.parent.mkdir()
    with writes_fail_past_the_limit():
        code, stdout, err = cli_main(capsys, "verify", str(job), "--manifest-out", str(merged))
    assert code == 1, (stdout, err)
    assert f"'{merged}'" in err, err
    assert leftovers(merged.parent) == []

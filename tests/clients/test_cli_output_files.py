"""The files `genserve-client` writes outside a bulk job (sample/interpolate images, grids and other
pictures, upscale/translate outputs, verify's merged manifest) on a disk that refuses the write: the
error names the file it was writing (the OS's write errors name none) and no partial file is left
under its name for the next tool to take for a whole one (docs/client.md: a write error is exit 1)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_fakes import FakeServer, cli_main

from genserve_client.bulk import write_file_whole

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


# --- an output path that is not a plain new file (a symlink, a FIFO or /dev/stdout, a file with its
# own permissions, a directory): written as the plain write it replaced wrote it ---------------------


def test_a_grid_written_through_a_symlink_updates_the_file_it_points_to_and_keeps_the_link(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    real = tmp_path / "runs" / "grid-7.png"
    real.parent.mkdir()
    real.write_bytes(b"an older grid")
    link = tmp_path / "latest.png"
    link.symlink_to(real)
    code, stdout, err = cli_main(
        capsys, *t, "sample", "--model", "fake-gen", "--n", "2", "--seed", "5", "--grid", str(link)
    )
    assert code == 0, err
    assert link.is_symlink(), "the user's symlink was replaced by a regular file"
    assert real.read_bytes().startswith(b"\x89PNG"), "the file the symlink points to was not written"


def test_verifys_manifest_out_to_a_fifo_is_written_into_it_not_replaced_by_a_file(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--manifest-out /dev/stdout` (a pipe to jq) is this case: as root the rename replaced the
    /dev/stdout link itself; as a user it failed on the temp name in /dev."""
    t = ("--target", fake_server.target)
    job = tmp_path / "job"
    code, stdout, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(job))
    assert code == 0, err
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reading end, open before the writer
    try:
        code, stdout, err = cli_main(capsys, "verify", str(job), "--manifest-out", str(fifo))
        try:
            received = os.read(reader, 1 << 16)
        except BlockingIOError:
            received = b""
    finally:
        os.close(reader)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert received.count(b"\n") == 4, received


def test_a_picture_that_replaces_an_existing_file_keeps_that_files_permissions(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an older grid")
    grid.chmod(0o600)
    code, stdout, err = cli_main(
        capsys, *t, "sample", "--model", "fake-gen", "--n", "2", "--seed", "5", "--grid", str(grid)
    )
    assert code == 0, err
    assert grid.read_bytes().startswith(b"\x89PNG")
    assert oct(grid.stat().st_mode & 0o777) == oct(0o600), "a private file became readable by all"


def test_the_new_contents_of_a_private_file_are_never_readable_by_others_while_written(
    tmp_path: Path,
) -> None:
    """The temp file took the umask's permissions (0644) and only got the replaced file's 0600 once
    written whole: for the whole write, the new contents of a private file were readable by all."""
    private = tmp_path / "grid.png"
    private.write_bytes(b"an older grid")
    private.chmod(0o600)
    modes: list[int] = []

    def pieces() -> Iterator[bytes]:
        yield b"secret "
        modes.extend(p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p != private)
        yield b"pixels"

    write_file_whole(private, pieces())
    assert private.read_bytes() == b"secret pixels"
    assert modes and all(mode & 0o077 == 0 for mode in modes), [oct(m) for m in modes]


def test_a_picture_replaces_an_existing_file_where_os_has_no_fchmod(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python before 3.13 has no os.fchmod on Windows, and every picture written over an existing
    file (a second run of the same command) failed with AttributeError, a traceback, its temp file
    removed and nothing written. It is written, keeping the old file's permissions."""
    monkeypatch.delattr(os, "fchmod")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an older grid")
    grid.chmod(0o600)
    sample = ("sample", "--model", "fake-gen", "--n", "2", "--grid", str(grid))
    code, _, err = cli_main(capsys, "--target", fake_server.target, *sample)
    assert code == 0, err
    assert grid.read_bytes().startswith(b"\x89PNG")
    assert oct(grid.stat().st_mode & 0o777) == oct(0o600)
    assert leftovers(tmp_path) == ["grid.png"]


def test_a_link_planted_at_the_temp_name_beside_a_grid_is_neither_written_through_nor_renamed_into_place(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The temp name beside the output was `.NAME.PID.tmp`, opened with a plain "wb": a symlink
    placed there by anyone who can write the folder (a shared output folder) had the picture
    written into the file it points to, and was then renamed over the output itself."""
    t = ("--target", fake_server.target)
    victim = tmp_path / "elsewhere" / "notes.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"the user's notes")
    out = tmp_path / "shared"
    out.mkdir()
    grid = out / "grid.png"
    (out / f".grid.png.{os.getpid()}.tmp").symlink_to(victim)
    code, stdout, err = cli_main(
        capsys, *t, "sample", "--model", "fake-gen", "--n", "2", "--seed", "5", "--grid", str(grid)
    )
    assert code == 0, err
    assert victim.read_bytes() == b"the user's notes", "the picture was written through the planted link"
    assert not grid.is_symlink() and grid.read_bytes().startswith(b"\x89PNG")


def test_a_manifest_out_that_is_a_directory_names_it_and_leaves_no_temp_file(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    job = tmp_path / "job"
    code, stdout, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(job))
    assert code == 0, err
    merged = tmp_path / "merged"
    merged.mkdir()
    code, stdout, err = cli_main(capsys, "verify", str(job), "--manifest-out", str(merged))
    assert code == 1, (stdout, err)
    assert f"Is a directory: '{merged}'" in err, err
    assert "-> None" not in err, err
    assert leftovers(tmp_path) == ["job", "merged"], "the manifest was left under a hidden temp name"


def test_a_grid_with_a_name_near_the_filesystems_limit_is_written(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name of 254 bytes is a valid file name; the temp name beside it must not exceed 255."""
    t = ("--target", fake_server.target)
    grid = tmp_path / ("g" * 250 + ".png")
    code, stdout, err = cli_main(
        capsys, *t, "sample", "--model", "fake-gen", "--n", "2", "--seed", "5", "--grid", str(grid)
    )
    assert code == 0, err
    assert leftovers(tmp_path) == [grid.name]


@pytest.mark.parametrize("command", ["sample", "interpolate"])
def test_an_out_folder_that_is_a_file_is_refused_before_any_call(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """--out names a folder: one that is a file (or lies under one) failed with a bare '[Errno 17]
    File exists' (exit 1) only after every call, all their images thrown away."""
    taken = tmp_path / "g.png"
    taken.write_bytes(b"not a folder")
    args = {
        "sample": ["sample", "--model", "fake-gen", "--n", "3", "--seed", "1"],
        "interpolate": ["interpolate", "--model", "fake-gen", "--from-seed", "1", "--to-seed", "2"],
    }[command]
    for out in (taken, taken / "sub"):
        code, stdout, err = cli_main(capsys, "--target", fake_server.target, *args, "--out", str(out))
        assert code == 2 and not stdout, (code, stdout)
        assert err.count("\n") == 1 and "--out" in err and str(taken) in err and "not a folder" in err
    assert not fake_server.service.calls.get(command.capitalize())
    assert taken.read_bytes() == b"not a folder"


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["sample", "--model", "fake-gen", "--n", "3", "--seed", "1", "--grid"], "--grid"),
        (["sample", "--model", "fake-prior", "--n", "1", "--out", "d", "--progress"], "--progress"),
        (["interpolate", "--model", "fake-gen", "--from-seed", "1", "--to-seed", "2", "--grid"], "--grid"),
        (["arithmetic", "--model", "fake-gen", "--a", "1", "--b", "2", "--c", "3", "--grid"], "--grid"),
        (["mix", "--model", "fake-gen", "--rows", "1", "--cols", "2", "--grid"], "--grid"),
        (["edit", "IN", "--model", "fake-vae", "--out"], "--out"),
        (["upscale", "IN", "--model", "fake-i2i"], "output"),
        (["translate", "IN", "--model", "fake-i2i"], "output"),
    ],
)
def test_a_picture_whose_folder_is_a_file_is_refused_before_any_call(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    flag: str,
) -> None:
    """A --grid (--progress, edit's --out, upscale's or translate's output) under a file: its folder
    was made only once the picture was, after every call, and failed with a bare '[Errno 17] File
    exists' naming that file (exit 1), the images thrown away -> refused before any call with exit
    2, naming the flag and the file in the way, as an --out folder that is a file is."""
    monkeypatch.chdir(tmp_path)
    picture = tmp_path / "in.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    taken = tmp_path / "taken"
    taken.write_bytes(b"not a folder")
    argv = [str(picture) if arg == "IN" else arg for arg in command]
    for path in (taken / "g.png", taken / "sub" / "g.png"):
        code, stdout, err = cli_main(capsys, "--target", fake_server.target, *argv, str(path))
        assert code == 2 and not stdout, (code, stdout, err)
        assert err.count("\n") == 1 and flag in err and str(taken) in err and "not a folder" in err, err
    assert not any(fake_server.service.calls.values()), fake_server.service.calls
    assert taken.read_bytes() == b"not a folder"

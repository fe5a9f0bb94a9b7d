"""`genserve-export build-defaults --jobs N` trains each recipe in a child process: a build that is
stopped (SIGTERM from a job runner or `kill`, SIGINT) must not leave its children training on into
--out. The children here are stand-ins (a shell script in place of the interpreter), so no recipe
trains."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from exec_support import exec_wrapped

from genserve_export.cli import CHILD_STOP_GRACE_S

REPO_ROOT = Path(__file__).resolve().parents[2]

# The parent process: build-defaults as the console script runs it, with sys.executable (what each
# child is started with) pointing at the stand-in.
PARENT = """
import sys
from genserve_export import cli
sys.executable, out = sys.argv[1:3]
sys.argv = ["genserve-export", "build-defaults", "--out", out, "--jobs", "2", "--no-verify",
            "--only", "vae-digits", "dcgan-digits"]
sys.exit(cli.main())
"""


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@contextlib.contextmanager
def started_build(
    tmp_path: Path, *, sigint_ignored: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], list[int], Path, Path]]:
    """The build (PARENT) over the stand-in, once both its children run: (the build, its children's
    pids, its log, the file each child records the signal it is stopped with in). Whatever is still
    running at the end is killed."""
    pids_file = tmp_path / "children.txt"
    stand_in = tmp_path / "train-stand-in"
    signals_file = tmp_path / "signals.txt"
    # A child records the signal it is stopped with (SIGINT: its KeyboardInterrupt runs its cleanup).
    # It writes its pid once its traps are set and its own child started: the pid file is what the
    # test waits for before it signals the build, so a shell signalled between its start and its
    # `trap` (descheduled on a busy machine) would die without recording, and fail the test.
    stand_in.write_text(
        "#!/bin/sh\n"
        f"trap 'echo INT >> \"{signals_file}\"; kill $child; exit 130' INT\n"
        f"trap 'echo TERM >> \"{signals_file}\"; kill $child; exit 143' TERM\n"
        f'sleep 120 & child=$!\necho $$ >> "{pids_file}"\nwait $child\n'
    )
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("export", "api"))}
    log = tmp_path / "build.log"
    with log.open("wb") as out:  # a file, not a pipe: the children hold the descriptor too
        # SIGINT ignored as `sh -c 'genserve-export build-defaults ... &'` starts the build; else
        # default as a terminal starts it, whatever the tests inherited: where pytest itself runs as
        # a background job of a script (or under nohup), SIGINT is ignored here, and so in the build.
        parent = subprocess.Popen(
            exec_wrapped(
                [sys.executable, "-c", PARENT, str(stand_in), str(tmp_path / "out")],
                sigint="ignore" if sigint_ignored else "default",
            ),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to the parent only, as `kill PID` sends it
        )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(children) < 2:
            assert parent.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the build started no children"
            time.sleep(0.1)
            if pids_file.exists():
                children = [int(line) for line in pids_file.read_text().split()]
        yield parent, children, log, signals_file
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_parallel_build_stops_the_recipes_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    with started_build(tmp_path) as (parent, children, log, signals_file):
        parent.send_signal(sig)
        parent.wait(30)
        time.sleep(0.5)
        left = [pid for pid in children if _alive(pid)]
        assert not left, (parent.returncode, log.read_text(errors="replace"))
        assert parent.returncode == 128 + sig, log.read_text(errors="replace")
        assert "interrupted" in log.read_text(errors="replace")
        assert signals_file.read_text().split() == ["INT", "INT"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_build_started_with_sigint_ignored_stops_its_recipes_at_once_through_their_cleanup(
    tmp_path: Path,
) -> None:
    """A command started in the background of a script (`genserve-export build-defaults --jobs 4 &`:
    a shell without job control starts it with SIGINT ignored, POSIX) passes that disposition on to
    its children, and a child started with SIGINT ignored never sees it (Python installs no
    KeyboardInterrupt handler then; sh cannot trap it). A `kill` of such a build sent its recipes
    SIGINT, which they ignored: the build took 10 s to stop and then SIGKILLed them, their cleanup
    never run, though SIGTERM alone had stopped them at once before 7fa3836."""
    with started_build(tmp_path, sigint_ignored=True) as (parent, children, log, signals_file):
        stopped = time.monotonic()
        parent.send_signal(signal.SIGTERM)
        parent.wait(30)
        took = time.monotonic() - stopped
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], log.read_text(errors="replace")
        assert parent.returncode == 128 + signal.SIGTERM, log.read_text(errors="replace")
        recorded = signals_file.read_text().split() if signals_file.exists() else []
        # Their handlers ran, and before the grace (the build SIGKILLs them once it has passed).
        assert len(recorded) == 2 and took < CHILD_STOP_GRACE_S, (
            f"stopped in {took:.1f} s; the children's stop handlers ran for {recorded} (SIGKILLed otherwise)"
        )


# A recipe's child as build-defaults starts it (`genserve-export train`), over a recipe that trains
# nothing and a disk that stalls once the version is half staged in --out.
TRAIN_CHILD = """
import sys, time
from pathlib import Path
import numpy as np, torch
from torch import nn
from genserve_export import cli, export, recipes
from genserve_export.recipe import ExportSpec

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 64)

    def forward(self, z):
        return torch.tanh(self.fc(z)).reshape(-1, 1, 8, 8)

class Recipe:
    names = ("tiny-gen",)

    def train(self, *, seed, steps, device, progress):
        card = {"description": "tiny", "output_range": [-1.0, 1.0]}
        z = np.zeros((2, 4), np.float32)
        return [ExportSpec("tiny-gen", "generator", Tiny(), {"z": z}, card, fp16=False)]

out, staged = sys.argv[1:3]
write_json = export._write_json

def stalled(path, value):
    write_json(path, value)
    Path(staged).write_text(str(path))
    time.sleep(120)

export._write_json = stalled
recipes.RECIPES["tiny-gen"] = Recipe()
sys.argv = ["genserve-export", "train", "tiny-gen", "--out", out, "--no-fp16"]
sys.exit(cli.main())  # as the console script runs it
"""


def test_a_recipe_child_stopped_with_sigterm_removes_its_partial_outputs(tmp_path: Path) -> None:
    """build-defaults stops a recipe started with SIGINT ignored with SIGTERM (and a job runner stops
    `genserve-export train` so): the child died at once, its cleanup skipped, leaving its temporary
    export folder and the half-staged version (<name>/.tmp-<version>-<rand>) in --out."""
    out, temp, staged, log = tmp_path / "out", tmp_path / "tmp", tmp_path / "staged.txt", tmp_path / "log"
    temp.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(temp),
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("export", "api")),
    }
    with log.open("wb") as err:  # a file, not a pipe that could fill
        child = subprocess.Popen(
            # SIGINT ignored, as build-defaults started in a script's background starts it
            exec_wrapped([sys.executable, "-c", TRAIN_CHILD, str(out), str(staged)], sigint="ignore"),
            env=env,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 120
        while not staged.exists():
            assert child.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the child never staged its version"
            time.sleep(0.1)
        assert [p.name for p in (out / "tiny-gen").iterdir() if p.name.startswith(".tmp-")]
        child.send_signal(signal.SIGTERM)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 128 + signal.SIGTERM, log.read_text(errors="replace")
    assert "stopped (SIGTERM)" in log.read_text(errors="replace")
    # the half-staged version is removed, and the folder of the new model it was in with it
    assert not (out / "tiny-gen").exists(), sorted(p.name for p in (out / "tiny-gen").iterdir())
    assert not list(temp.glob("genserve-export-*")), "the temporary export folder is left"


def _staged_by(
    child_script: str, out: Path, staged: Path, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start `child_script` (TRAIN_CHILD) and return it once it has staged its version."""
    with log.open("wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", child_script, str(out), str(staged)], env=env, stderr=err
        )
    deadline = time.monotonic() + 120
    while not staged.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait(10)
            raise AssertionError(log.read_text(errors="replace"))
        time.sleep(0.1)
    return child


def test_an_export_removes_the_staging_folders_killed_exports_left_and_no_live_ones(tmp_path: Path) -> None:
    """An export SIGKILLed (the OOM killer, a node lost, kill -9) while staging leaves
    <name>/.tmp-<version>-<rand> behind, which the server ignores and nothing removed: they piled up.
    The next export into the model's directory removes those of its own naming that no live export
    holds and that are old enough to be no export of an earlier genserve-export; a live export's
    staging, a fresh one and an operator's own `.tmp-2` stay."""
    from genserve_export import export_model
    from tests.export.test_export_checks import _TinyImage

    out, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()  # the killed child's temporary export folder lands there, not in /tmp
    env = {
        **os.environ,
        "TMPDIR": str(temp),
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("export", "api")),
    }
    killed = _staged_by(TRAIN_CHILD, out, tmp_path / "killed.txt", tmp_path / "killed.log", env)
    killed.kill()
    killed.wait(10)
    left = Path((tmp_path / "killed.txt").read_text()).parent
    live = _staged_by(TRAIN_CHILD, out, tmp_path / "live.txt", tmp_path / "live.log", env)
    try:
        held = Path((tmp_path / "live.txt").read_text()).parent
        assert left.is_dir() and left.name.startswith(".tmp-1-"), "the killed export left no staging folder"
        operators = out / "tiny-gen" / ".tmp-2"  # docs/operations.md's cp -r staging, then mv
        operators.mkdir()
        hours_ago = time.time() - 7200
        for folder in (left, held, operators):
            os.utime(folder, (hours_ago, hours_ago))
        z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
        card = {"description": "tiny", "output_range": [-1.0, 1.0]}
        export_model(
            _TinyImage(0),
            kind="generator",
            name="tiny-gen",
            version="2",
            out_dir=out,
            example_inputs={"z": z},
            card=card,
            fp16=False,
        )
        assert not left.exists(), "the killed export's staging folder is left"
        assert held.is_dir(), "a live export's staging folder was removed"
        assert operators.is_dir(), "a folder not of the export's naming was removed"
        assert (out / "tiny-gen" / "2" / "card.json").is_file()
    finally:
        live.kill()
        live.wait(10)

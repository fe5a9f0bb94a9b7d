"""A server started where it may write nothing but what its flags name (deploy/k8s: readOnlyRootFilesystem,
HOME /opt/genserve owned by root, the model repository read-only): a clean start, clean logs, and no
file of its own anywhere else.

ONNX Runtime (1.31) persists a telemetry device id and an event database under
$XDG_CACHE_HOME or $HOME/.cache/Microsoft/DeveloperTools/.onnxruntime at import, and where it cannot
it prints a coloured, non-JSON warning line to stderr before the server's logging starts.

Every test starts a real `genserve-server` on 127.0.0.1 (free ports only) and stops it, but the one of
the start helper's own stop, which starts a stand-in that ignores SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_support import write_gen

STOP_WAIT_S = 20.0  # a clean stop takes well under this; a server still running after it is hung


def _start_until_ready(models: Path, work: Path, env: dict[str, str], *extra: str) -> tuple[int, str]:
    """Start `genserve-server serve` with `env`, wait for its ready-file (or its exit), SIGTERM it;
    (exit status, stderr)."""
    work.mkdir(parents=True, exist_ok=True)
    ready = work / "ready.json"
    args = [
        sys.executable,
        "-m",
        "genserve_server.main",
        "serve",
        "--models",
        str(models),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready),
        *extra,
    ]
    stderr_path = work / "stderr.log"
    with stderr_path.open("wb") as err:
        # Its own process group, so that a server hung past STOP_WAIT_S goes with everything it started.
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        try:
            while not ready.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, stderr_path.read_text(errors="replace")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(
                    f"the server did not stop within {STOP_WAIT_S} s of SIGTERM (process group killed)\n"
                    + stderr_path.read_text(errors="replace")
                ) from None
    return int(proc.returncode), stderr_path.read_text(errors="replace")


def _env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    env["HOME"] = home
    return env


def test_a_home_that_cannot_be_written_leaves_every_log_line_json(tmp_path: Path) -> None:
    """HOME not writable (the image's /opt/genserve under readOnlyRootFilesystem; /dev/null here, which
    not even root can make a directory in): every stderr line is JSON under --log-json, and no line is
    ONNX Runtime's own."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    rc, stderr = _start_until_ready(models, tmp_path / "work", _env("/dev/null"), "--log-json")
    assert rc == 0, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "expected JSON log lines"
    for line in lines:
        assert "onnxruntime:" not in line, stderr
        try:
            json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{stderr}") from None


def test_a_start_writes_nothing_into_home(tmp_path: Path) -> None:
    """A writable HOME stays empty: the server keeps no cache, telemetry or state outside the paths
    its flags and config name."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    home = tmp_path / "home"
    home.mkdir()
    rc, stderr = _start_until_ready(models, tmp_path / "work", _env(str(home)))
    assert rc == 0, stderr
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], written


def _gone(pid: int) -> bool:
    """No such process, or only its zombie left for whoever reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_server_that_ignores_sigterm_is_killed_with_its_children_and_fails_the_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start helper's own stop: a server that hangs after SIGTERM (here a stand-in that ignores it,
    with a child of its own) must not outlive the test: after the bounded wait its process group is
    killed and the helper fails saying so."""
    pids = tmp_path / "pids"
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        "trap '' TERM\n"
        'while [ $# -gt 0 ]; do [ "$1" = --ready-file ] && ready=$2; shift; done\n'
        "sleep 300 &\n"
        f"echo $$ $! > {pids}\n"
        'echo "{}" > "$ready"\n'
        "wait\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(sys.modules[__name__], "STOP_WAIT_S", 1.0)
    try:
        with pytest.raises(AssertionError, match="did not stop within"):
            _start_until_ready(tmp_path / "models", tmp_path / "work", _env(str(tmp_path)))
        shell, child = (int(p) for p in pids.read_text().split())
        # SIGKILL is delivered at once but a busy machine may take a moment to end the child, which
        # nobody waits for (the helper waits for its own child only): allow it a bounded while.
        deadline = time.monotonic() + 10
        while not (_gone(shell) and _gone(child)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(shell) and _gone(child), "the hung server or its child outlived the test"
    finally:
        for pid in (int(p) for p in pids.read_text().split()) if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

"""genserve_server.launcher: start a server subprocess, wait for its ready file, stop it.
Stand-in servers are small Python scripts, so these tests need no models."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from genserve_server.launcher import ServerStartError, ServerSubprocess, genserve_command

WRITES_READY = """
import json, os, sys, time
path = sys.argv[sys.argv.index("--ready-file") + 1]
print("listening", flush=True)
with open(path + ".tmp", "w") as f:
    json.dump({"port": 4321, "pid": os.getpid()}, f)
os.replace(path + ".tmp", path)
time.sleep(60)
"""


def python(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_start_reads_the_ready_file_and_stop_terminates(tmp_path: Path) -> None:
    server = ServerSubprocess.start(python(WRITES_READY), tmp_path / "work")
    try:
        assert (server.port, server.metrics_port, server.pid) == (4321, 0, server.proc.pid)
        assert server.target == "127.0.0.1:4321" and server.alive()
    finally:
        code = server.stop(timeout_s=5)
    assert code == -signal.SIGTERM and not server.alive()
    assert "listening" in server.log()


def test_a_server_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match=r"exited unexpectedly \(3\)") as info:
        ServerSubprocess.start(python("print('bad config'); raise SystemExit(3)"), tmp_path, timeout_s=60)
    assert "bad config" in info.value.log


def test_a_server_that_never_gets_ready_is_killed_at_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="not ready within 0.3 s"):
        ServerSubprocess.start(python("import time; time.sleep(60)"), tmp_path, timeout_s=0.3)


def test_genserve_command_binds_loopback_on_os_chosen_ports(tmp_path: Path) -> None:
    command = genserve_command(tmp_path, "--no-metrics")
    assert command[:4] == [sys.executable, "-m", "genserve_server", "serve"]
    flags = dict(zip(command[4:-1:2], command[5::2], strict=True))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "0" and flags["--metrics-port"] == "0"
    assert command[-1] == "--no-metrics"


def test_a_start_interrupted_while_it_waits_leaves_no_server_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C (or any error) while start() waited for the ready file (a benchmark's server warming up
    # for seconds) went through it and left the server running, orphaned, on its port.
    import subprocess
    import time

    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))  # type: ignore[call-overload]
        return started[-1]

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(time, "sleep", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            ServerSubprocess.start(python("import time; time.sleep(60)"), tmp_path, timeout_s=60)
        monkeypatch.undo()
        assert len(started) == 1
        started[0].wait(timeout=5)  # raises TimeoutExpired while it still runs
    finally:
        for proc in started:
            proc.kill()
            proc.wait()

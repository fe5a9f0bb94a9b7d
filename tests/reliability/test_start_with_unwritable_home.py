"""A server started where it may write nothing but what its flags name (deploy/k8s: readOnlyRootFilesystem,
HOME /opt/genserve owned by root, the model repository read-only): a clean start, clean logs, and no
file of its own anywhere else.

ONNX Runtime (1.31) persists a telemetry device id and an event database under
$XDG_CACHE_HOME or $HOME/.cache/Microsoft/DeveloperTools/.onnxruntime at import, and where it cannot
it prints a coloured, non-JSON warning line to stderr before the server's logging starts.

Every test starts a real `genserve-server` on 127.0.0.1 (free ports only) and stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from reliability_support import write_gen


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
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 60
        try:
            while not ready.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, stderr_path.read_text(errors="replace")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(20)
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

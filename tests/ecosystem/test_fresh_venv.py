"""The Docker image's install, without Docker: requirements/server.txt into a FRESH venv, then the
api, server and client packages (non-editable, as the image's build stage does), and the server
started from that venv answers grpc.health.v1 SERVING through its own `genserve-server health` probe
and the venv's `genserve-client` (which bulk Jobs run from the same image).

Proves the runtime requirements are complete (nothing leaks in from the dev venv), pinned by the
one constraints file, and free of torch. pip uses its local cache: a warm run takes about a
minute on 2 cores (onnxruntime-gpu's 256 MB wheel is most of it).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ecosystem_helpers import COPY_IGNORE, ROOT, run
from server_support import healthy_models

pytestmark = pytest.mark.slow

CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
SERVER_REQUIREMENTS = ROOT / "requirements" / "server.txt"


def test_server_from_a_fresh_venv_reports_serving(tmp_path: Path, tiny_repo: Path) -> None:
    started = time.monotonic()
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout_s=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, "-c", str(CONSTRAINTS), "-r", str(SERVER_REQUIREMENTS)], timeout_s=600)
    # Build from copies so setuptools' build/ and egg-info never land in the working tree.
    for package in ("api", "server", "clients"):  # the image holds the client too (bulk Jobs run it)
        shutil.copytree(ROOT / package, tmp_path / package, ignore=COPY_IGNORE)
    packages = [str(tmp_path / p) for p in ("api", "server", "clients")]
    run([*pip, "-c", str(CONSTRAINTS), *packages], timeout_s=300)
    install_s = time.monotonic() - started
    run([str(venv / "bin" / "python"), "-m", "pip", "check"], timeout_s=60)
    listed = run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], timeout_s=60).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert not installed & {"torch", "onnx", "onnxscript", "genserve-export", "pytest"}, installed
    assert {"genserve-server", "genserve-api", "genserve-client"} <= installed

    ready = tmp_path / "ready.json"
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [
            str(venv / "bin" / "genserve-server"), "serve", "--models", str(tiny_repo),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", str(ready),
            *healthy_models(tiny_repo),  # tiny-broken fails on purpose; "" needs every other model
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,  # not the repository: nothing importable from the working tree
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert server.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()}"
            assert time.monotonic() < deadline, f"not ready in 90 s: {(tmp_path / 'server.log').read_text()}"
            time.sleep(0.1)
        port = json.loads(ready.read_text())["port"]
        probe = subprocess.run(
            [str(venv / "bin" / "genserve-server"), "health", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert probe.stdout.strip() == '"" SERVING'
        # The image's client, from the same venv, talks to the server (what a bulk Job pod does).
        models = run(
            [str(venv / "bin" / "genserve-client"), "--target", f"127.0.0.1:{port}", "models"],
            timeout_s=60,
            cwd=tmp_path,
        ).stdout
        assert "tiny-gen" in models, models
        # The server really runs from the fresh venv, not from the repository's.
        module = run(
            [str(venv / "bin" / "python"), "-c", "import genserve_server; print(genserve_server.__file__)"],
            timeout_s=60,
            cwd=tmp_path,
        ).stdout
        assert module.startswith(str(venv)), module
    finally:
        server.send_signal(signal.SIGTERM)  # by PID: only the server this test started
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()
    assert server.returncode == 0, (tmp_path / "server.log").read_text()
    # Measured and shown, not asserted: seconds of pip and disk are this machine's, not the install's
    # (the pip steps' own timeouts bound a hung install).
    print(f"fresh venv install took {install_s:.1f} s")  # noqa: T201 - the issue asks to measure it

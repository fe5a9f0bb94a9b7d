"""`genserve-server serve`'s flags: a value out of range, an address that cannot be bound
for /metrics, or a --ready-file that cannot be written is one line naming the flag (exit 2), never a
traceback, and never a server that starts and then fails at its first SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from reliability_support import as_unprivileged_user, write_gen
from server_support import wait_until

from genserve_server.metrics_http import BoundedWSGIServer


def serve_args(models: Path, *extra: str) -> list[str]:
    base = ["--port", "0", "--metrics-port", "0"]
    return [sys.executable, "-m", "genserve_server", "serve", "--models", str(models), *base, *extra]


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "NVML" not in line]
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    ("extra", "flag", "limit"),
    [
        (("--port", "70000"), "--port", "0..65535"),
        (("--metrics-port", "-1"), "--metrics-port", "0..65535"),
        (("--health-port", "70000"), "--health-port", "0..65535"),
        (("--drain-grace-s", "nan"), "--drain-grace-s", ">= 0"),
        (("--drain-grace-s", "-1"), "--drain-grace-s", ">= 0"),  # the config file refuses it too
        (("--watch-interval-s", "nan"), "--watch-interval-s", "> 0"),
        (("--metrics-host", "no-such-host.invalid"), "--metrics-host", "cannot serve metrics"),
        (("--ready-file", "/nonexistent-dir/ready.json"), "--ready-file", "does not exist"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, extra: tuple[str, ...], flag: str, limit: str
) -> None:
    models = tmp_path / "models"
    write_gen(models, "gen")
    proc = subprocess.run(serve_args(models, *extra), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert flag in last_line(proc.stderr) and limit in last_line(proc.stderr), proc.stderr
    assert "listening" not in proc.stdout


def test_a_health_port_in_use_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_gen(models, "gen")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            serve_args(models, "--health-port", str(port)), capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"port {port}" in last_line(proc.stderr) and "--health-port" in last_line(proc.stderr)
    assert "listening" not in proc.stdout


def test_a_nan_watch_interval_in_the_config_file_is_refused(tmp_path: Path) -> None:
    """Python's json reads NaN; `watch_interval_s: NaN` passed the `<= 0` check and killed the
    repository watch, then the server's shutdown, with a traceback."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    config = tmp_path / "server.json"
    config.write_text('{"watch_interval_s": NaN}')
    proc = subprocess.run(
        serve_args(models, "--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "watch_interval_s" in last_line(proc.stderr) and "Traceback" not in proc.stderr


def test_good_duration_flags_still_serve_and_stop_cleanly(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_gen(models, "gen")
    ready = tmp_path / "ready.json"
    extra = ("--drain-grace-s", "0", "--watch-interval-s", "0.5", "--ready-file", str(ready), "--no-metrics")
    args = serve_args(models, *extra)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        wait_until(ready.exists, 30, "the ready file")
        assert json.loads(ready.read_text())["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_a_metrics_server_whose_bind_fails_raises_the_bind_error() -> None:
    """TCPServer.__init__ calls server_close when its bind fails, before server_activate made the
    workers: the AttributeError that raised hid EADDRINUSE (the message naming --metrics-port)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as info:  # a listener holds it: SO_REUSEADDR does not help
            BoundedWSGIServer(("127.0.0.1", port), object, lambda: (True, ""))  # type: ignore[arg-type]
    assert info.value.errno == errno.EADDRINUSE


def test_a_models_path_that_is_a_file_is_named_as_not_a_directory(tmp_path: Path) -> None:
    """`--models FILE` said 'directory not found' of a path that exists."""
    models = tmp_path / "models.tar"
    models.write_bytes(b"not a folder")
    proc = subprocess.run(serve_args(models), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{models}: model repository is not a directory" in last_line(proc.stderr), proc.stderr


def test_a_models_directory_that_cannot_be_listed_is_one_line_naming_it() -> None:
    """An unreadable repository (a volume mounted with the wrong owner or mode for uid 10001: no
    fsGroup, mode 0700 root) exited with a Python traceback out of Repository.scan, not one line naming
    the directory and the cause as a missing or non-directory --models does."""
    prefix = as_unprivileged_user()
    # Not under pytest's tmp_path (mode 0700 of root): the other user must reach the directory.
    base = Path(tempfile.mkdtemp(prefix="genserve-unreadable-"))
    try:
        base.chmod(0o755)
        models = base / "models"
        write_gen(models, "gen")
        models.chmod(0)
        env = {**os.environ, "HOME": str(base)}
        proc = subprocess.run(
            [*prefix, *serve_args(models)], capture_output=True, text=True, timeout=60, env=env
        )
    finally:
        (base / "models").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = last_line(proc.stderr)
    assert f"{models}: model repository cannot be read: Permission denied" in line, proc.stderr


# `python -m genserve_server` on a kernel without IPv6 (booted with ipv6.disable=1): Python's
# socket.has_ipv6 false, and an AF_INET6 socket refused with EAFNOSUPPORT.
_NO_IPV6 = """
import errno, runpy, socket, sys
_socket = socket.socket
class _NoIpv6(_socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        super().__init__(family, type, proto, fileno)
socket.socket = _NoIpv6
socket.has_ipv6 = False
sys.argv[0] = "genserve_server"
runpy.run_module("genserve_server", run_name="__main__", alter_sys=True)
"""


def test_metrics_on_ipv6_where_the_kernel_has_none_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    """deploy/k8s's --metrics-host :: on a node whose kernel has IPv6 off: a traceback ending in
    'Address family not supported by protocol', naming no flag. One line naming --metrics-host and
    what to use instead (exit 2)."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    # `python -m genserve_server` left out: _NO_IPV6 runs it.
    with socket.socket() as free:  # a port of its own, as the Deployment's 50052 (0 skips the check)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    args = serve_args(models, "--metrics-host", "::", "--metrics-port", str(port))[3:]
    proc = subprocess.run([sys.executable, "-c", _NO_IPV6, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = last_line(proc.stderr)
    assert "--metrics-host" in line and "IPv6" in line and "0.0.0.0" in line, proc.stderr
    assert "listening" not in proc.stdout


@pytest.mark.parametrize("json_from", ["--log-json", "config log_json"])
def test_a_fatal_start_up_error_under_log_json_is_a_json_record(tmp_path: Path, json_from: str) -> None:
    """With --log-json (or the config's log_json) every stderr line is a JSON record for the log
    shipper, but the error that ends the start (a --models that is not there, a port in use) was
    written as plain text, `genserve-server: ...`, among the records before it: the one line an
    operator needs was the one a JSON pipeline could not parse. It is an ERROR record, exit 2."""
    if json_from == "--log-json":
        extra: tuple[str, ...] = ("--log-json",)
    else:
        config = tmp_path / "server.json"
        config.write_text('{"log_json": true}')
        extra = ("--config", str(config))
    missing = tmp_path / "no-such-models"
    proc = subprocess.run(serve_args(missing, *extra), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, proc.stderr
    records = [json.loads(line) for line in lines]  # every line, the last included, is JSON
    assert records[-1]["level"] == "ERROR", records[-1]
    assert f"{missing}: model repository directory not found" in records[-1]["msg"], records[-1]


@pytest.mark.parametrize("flag", ["--metrics-port", "--health-port"])
def test_a_port_given_twice_is_named_as_given_twice_not_as_in_use(tmp_path: Path, flag: str) -> None:
    """--metrics-port or --health-port set to --port's own number (on the same --host) was told as
    'port P on 127.0.0.1 is already in use: free it or choose another', with nothing else on the
    port: the operator looked for another process holding it, and found none once the server had
    exited. It is refused before anything binds, naming both flags."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    args = serve_args(models, flag, port)
    args[args.index("--port") + 1] = port
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = last_line(proc.stderr)
    assert f"--port and {flag} are both {port}" in line, proc.stderr
    assert "in use" not in proc.stderr and "listening" not in proc.stdout, proc.stderr

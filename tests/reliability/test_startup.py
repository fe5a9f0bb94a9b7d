"""What an operator sees first (issue 16): readiness that does not lie, /healthz on the metrics port,
a quiet start on a CPU machine, one clear line for a port in use, and a probe that imports only grpc.

Every test starts real `genserve-server` processes on 127.0.0.1 (free ports only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx
import pytest
from exec_support import exec_wrapped
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability_support import health_status, wait_on_loop, write_gen
from server_support import (
    REPO_ROOT,
    TINY_LATENT,
    ServerProcess,
    slow_generator_graph,
    start_server,
    write_model,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_server.config import ServerConfig
from genserve_server.health import LIVE_KEY
from genserve_server.launcher import genserve_command
from genserve_server.main import App

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = genserve_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
GPU_CHAIN = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def healthz(server: ServerProcess) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def overall(server: ServerProcess) -> tuple[int, int]:
    """("" status, genserve.v1.GenerationService status)."""
    with grpc.insecure_channel(server.target) as channel:
        return health_status(channel), health_status(channel, SERVICE)


@pytest.fixture
def server_of(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def start(models: Path, *extra_args: str) -> ServerProcess:
        server = start_server(models, tmp_path / f"server-{len(started)}", extra_args=extra_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def broken_model(root: Path, name: str) -> None:
    version = write_gen(root, name)
    (version / "model.onnx").unlink()


# ------------------------------------------------------------------------------------------ readiness


def test_healthz_answers_from_the_last_state_while_the_event_loop_is_blocked_as_metrics_md_says(
    tmp_path: Path,
) -> None:
    """/healthz is answered by the metrics port's thread from the state the event loop last set, so
    with the loop blocked it still answers 200 `ok` while grpc.health.v1 (served on the loop) answers
    nothing. docs/metrics.md called it 'the same answer as grpc.health.v1' and said nothing of this:
    an operator could take it for a liveness probe that catches a wedged server. It now says so."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    seen: dict[str, object] = {}
    blocked = threading.Event()

    def probe(app: App) -> None:
        blocked.wait(30)
        url = f"http://127.0.0.1:{app.metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            seen["healthz"] = (response.status, response.read().decode().strip())
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            try:
                seen["grpc"] = health_status_within(channel, 1.0)
            except grpc.RpcError as exc:
                seen["grpc"] = exc.code()

    async def scenario() -> None:
        app = App(models, ServerConfig(), port=0, metrics_port=0)
        await app.start()
        try:
            await wait_on_loop(lambda: app.health.serving, "the server SERVING", 30)
            prober = threading.Thread(target=probe, args=(app,), daemon=True)
            prober.start()
            blocked.set()
            prober.join(30)  # on the loop: it is blocked until the probes have their answers
        finally:
            app.request_stop()
            await app.stop()

    asyncio.run(scenario())
    assert seen == {"healthz": (200, "ok"), "grpc": grpc.StatusCode.DEADLINE_EXCEEDED}, seen
    text = " ".join((REPO_ROOT / "docs" / "metrics.md").read_text().split())
    assert "keeps answering while the event loop is blocked" in text
    assert "not a liveness probe" in text


def health_status_within(channel: grpc.Channel, timeout_s: float) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s).status)


def test_a_failed_model_keeps_the_server_not_serving_unless_not_required(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    write_gen(models, "gen")
    broken_model(models, "gone")
    server = server_of(models)
    assert overall(server) == (NOT_SERVING, NOT_SERVING)
    with grpc.insecure_channel(server.target) as channel:
        assert health_status(channel, "gen") == SERVING
        assert health_status(channel, "gone") == NOT_SERVING
        assert health_status(channel, LIVE_KEY) == SERVING  # loading is over: no restart (k8s liveness)
    status, body = healthz(server)
    assert status == 503 and "gone" in body and len(body) < 600, (status, body)

    required = server_of(models, "--require-models", "gen")
    assert overall(required) == (SERVING, SERVING)
    assert healthz(required) == (200, "ok\n")


def test_an_empty_repository_and_one_where_every_model_failed_are_not_serving(
    tmp_path: Path,
    server_of,  # type: ignore[no-untyped-def]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = tmp_path / "failed"
    broken_model(failed, "a")
    broken_model(failed, "b")
    for models in (empty, failed):
        server = server_of(models)
        assert overall(server) == (NOT_SERVING, NOT_SERVING), models.name
        assert healthz(server)[0] == 503, models.name


def test_a_required_model_missing_from_the_repository_is_not_serving(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    write_gen(models, "gen")
    server = server_of(models, "--require-models", "gen,nosuch")
    assert overall(server) == (NOT_SERVING, NOT_SERVING)
    assert "nosuch" in healthz(server)[1]


def test_healthz_answers_ok_and_the_metrics_port_still_serves_the_metrics(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    write_gen(models, "gen")
    server = server_of(models)
    assert healthz(server) == (200, "ok\n")
    assert "genserve_model_ready" in server.metrics_text()


# ------------------------------------------------------------------------------------------ quiet start


def _serve_args(models: Path, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "genserve_server",
        "serve",
        "--models",
        str(models),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(work / "ready.json"),
        *extra,
    ]


def _run_until_ready(args: list[str], work: Path, timeout_s: float = 60.0) -> tuple[int, str]:
    """Start, wait for the ready-file (or exit), SIGTERM; (exit status, stderr)."""
    stderr_path = work / "stderr.log"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout_s
        try:
            while not (work / "ready.json").exists() and proc.poll() is None:
                assert time.monotonic() < deadline, stderr_path.read_text()
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(20)
    return int(proc.returncode), stderr_path.read_text(errors="replace")


def test_start_with_gpu_providers_requested_is_quiet_and_json_clean(tmp_path: Path) -> None:
    """Models that ask for TensorRT and CUDA on a machine without them: no ONNX Runtime line on
    stderr, every line JSON with --log-json, and at most one line about the providers."""
    models = tmp_path / "models"
    for name in ("gen-a", "gen-b", "gen-c"):
        write_gen(models, name, execution_providers=GPU_CHAIN)
    rc, stderr = _run_until_ready(
        _serve_args(models, tmp_path, "--log-json", "--log-level", "INFO"), tmp_path
    )
    assert rc == 0, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "expected JSON log lines"
    assert not [line for line in lines if "onnxruntime:" in line or line.startswith("[")], stderr
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    about_providers = [r for r in records if "execution providers" in r["msg"]]
    assert len(about_providers) <= 1, about_providers
    assert sum("ready in" in r["msg"] for r in records) == 3


# ------------------------------------------------------------------------------------------ ports


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_the_port_and_the_flag(tmp_path: Path, flag: str) -> None:
    models = tmp_path / "models"
    write_gen(models, "gen")
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        args = _serve_args(models, tmp_path)
        args[args.index(flag) + 1] = str(port)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(port) in lines[0] and flag in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ probe


def test_the_health_probe_says_why_it_could_not_reach_the_server(
    capsys: pytest.CaptureFixture[str], idle_port: int
) -> None:
    """Pointed at a port that speaks HTTP/1 (the metrics port) or at one where nothing listens, the
    probe printed only `"" UNAVAILABLE`, gRPC's details (the parse failure, the refused connection)
    dropped: the operator could not tell a wrong port from a server down. Its one line says why, cut
    short; the exit status stays 1 (unhealthy)."""
    import http.server

    from genserve_server import probe

    http1 = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    serving = threading.Thread(target=http1.serve_forever, daemon=True)
    serving.start()
    try:  # nothing listens on idle_port
        for port, why in ((http1.server_address[1], "HTTP/2"), (idle_port, "Connection refused")):
            assert probe.main(["--port", str(port), "--timeout-s", "5"]) == 1
            out = capsys.readouterr().out
            assert out.startswith('"" UNAVAILABLE') and why in out, out
            assert out.count("\n") == 1 and len(out) < 400, out
    finally:
        http1.shutdown()
        http1.server_close()
        serving.join(10)


@pytest.mark.parametrize("stdout", ["closed", "reader gone"])
def test_the_health_probe_answers_serving_whatever_became_of_its_stdout(
    tiny_server: ServerProcess, stdout: str
) -> None:
    """The probe's exit status is its answer. `genserve-server health ... >&-` (Python then has no
    sys.stdout) raised AttributeError on its line: a traceback and exit 1, a SERVING server reported
    down; a reader gone before the line (`| true`, stdout buffered) printed "Exception ignored ...
    BrokenPipeError" and exited 120. Both now exit 0, without a word on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = [sys.executable, "-m", "genserve_server", "health", "--port", str(tiny_server.port)]
    if stdout == "closed":
        proc = subprocess.Popen(exec_wrapped(command, close_fds=(1,)), stderr=subprocess.PIPE, env=env)
    else:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


@pytest.mark.parametrize("unbuffered", ["", "1"])
@pytest.mark.parametrize(
    "command",
    [
        ["genserve_server", "--help"],
        ["genserve_server", "serve", "--help"],
        ["genserve_server.probe", "--help"],
    ],
    ids=["--help", "serve --help", "probe --help"],
)
def test_help_to_a_reader_that_goes_away_exits_141_quietly(command: list[str], unbuffered: str) -> None:
    """`genserve-server --help | true`: argparse prints the help and exits inside parse_args, so where
    stdout is buffered the interpreter's final flush printed "Exception ignored ... BrokenPipeError"
    and exited 120; unbuffered, argparse dropped the failed write and exited 0. As genserve-client
    and genserve-export do: nothing on stderr, exit 141."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen(
        [sys.executable, "-m", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the help
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == "", err


def test_the_health_probe_imports_neither_onnxruntime_nor_numpy_nor_cv2(idle_port: int) -> None:
    """`python -m genserve_server.probe` (the Docker HEALTHCHECK): grpc and its health stubs only."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "genserve_server.probe",
            "--port",
            str(idle_port),  # nothing listens: the probe answers "unreachable"
            "--timeout-s",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # unhealthy: Docker reserves 2
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "grpc" in imported
    assert not imported & {"onnxruntime", "numpy", "cv2", "PIL", "prometheus_client"}, sorted(imported)


# ------------------------------------------------------------------------------------------ loading


def test_a_model_serves_while_the_next_loads_and_sigterm_cancels_loading(
    tmp_path: Path, server_port: int
) -> None:
    """gen loads first and serves (its health key SERVING) while z-slow, which takes long to warm
    up, is still LOADING; SIGTERM then ends the start at the next warm-up step, not after it."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    write_model(
        models,
        "z-slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 4000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        # Warm-up times every power of two up to 256, three runs each: far longer than the test.
        config={
            "batching": {"max_batch_size": 256, "max_queue_delay_ms": 1.0, "efficient_batch_tolerance": 0.1}
        },
    )
    # Its port before it is ready (the ready file, which names it, comes after z-slow's warm-up):
    # held for it (server_port), so that the health calls below reach this server and no other.
    port = server_port
    args = _serve_args(models, tmp_path)
    args[args.index("--port") + 1] = str(port)
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, (
                    "gen never SERVING while z-slow loads:\n" + log_path.read_text()
                )
                try:
                    if health_status(channel, "gen") == SERVING:
                        break
                except grpc.RpcError:
                    pass  # not listening yet, or "gen" not registered yet
                time.sleep(0.1)
            slow = genserve_pb2_grpc.GenerationServiceStub(channel).GetModel(
                genserve_pb2.GetModelRequest(name="z-slow"), timeout=10
            )
            assert slow.versions[0].state == genserve_pb2.MODEL_STATE_LOADING, log_path.read_text()
            assert health_status(channel) == NOT_SERVING  # "" waits for every model
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert "model z-slow version 1 ready" not in log_text, log_text
    assert "loading cancelled" in log_text, log_text
    assert not (tmp_path / "ready.json").exists()


def test_the_ready_file_exists_only_while_the_server_is_ready(tmp_path: Path, server_port: int) -> None:
    """A --ready-file left by an earlier run (same path, its ports and pid) stayed while this server
    loaded, so whoever waits for the file took it as ready and used the old ports; and the file the
    server wrote stayed after it stopped. The stale file goes before loading, the server's own once
    it stops."""
    stale = {"port": 1, "metrics_port": 2, "health_port": 0, "pid": 999_999_999}
    ready = tmp_path / "ready.json"
    models = tmp_path / "models"
    write_gen(models, "gen")
    write_model(
        models,
        "z-slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 4000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={  # a warm-up far longer than the test
            "batching": {"max_batch_size": 256, "max_queue_delay_ms": 1.0, "efficient_batch_tolerance": 0.1}
        },
    )
    fast_models = tmp_path / "fast-models"
    write_gen(fast_models, "gen")
    for repository in (models, fast_models):
        ready.write_text(json.dumps(stale))
        port = server_port  # known before the ready file; no one else's (conftest)
        args = _serve_args(repository, tmp_path)
        args[args.index("--port") + 1] = str(port)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                while True:
                    assert proc.poll() is None and time.monotonic() < deadline, "gen never SERVING"
                    with contextlib.suppress(grpc.RpcError):  # not listening yet
                        if health_status(channel, "gen") == SERVING:
                            break
                    time.sleep(0.05)
            if repository == models:  # z-slow still loading
                assert not ready.exists(), ready.read_text()
            else:
                while not ready.exists():
                    assert time.monotonic() < deadline, "no ready file"
                    time.sleep(0.05)
                assert json.loads(ready.read_text())["pid"] == proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert not ready.exists(), ready.read_text()


def test_a_stop_during_start_up_warns_of_no_model_it_cancelled(tmp_path: Path) -> None:
    """SIGTERM while a model still loads cancels its load: the start-up then logged the whole
    server's state as after any load, a WARNING `server NOT_SERVING: required models not ready:`
    naming every model it had just cancelled itself (all of them, on a stop early in a large
    repository), an alarm for an ordinary stop. The cancelled loads are said (INFO), and no such
    warning; the server stops with 0."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    write_model(
        models,
        "z-slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 4000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={
            "batching": {"max_batch_size": 256, "max_queue_delay_ms": 1.0, "efficient_batch_tolerance": 0.1}
        },
    )
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_serve_args(models, tmp_path), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "model gen version 1 ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert "model z-slow version 1: loading cancelled" in log_text, log_text
    assert "NOT_SERVING" not in log_text and "not ready" not in log_text, log_text


def test_a_stop_during_start_up_turns_every_health_name_not_serving_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process. SIGTERM while z-slow still loads (gen already SERVING): every name is NOT_SERVING
    from that moment, as at any shutdown. gen's key stayed SERVING while the loads were cancelled,
    and once start-up ended `liveness` turned SERVING, after the stop, until the drain began."""
    from grpc_health.v1 import health_pb2_grpc

    from genserve_server import loader

    models = tmp_path / "models"
    write_gen(models, "gen")
    write_gen(models, "z-slow", seed=1)
    real_load_files = loader.load_files

    def load_files(mv, sc, check_stopping, gate, opened=None):  # type: ignore[no-untyped-def]
        if mv.name == "z-slow":  # a long warm-up: each step checks for a stop
            while True:
                check_stopping()
                time.sleep(0.005)
        real_load_files(mv, sc, check_stopping, gate, opened)

    monkeypatch.setattr(loader, "load_files", load_files)
    names = ("", SERVICE, LIVE_KEY, "gen", "z-slow")

    async def statuses(channel: grpc.aio.Channel) -> dict[str, int]:
        stub = health_pb2_grpc.HealthStub(channel)
        answers = {}
        for name in names:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            answers[name] = response.status
        return answers

    async def scenario() -> tuple[dict[str, int], dict[str, int], bool]:
        app = App(models, ServerConfig(), port=0, metrics_port=None)
        starting = asyncio.ensure_future(app.start())
        try:
            await wait_on_loop(lambda: app.port != 0, "the server to listen")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                deadline = time.monotonic() + 30
                while (await statuses(channel))["gen"] != SERVING:
                    assert time.monotonic() < deadline, "gen never SERVING"
                    await asyncio.sleep(0.02)
                app.request_stop()
                while_cancelling = await statuses(channel)  # the loads are being cancelled
                await starting
                after_start = await statuses(channel)
                return while_cancelling, after_start, app.health.serving
        finally:
            app.request_stop()
            await asyncio.wait({starting})
            await app.stop()

    while_cancelling, after_start, healthz_serving = asyncio.run(scenario())
    assert while_cancelling == dict.fromkeys(names, NOT_SERVING), while_cancelling
    assert after_start == dict.fromkeys(names, NOT_SERVING), after_start
    assert not healthz_serving


def _grpc_imported(pid: int) -> bool:
    """The process has loaded grpc's extension: the server's imports are under way (Linux /proc)."""
    try:
        return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("moment", ["while importing", "after the first log line"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("module", ["genserve_server", "genserve_server.main"])
def test_a_signal_early_in_start_up_stops_cleanly_or_waits_for_the_scan(
    tmp_path: Path, sig: signal.Signals, moment: str, module: str
) -> None:
    """A signal before serve() had installed the event loop's handlers (the server's imports take
    half a second, building the App more) acted by default: SIGINT a KeyboardInterrupt traceback,
    SIGTERM exit -15 and SIGHUP exit -1, none of them drained. Now SIGTERM/SIGINT stop the start-up
    (exit 0, no traceback, no ready file) and a SIGHUP before the start-up scan changes nothing:
    the server comes up (the scan reads the repository after it) and stops on SIGTERM with 0.
    `python -m genserve_server.main` starts the same server, so it holds them the same way."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "stderr.log"
    command = genserve_command(models, "--log-level", "INFO")
    assert command[1:3] == ["-m", "genserve_server"]
    command[2] = module
    out_path = tmp_path / "stdout.log"
    with log_path.open("wb") as log, out_path.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--ready-file", str(ready)],
            stdout=out,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while not (_grpc_imported(proc.pid) if moment == "while importing" else log_path.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.002)
        proc.send_signal(sig)
        if sig == signal.SIGHUP:
            while not ready.exists():
                assert proc.poll() is None, f"exit {proc.returncode} on SIGHUP:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert returncode == 0, f"exit {returncode} on an early {sig.name}:\n{log_text}"
    assert "Traceback" not in log_text and "KeyboardInterrupt" not in log_text, log_text
    # Announced (and its ready file written, seen above) only where it came up; the file goes at the stop.
    assert ("genserve listening" in out_path.read_text()) == (sig == signal.SIGHUP), log_text
    assert not ready.exists(), log_text


# Signals raised while serve() builds the App, the last step before it takes the event loop's handlers.
_SIGNALS_WHILE_BUILDING = """
import signal, sys
from genserve_server import start_signals
start_signals.hold()  # as genserve_server/__main__.py does
from genserve_server import main
signals = sys.argv.pop(1).split(",")
build = main.App.__init__
def init(self, *args, **kwargs):
    for name in signals:
        signal.raise_signal(getattr(signal, name))
    build(self, *args, **kwargs)
main.App.__init__ = init
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signals", ["SIGTERM", "SIGINT", "SIGUSR1,SIGTERM"])
def test_a_signal_while_the_app_is_built_is_taken_once(tmp_path: Path, signals: str) -> None:
    """A signal while serve() built the App (after the event loop had started, before its handlers
    were installed) was taken twice: held by start_signals and also written to uvloop's wakeup fd,
    which the loop's handler read once installed. One SIGTERM was logged as a second one ('SIGTERM
    received while already stopping: ...'), one SIGUSR1 warned twice. Now each is taken once."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    command = genserve_command(models, "--log-level", "INFO")
    assert command[1:3] == ["-m", "genserve_server"]
    result = subprocess.run(
        [sys.executable, "-c", _SIGNALS_WHILE_BUILDING, signals, *command[3:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = result.stderr
    assert result.returncode == 0, log
    assert "stop requested during start-up: cancelling model loading" in log, log
    assert "already stopping" not in log, log
    assert log.count("SIGUSR1") == signals.count("SIGUSR1"), log
    assert "Traceback" not in log, log
    assert "genserve listening" not in result.stdout, result.stdout


@pytest.mark.parametrize("stdout", ["closed", "reader gone"])
def test_the_server_serves_whatever_became_of_its_stdout(tmp_path: Path, stdout: str) -> None:
    """`genserve-server serve ... >&-` (no sys.stdout) or `| head -0` (its reader gone before the
    listening line): the line's write raised AttributeError or BrokenPipeError once the server had
    started, and it stopped without writing its ready file, where a server must keep serving
    whatever became of its stdout. It comes up, answers health and Sample, and stops with 0."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    args = _serve_args(models, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's buffered stdout
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        if stdout == "closed":
            proc = subprocess.Popen(exec_wrapped(args, close_fds=(1,)), stderr=log, env=env)
        else:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env)
            assert proc.stdout is not None
            proc.stdout.close()
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready.json").exists():
            assert proc.poll() is None, f"exit {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port = json.loads((tmp_path / "ready.json").read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_status(channel) == SERVING
            stub = genserve_pb2_grpc.GenerationServiceStub(channel)
            reply = stub.Sample(genserve_pb2.SampleRequest(model="gen", count=1), timeout=10)
            assert len(reply.images) == 1
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert returncode == 0, f"exit {returncode}:\n{log_text}"
    assert "Traceback" not in log_text and "Exception ignored" not in log_text, log_text


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_sigusr1_and_sigusr2_are_logged_and_ignored_from_the_first_import_on(tmp_path: Path) -> None:
    """SIGUSR1/SIGUSR2 (a `kill -USR1` meant for another process, a log-rotation habit) ended the
    server by Python's default, exit -10 / -12 with no log line and no drain. Now each is one line
    saying it is ignored, during the imports as once serving, and the server goes on serving."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*genserve_command(models, "--log-level", "INFO"), "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while not _grpc_imported(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.002)
        proc.send_signal(signal.SIGUSR1)
        while not ready.exists():
            assert proc.poll() is None, f"exit {proc.returncode} on SIGUSR1:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        while "SIGUSR2 received: ignored" not in log_path.read_text():
            assert proc.poll() is None, f"exit {proc.returncode} on SIGUSR2:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert returncode == 0, log_text
    assert "SIGUSR1 during start-up ignored" in log_text, log_text
    assert "Traceback" not in log_text, log_text


def test_overall_health_follows_a_hot_reload(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    """A model added with a broken config.json (sorting last: no other model announces after it) turns
    "" NOT_SERVING; removing it restores SERVING."""
    import shutil

    models = tmp_path / "models"
    write_gen(models, "gen")
    server = server_of(models)
    assert overall(server) == (SERVING, SERVING)
    (models / "zz-bad").mkdir()
    (models / "zz-bad" / "config.json").write_text("{not json")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while overall(server) != (NOT_SERVING, NOT_SERVING):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert "zz-bad" in healthz(server)[1]
    shutil.rmtree(models / "zz-bad")
    server.proc.send_signal(signal.SIGHUP)
    while overall(server) != (SERVING, SERVING):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert healthz(server) == (200, "ok\n")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "70000"], "--port"),
        (["--timeout-s", "nan"], "--timeout-s"),
        (["--timeout-s", "0"], "--timeout-s"),
    ],
)
def test_the_health_probe_refuses_a_port_or_timeout_out_of_range(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--port 70000 and --timeout-s 0/nan reached grpc and read as 'unreachable'."""
    from genserve_server import probe

    with pytest.raises(SystemExit) as exit_info:
        probe.main(args)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_a_repository_whose_only_models_have_no_version_to_load_says_which_models(tmp_path: Path) -> None:
    """In process. A repository holding models none of which has a version to load (a config.json
    that does not parse, no version directory): "" is NOT_SERVING and /healthz and the log said
    'no models in the repository' (start-up notified no model, so none counted as tried), sending an
    operator after a missing volume instead of the broken files; it names the models not ready."""
    models = tmp_path / "models"
    (models / "bad").mkdir(parents=True)
    (models / "bad" / "config.json").write_text('{"kind": "generator", "batching": {"max_batch_size": 0}}')
    (models / "empty").mkdir()
    (models / "empty" / "config.json").write_text('{"kind": "generator"}')

    async def scenario() -> tuple[bool, str]:
        app = App(models, ServerConfig(), port=0, metrics_port=None)
        await app.start()
        try:
            await app.health.flush()
            return app.health.serving, app.health.reason
        finally:
            app.request_stop()
            await app.stop()

    serving, reason = asyncio.run(scenario())
    assert not serving
    assert reason == "required models not ready: bad, empty", reason


def test_names_and_values_from_repository_files_cannot_forge_log_lines(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    """Whoever can write the model repository chose text the log wrote as it was: a model or version
    directory's name, a config.json key, a card's sha256 (and ONNX Runtime's messages, which quote
    the graph's node names). A newline there wrote a whole log line of their choosing, ESC and NUL
    reached the log (and the terminal tailing it). The text format writes each record on one line,
    its control characters escaped; `--log-json` already did."""
    forged = "2026-01-01 00:00:00,000 INFO genserve_server.repository: forged line"
    evil = f"e\n{forged}\x1b[31m\x00"
    models = tmp_path / "models"
    write_gen(models, "gen")
    (models / f"model{evil[:-1]}").mkdir()  # not a model name (a file name holds no NUL)
    (models / "gen" / evil[:-1]).mkdir()  # not a version
    write_gen(models, "bad-config")
    config = {"kind": "generator", "batching": {evil: 1}}
    (models / "bad-config" / "config.json").write_text(json.dumps(config))
    card = write_gen(models, "bad-card") / "card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "sha256": {"model.onnx": evil}}))
    server = server_of(models)
    log = server.log()
    assert not any(line.startswith(forged[:20]) for line in log.splitlines()), log
    assert "\x1b" not in log and "\x00" not in log, log
    for seen in ("ignoring directories", "batching.e", "sha256 mismatch", "model names must match"):
        [line] = [line for line in log.splitlines() if seen in line]
        assert "e\\n2026-01-01" in line, line


def test_a_corrupt_model_file_is_one_error_line_naming_it_at_start_and_at_rescan(
    tmp_path: Path, server_of
) -> None:  # type: ignore[no-untyped-def]
    """A model.onnx of random bytes (a truncated copy whose card.json was regenerated from it) made
    ONNX Runtime's parse error an unexpected one: each load, at start and at every rescan that retried
    it, logged a 30-line Python traceback before the ERROR line that says it all. It is that one line,
    naming the version, the file and ONNX Runtime's reason; the traceback only with --log-level DEBUG."""
    models = tmp_path / "models"
    write_gen(models, "good")
    version = write_gen(models, "bad")
    data = os.urandom(3000)
    (version / "model.onnx").write_bytes(data)
    card = json.loads((version / "card.json").read_text())
    (version / "card.json").write_text(
        json.dumps({**card, "sha256": {"model.onnx": hashlib.sha256(data).hexdigest()}})
    )
    server = server_of(models)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "rescan in" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    log = server.log()
    assert "Traceback" not in log, log
    failures = [line for line in log.splitlines() if " ERROR " in line]
    assert len(failures) == 2, log  # the start's load, the rescan's retry: one line each
    for line in failures:
        assert "model bad version 1 unavailable: InvalidProtobuf" in line, line
        assert str(version / "model.onnx") in line, line


def test_a_graph_whose_node_names_forge_lines_cannot_forge_them_in_the_load_failures_traceback(
    tmp_path: Path, server_of
) -> None:  # type: ignore[no-untyped-def]
    """ONNX Runtime's load error quotes the graph's node names, which whoever wrote model.onnx chose;
    the load failure's line escaped them, but the traceback logged with it (an unexpected error)
    wrote its exception's message as it was: a newline in a node name, a forged line."""
    forged = "2026-01-01 00:00:00,000 INFO genserve_server.repository: forged line"
    models = tmp_path / "models"
    version = write_gen(models, "bad-graph")
    model = onnx.load(str(version / "model.onnx"))
    model.graph.node[1].name = f"e\n{forged}\x1b[31m"
    model.graph.node[1].op_type = "NoSuchOp"
    data = model.SerializeToString()
    (version / "model.onnx").write_bytes(data)
    card = json.loads((version / "card.json").read_text())
    (version / "card.json").write_text(
        json.dumps({**card, "sha256": {"model.onnx": hashlib.sha256(data).hexdigest()}})
    )
    server = server_of(models, "--log-level", "DEBUG")  # the traceback is logged at DEBUG only
    log = server.log()
    assert "Traceback" in log and "NoSuchOp" in log, log  # the failure is logged, with its traceback
    assert not any(line.startswith(forged[:20]) for line in log.splitlines()), log
    assert "\x1b" not in log, log


def test_reasons_from_repository_files_reach_clients_with_their_control_characters_escaped(
    tmp_path: Path, server_of
) -> None:  # type: ignore[no-untyped-def]
    """A reason quotes what the model repository holds (a config.json key, ONNX Runtime's message
    naming the graph's nodes): GetModel, ListModels and a refusal sent it with its newlines and ESC
    sequences as they were, so any client printing it wrote lines and terminal escapes of the
    repository writer's choosing. They arrive escaped as a repr writes them; printable text stays."""
    evil = "é✓\nforged line\x1b[31m\x07"
    escaped = "é✓\\nforged line\\x1b[31m\\x07"
    models = tmp_path / "models"
    write_gen(models, "gen")
    write_gen(models, "bad-config")
    (models / "bad-config" / "config.json").write_text(
        json.dumps({"kind": "generator", "batching": {evil: 1}})
    )
    version = write_gen(models, "bad-graph")
    model = onnx.load(str(version / "model.onnx"))
    model.graph.node[1].name = evil
    model.graph.node[1].op_type = "NoSuchOp"
    data = model.SerializeToString()
    (version / "model.onnx").write_bytes(data)
    card = json.loads((version / "card.json").read_text())
    (version / "card.json").write_text(
        json.dumps({**card, "sha256": {"model.onnx": hashlib.sha256(data).hexdigest()}})
    )
    server = server_of(models)
    with grpc.insecure_channel(server.target) as channel:
        stub = genserve_pb2_grpc.GenerationServiceStub(channel)
        listed = {m.name: m for m in stub.ListModels(genserve_pb2.ListModelsRequest()).models}
        got = {
            name: stub.GetModel(genserve_pb2.GetModelRequest(name=name))
            for name in ("bad-config", "bad-graph")
        }
        with pytest.raises(grpc.RpcError) as refused:
            stub.Sample(genserve_pb2.SampleRequest(model="bad-graph", count=1))
    reasons = {
        "bad-config": [listed["bad-config"].reason, got["bad-config"].reason],
        "bad-graph": [v.reason for v in (*listed["bad-graph"].versions, *got["bad-graph"].versions)],
    }
    reasons["bad-graph"].append(refused.value.details() or "")
    for name, texts in reasons.items():
        assert len(texts) >= 2, (name, texts)
        for text in texts:
            assert escaped in text, (name, text)
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text), (name, text)


def test_a_reason_quoting_a_file_name_that_is_not_utf8_reaches_clients_with_its_bytes_escaped(
    tmp_path: Path, server_of
) -> None:  # type: ignore[no-untyped-def]
    """A version folder whose name is not UTF-8 (Latin-1 'vérsion' from an old archive; under a C
    locale any non-ASCII name) is held by Python with lone surrogates, and a reason quoting it could
    not be encoded into the answer: ListModels failed INTERNAL for the whole repository, GetModel of
    that model too. The name's undecodable bytes arrive escaped as \\xNN, as a repr writes a byte."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    version = write_gen(models, "lost")
    os.rename(version, os.path.join(os.fsencode(version.parent), b"v\xe9rsion"))
    server = server_of(models)
    with grpc.insecure_channel(server.target) as channel:
        stub = genserve_pb2_grpc.GenerationServiceStub(channel)
        listed = {m.name: m for m in stub.ListModels(genserve_pb2.ListModelsRequest(), timeout=10).models}
        got = stub.GetModel(genserve_pb2.GetModelRequest(name="lost"), timeout=10)
    assert listed["gen"].versions[0].state == genserve_pb2.MODEL_STATE_READY, listed
    for reason in (listed["lost"].reason, got.reason):
        assert "v\\xe9rsion" in reason, reason


def test_a_model_name_the_client_sent_as_a_path_comes_back_as_it_sent_it(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    """A client that names a model by its path (`/srv/models/gen`, as a user who confuses the two
    does) is told that no model has that name, quoting what it sent: its own text is not a path of
    the server's to hide, and `<path outside the repository>` would send it looking for one."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    server = server_of(models)
    with grpc.insecure_channel(server.target) as channel:
        stub = genserve_pb2_grpc.GenerationServiceStub(channel)
        for name in ("/srv/models/gen", "/etc/gen"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Sample(genserve_pb2.SampleRequest(model=name, count=1))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            details = refused.value.details() or ""
            assert f"model {name!r} not found" in details, details
            assert "outside the repository" not in details, details


def test_a_version_the_client_sent_as_a_path_comes_back_as_it_sent_it(tmp_path: Path, server_of) -> None:  # type: ignore[no-untyped-def]
    """A version the client sent that looks like a path ('/x', '/srv/models/gen/1') is quoted back
    in the NOT_FOUND of every RPC that names a version (Sample, GetModel, KServe's ModelMetadata
    and ModelInfer): it is the client's text, not a server path for redact to hide."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    server = server_of(models)
    with grpc.insecure_channel(server.target) as channel:
        stub = genserve_pb2_grpc.GenerationServiceStub(channel)
        kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
        for version in ("/x", "/srv/models/gen/1"):
            calls = (
                (stub.Sample, genserve_pb2.SampleRequest(model="gen", version=version, count=1)),
                (stub.GetModel, genserve_pb2.GetModelRequest(name="gen", version=version)),
                (kstub.ModelMetadata, kpb.ModelMetadataRequest(name="gen", version=version)),
                (kstub.ModelInfer, kpb.ModelInferRequest(model_name="gen", model_version=version)),
            )
            for rpc, request in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    rpc(request)
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND, (request, refused.value)
                details = refused.value.details() or ""
                assert f"model gen has no version {version!r}" in details, (request, details)
                assert "outside the repository" not in details, (request, details)


def test_a_ready_file_that_cannot_be_written_once_loaded_is_said_once(tmp_path: Path) -> None:
    """The --ready-file's folder removed while the models load: the start ends (exit 2) naming the
    file; it said so twice, an ERROR line and then the same error as the fatal line."""
    models = tmp_path / "models"
    write_model(
        models,
        "slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 20000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 2, "max_queue_delay_ms": 1.0}},
    )
    ready_dir = tmp_path / "run"
    ready_dir.mkdir()
    args = _serve_args(models, tmp_path)
    args[args.index("--ready-file") + 1] = str(ready_dir / "ready.json")
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "loading 1 model versions" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        ready_dir.rmdir()
        assert proc.wait(60) == 2, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert "slow version 1 ready" in log_text, log_text  # the folder went while the model loaded
    assert log_text.count("cannot be written") == 1, log_text
    last = log_text.rstrip().splitlines()[-1]
    assert last.startswith("genserve-server: --ready-file "), log_text
    assert last.count("ready.json") == 1 and "Errno" not in last, last  # the path once, as given


def test_an_earlier_ready_file_that_cannot_be_removed_names_its_path_once(tmp_path: Path) -> None:
    """The line said the path and then the OSError's str(), which repeats it as a repr ('[Errno 21]
    Is a directory: '/run/r\\udcc3\\udca9.json'' under LANG=C): the path once, then why."""
    from genserve_server.errors import GenserveError
    from genserve_server.main import remove_stale_ready_file

    ready = tmp_path / "résumé.json"
    ready.mkdir()
    with pytest.raises(GenserveError) as info:
        remove_stale_ready_file(ready)
    message = str(info.value)
    assert message.count("résumé") == 1 and "Errno" not in message, message
    assert message.startswith(f"--ready-file {ready}: an earlier run's file cannot be removed: "), message


def test_the_load_progress_does_not_count_loads_a_stop_cancelled_as_loaded(tmp_path: Path) -> None:
    """SIGTERM while z-slow still warms up cancels its load: the progress line then said 'loaded 2/2
    model versions (1 ready)', as if loading had finished. A cancelled load is not counted as
    loaded: 'loaded 1/2 ...' stands, and one line says how many the stop left unloaded."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    write_model(
        models,
        "z-slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 4000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={
            "batching": {"max_batch_size": 256, "max_queue_delay_ms": 1.0, "efficient_batch_tolerance": 0.1}
        },
    )
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_serve_args(models, tmp_path), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "loaded 1/2 model versions" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = log_path.read_text()
    assert "model z-slow version 1: loading cancelled" in log_text, log_text
    assert "loaded 2/2" not in log_text, log_text
    assert "loading stopped: 1 of 2 model versions not loaded" in log_text, log_text


@pytest.mark.parametrize("module", ["genserve_server", "genserve_server.probe"])
def test_version_prints_the_package_and_its_version(module: str) -> None:
    """`genserve-server --version` and the probe's (`python -m genserve_server.probe --version`), as
    every serving tool has one: the distribution and its version on stdout, exit 0, nothing started."""
    from genserve_server.version import SERVER_VERSION

    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"genserve-server {SERVER_VERSION}\n" and proc.stderr == ""


# A machine whose locale is not UTF-8 (LANG=C with Python's UTF-8 mode and locale coercion off, as an
# operator's service file may set): Python holds a non-ASCII file name's bytes as lone surrogates.
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


def test_a_repository_in_a_non_ascii_folder_serves_under_a_c_locale(tmp_path: Path) -> None:
    """A repository under /srv/modèles (or a home folder such as /home/józef) on a C-locale machine:
    Python holds its path with lone surrogates, which ONNX Runtime's binding cannot take as a str, so
    every version failed to load with a TypeError from its constructor (UNAVAILABLE). Each is served."""
    models = tmp_path / "modèles dir"
    write_gen(models, "gen")
    server = ServerProcess.start(genserve_command(models), tmp_path / "work", env=C_LOCALE)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = genserve_pb2_grpc.GenerationServiceStub(channel)
            info = stub.GetModel(genserve_pb2.GetModelRequest(name="gen"), timeout=10)
            assert [v.state for v in info.versions] == [genserve_pb2.MODEL_STATE_READY], info
            reply = stub.Sample(genserve_pb2.SampleRequest(model="gen", count=1), timeout=10)
            assert len(reply.images) == 1
    finally:
        server.stop()

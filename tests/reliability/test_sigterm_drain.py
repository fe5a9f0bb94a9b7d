"""SIGTERM drains: unary calls in flight finish, SampleStreams end at a chunk boundary with a status
the client resumes from, the port is free for the next server, and the old process exits soon."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from reliability_support import cpu_seconds, write_gen, write_slow
from server_support import ServerProcess, start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_client import GenserveClient, RetryPolicy
from genserve_client import bulk as bulk_module
from genserve_client.bulk import BulkJob, BulkParams, read_manifest
from genserve_server import main as server_main
from genserve_server import start_signals
from genserve_server.config import ServerConfig
from genserve_server.core import STREAM_CHUNKS_AHEAD

GRACE_S = 120.0  # far longer than the drain may take: streams must not run until it ends
CHUNK = 4
JOB_N = 32


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


class RawStream(threading.Thread):
    """A long SampleStream read as fast as it comes: chunk sizes, arrival times, the final status."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.chunks: list[tuple[float, list[int]]] = []
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        request = pb.SampleStreamRequest(
            sample=pb.SampleRequest(model="slow", count=1_000_000, base_seed=0), chunk_size=CHUNK
        )
        with grpc.insecure_channel(self.target) as ch:
            try:
                for chunk in pb_grpc.GenerationServiceStub(ch).SampleStream(request, timeout=GRACE_S * 2):
                    self.chunks.append((time.monotonic(), [g.index for g in chunk.images]))
            except grpc.RpcError as exc:
                self.error = exc


def _start(repo: Path, work: Path, port: int) -> ServerProcess:
    config = {"drain_grace_s": GRACE_S, "warmup": False}
    return start_server(repo, work, config=config, extra_args=("--port", str(port)))


def test_sigterm_finishes_unary_calls_ends_streams_at_a_chunk_boundary_and_frees_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_port: int
) -> None:
    monkeypatch.setattr(bulk_module, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(bulk_module, "BACKOFF_MAX_S", 0.5)
    repo = tmp_path / "models"
    write_slow(repo, "slow", iterations=10000, queue=64, batch=CHUNK)  # a chunk takes ~0.1-0.3 s
    port = server_port  # no one else's between the two servers
    old = _start(repo, tmp_path / "old", port)
    target = old.target
    job_dir = tmp_path / "job"
    job_errors: list[BaseException] = []

    def run_job() -> None:
        retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)
        try:
            with GenserveClient(target, retry=retry) as client:
                BulkJob(
                    client, BulkParams("slow", n=JOB_N), job_dir, chunk_size=CHUNK, retry_window_s=120
                ).run()
        except BaseException as exc:  # reported by the assertion below
            job_errors.append(exc)

    new: ServerProcess | None = None
    try:
        raw = RawStream(target)
        raw.start()
        job = threading.Thread(target=run_job, daemon=True)
        job.start()
        wait_until(lambda: len(raw.chunks) >= 2, 60, "the raw stream's first chunks")
        wait_until(lambda: (job_dir / "manifest.jsonl").exists(), 60, "the bulk job's first chunk")

        # An interactive call in flight at SIGTERM: two batches' worth, so it is surely still running.
        with grpc.insecure_channel(target) as ch:
            unary = pb_grpc.GenerationServiceStub(ch).Sample.future(
                pb.SampleRequest(
                    model="slow", count=2 * CHUNK, base_seed=7, priority=tpb.PRIORITY_INTERACTIVE
                ),
                timeout=GRACE_S,
            )
            wait_until(
                lambda: old.metric("genserve_requests_in_flight", method="Sample") >= 1, 30, "the Sample"
            )
            signalled = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            response = unary.result(timeout=GRACE_S)
        assert len(response.images) == 2 * CHUNK
        old.proc.wait(GRACE_S)
        exited_after_s = time.monotonic() - signalled
        assert old.proc.returncode == 0, old.log()
        # Not the grace: only the chunks in flight and the unary call were waited for.
        assert exited_after_s < GRACE_S / 4, (exited_after_s, old.log())

        raw.join(10)
        assert raw.error is not None and raw.error.code() == grpc.StatusCode.UNAVAILABLE
        received = [i for _, indices in raw.chunks for i in indices]
        assert received == list(range(len(received)))  # in order, nothing lost or repeated
        assert all(len(indices) == CHUNK for _, indices in raw.chunks)  # whole chunks only
        assert f"start_index={len(received)}" in (raw.error.details() or "")
        after_signal = [t for t, _ in raw.chunks if t > signalled]
        assert len(after_signal) <= STREAM_CHUNKS_AHEAD + 1

        # The same port at once, for the restarted server; the bulk job resumes there.
        new = _start(repo, tmp_path / "new", port)
        assert new.port == port
        job.join(120)
        assert not job.is_alive() and not job_errors, job_errors
        entries = read_manifest(job_dir / "manifest.jsonl")[0]
        assert sorted(e["index"] for e in entries) == list(range(JOB_N))
        with grpc.insecure_channel(new.target) as ch:
            reference = pb_grpc.GenerationServiceStub(ch).Sample(
                pb.SampleRequest(
                    model="slow",
                    count=JOB_N,
                    base_seed=0,
                    output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG),
                ),
                timeout=GRACE_S,
            )
        for entry in entries:
            written = _pixels((job_dir / entry["file"]).read_bytes())
            expected = _pixels(reference.images[entry["index"]].image.data)
            assert np.array_equal(written, expected), entry
    finally:
        old.stop()
        if new is not None:
            assert new.stop() == 0


class HealthWatch(threading.Thread):
    """A grpc.health.v1 Watch of the whole server ("") held open, as gRPC's client-side health
    checking holds one per connection: the statuses it received and how it ended."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.statuses: list[int] = []
        self.error: grpc.RpcError | None = None
        self.ended = False

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            try:
                for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="")):
                    self.statuses.append(reply.status)
            except grpc.RpcError as exc:
                self.error = exc
        self.ended = True


def test_an_open_health_watch_does_not_hold_an_idle_server_for_the_whole_drain_grace(tmp_path: Path) -> None:
    """Nothing in flight but a health Watch (it never ends by itself): SIGTERM sends it NOT_SERVING,
    ends it, and the server exits at once, not when the drain grace cuts it ("Cancelling all
    calls")."""
    repo = tmp_path / "models"
    write_gen(repo)
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": 30.0, "warmup": False})
    try:
        watch = HealthWatch(server.target)
        watch.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: watch.statuses[-1:] == [serving], 30, "the watch's SERVING")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
            server.proc.wait(8.0)
        exited_after_s = time.monotonic() - signalled
        assert server.proc.returncode == 0, (exited_after_s, server.log())
        watch.join(10)
        assert watch.ended
        assert watch.statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert watch.error is not None and watch.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (watch.error.details() or ""), watch.error.details()
    finally:
        server.stop()


def _slow_only_when_asked(repo: Path, iterations: int) -> None:
    """A slow model whose Loop runs `iterations` times for a row of non-zero latents, and not at all
    for the zeros its load probes it with: a long call to interrupt that costs no time to load."""
    write_slow(repo, "slow", iterations=iterations, queue=4, batch=1)
    path = repo / "slow" / "1" / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    trip = next(i for i in graph.initializer if i.name == "trip")
    graph.initializer.remove(trip)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(iterations, np.int64), "iterations"))
    graph.node.insert(0, onnx.helper.make_node("Abs", ["z"], ["z_abs"]))
    graph.node.insert(1, onnx.helper.make_node("ReduceSum", ["z_abs"], ["z_sum"], keepdims=0))
    graph.node.insert(2, onnx.helper.make_node("Sign", ["z_sum"], ["z_any"]))
    graph.node.insert(3, onnx.helper.make_node("Cast", ["z_any"], ["z_one"], to=onnx.TensorProto.INT64))
    graph.node.insert(4, onnx.helper.make_node("Mul", ["z_one", "iterations"], ["trip"]))
    data = model.SerializeToString()
    path.write_bytes(data)
    card_path = path.parent / "card.json"
    card = json.loads(card_path.read_text())
    card["sha256"]["model.onnx"] = hashlib.sha256(data).hexdigest()
    card_path.write_text(json.dumps(card))
    config_path = repo / "slow" / "config.json"
    config = json.loads(config_path.read_text())
    # One intra-op thread and no solo session: no load-time check of rows (seeded, non-zero).
    config["runtime"] = {"intra_op_threads": 1, "solo_session": False}
    config_path.write_text(json.dumps(config))


def test_a_batch_computing_past_the_drain_grace_neither_stops_health_answers_nor_holds_the_exit(
    tmp_path: Path,
) -> None:
    """SIGTERM while one model call computes far longer than drain_grace_s (ONNX Runtime cannot be
    interrupted between two of its nodes only). Closing its runner waited for the call on the event
    loop: the --health-port listener answered no probe (the kubelet's time out instead of reading
    NOT_SERVING), and the process exited when the call ended, not at the grace (past the pod's
    terminationGracePeriodSeconds: SIGKILL). The probes must be answered throughout, and the call
    still running at the grace's end is aborted, so the exit follows the grace."""
    grace_s = 2.0
    repo = tmp_path / "models"
    # One row takes ~20 s on an idle core (about 55,000 iterations a second), longer on a busy one.
    _slow_only_when_asked(repo, 1_100_000)
    server = start_server(
        repo,
        tmp_path / "work",
        config={"drain_grace_s": grace_s, "warmup": False},
        extra_args=("--health-port", "0"),
    )
    try:
        with grpc.insecure_channel(server.target) as ch:
            call = pb_grpc.GenerationServiceStub(ch).Sample.future(
                pb.SampleRequest(model="slow", count=1, base_seed=0), timeout=120
            )
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="Sample") >= 1, 30, "the Sample"
            )
            time.sleep(0.2)  # its batch formed (1 ms queue delay) and computing
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            answers: list[tuple[float, int]] = []
            unanswered: list[tuple[float, str]] = []
            with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as health_ch:
                stub = health_pb2_grpc.HealthStub(health_ch)
                while server.proc.poll() is None and time.monotonic() - signalled < 60:
                    at = time.monotonic() - signalled
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=grace_s)
                        answers.append((at, reply.status))
                    except grpc.RpcError as exc:
                        if server.proc.poll() is None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                            unanswered.append((at, exc.code().name))
                    time.sleep(0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
            exited_after_s = time.monotonic() - signalled
            with contextlib.suppress(grpc.RpcError):  # cancelled at the grace's end
                call.result(timeout=10)
        assert server.proc.returncode == 0, (exited_after_s, server.log())
        assert not unanswered, (unanswered, answers, server.log())
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert answers and all(status == not_serving for _, status in answers), answers
        assert exited_after_s < 4 * grace_s, (exited_after_s, server.log())
        assert "model calls still running at the end of the drain grace: aborting them" in server.log()
    finally:
        server.stop()


def test_the_shutdown_log_names_the_calls_it_drains_and_those_the_grace_cut(tmp_path: Path) -> None:
    """SIGTERM with a Sample that computes far past drain_grace_s: the log said
    only 'draining for up to 2.0 s' and 'stopped in 2.3 s', so an operator could not tell a clean
    drain from one whose grace cut accepted calls (their clients got UNAVAILABLE 'Cancelling all
    calls', which no server log line named). It names the calls in flight at SIGTERM, by method,
    and those still running when the grace ended."""
    grace_s = 2.0
    repo = tmp_path / "models"
    _slow_only_when_asked(repo, 1_100_000)  # ~20 s a row on an idle core
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        with grpc.insecure_channel(server.target) as ch:
            call = pb_grpc.GenerationServiceStub(ch).Sample.future(
                pb.SampleRequest(model="slow", count=1, base_seed=0), timeout=120
            )
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="Sample") >= 1, 30, "the Sample"
            )
            time.sleep(0.2)  # its batch formed and computing
            server.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
            with pytest.raises(grpc.RpcError) as cut:
                call.result(timeout=10)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        log = server.log()
        assert server.proc.returncode == 0, log
        assert "shutting down: draining 1 call in flight (Sample 1) for up to 2 s" in log
        assert "drain grace of 2 s ended with 1 call in flight (Sample 1): cancelled" in log
    finally:
        server.stop()


@pytest.mark.parametrize(("grace_s", "shown"), [(1e300, "1e+300"), (0.25, "0.25")])
def test_the_shutdown_log_prints_the_drain_grace_as_given(tmp_path: Path, grace_s: float, shown: str) -> None:
    """drain_grace_s is any number >= 0: 1e300 (wait for every call) was printed with %.1f, a
    302-character figure in 'draining ... for up to', and 0.25 as '0.2'."""
    repo = tmp_path / "models"
    write_gen(repo)
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
            server.proc.wait(30)
        log = server.log()
        assert server.proc.returncode == 0, log
        assert f"shutting down: no call in flight (drain grace {shown} s)" in log, log
    finally:
        server.stop()


def test_a_model_call_the_drain_grace_aborts_is_no_error_in_the_log(tmp_path: Path) -> None:
    """SIGTERM with two Samples computing far past drain_grace_s: each model call the grace's end
    aborted was logged at ERROR ('batch of 1 rows ... failed ... model call aborted: the server is
    shutting down'), as a model failure, which log alerting pages on for an expected shutdown. The
    shutdown's WARNINGs say it (the calls cut, the model calls aborted); each batch is an INFO line."""
    grace_s = 2.0
    repo = tmp_path / "models"
    _slow_only_when_asked(repo, 1_100_000)  # ~20 s a row on an idle core
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            calls = [
                stub.Sample.future(pb.SampleRequest(model="slow", count=1, base_seed=seed), timeout=120)
                for seed in range(2)
            ]
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="Sample") >= 2, 30, "the Samples"
            )
            time.sleep(0.2)  # the first batch formed and computing
            server.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
            for call in calls:
                with pytest.raises(grpc.RpcError) as cut:
                    call.result(timeout=10)
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        log = server.log()
        assert server.proc.returncode == 0, log
        assert "model calls still running at the end of the drain grace: aborting them" in log
        assert " ERROR " not in log, log
        assert "batch of 1 rows from 1 requests aborted by the shutdown" in log, log
    finally:
        server.stop()


def test_calls_the_drain_grace_cuts_are_counted_under_the_status_their_clients_get(tmp_path: Path) -> None:
    """SIGTERM with a Sample and a SampleStream computing far past drain_grace_s: gRPC cancels both
    at the grace's end and their clients get UNAVAILABLE, but the server counted them CANCELLED (in
    genserve_requests_total, as if the client had cancelled). The request line (DEBUG, the code
    the metrics count) says UNAVAILABLE."""
    grace_s = 2.0
    repo = tmp_path / "models"
    _slow_only_when_asked(repo, 1_100_000)  # ~20 s a row on an idle core
    server = start_server(
        repo,
        tmp_path / "work",
        config={"drain_grace_s": grace_s, "warmup": False},
        extra_args=("--log-level", "DEBUG"),
    )
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            unary = stub.Sample.future(pb.SampleRequest(model="slow", count=1, base_seed=0), timeout=120)
            stream = stub.SampleStream(
                pb.SampleStreamRequest(sample=pb.SampleRequest(model="slow", count=1, base_seed=1)),
                timeout=120,
            )
            wait_until(
                lambda: (
                    server.metric("genserve_requests_in_flight", method="Sample") >= 1
                    and server.metric("genserve_requests_in_flight", method="SampleStream") >= 1
                ),
                30,
                "the calls",
            )
            time.sleep(0.2)  # the first batch formed and computing
            server.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
            with pytest.raises(grpc.RpcError) as unary_cut:
                unary.result(timeout=10)
            with pytest.raises(grpc.RpcError) as stream_cut:
                list(stream)
        assert unary_cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stream_cut.value.code() == grpc.StatusCode.UNAVAILABLE
        log = server.log()
        assert server.proc.returncode == 0, log
        # The stream ends itself just before (resume hint); the Sample is cut.
        assert "drain grace of 2 s ended with 1 call in flight (Sample 1)" in log, log
        for method in ("Sample", "SampleStream"):
            assert f"method={method} model=slow version=1 code=UNAVAILABLE " in log, log
        assert "code=CANCELLED" not in log, log
    finally:
        server.stop()


def test_a_stream_still_computing_as_the_drain_grace_ends_is_told_where_to_resume(tmp_path: Path) -> None:
    """SIGTERM while a SampleStream's first chunk computes far past drain_grace_s: a draining stream
    ends at its next chunk boundary with UNAVAILABLE 'resume with start_index=N', but this one never
    reached one, and gRPC's cancel at the grace's end told its client only 'Cancelling all calls'.
    The server ends such a stream itself just before the grace runs out, with the same hint."""
    grace_s = 2.0
    repo = tmp_path / "models"
    _slow_only_when_asked(repo, 1_100_000)  # ~20 s a row on an idle core
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        with grpc.insecure_channel(server.target) as ch:
            request = pb.SampleStreamRequest(sample=pb.SampleRequest(model="slow", count=3, base_seed=1))
            stream = pb_grpc.GenerationServiceStub(ch).SampleStream(request, timeout=120)
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="SampleStream") >= 1,
                30,
                "the stream",
            )
            time.sleep(0.2)  # its first chunk's batch formed and computing
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as ended:
                list(stream)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume with start_index=0" in (ended.value.details() or ""), ended.value.details()
        assert server.proc.returncode == 0, server.log()
    finally:
        server.stop()


def test_a_batch_of_a_removed_model_computing_past_the_drain_grace_does_not_hold_the_exit(
    tmp_path: Path,
) -> None:
    """As above, but the model left the repository (SIGHUP) while its call computed: its version
    drains under the reloader, outside Repository.models, so Repository.close never aborted its
    runner, and the drain's runner.close thread (asyncio.run joins it) held the process's exit until
    the call ended, past drain_grace_s (and the pod's terminationGracePeriodSeconds)."""
    grace_s = 2.0
    repo = tmp_path / "models"
    _slow_only_when_asked(repo, 6_000_000)  # ~30 s or more a row
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        with grpc.insecure_channel(server.target) as ch:
            call = pb_grpc.GenerationServiceStub(ch).Sample.future(
                pb.SampleRequest(model="slow", count=1, base_seed=0), timeout=120
            )
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="Sample") >= 1, 30, "the Sample"
            )
            time.sleep(0.2)  # its batch formed and computing
            shutil.rmtree(repo / "slow")
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "left the repository" in server.log(), 30, "the rescan")
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
            exited_after_s = time.monotonic() - signalled
            with contextlib.suppress(grpc.RpcError):
                call.result(timeout=10)
        assert server.proc.returncode == 0, (exited_after_s, server.log())
        assert exited_after_s < 4 * grace_s, (exited_after_s, server.log())
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


# CPU seconds a load spends before its first model call (a small model's card, sha256 and sessions:
# a few ms) are far fewer; the slow model's call then burns a core until it ends.
LOAD_CALL_CPU_S = 0.5


def _wait_until_the_load_computes(server: ServerProcess, model: str = "slow") -> None:
    """`model`'s version is loading and has reached a long model call: the server has used
    LOAD_CALL_CPU_S of CPU since the load began, however busy the machine is."""
    wait_until(lambda: server.metric("genserve_model_loading", model=model) == 1, 30, f"{model}'s load")
    began = cpu_seconds(server.pid)
    wait_until(lambda: cpu_seconds(server.pid) - began >= LOAD_CALL_CPU_S, 60, f"{model}'s load's model call")


def test_a_version_loading_with_a_long_model_call_does_not_hold_the_exit_past_the_drain_grace(
    tmp_path: Path,
) -> None:
    """SIGTERM while a reload (SIGHUP) loads a version whose load-time model call (its probe) runs far
    past drain_grace_s: a load stops only between its steps, and its runner is not yet the version's,
    so Repository.close never aborted that call, and the load thread (joined at the interpreter's
    exit) held the process until it ended. docs/deploy.md: a model call still computing when the
    grace ends is aborted, so the exit follows the grace whatever the model's call takes."""
    grace_s = 2.0
    repo = tmp_path / "models"
    write_gen(repo)
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        write_slow(repo, "slow", iterations=6_000_000)  # ~30 s or more a call, its load's probe too
        config_path = repo / "slow" / "config.json"
        config = json.loads(config_path.read_text())
        config["runtime"] = {"intra_op_threads": 1, "solo_session": False}
        config_path.write_text(json.dumps(config))
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "repository rescan requested" in server.log(), 30, "the rescan")
        _wait_until_the_load_computes(server)  # in its probe call
        assert "slow version 1 ready" not in server.log(), server.log()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
            server.proc.wait(60)
        exited_after_s = time.monotonic() - signalled
        assert server.proc.returncode == 0, (exited_after_s, server.log())
        assert exited_after_s < 4 * grace_s, (exited_after_s, server.log())
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


def test_a_version_loading_in_its_fp16_parity_check_does_not_hold_the_exit_past_the_drain_grace(
    tmp_path: Path,
) -> None:
    """As above, but the long load-time model calls are the fp16 parity check's (precision fp16:
    loader.fp16_on_provider runs the fp32 and the fp16 graph on sessions of their own, before the
    version's runner exists): cancel_loading aborts only runners, so those calls ran on and the load
    thread held the process's exit until both had ended, against docs/deploy.md's 'the exit follows
    the grace whatever the model's call takes'."""
    grace_s = 2.0
    repo = tmp_path / "models"
    write_gen(repo)
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        version_dir = write_slow(repo, "slow", iterations=3_000_000, batch=1)  # ~15 s a call
        data = (version_dir / "model.onnx").read_bytes()
        (version_dir / "model.fp16.onnx").write_bytes(data)  # a twin within any parity
        card_path = version_dir / "card.json"
        card = json.loads(card_path.read_text())
        card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
        card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
        card_path.write_text(json.dumps(card))
        config_path = repo / "slow" / "config.json"
        config = json.loads(config_path.read_text())
        config["precision"] = "fp16"
        config["runtime"] = {"intra_op_threads": 1, "solo_session": False}
        config_path.write_text(json.dumps(config))
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "repository rescan requested" in server.log(), 30, "the rescan")
        _wait_until_the_load_computes(server)  # in its fp16 parity check
        assert "slow version 1 ready" not in server.log(), server.log()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
            server.proc.wait(60)
        exited_after_s = time.monotonic() - signalled
        assert server.proc.returncode == 0, (exited_after_s, server.log())
        assert exited_after_s < 4 * grace_s, (exited_after_s, server.log())
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


def test_a_second_stop_signal_while_draining_is_said_once_and_the_drain_goes_on(tmp_path: Path) -> None:
    """A supervisor or an operator repeating SIGTERM/SIGINT while the server drains got no word at
    all (during start-up, 'stop requested during start-up: cancelling model loading' again): one
    line says the signal was seen and that the drain goes on, however many come; no traceback."""
    grace_s = 3.0
    repo = tmp_path / "models"
    _slow_only_when_asked(repo, 1_100_000)  # ~20 s a row on an idle core
    server = start_server(repo, tmp_path / "work", config={"drain_grace_s": grace_s, "warmup": False})
    try:
        with grpc.insecure_channel(server.target) as ch:
            call = pb_grpc.GenerationServiceStub(ch).Sample.future(
                pb.SampleRequest(model="slow", count=1, base_seed=0), timeout=120
            )
            wait_until(
                lambda: server.metric("genserve_requests_in_flight", method="Sample") >= 1, 30, "the Sample"
            )
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "shutting down: draining" in server.log(), 30, "the drain")
            server.proc.send_signal(signal.SIGINT)
            server.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below
                server.proc.wait(60)
            with pytest.raises(grpc.RpcError):
                call.result(timeout=10)
        log = server.log()
        assert server.proc.returncode == 0, log
        assert log.count("shutting down: draining") == 1, log
        assert log.count("while already stopping") == 1, log
        # Which of the two the loop reads first is the kernel's order: either is named.
        assert re.search(r"SIG(INT|TERM) received while already stopping: the drain goes on", log), log
        assert "Traceback" not in log, log
    finally:
        server.stop()


def test_a_gpu_failure_while_stopping_is_not_told_as_a_second_signal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sticky GPU failure stopped the server by sending it SIGTERM, so a failure once the server was
    stopping (an operator's SIGTERM draining it, or a second version failing on the same broken CUDA
    context) logged 'SIGTERM received while already stopping: ... SIGKILL stops at once', a second
    signal nobody sent. The server's own stop requests the stop itself; only the operator's second
    signal is told so."""
    models = tmp_path / "models"
    write_gen(models, "gen")
    write_gen(models, "gen2")
    reason = "CUDA error 700: an illegal memory access was encountered"

    async def scenario() -> None:
        app = server_main.App(models, ServerConfig(), port=0, metrics_port=None)
        loop = asyncio.get_running_loop()
        server_main._take_signals(app)
        try:
            await app.start()
            app.request_stop()  # the operator's SIGTERM: the drain is under way
            app.repository.device_lost(app.repository.get("gen").resolve(""), reason)
            app.repository.device_lost(app.repository.get("gen2").resolve(""), reason)
            for _ in range(20):  # a signal reaches its handler through the loop
                await asyncio.sleep(0.01)
            assert app.stop_requested
            await app.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *start_signals.IGNORED):
                loop.remove_signal_handler(sig)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "stopping the server for a restart" in caplog.text, caplog.text
    assert "already stopping" not in caplog.text, caplog.text

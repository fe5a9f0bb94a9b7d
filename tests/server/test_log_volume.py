"""How much the server logs at its default level (INFO) under good load, bad requests and attack.

Operators ship the log; a client must not be able to write a line (or a traceback) per call at
will: refusals are counted by genserve_requests_total / genserve_requests_rejected_total, and the
log says that they happen, not each one."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import ServerProcess, build_tiny_repo, start_server, write_tiny_generator

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_server import boundary

SAMPLE = "/genserve.v1.GenerationService/Sample"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = build_tiny_repo(tmp_path_factory.mktemp("log-volume-models"), with_slow=False, with_broken=False)
    proc = start_server(
        root, tmp_path_factory.mktemp("log-volume-server"), config={"limits": {"max_health_watchers": 2}}
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _lines(server: ServerProcess) -> int:
    return len(server.log().splitlines())


def _new_lines(server: ServerProcess, since: int) -> list[str]:
    return server.log().splitlines()[since:]


def _refused(call: object, times: int) -> grpc.StatusCode:
    code = grpc.StatusCode.OK
    for _ in range(times):
        try:
            call()  # type: ignore[operator]
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            code = exc.code()
    return code


def test_good_requests_log_nothing_at_the_default_level(server: ServerProcess, channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    since = _lines(server)
    for seed in range(300):
        stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[seed]))
    assert _new_lines(server, since) == []


def test_garbage_reflection_requests_are_refused_without_a_traceback(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    """Bytes that are not a ServerReflectionRequest made grpc's deserializer raise inside the
    handler: the client got UNKNOWN and the log a 21-line ERROR traceback per call, at will."""
    reflection = channel.stream_stream(REFLECTION)
    since = _lines(server)
    code = _refused(lambda: list(reflection(iter([b"\xff\xff\xff"]))), 30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    new = _new_lines(server, since)
    assert not [line for line in new if "Traceback" in line or " ERROR " in line], new[:25]
    assert len(new) <= 30, new[:25]  # never a traceback's 21 lines a call (the flood: below)


def test_a_flood_of_refused_requests_logs_a_bounded_number_of_lines(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    """Each refused call (unknown model, invalid field, bytes that are not a request, a Watch over
    max_health_watchers) logged an INFO line: a client's flood of bad calls wrote the log at will.
    The first of each kind is logged; the metrics count every one."""
    stub = pb_grpc.GenerationServiceStub(channel)
    raw_sample = channel.unary_unary(SAMPLE)
    health = health_pb2_grpc.HealthStub(channel)
    not_found_before = server.metric("genserve_requests_total", method="Sample", code="NOT_FOUND")
    since = _lines(server)

    unknown = _refused(lambda: stub.Sample(pb.SampleRequest(model="nope", count=1)), 200)
    assert unknown == grpc.StatusCode.NOT_FOUND
    assert (
        _refused(lambda: stub.Sample(pb.SampleRequest(model="tiny-gen", count=0)), 200)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _refused(lambda: raw_sample(b"\xff\xff\xff\xff"), 200) == grpc.StatusCode.INVALID_ARGUMENT
    watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
    try:
        for watch in watches:
            next(watch)
        over = _refused(lambda: list(health.Watch(health_pb2.HealthCheckRequest())), 100)
        assert over == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for watch in watches:
            watch.cancel()

    new = _new_lines(server, since)
    assert len(new) <= 8, f"{len(new)} lines for 700 refused calls: {new[:10]}"
    text = "\n".join(new)
    for kind in ("code=NOT_FOUND", "code=INVALID_ARGUMENT", "Sample: DecodeError", "health Watch"):
        assert kind in text, (kind, new)  # the operator still learns that it happens
    not_found = server.metric("genserve_requests_total", method="Sample", code="NOT_FOUND")
    assert not_found - not_found_before == 200  # every one still counted


def test_a_throttled_kind_logs_a_line_per_interval_with_the_count_and_each_one_at_debug(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr(boundary.time, "monotonic", lambda: now[0])
    log = boundary.ThrottledLog(logging.getLogger("genserve_server.test"), interval_s=10.0)
    with caplog.at_level(logging.DEBUG, logger="genserve_server.test"):
        for i in range(300):
            log.log("NOT_FOUND", "request_id=%d code=NOT_FOUND", i)
        log.log("INVALID_ARGUMENT", "request_id=x code=INVALID_ARGUMENT")  # another kind: its own line
        now[0] += 10.0
        log.log("NOT_FOUND", "request_id=last code=NOT_FOUND")
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == [
        "request_id=0 code=NOT_FOUND",
        "request_id=x code=INVALID_ARGUMENT",
        "request_id=last code=NOT_FOUND (299 more since the last line)",
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 299 and debug[-1] == "request_id=299 code=NOT_FOUND"  # DEBUG shows each one


def test_a_throttled_kinds_held_back_count_reaches_the_log_after_the_flood_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The '(N more since the last line)' count was written only with the next event of its kind
    at INFO: a flood that stopped (a scanner gone, a client fixed) left its count at DEBUG for good,
    the log showing one refused call where there were hundreds. Now the count is logged once the
    interval ends, whether or not another event comes."""
    log = boundary.ThrottledLog(logging.getLogger("genserve_server.test"), interval_s=0.05)

    def info() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]

    async def flood() -> None:
        for i in range(50):
            log.log("UNAUTHENTICATED", "request_id=%d rejected", i)
        log.log("NOT_FOUND", "request_id=x code=NOT_FOUND")  # another kind, nothing held back
        for _ in range(200):  # the interval is 0.05 s: well within 10 s
            if len(info()) >= 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # nothing more comes: no line without events held back

    with caplog.at_level(logging.DEBUG, logger="genserve_server.test"):
        asyncio.run(flood())
    assert info() == [
        "request_id=0 rejected",
        "request_id=x code=NOT_FOUND",
        "request_id=49 rejected (48 more since the last line)",
    ]


def test_an_event_held_back_keeps_no_reference_to_its_arguments(caplog: pytest.LogCaptureFixture) -> None:
    """A held-back event is kept for its interval's line (the flood's last one, with the count); kept
    with its arguments, a refusal's error (whose traceback holds the refused request: megabytes of
    seeds) lived till the timer fired, and seven refused 7 MiB requests peaked at 2.3x one
    (test_a_refused_request_is_freed_when_its_call_ends). Only its text is kept; the line says the
    same."""

    class Refusal(Exception):
        pass

    log = boundary.ThrottledLog(logging.getLogger("genserve_server.test"), interval_s=10.0)
    log.log("INVALID_ARGUMENT", "request_id=%s: %s", "a", Refusal("too many seeds"))  # its line
    held = Refusal("too many seeds")
    alive = weakref.ref(held)
    log.log("INVALID_ARGUMENT", "request_id=%s: %s", "b", held)  # held back
    del held
    gc.collect()
    assert alive() is None, "the held-back event kept its error alive"
    with caplog.at_level(logging.INFO, logger="genserve_server.test"):
        log.flush()
    assert [r.getMessage() for r in caplog.records] == ["request_id=b: too many seeds"]


def test_a_count_held_back_when_the_server_stops_is_in_its_log(tmp_path: Path) -> None:
    """The held-back count's timer runs at the interval's end (10 s): a server stopped before it
    (a flood, then a deploy's SIGTERM) dropped the timer with the loop, its log showing one refused
    call of the flood. A graceful stop writes every count still held back."""
    write_tiny_generator(tmp_path / "models", "tiny-gen")
    server = start_server(tmp_path / "models", tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            unknown = _refused(lambda: stub.Sample(pb.SampleRequest(model="nope", count=1)), 30)
            assert unknown == grpc.StatusCode.NOT_FOUND
    finally:
        assert server.stop() == 0
    lines = [line for line in server.log().splitlines() if "code=NOT_FOUND" in line]
    assert len(lines) == 2, lines
    assert "more since the last line" not in lines[0]
    assert lines[1].endswith("(28 more since the last line)")

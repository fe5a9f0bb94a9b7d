"""SampleStreams whose client stopped reading cannot keep the bulk slots (issue 22).

A raw HTTP/2 client opens as many SampleStreams as there are slots and never reads (no
WINDOW_UPDATE): the server's writes stall once the flow-control window is full. After
`stream_write_timeout_s` the server ends each handler (its job stops and its slot is freed; the
status cannot reach a client whose window is full), so a real bulk client gets a slot and its
whole job. On the session's start the unread streams kept both slots for as long as they stayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from reliability_support import NO_BDP_PROBE, write_gen
from server_support import ServerProcess, start_server, wait_until
from unread_client import UnreadClient

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.boundary import REFUSAL_LOG_INTERVAL_S

SLOTS = 2
STREAM = "/genserve.v1.GenerationService/SampleStream"
SAMPLE = "/genserve.v1.GenerationService/Sample"
RAW = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("unread-models")
    write_gen(root)
    limits = {"max_concurrent_sample_streams": SLOTS, "stream_write_timeout_s": 3.0}
    proc = start_server(root, tmp_path_factory.mktemp("unread-server"), config={"limits": limits})
    yield proc
    proc.stop()


def test_unread_streams_lose_their_slots_and_a_real_bulk_job_runs(server: ServerProcess) -> None:
    job = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
    unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
    try:
        for _ in range(SLOTS):
            unread.call(server.target, STREAM, job.SerializeToString())
        # Both unread streams admitted (their handlers run) before the real job asks for a slot; they
        # then hold it for stream_write_timeout_s after their window fills.
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") >= SLOTS,
            10,
            "the unread streams to take every slot",
            interval_s=0.01,
        )
        request = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=100, output=RAW))
        refused: list[str] = []

        def bulk_job_runs() -> bool:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                try:
                    chunks = list(stub.SampleStream(request, timeout=60))
                except grpc.RpcError as exc:  # both slots held: RESOURCE_EXHAUSTED until they are freed
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    refused.append(exc.details() or "")
                    return False
            assert [image.index for chunk in chunks for image in chunk.images] == list(range(100))
            return True

        wait_until(bulk_job_runs, 30, "a real bulk job to get a slot beside the unread streams")
        assert refused and "max_concurrent_sample_streams" in refused[0]  # the slots were taken first
    finally:
        unread.close()


@pytest.fixture(scope="module")
def quick_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Unread streams end after 0.5 s."""
    root = tmp_path_factory.mktemp("unread-quick-models")
    write_gen(root)
    limits = {"max_concurrent_sample_streams": 8, "stream_write_timeout_s": 0.5}
    proc = start_server(root, tmp_path_factory.mktemp("unread-quick-server"), config={"limits": limits})
    yield proc
    proc.stop()


def _log_problems(server: ServerProcess, since: int) -> list[str]:
    return [
        line
        for line in server.log().splitlines()[since:]
        if "Traceback" in line or "ExecuteBatchError" in line
    ]


def _ended_streams(server: ServerProcess) -> float:
    return server.metric("genserve_requests_total", method="SampleStream", code="RESOURCE_EXHAUSTED")


@pytest.mark.parametrize("goes_by", ["cancel", "disconnect"])
def test_a_client_that_goes_after_the_server_ended_its_unread_stream_leaves_no_traceback(
    quick_server: ServerProcess, goes_by: str
) -> None:
    """The server ends a stream its client does not read (stream_write_timeout_s) and leaves its
    RESOURCE_EXHAUSTED status queued behind the unread message, for a client that reads on. A client
    that cancels or disconnects instead fails that status send in gRPC's core, and grpc logged it as
    'ExecuteBatchError raised in core by servicer method [...SampleStream]' at ERROR with a traceback
    whenever its failed send was handled before its notice of the client leaving."""
    server = quick_server
    job = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
    lines = len(server.log().splitlines())
    streams = 4

    def ended_since(before: float) -> Callable[[], bool]:
        return lambda: _ended_streams(server) - before >= streams

    for _ in range(3):
        ended = ended_since(_ended_streams(server))
        if goes_by == "cancel":
            with grpc.insecure_channel(server.target, options=NO_BDP_PROBE) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                calls = [stub.SampleStream(job, timeout=30) for _ in range(streams)]  # never read
                wait_until(ended, 10, "the server to end the unread streams")
                for call in calls:
                    call.cancel()
        else:
            unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
            try:
                for _ in range(streams):
                    unread.call(server.target, STREAM, job.SerializeToString())
                wait_until(ended, 10, "the server to end the unread streams")
            finally:
                unread.close()
        time.sleep(0.3)  # grpc logs the failed status send after the handler has ended
    assert _log_problems(server, lines) == []


@pytest.mark.parametrize("goes_by", ["cancel", "disconnect"])
def test_a_client_that_goes_while_its_unary_response_is_sent_leaves_no_traceback(
    quick_server: ServerProcess, goes_by: str
) -> None:
    """A unary response larger than the client's flow-control window waits in gRPC's send after the
    handler has returned. A client that cancels or disconnects then (it stopped reading; or grpc's
    own client, whose default 4 MiB max_receive_message_length refuses a larger response, resets
    the call) fails that send in gRPC's core, and grpc logged 'ExecuteBatchError raised in core by
    servicer method [...Sample]' at ERROR with a traceback: the client leaving, not a server fault."""
    server = quick_server
    # 256 8x8x3 float32 images: about 200 KB, beyond the client's 64 KiB window.
    request = pb.SampleRequest(
        model="gen", count=256, base_seed=0, output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)
    )
    lines = len(server.log().splitlines())
    for _ in range(3):
        unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
        try:
            calls = [unread.call(server.target, SAMPLE, request.SerializeToString()) for _ in range(2)]
            wait_until(
                lambda: server.metric("genserve_response_bytes_pending") > 0,
                10,
                "the responses computed and waiting to be sent",
            )
            time.sleep(0.2)  # in gRPC's send, their window full
            if goes_by == "cancel":
                for stream_id in calls:
                    unread.cancel(stream_id)
        finally:
            unread.close()
        wait_until(
            lambda: server.metric("genserve_response_bytes_pending") == 0, 10, "the responses released"
        )
        time.sleep(0.3)  # grpc logs the failed send after the handler has ended
    assert _log_problems(server, lines) == []


def test_a_flood_of_unread_streams_logs_a_bounded_number_of_lines(quick_server: ServerProcess) -> None:
    """Each stream the server ended because its client read nothing logged an INFO line: a client
    opening unread streams wrote the log at will (a line per stream). Like the refusals
    (boundary.ThrottledLog), the first is logged, then one line per interval saying how many more
    came; genserve_requests_total{code="RESOURCE_EXHAUSTED"} counts every one."""
    server = quick_server
    job = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
    lines = len(server.log().splitlines())
    before = _ended_streams(server)
    rounds, streams = 25, 8  # max_concurrent_sample_streams at a time
    started = time.monotonic()
    for done in range(1, rounds + 1):
        unread = UnreadClient(int(server.target.rsplit(":", 1)[1]))
        try:
            for _ in range(streams):
                unread.call(server.target, STREAM, job.SerializeToString())
            wait_until(
                lambda n=done: _ended_streams(server) - before >= n * streams,
                10,
                "the server to end the unread streams",
            )
        finally:
            unread.close()
    windows = 1 + int((time.monotonic() - started) / REFUSAL_LOG_INTERVAL_S)  # a line for each at most
    ended = [line for line in server.log().splitlines()[lines:] if "read nothing" in line]
    assert 1 <= len(ended) <= windows, (
        f"{len(ended)} lines for {rounds * streams} unread streams: {ended[:5]}"
    )
    assert "more since the last line" in ended[-1] or len(ended) == 1, ended
    assert _ended_streams(server) - before == rounds * streams  # every one still counted

"""A SampleStream whose client stops reading and then cancels, or whose deadline passes, while the
server waits to write (its flow-control window full): the call ends with the client's status and the
server's log stays clean.

gRPC's core fails the pending write when it ends the call; grpc's aio server logged that failure as
"ExecuteBatchError raised in core by servicer method [...SampleStream]" at ERROR with a traceback
through genserve's frames, unless its own cancellation of the handler happened to run first (found
by the chaos storm, tests/reliability/test_chaos.py, seed 303, one CPU core).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from reliability_support import NO_BDP_PROBE, write_gen
from server_support import ServerProcess, start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

RAW = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
# Far more than a flow-control window holds: the server's writes stall while the client reads nothing.
JOB = pb.SampleStreamRequest(sample=pb.SampleRequest(model="gen", count=10**6, base_seed=0, output=RAW))
CALLS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("stream-end-models")
    write_gen(root)
    proc = start_server(root, tmp_path_factory.mktemp("stream-end-server"))
    yield proc
    proc.stop()


def _stream_calls(server: ServerProcess, code: str) -> float:
    return server.metric("genserve_requests_total", method="SampleStream", code=code)


def _idle(server: ServerProcess) -> None:
    wait_until(
        lambda: server.metric("genserve_requests_in_flight", method="SampleStream") == 0,
        10,
        "the stream handlers to end",
    )


def _log_problems(server: ServerProcess, since: int) -> list[str]:
    return [
        line
        for line in server.log().splitlines()[since:]
        if "Traceback" in line or "ExecuteBatchError" in line
    ]


def test_a_cancel_while_the_server_waits_to_write_logs_no_traceback(server: ServerProcess) -> None:
    before, lines = _stream_calls(server, "CANCELLED"), len(server.log().splitlines())
    with grpc.insecure_channel(server.target, options=NO_BDP_PROBE) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(CALLS):
            call = stub.SampleStream(JOB, timeout=30)  # never read
            time.sleep(0.5)  # the window fills; the handler waits in its write
            call.cancel()
            assert call.code() == grpc.StatusCode.CANCELLED
            _idle(server)
    time.sleep(0.2)  # grpc logs the failed write after the handler has ended
    assert _log_problems(server, lines) == []
    assert _stream_calls(server, "CANCELLED") - before == CALLS


def test_a_deadline_while_the_server_waits_to_write_logs_no_traceback(server: ServerProcess) -> None:
    before, lines = _stream_calls(server, "DEADLINE_EXCEEDED"), len(server.log().splitlines())
    with grpc.insecure_channel(server.target, options=NO_BDP_PROBE) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(CALLS):
            call = stub.SampleStream(JOB, timeout=0.5)  # never read
            assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            _idle(server)
    time.sleep(0.2)
    assert _log_problems(server, lines) == []
    assert _stream_calls(server, "DEADLINE_EXCEEDED") - before == CALLS

"""SampleStreams whose client stopped reading cannot keep the bulk slots (issue 22).

A raw HTTP/2 client opens as many SampleStreams as there are slots and never reads (no
WINDOW_UPDATE): the server's writes stall once the flow-control window is full. After
`stream_write_timeout_s` the server ends each handler (its job stops and its slot is freed; the
status cannot reach a client whose window is full), so a real bulk client gets a slot and its
whole job. On the session's start the unread streams kept both slots for as long as they stayed.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from reliability_support import write_gen
from server_support import ServerProcess, start_server, wait_until
from unread_client import UnreadClient

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

SLOTS = 2
STREAM = "/genserve.v1.GenerationService/SampleStream"
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

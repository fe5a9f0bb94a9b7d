"""How much the server logs at its default level (INFO) under good load, bad requests and attack.

Operators ship the log; a client must not be able to write a line (or a traceback) per call at
will: refusals are counted by genserve_requests_total / genserve_requests_rejected_total, and the
log says that they happen, not each one."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from server_support import ServerProcess, build_tiny_repo, start_server

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

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
    assert len(new) <= 30, new[:25]  # never a traceback (21 lines) a call

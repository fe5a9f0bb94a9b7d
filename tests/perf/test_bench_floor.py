"""The bench's transport floor: a health Check one call at a time, through the same load generator
as the c=1 levels it is subtracted from (bench.servers.rpc_floor_ms)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.servers import BenchError, ServerProcess, rpc_floor_ms


@pytest.fixture
def health_only_server() -> Iterator[str]:
    """A server that answers grpc.health Check and nothing else (Sample would be UNIMPLEMENTED)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_the_floor_is_a_health_check_through_the_load_generator(health_only_server: str) -> None:
    server: Any = SimpleNamespace(target=health_only_server)
    floor = rpc_floor_ms(cast(ServerProcess, server), duration_s=0.2)
    # Answered, so the calls went to Check, not to the load generator's default Sample.
    assert 0.0 < floor < 1000.0


class EveryOtherCheckFails(health.HealthServicer):
    """Answers every other Check UNAVAILABLE, at once (as a server shedding load would)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:  # noqa: N802
        self.calls += 1
        if self.calls % 2 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "shedding")
        return super().Check(request, context)


def test_a_floor_whose_checks_failed_is_no_floor() -> None:
    # The p50 of the calls that happened to be answered is no floor of this server (a failed call is
    # in no latency), and the c=1 p50 over it would judge issue 20's target against it: a floor
    # measured with failed calls is refused, as a level with failed calls is (check_no_failures).
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(EveryOtherCheckFails(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        server: Any = SimpleNamespace(target=f"127.0.0.1:{port}")
        with pytest.raises(BenchError, match="UNAVAILABLE"):
            rpc_floor_ms(cast(ServerProcess, server), duration_s=0.2)
    finally:
        grpc_server.stop(None)

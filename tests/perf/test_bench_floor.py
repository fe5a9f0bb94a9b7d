"""The bench's transport floor: a health Check one call at a time, through the same load generator
as the c=1 levels it is subtracted from (bench.servers.rpc_floor_ms)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from bench.servers import ServerProcess, rpc_floor_ms


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

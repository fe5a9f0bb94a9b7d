"""The bench's transport floor: a health Check one call at a time, through the same load generator
as the c=1 levels it is subtracted from (bench.servers.rpc_floor_ms); and what that load generator
opens to a server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.servers import BenchError, ServerProcess, rpc_floor_ms
from genserve_client.bench import BenchResult, LoadGenerator
from genserve_client.channel import ChannelConfig
from genserve_server.admission import HEALTH_CHECK


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


def test_the_load_generators_channels_are_connections_of_their_own() -> None:
    # `genserve-client bench --channels N`: "gRPC channels (HTTP/2 connections)". gRPC shares one
    # connection among channels to one target with the same arguments, so N channels were N names
    # for one connection: every call went over the one HTTP/2 connection, as with --channels 1.
    peers: set[str] = set()

    class Recording(health.HealthServicer):
        def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:  # noqa: N802
            peers.add(context.peer())
            return super().Check(request, context)

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(Recording(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()

    async def load() -> BenchResult:
        config = ChannelConfig(target=f"127.0.0.1:{port}")
        gen = LoadGenerator(config, lambda: request, channels=3, method=HEALTH_CHECK)
        try:
            return await gen.closed_loop(6, 0.2)
        finally:
            await gen.close()

    try:
        result = asyncio.run(load())
    finally:
        grpc_server.stop(None)
    assert result.images > 0 and not result.errors
    assert len(peers) == 3, peers

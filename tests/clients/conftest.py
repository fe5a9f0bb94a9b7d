"""Client-test fixtures. Real-server tests use the shared `tiny_server` from tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from client_fakes import FakeServer, FakeService

from genserve.v1 import genserve_pb2_grpc


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeServer(service, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)

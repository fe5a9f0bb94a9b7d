"""port_support: a port held by a bound, not listening socket refuses connections (gRPC: UNAVAILABLE)
and binds, and a reserved one takes the test's own servers in turn; a port found free and let go
does neither (the race between `make test`'s two workers)."""

from __future__ import annotations

import errno
import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from port_support import refused_port, reserved_port


def _connect_error(port: int) -> int:
    with socket.socket() as client:
        try:
            client.connect(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno or 0
    return 0


def _bind_error(port: int, *, reuse_addr: bool) -> int:
    with socket.socket() as other:
        if reuse_addr:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno or 0
    return 0


def _health_code(port: int) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.UNAVAILABLE or "Connection refused" in (exc.details() or "")
            return exc.code()
    return grpc.StatusCode.OK


def _grpc_server(port: int) -> grpc.Server:
    """A gRPC server with a SERVING health service on `port`, bound as genserve binds (no SO_REUSEPORT)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def test_a_port_found_free_and_let_go_is_anyones_before_the_test_uses_it() -> None:
    """The pattern these helpers replace: between the close and the use, a stranger (the other
    worker's server) listens there, and a client meant to find nothing reaches it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # "nothing listens"
    stranger = _grpc_server(port)
    try:
        assert _health_code(port) == grpc.StatusCode.OK  # not the UNAVAILABLE the test counted on
    finally:
        stranger.stop(None)


def test_a_refused_port_refuses_every_connection_and_every_bind() -> None:
    with refused_port() as port:
        assert _connect_error(port) == errno.ECONNREFUSED
        assert _health_code(port) == grpc.StatusCode.UNAVAILABLE
        assert _bind_error(port, reuse_addr=False) == errno.EADDRINUSE
        assert _bind_error(port, reuse_addr=True) == errno.EADDRINUSE
        with pytest.raises(RuntimeError):  # grpcio: "Failed to bind to address"
            _grpc_server(port)


def test_a_reserved_port_takes_the_tests_servers_in_turn_and_refuses_between_them() -> None:
    with reserved_port() as port:
        assert _health_code(port) == grpc.StatusCode.UNAVAILABLE
        assert _bind_error(port, reuse_addr=False) == errno.EADDRINUSE
        for _ in range(2):  # a server, then its restart on the same port
            server = _grpc_server(port)
            try:
                assert _health_code(port) == grpc.StatusCode.OK
                assert _bind_error(port, reuse_addr=True) == errno.EADDRINUSE  # one listener at a time
            finally:
                server.stop(None)
            assert _health_code(port) == grpc.StatusCode.UNAVAILABLE


def test_the_fixtures_hold_their_ports_for_the_whole_test(idle_port: int, server_port: int) -> None:
    """conftest's idle_port is a refused_port, server_port a reserved_port."""
    assert _health_code(idle_port) == _health_code(server_port) == grpc.StatusCode.UNAVAILABLE
    assert _bind_error(idle_port, reuse_addr=True) == errno.EADDRINUSE
    server = _grpc_server(server_port)
    server.stop(None)

"""Health probes at the server's connection limits (deploy/k8s/deployment.yaml, docs/operations.md).

The kubelet's gRPC probes open a new connection for each probe, HTTP checkers (HAProxy, uptime
probes: docs/metrics.md) a new one to `/healthz`. A server busy at one of its connection limits must
still answer them: a probe refused for the load takes a healthy pod out of its Service (readiness)
or restarts it (liveness: six failures, a minute), dropping the work of every client it was serving.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability_support import health_status, write_gen
from server_support import ServerProcess, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
MAX_CONNECTIONS = 4
METRICS_THREADS = 2
# More scrapers in a loop than the metrics port's workers and their queue (4 per worker) hold.
SCRAPERS = 4 * METRICS_THREADS * 2
# What the kubelet gives a readiness probe (deploy/k8s/deployment.yaml, timeoutSeconds).
PROBE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("probe-models")
    write_gen(root)
    limits = {"max_connections": MAX_CONNECTIONS, "metrics_threads": METRICS_THREADS}
    proc = start_server(root, tmp_path_factory.mktemp("probe-server"), config={"limits": limits})
    yield proc
    proc.stop()


def _probe(target: str, service: str) -> object:
    """A kubelet-like probe: a connection of its own, one Check, PROBE_TIMEOUT_S."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PROBE_TIMEOUT_S).status
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"


def test_grpc_probes_answer_while_clients_hold_every_connection(server: ServerProcess) -> None:
    """max_connections busy clients (each its own connection, as a fleet of client processes has):
    the readiness and liveness probes still answer SERVING. grpc's max_allowed_incoming_connections
    closed the probe's connection at accept, so the pod left its Service and, the clients staying
    longer than a minute, the kubelet restarted it."""
    clients = [
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(MAX_CONNECTIONS)
    ]
    try:
        for channel in clients:
            assert health_status(channel) == SERVING  # each holds a connection now
        answers = {service: _probe(server.target, service) for service in ("", "liveness")}
        assert answers == {"": SERVING, "liveness": SERVING}, answers
    finally:
        for channel in clients:
            channel.close()


def test_probes_answer_once_the_load_has_gone(server: ServerProcess) -> None:
    """The server itself is fine once the clients go (the refusal above is the limit, not a fault)."""
    assert _probe(server.target, "") == SERVING

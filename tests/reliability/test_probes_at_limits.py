"""Health probes at the server's connection limits (deploy/k8s/deployment.yaml, docs/operations.md).

The kubelet's gRPC probes open a new connection for each probe (to `--health-port`, as the shipped
Deployment sets them), HTTP checkers (HAProxy, uptime probes: docs/metrics.md) a new one to
`/healthz`. A server busy at one of its connection limits must still answer them: a probe refused
for the load takes a healthy pod out of its Service (readiness) or restarts it (liveness: six
failures, a minute), dropping the work of every client it was serving.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability_support import health_status, write_gen
from server_support import ServerProcess, metric_in, start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_server.launcher import genserve_command

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
    proc = start_server(
        root,
        tmp_path_factory.mktemp("probe-server"),
        config={"limits": limits},
        extra_args=("--health-port", "0"),
    )
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
    the readiness and liveness probes, on the health port as docs/deploy.md points them, still
    answer SERVING. On the serving port grpc's max_allowed_incoming_connections closed the probe's
    connection at accept, so the pod left its Service and, the clients staying longer than a minute,
    the kubelet restarted it."""
    clients = [
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(MAX_CONNECTIONS)
    ]
    try:
        for channel in clients:
            assert health_status(channel) == SERVING  # each holds a connection now
        health_target = f"127.0.0.1:{server.health_port}"
        answers = {service: _probe(health_target, service) for service in ("", "liveness")}
        assert answers == {"": SERVING, "liveness": SERVING}, answers
        # The serving port itself is at its limit: the probe would have been refused there.
        assert _probe(server.target, "") != SERVING
    finally:
        for channel in clients:
            channel.close()


def test_the_health_port_answers_what_the_serving_port_answers_and_serves_nothing_else(
    server: ServerProcess,
) -> None:
    """The same servicer on both listeners: every name (List) answers alike; genserve.v1 and the
    other services are not on the health port (a client pointed there by mistake learns at once)."""
    with (
        grpc.insecure_channel(server.target) as serving,
        grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as health,
    ):
        request = health_pb2.HealthListRequest()
        # wait_for_ready: the serving port may still count the connections the tests above closed.
        listed = health_pb2_grpc.HealthStub(serving).List(request, timeout=10, wait_for_ready=True)
        on_serving = listed.statuses
        on_health = health_pb2_grpc.HealthStub(health).List(request, timeout=5).statuses
        assert {"", "liveness", "gen"} <= set(on_serving)
        assert dict(on_health) == dict(on_serving)
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GenerationServiceStub(health).ListModels(pb.ListModelsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"health on 127.0.0.1:{server.health_port}" in server.log()


def test_a_method_the_health_port_does_not_serve_is_unimplemented_with_its_request_id_and_counted(
    server: ServerProcess,
) -> None:
    """The health port has its own catch-all (main.py): a method it does not serve (genserve.v1's, a
    made-up one) is UNIMPLEMENTED naming the method, with the call's request id in its trailing
    metadata as every RPC's (docs/metrics.md), and counted as on the serving port (method="")."""
    paths = {
        "rid-health-genserve": "/genserve.v1.GenerationService/ListModels",
        "rid-health-made-up": "/foo/bar",
    }
    labels = {"model": "", "version": "", "method": "", "code": "UNIMPLEMENTED"}
    # The server counts such a call once gRPC has sent its status (Boundary.unknown_method counts
    # after its abort), so its client can have the status first: the module's server may still
    # count the test above's ListModels on this port. Take "before" once the count holds still.
    before = server.metrics_text()
    settle_deadline = time.monotonic() + 10
    while time.monotonic() < settle_deadline:
        time.sleep(0.3)
        again = server.metrics_text()
        if metric_in(again, "genserve_requests_total", **labels) == metric_in(
            before, "genserve_requests_total", **labels
        ):
            break
        before = again
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as health:
        for rid, path in paths.items():
            with pytest.raises(grpc.RpcError) as refused:
                health.unary_unary(path)(b"", metadata=(("x-request-id", rid),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value
            assert path in (refused.value.details() or ""), refused.value.details()  # type: ignore[attr-defined]
            trailing = dict(refused.value.trailing_metadata() or ())  # type: ignore[attr-defined]
            assert trailing.get("x-request-id") == rid, trailing

    def added() -> float:
        after = server.metrics_text()
        return metric_in(after, "genserve_requests_total", **labels) - metric_in(
            before, "genserve_requests_total", **labels
        )

    # Likewise the last call's count can miss a scrape taken at once: wait for it (10 s at most).
    settle_deadline = time.monotonic() + 10
    while added() < len(paths) and time.monotonic() < settle_deadline:
        time.sleep(0.05)
    assert added() == len(paths)


def _healthz(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=PROBE_TIMEOUT_S) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except OSError as exc:  # closed without an answer, or timed out
        return f"{type(exc).__name__}: {exc}"


def test_healthz_answers_during_a_scrape_flood(server: ServerProcess) -> None:
    """docs/metrics.md: a scrape flood "cannot be turned against serving"; it may delay scrapes. The
    health answer on the same port must not be refused with them: with more scrapers in a loop than
    the workers and their queue hold, /healthz connections were closed without an answer, and an
    HTTP checker took the pod out of rotation."""
    stop = threading.Event()
    scraped = [0] * SCRAPERS  # scrapes each scraper has ended, answered or not

    def scrape(i: int) -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10
                ) as r:
                    r.read()
            except OSError:
                time.sleep(0.01)
            scraped[i] += 1

    scrapers = [threading.Thread(target=scrape, args=(i,), daemon=True) for i in range(SCRAPERS)]
    for thread in scrapers:
        thread.start()
    try:
        wait_until(lambda: min(scraped) >= 1, 30, "every scraper in its loop")  # the flood under way
        answers = []
        for _ in range(10):
            answers.append(_healthz(server.metrics_port))
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in scrapers:
            thread.join(15)
    assert answers == ["200"] * len(answers), answers
    assert _healthz(server.metrics_port) == "200"  # and after the flood


def test_healthz_answers_while_half_sent_requests_are_held(server: ServerProcess) -> None:
    """More connections than the workers and their queue hold, each a /metrics request whose head
    never ends (kept until metrics_read_timeout_s): /healthz still answers at once."""
    held = []
    try:
        for _ in range(METRICS_THREADS * 5 + 4):
            s = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: genserve\r\n")
            held.append(s)
        time.sleep(0.2)
        assert [_healthz(server.metrics_port) for _ in range(3)] == ["200"] * 3
    finally:
        for s in held:
            s.close()


def test_probes_answer_once_the_load_has_gone(server: ServerProcess) -> None:
    """The server itself is fine once the clients go (the refusal above is the limit, not a fault)."""
    assert _probe(server.target, "") == SERVING
    assert _probe(f"127.0.0.1:{server.health_port}", "liveness") == SERVING
    assert _healthz(server.metrics_port) == "200"


# A process's open-file limit as systemd, Docker (moby 25+) and containerd 2 start it: soft 1024,
# hard far above. Scaled down here: 128, so that a few more client connections than that exhaust it.
LOW_SOFT_NOFILE = 128
NOFILE_HARD = 8192


def test_probes_answer_while_clients_hold_more_connections_than_the_soft_open_file_limit(
    tmp_path: Path,
) -> None:
    """Each connection is a file descriptor. Started under a soft RLIMIT_NOFILE below the default
    max_connections (1024; a container's soft limit is commonly exactly 1024), the server ran out of
    descriptors at ~100 client connections: every new connection, the health port's and /healthz's
    included, waited at accept ("File descriptor limit reached. Retrying."), so the kubelet's probes
    failed and restarted a pod that was only busy. The server now raises its soft limit (within the
    hard one) to what max_connections and the health port need."""
    root = tmp_path / "models"
    write_gen(root)
    limit = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_SOFT_NOFILE}, {NOFILE_HARD})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    command = [sys.executable, "-c", limit, *genserve_command(root, "--health-port", "0")]
    proc = ServerProcess.start(command, tmp_path / "server")
    clients: list[grpc.Channel] = []
    try:
        for _ in range(LOW_SOFT_NOFILE + 16):
            channel = grpc.insecure_channel(proc.target, options=[("grpc.use_local_subchannel_pool", 1)])
            clients.append(channel)
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                assert stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S).status == SERVING
            except grpc.RpcError as exc:
                pytest.fail(f"client connection {len(clients)} refused: {exc.code().name} {exc.details()}")
        health_target = f"127.0.0.1:{proc.health_port}"
        answers = {service: _probe(health_target, service) for service in ("", "liveness")}
        assert answers == {"": SERVING, "liveness": SERVING}, answers
        assert _healthz(proc.metrics_port) == "200"
        assert "File descriptor limit reached" not in proc.log()
    finally:
        for channel in clients:
            channel.close()
        proc.stop()

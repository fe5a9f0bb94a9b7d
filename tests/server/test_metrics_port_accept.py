"""The metrics port's listening socket: connections that arrive while its accept thread is not
running (it waits for the GIL behind a render or the event loop) wait in the kernel, not dropped."""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from genserve_server.metrics_http import serve

BURST = 40  # a scrape flood's connections, and an HTTP checker's among them


def test_a_burst_of_connections_while_the_accept_thread_is_held_is_not_dropped() -> None:
    """socketserver listens with a backlog of 5: while the accept thread could not run, the kernel
    dropped the SYN of every connection past the sixth, and each such client (a /healthz probe
    among the scrapers) connected only on its retransmission, 1 s (then 3 s) later: a kubelet
    httpGet probe (timeoutSeconds 1) failed under a scrape flood that docs/metrics.md says cannot
    delay /healthz. Measured with 32 scrapers in a loop from another process: 3 of 30 /healthz took
    1.02 s."""
    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), lambda: (True, ""), threads=1)
    port = httpd.server_port
    gate = threading.Event()
    original = httpd.process_request

    def held(request: Any, client_address: Any) -> None:
        gate.wait(10)  # the accept thread busy (the GIL held elsewhere) for a moment
        original(request, client_address)

    httpd.process_request = held  # type: ignore[method-assign]
    clients: list[socket.socket] = []
    try:
        for _ in range(BURST):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            clients.append(sock)
        time.sleep(0.3)
        gate.set()  # the accept thread runs again
        deadline = time.monotonic() + 0.5
        pending = list(clients)
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
            pending = [s for s in pending if s not in writable]
        assert not pending, (
            f"{len(pending)} of {BURST} connections not established 0.5 s after the accept thread ran"
        )
        # The last of the burst is a /healthz probe: answered at once.
        probe = clients[-1]
        probe.setblocking(True)
        probe.settimeout(2)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.recv(64).startswith(b"HTTP/1.0 200 ")
    finally:
        gate.set()
        for sock in clients:
            sock.close()
        httpd.shutdown()
        httpd.server_close()


def test_healthz_answers_while_half_sent_requests_hold_every_reading_slot() -> None:
    """docs/metrics.md: a flood of half-sent requests does not get a load balancer's health check
    closed unanswered. The reader takes at most MAX_READING connections at once and closes more at
    accept, so a client holding that many half-sent requests (each kept up to
    metrics_read_timeout_s, then reopened) had every /healthz probe closed unanswered."""
    from genserve_server.metrics_http import MAX_READING

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), lambda: (True, ""), threads=1, read_timeout_s=5.0)
    port = httpd.server_port
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_READING):
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # half-sent: no blank line yet
            held.append(sock)
        time.sleep(0.3)  # all accepted and being read
        with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = probe.recv(64)
            except OSError as exc:  # reset at accept
                answer = repr(exc).encode()
        assert answer.startswith(b"HTTP/1.0 200 "), answer
    finally:
        for sock in held:
            sock.close()
        httpd.shutdown()
        httpd.server_close()


def test_metrics_on_the_unspecified_ipv6_address_take_ipv4_too_whatever_bindv6only(
    monkeypatch: Any,
) -> None:
    """deploy/k8s's --metrics-host :: is every IPv4 and IPv6 address only where a new IPv6 socket is
    dual-stack, Linux's net.ipv6.bindv6only=0: on a node that sets it to 1 the PodMonitor's scrapes of
    an IPv4 pod IP were refused. The socket is made dual-stack itself (IPV6_V6ONLY 0)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no IPv6 loopback")

    class V6OnlyByDefault(socket.socket):
        """A socket as net.ipv6.bindv6only=1 makes it: IPv6 only unless told otherwise."""

        def __init__(self, family: Any = -1, type: Any = -1, proto: int = -1, fileno: Any = None) -> None:
            super().__init__(family, type, proto, fileno)
            if fileno is None and self.family == socket.AF_INET6:
                self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)

    monkeypatch.setattr(socket, "socket", V6OnlyByDefault)
    httpd, thread = serve("::", 0, CollectorRegistry(), lambda: (True, ""))
    monkeypatch.undo()
    try:
        assert httpd.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = httpd.server_address[1]
        for host in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as response:
                assert response.status == 200, host
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)

"""The metrics port's reader past MAX_READING connections: it closes the one reading longest for a
newcomer (docs/metrics.md, "The metrics port under load"), never one whose request has arrived, and
a connection flood cannot starve the scrapes."""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from genserve_server import metrics_http
from genserve_server.metrics_http import BoundedWSGIServer, _Handler, _Reading, serve


class _ReaderDrivenByTheTest(BoundedWSGIServer):
    """The server without its reader thread: the test calls the reader's steps itself, in order."""

    def _read_heads(self) -> None:
        return None


def _half_sent(server: BoundedWSGIServer, clients: list[socket.socket]) -> None:
    """A connection accepted whose request head is held back (no blank line)."""
    client, accepted = socket.socketpair()
    client.sendall(b"GET /metrics HTTP/1.1\r\n")
    clients.append(client)
    server.process_request(accepted, ("127.0.0.1", 0))


def test_a_probe_whose_head_has_arrived_is_answered_not_evicted_for_newer_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_READING the reader closes the connection reading longest for a newcomer. It did so
    as soon as it took the newcomers, before receiving what the connections it held had sent: a
    /healthz probe (or a scrape) whose whole head was already in its socket buffer, older than the
    newcomers of a connection flood, was closed unanswered (reset) when their wake-up came first."""
    monkeypatch.setattr(metrics_http, "MAX_READING", 4)
    server = _ReaderDrivenByTheTest(("127.0.0.1", 0), _Handler, lambda: (True, ""))
    clients: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    reading: dict[socket.socket, _Reading] = {}
    try:
        for _ in range(4):  # every reading slot held by a half-sent request
            _half_sent(server, clients)
        server._take_accepted(selector, reading)
        probe, accepted = socket.socketpair()
        clients.append(probe)
        server.process_request(accepted, ("127.0.0.1", 0))
        server._take_accepted(selector, reading)  # the probe in, the oldest half-sent one out
        assert accepted in reading
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # whole, not received yet
        for _ in range(4):  # a flood's newcomers, taken before the reader receives the probe's head
            _half_sent(server, clients)
        server._take_accepted(selector, reading)
        probe.settimeout(2)
        try:
            answer = probe.recv(64)
        except OSError as exc:
            answer = repr(exc).encode()
        assert answer.startswith(b"HTTP/1.0 200 "), answer
        assert len(reading) == 4  # the flood still holds at most MAX_READING
        assert accepted not in reading
    finally:
        for conn in list(reading.values()):
            server.shutdown_request(conn.sock)
        selector.close()
        for sock in clients:
            sock.close()
        server.server_close()


def test_a_probe_accepted_while_the_reader_is_behind_waits_for_it_not_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With twice MAX_READING connections accepted and not yet read (under a connection flood the
    accept thread wins the GIL over the reader), the accept thread closed every newcomer at once: a
    flood of half-sent requests from one client got ~1% of /healthz probes and scrapes closed
    unanswered. It now waits for the reader to take them (the newcomer answered), and closes the
    newcomer only after READER_BEHIND_WAIT_S (a reader that is stuck)."""
    monkeypatch.setattr(metrics_http, "MAX_READING", 2)
    monkeypatch.setattr(metrics_http, "READER_BEHIND_WAIT_S", 5.0)
    server = _ReaderDrivenByTheTest(("127.0.0.1", 0), _Handler, lambda: (True, ""))
    clients: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    reading: dict[socket.socket, _Reading] = {}
    try:
        for _ in range(4):  # accepted, not yet taken by the reader: it is behind
            _half_sent(server, clients)
        probe, accepted = socket.socketpair()
        clients.append(probe)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        accept = threading.Thread(target=server.process_request, args=(accepted, ("127.0.0.1", 0)))
        accept.start()
        server._take_accepted(selector, reading)  # the reader's turn: down to MAX_READING
        accept.join(5)
        assert not accept.is_alive()
        server._take_accepted(selector, reading)  # the probe, its head in
        probe.settimeout(2)
        try:
            answer = probe.recv(64)
        except OSError as exc:
            answer = repr(exc).encode()
        assert answer.startswith(b"HTTP/1.0 200 "), answer
        # A reader that does not catch up: the newcomer is closed after READER_BEHIND_WAIT_S.
        monkeypatch.setattr(metrics_http, "READER_BEHIND_WAIT_S", 0.1)
        for _ in range(2):
            _half_sent(server, clients)
        assert server._reading_count == 4
        late, accepted = socket.socketpair()
        clients.append(late)
        server.process_request(accepted, ("127.0.0.1", 0))
        late.settimeout(2)
        assert late.recv(64) == b""
    finally:
        for conn in list(reading.values()):
            server.shutdown_request(conn.sock)
        selector.close()
        for sock in clients:
            sock.close()
        server.server_close()


FLOOD_S = 3.0
# One client opening half-sent requests as fast as it can, holding each (the server evicts them).
# It says "under way" once it has opened argv[3] connections, and floods argv[2] seconds from then.
FLOOD = """
import collections, socket, sys, time
port, flood_s, under_way = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
held, opened, end = collections.deque(), 0, float("inf")
while time.monotonic() < end:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=1)
        sock.sendall(b"GET /metrics HTTP/1.1\\r\\n")
    except OSError:
        continue
    opened += 1
    held.append(sock)
    if len(held) > 2000:
        held.popleft().close()
    if opened == under_way:
        print("under way", flush=True)
        end = time.monotonic() + flood_s
print(opened)
"""


def test_a_flood_of_half_sent_connections_does_not_starve_a_scraper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection of a flood evicts the one reading longest: a scraper's connection lives
    MAX_READING connections of the flood. The scraper looping /metrics (and /healthz) meanwhile is
    still answered (measured on the 2-core VM: all but 0-4 of ~1,400 each; before the two fixes
    above 4-31% were closed unanswered)."""
    monkeypatch.setattr(metrics_http, "MAX_READING", 32)  # a short life for every connection
    registry = CollectorRegistry()
    Counter("flood_test_total", "A sample for the scrapes.", registry=registry).inc()
    httpd, _ = serve("127.0.0.1", 0, registry, lambda: (True, ""), threads=2, read_timeout_s=5.0)
    evicting = metrics_http.MAX_READING + 1  # from this connection on, each evicts another
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(httpd.server_port), str(FLOOD_S), str(evicting)],
        stdout=subprocess.PIPE,
        text=True,
    )
    answered = {"/metrics": 0, "/healthz": 0}
    refused = {"/metrics": 0, "/healthz": 0}
    try:
        # The flood under way: it has opened `evicting` connections.
        assert flood.stdout is not None
        with selectors.DefaultSelector() as said:
            said.register(flood.stdout, selectors.EVENT_READ)
            said_it = said.select(30) and flood.stdout.readline() == "under way\n"
        assert said_it, "the flood was not under way after 30 s"
        end = time.monotonic() + FLOOD_S - 1.0
        while time.monotonic() < end:
            for path in answered:
                try:
                    with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=3) as sock:
                        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        ok = sock.recv(64).startswith(b"HTTP/1.0 200 ")
                except OSError:
                    ok = False
                (answered if ok else refused)[path] += 1
        opened = int(flood.communicate(timeout=FLOOD_S + 10)[0])
    finally:
        flood.kill()
        flood.wait()
        httpd.shutdown()
        httpd.server_close()
    assert opened > 10 * 32, f"the flood opened only {opened} connections"
    for path in answered:
        tries = answered[path] + refused[path]
        assert answered[path] >= 0.9 * tries, f"{path}: {answered[path]} of {tries} answered"

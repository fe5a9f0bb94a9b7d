"""The metrics port's HTTP server: `/metrics` (Prometheus exposition) and `/healthz`.

prometheus_client's own `start_http_server` answers every path with the metrics, so an HTTP check
of `/healthz` there always passed. Here `/healthz` is a real answer: 200 `ok` while the server is
SERVING (the same state as grpc.health.v1 ""), 503 and one line saying why otherwise; to GET, and
without the body to HEAD and OPTIONS (what HAProxy's `option httpchk` sends).

prometheus_client's server also started a thread per connection and waited forever for a request:
1,000 half-sent requests held 1,000 threads, and 16 clients scraping in a loop multiplied a gRPC
client's p50 by 50 (each render holds the GIL). Here instead (docs/metrics.md, "The metrics port"):

- `threads` worker threads; accepted connections wait in a queue of 4 per worker, and beyond it
  are closed at once.
- A connection has `read_timeout_s` in all to send its request (not per byte: one byte a second
  does not keep it), else it is closed; a worker is never held longer by a client.
- A scrape is answered by a render that started after it arrived (never stale), one render at a
  time; scrapes that arrive during a render share the next one, and while scrapes overlap, renders
  take at most `render_share` of the time (after a render of d seconds the next starts no sooner
  than d × (1/render_share − 1) later). A flood of scrapes costs one thread's share, not a thread
  each; a single scraper is answered as fast as the registry renders.
"""

from __future__ import annotations

import gzip
import io
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

# (serving, reason) of the whole server.
HealthProbe = Callable[[], tuple[bool, str]]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

QUEUE_PER_WORKER = 4
# /healthz answers these with the health (HEAD and OPTIONS without a body).
HEALTHZ_METHODS = ("GET", "HEAD", "OPTIONS")


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes until a deadline: each recv may wait only for the time left."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received within metrics_read_timeout_s")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout_s)  # writing the answer gets the whole timeout


class _Handler(WSGIRequestHandler):
    """No access log on stderr (it would break --log-json); the request read under a deadline."""

    read_timeout_s = 5.0

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.read_timeout_s)  # for writing the answer
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.read_timeout_s))

    def log_message(self, format: str, *args: Any) -> None:
        return None


class BoundedWSGIServer(WSGIServer):
    """`threads` workers take accepted connections from a bounded queue; overflow is closed."""

    daemon_threads = True
    threads = 4

    def server_activate(self) -> None:
        super().server_activate()
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue(self.threads * QUEUE_PER_WORKER)
        self._workers = [
            threading.Thread(target=self._work, name=f"metrics-http-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self.shutdown_request(request)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that went away or timed out: nothing for the log

    def server_close(self) -> None:
        super().server_close()
        # Also called by TCPServer.__init__ when the bind fails, before server_activate made workers:
        # the bind's own error (address in use, unknown host) must surface, not an AttributeError.
        for _ in getattr(self, "_workers", ()):
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break  # daemon threads: they end with the process


class Exposition:
    """The registry rendered for /metrics: never stale, one render at a time, and while scrapes
    overlap at most `render_share` of the time spent rendering."""

    def __init__(self, registry: CollectorRegistry, render_share: float = 0.5) -> None:
        if not 0 < render_share <= 1:
            raise ValueError(f"render_share must be in (0, 1], got {render_share}")
        self._registry = registry
        self._gap_factor = 1 / render_share - 1
        self._done = threading.Condition()
        self._rendering = False
        self._contended = False  # a scrape waited for a render since the last one started
        self._next_start = 0.0
        # key -> (render start, headers, body); one entry per answer format
        self._cache: dict[tuple[str, bool, tuple[str, ...]], tuple[float, list[tuple[str, str]], bytes]] = {}
        self.renders = 0

    def answer(
        self, accept: str | None, accept_encoding: str | None, names: list[str]
    ) -> tuple[list[tuple[str, str]], bytes]:
        arrived = time.monotonic()
        encoder, content_type = choose_encoder(accept or "")
        compress = gzip_accepted(accept_encoding or "")
        key = (content_type, compress, tuple(sorted(names)))
        with self._done:
            while True:
                cached = self._cache.get(key)
                if cached is not None and cached[0] >= arrived:  # rendered after this scrape arrived
                    return cached[1], cached[2]
                if not self._rendering:
                    break
                self._contended = True
                self._done.wait()  # a render is under way: the next one may serve this scrape too
            self._rendering = True
            # Scrapes that overlap (a flood) are held to the render share; one scraper alone is not.
            wait = self._next_start - time.monotonic() if self._contended else 0.0
            self._contended = False
        rendered: tuple[float, list[tuple[str, str]], bytes] | None = None
        try:
            if wait > 0:
                time.sleep(wait)  # scrapes arriving meanwhile share this render
            started = time.monotonic()
            registry = self._registry.restricted_registry(names) if names else self._registry
            body = encoder(registry)
            headers = [("Content-Type", content_type)]
            if compress:
                body = gzip.compress(body)
                headers.append(("Content-Encoding", "gzip"))
            rendered = (started, headers, body)
        finally:
            with self._done:
                if rendered is not None:
                    ended = time.monotonic()
                    self._next_start = ended + (ended - rendered[0]) * self._gap_factor
                    if len(self._cache) >= 8:  # keys come from request headers: keep the cache small
                        self._cache.clear()
                    self._cache[key] = rendered
                    self.renders += 1
                self._rendering = False
                self._done.notify_all()
        return rendered[1], rendered[2]


def metrics_app(exposition: Exposition, health: HealthProbe | None) -> WsgiApp:
    """`/healthz` from `health`; every other path the metrics (as prometheus_client answers)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        headers: list[tuple[str, str]]
        if environ.get("PATH_INFO") == "/healthz" and method in HEALTHZ_METHODS:
            # Every method HTTP checkers send gets the health: HAProxy's `option httpchk /healthz`
            # sends OPTIONS, `curl -I` and uptime probes HEAD (answered without the body).
            serving, reason = health() if health is not None else (True, "")
            body = b"ok\n" if serving else f"not serving: {reason}\n".encode()[:512]
            status = "200 OK" if serving else "503 Service Unavailable"
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Allow", ",".join(HEALTHZ_METHODS))]
            if method == "HEAD":  # GET's headers, its Content-Length included, without the body
                start_response(status, [*headers, ("Content-Length", str(len(body)))])
                return [b""]
            if method == "OPTIONS":
                body = b""
        elif method == "OPTIONS":
            status, headers, body = "200 OK", [("Allow", "OPTIONS,GET")], b""
        elif method != "GET":
            status, headers = "405 Method Not Allowed", [("Allow", "OPTIONS,GET")]
            body = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()[:200]
        elif environ.get("PATH_INFO") == "/favicon.ico":
            status, headers, body = "200 OK", [], b""
        else:
            names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]", [])
            headers, body = exposition.answer(
                environ.get("HTTP_ACCEPT"), environ.get("HTTP_ACCEPT_ENCODING"), names
            )
            status = "200 OK"
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: HealthProbe | None,
    *,
    threads: int = 4,
    read_timeout_s: float = 5.0,
    render_share: float = 0.5,
) -> tuple[WSGIServer, threading.Thread]:
    """Bind host:port (OSError when it cannot) and serve on a daemon thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(BoundedWSGIServer):
        address_family = family

    Server.threads = threads

    class Handler(_Handler):
        pass

    Handler.read_timeout_s = read_timeout_s
    app = metrics_app(Exposition(registry, render_share), health)
    httpd = make_server(host, port, app, Server, handler_class=Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread

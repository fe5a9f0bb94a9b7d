"""The metrics port's HTTP server: `/metrics` (Prometheus exposition) and `/healthz`.

prometheus_client's own `start_http_server` answers every path with the metrics, so an HTTP check
of `/healthz` there always passed. Here `/healthz` is a real answer: 200 `ok` while the server is
SERVING (the same state as grpc.health.v1 ""), 503 and one line saying why otherwise; to GET, and
without the body to HEAD and OPTIONS (what HAProxy's `option httpchk` sends).

prometheus_client's server also started a thread per connection and waited forever for a request:
1,000 half-sent requests held 1,000 threads, and 16 clients scraping in a loop multiplied a gRPC
client's p50 by 50 (each render holds the GIL). Here instead (docs/metrics.md, "The metrics port"):

- One reader thread receives every accepted connection's request head without blocking (a
  selector; at most MAX_READING connections at once: past it, once what every connection has sent
  is received, the one reading longest is closed, so that connections holding their heads back
  cannot keep a new one, a /healthz probe, out, and one whose head has arrived is never closed for
  a newer one). A connection has `read_timeout_s` in all, from its accept, to send it (not per
  byte: one byte a second does not keep it), else it is closed; no thread waits on a client.
- `/healthz` (GET, HEAD, OPTIONS) is answered by the reader at once: scrapes queued or rendering
  never delay it, and a scrape flood cannot get a health check closed unanswered.
- Every other request goes to `threads` worker threads through a queue of 4 per worker; beyond it
  the connection is closed at once.
- A scrape is answered by a render that started after it arrived (never stale), one render at a
  time; scrapes that arrive during a render share the next one, and while scrapes overlap, renders
  take at most `render_share` of the time (after a render of d seconds the next starts no sooner
  than d × (1/render_share − 1) later). A flood of scrapes costs one thread's share, not a thread
  each; a single scraper is answered as fast as the registry renders.
- The render is genserve_server/exposition.py's (prometheus_client's bytes, ~10x faster with many
  model versions), gzip at level 6.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import logging
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry

from genserve_server import exposition as fast_exposition
from genserve_server.errors import escape_controls

logger = logging.getLogger(__name__)

# (serving, reason) of the whole server.
HealthProbe = Callable[[], tuple[bool, str]]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

QUEUE_PER_WORKER = 4
# Connections whose request head the reader receives at once; past it the one reading longest is
# closed for the newcomer (half-sent requests cannot keep a /healthz probe out), once the reader has
# received what they all sent (a head that has arrived is answered, not closed). At twice this
# (accepted connections the reader has not taken yet: a reader that is behind, the accept thread
# winning the GIL under a connection flood) the accept thread waits for the reader to take them.
MAX_READING = 256
# ... for at most this long; then the newcomer is closed at accept (a reader that is stuck).
READER_BEHIND_WAIT_S = 1.0
# A request head larger than this without its end is answered too long by the reader (http.server
# reads on a head of up to 100 lines of 64 KiB each: a worker would wait on the client for it).
MAX_HEAD_BYTES = 64 * 1024
# What the reader reads of a head it answered too long before closing it (so that the answer is not
# reset by the unread rest): at most this many recv calls of 64 KiB.
DRAIN_RECVS = 16
# zlib's default level: 21 MB of exposition (~900 versions) in 0.15 s on the 2-core VM against 0.8 s
# at gzip.compress's level 9, for 3% more bytes (736 KB against 715 KB, bench/profile.md).
GZIP_LEVEL = 6
# /healthz answers these with the health (HEAD and OPTIONS without a body).
HEALTHZ_METHODS = ("GET", "HEAD", "OPTIONS")
# /healthz's 503 body is at most this many bytes: a longer reason is cut, ending in _CUT.
HEALTHZ_MAX_BODY = 512
# The 405 body, which quotes the client's method, is at most this many bytes (cut as /healthz's is).
METHOD_NOT_ALLOWED_MAX_BODY = 200
_CUT = "…\n".encode()


class _DeadlineReader(io.RawIOBase):
    """`received` (what the reader thread read), then the socket's bytes until a deadline: each recv
    may wait only for the time left."""

    def __init__(self, sock: socket.socket, timeout_s: float, received: bytes, deadline: float) -> None:
        self._sock = sock
        self._received = memoryview(received)
        self._deadline = deadline
        self._timeout_s = timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._received:
            n = min(len(buffer), len(self._received))
            buffer[:n] = self._received[:n]
            self._received = self._received[n:]
            return n
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received within metrics_read_timeout_s")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout_s)  # writing the answer gets the whole timeout


class _ServerHandler(ServerHandler):
    """wsgiref's, with a client that cannot take the answer in time (the write's timeout: one that
    reads too slowly, or not at all) dropped as one that went away is, without its traceback on
    stderr (raw lines among --log-json's records)."""

    request_handler: WSGIRequestHandler  # set by _Handler.handle, as wsgiref's handle does

    def log_exception(self, exc_info: Any) -> None:
        if isinstance(exc_info[1], OSError):
            return
        # Another error (a collector raising during a render): one record of the server's log, not
        # wsgiref's traceback on stderr; the client gets wsgiref's 500.
        environ: dict[str, Any] = getattr(self, "environ", None) or {}  # set by setup_environ
        method, path = environ.get("REQUEST_METHOD", ""), str(environ.get("PATH_INFO", ""))[:200]
        logger.error("metrics port: %s %r failed; answered 500", method, path, exc_info=exc_info)


class _Handler(WSGIRequestHandler):
    """No access log on stderr (it would break --log-json); the request read under a deadline,
    starting with the bytes the reader thread received."""

    read_timeout_s = 5.0

    def __init__(
        self, request: Any, client_address: Any, server: Any, received: bytes, deadline: float
    ) -> None:
        self._received = received
        self._deadline = deadline
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.read_timeout_s)  # for writing the answer
        reader = _DeadlineReader(self.connection, self.read_timeout_s, self._received, self._deadline)
        self.rfile = io.BufferedReader(reader)

    def handle(self) -> None:
        """WSGIRequestHandler.handle, with _ServerHandler."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():  # an error has been answered
            return
        handler = _ServerHandler(
            self.rfile, cast(Any, self.wfile), self.get_stderr(), self.get_environ(), multithread=False
        )
        handler.request_handler = self
        handler.run(cast(Any, self.server).get_app())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server sends an error found before the request's version (an HTTP/2 preface, a TLS
        # ClientHello, garbage) as HTTP/0.9: the page alone, no status line, which no client reads
        # as a status. Every refusal here carries its status line and headers.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:
        return None


# RFC 9110, 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def gzip_accepted(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header lists gzip with a weight above 0 (prometheus_client's
    gzip_accepted ignores the weight: `gzip;q=0`, gzip refused (RFC 9110, 12.5.3), got gzip). A
    weight that is not a qvalue (q=abc, q=nan, q=-1, q=2) is taken as none: the name alone."""
    for item in accept_encoding.split(","):
        name, *params = item.split(";")
        if name.strip().lower() != "gzip":
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                weight = value.strip()
                return float(weight) > 0 if _QVALUE.fullmatch(weight) else True
        return True
    return False


def healthz_answer(method: str, health: HealthProbe) -> tuple[str, list[tuple[str, str]], bytes]:
    """/healthz's status, headers (Content-Length included) and body for `method` (HEALTHZ_METHODS).

    Every method HTTP checkers send gets the health: HAProxy's `option httpchk /healthz` sends
    OPTIONS, `curl -I` and uptime probes HEAD (GET's headers, its Content-Length included, without
    the body)."""
    serving, reason = health()
    # A model folder whose name is not UTF-8 reaches the reason as a lone surrogate (os.fsdecode):
    # escaped, not an UnicodeEncodeError that closed the probe's connection unanswered.
    body = b"ok\n" if serving else f"not serving: {reason}\n".encode("utf-8", "backslashreplace")
    body = _cut(body, HEALTHZ_MAX_BODY)
    status = "200 OK" if serving else "503 Service Unavailable"
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Allow", ",".join(HEALTHZ_METHODS))]
    if method == "OPTIONS":
        body = b""
    headers.append(("Content-Length", str(len(body))))
    return status, headers, b"" if method == "HEAD" else body


def _cut(body: bytes, limit: int) -> bytes:
    """A UTF-8 text `body` of at most `limit` bytes: a longer one cut on a character, the cut marked,
    the newline kept."""
    if len(body) <= limit:
        return body
    kept = body[: limit - len(_CUT)].decode("utf-8", "ignore")  # a split last one goes
    return kept.encode() + _CUT


def _healthz_method(head: bytes) -> str | None:
    """The method of a request head that asks /healthz with one of HEALTHZ_METHODS, else None (a
    worker answers it: the same answer for a /healthz the reader does not recognise, e.g. escaped)."""
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    method = parts[0].decode("latin-1")
    if parts[1].split(b"?", 1)[0] != b"/healthz" or method not in HEALTHZ_METHODS:
        return None
    return method


# A request line after which http.server reads header lines (BaseHTTPRequestHandler.parse_request:
# three words split on any whitespace, the last an HTTP version below 2.0; or HTTP/0.9's two, GET
# and a path).
_HEADED_LINE = re.compile(rb"\s*\S+\s+\S+\s+HTTP/0*[01]\.[0-9]{1,10}\s*|\s*GET\s+\S+\s*")


def _malformed_line(received: bytearray) -> bool:
    """Whether the request line has arrived and is none after which http.server reads headers: a
    worker answers it at once (400, or 505 for HTTP/2), as before the reader, instead of the
    head's blank line being awaited until the timeout. A line it reads headers after (two spaces or
    a tab between its words too) waits here for its blank line: a worker would wait on the client."""
    end = received.find(b"\n")
    if end < 0:
        return False
    return _HEADED_LINE.fullmatch(bytes(received[:end])) is None


def _unspecified(host: Any) -> bool:
    """Whether `host` is the unspecified address (`::`, `0.0.0.0`)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class _Reading:
    """A connection whose request head the reader is receiving."""

    __slots__ = ("address", "deadline", "received", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.received = bytearray()


class BoundedWSGIServer(WSGIServer):
    """A reader thread receives each accepted connection's request head without blocking and answers
    /healthz itself; `threads` workers take the other requests from a bounded queue; overflow (of
    either) is closed."""

    daemon_threads = True
    threads = 4
    read_timeout_s = 5.0
    # The listen backlog (socketserver's default is 5): connections that arrive while the accept
    # thread waits for the GIL (a render, the event loop) wait here; past it the kernel drops their
    # SYN, and the client (a /healthz probe) connects on its retransmission, 1 s later.
    request_queue_size = MAX_READING

    def __init__(
        self,
        server_address: tuple[str, int],
        RequestHandlerClass: type[WSGIRequestHandler],
        health: HealthProbe,
        bind_and_activate: bool = True,
    ) -> None:
        # Required, no default: a /healthz always answering "ok" is a readiness check that lies.
        self._health = health
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)

    def probe_health(self) -> tuple[bool, str]:
        """(serving, reason) for /healthz: the health probe the server was built with."""
        return self._health()

    def server_bind(self) -> None:
        # `::` is every IPv4 address too only on a dual-stack socket, which a new one is only where
        # Linux's net.ipv6.bindv6only is 0 (deploy/k8s's --metrics-host ::): set it here.
        if self.address_family == socket.AF_INET6 and _unspecified(self.server_address[0]):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def server_activate(self) -> None:
        super().server_activate()
        self._queue: queue.Queue[tuple[Any, Any, bytes, float] | None] = queue.Queue(
            self.threads * QUEUE_PER_WORKER
        )
        self._workers = [
            threading.Thread(target=self._work, name=f"metrics-http-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        self._accepted: list[_Reading] = []
        self._accepted_lock = threading.Lock()
        self._accepted_taken = threading.Condition(self._accepted_lock)
        self._reading_count = 0  # connections accepted and not yet answered or handed to a worker
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = False
        self._reader = threading.Thread(target=self._read_heads, name="metrics-http-reader", daemon=True)
        self._reader.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._accepted_lock:
            if self._reading_count >= 2 * MAX_READING:
                # The reader is behind: closing the newcomer would close probes and scrapes too
                # (at random) for a flood of connections; the kernel's backlog holds them meanwhile.
                self._wake()
                self._accepted_taken.wait_for(
                    lambda: self._reading_count < 2 * MAX_READING or self._closing, READER_BEHIND_WAIT_S
                )
            if self._reading_count >= 2 * MAX_READING:  # the reader is stuck
                full = True
            else:
                full = False
                self._reading_count += 1
                deadline = time.monotonic() + self.read_timeout_s
                self._accepted.append(_Reading(request, client_address, deadline))
        if full:
            self.shutdown_request(request)
            return
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the pipe is full (the reader is already woken) or closed
            pass

    def _read_heads(self) -> None:
        """The reader thread: request heads in, /healthz answered, the rest queued for the workers."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            reading: dict[socket.socket, _Reading] = {}
            while not self._closing:
                timeout = None
                if reading:
                    timeout = max(0.0, min(r.deadline for r in reading.values()) - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.fileobj is self._wake_r:
                        self._take_accepted(selector, reading)
                        continue
                    conn = reading.get(cast(socket.socket, key.fileobj))
                    if conn is None:  # evicted, or its head received, earlier in this round
                        continue
                    self._receive_or_close(selector, reading, conn)
                now = time.monotonic()
                for conn in [r for r in reading.values() if r.deadline <= now]:
                    self._close_reading(selector, reading, conn)  # the request not received in time
            for conn in reading.values():
                self.shutdown_request(conn.sock)

    def _take_accepted(
        self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading]
    ) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._accepted_lock:
            accepted, self._accepted = self._accepted, []
        for conn in accepted:
            conn.sock.setblocking(False)
            selector.register(conn.sock, selectors.EVENT_READ)
            reading[conn.sock] = conn
        if len(reading) > MAX_READING:
            # What has arrived first: a connection whose head is in already (a /healthz probe, a
            # scrape) is answered or queued, not closed for a newcomer it came before.
            for key, _ in selector.select(0):
                ready = reading.get(cast(socket.socket, key.fileobj))
                if ready is not None:  # not the wake-up socket
                    self._receive_or_close(selector, reading, ready)
        while len(reading) > MAX_READING:
            # The connection reading longest (its head held back, or dribbled) makes way for the
            # newest: a flood of half-sent requests cannot keep a health check out.
            self._close_reading(selector, reading, min(reading.values(), key=lambda r: r.deadline))
        with self._accepted_lock:
            self._accepted_taken.notify_all()  # an accept thread waiting for the reader to catch up

    def _receive_or_close(
        self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading], conn: _Reading
    ) -> None:
        try:
            self._receive(selector, reading, conn)
        except Exception:  # this connection's trouble must not end the reader
            if conn.sock in reading:
                self._close_reading(selector, reading, conn)
            else:
                self.shutdown_request(conn.sock)

    def _done_reading(
        self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading], conn: _Reading
    ) -> None:
        selector.unregister(conn.sock)
        del reading[conn.sock]
        with self._accepted_lock:
            self._reading_count -= 1

    def _close_reading(
        self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading], conn: _Reading
    ) -> None:
        """A connection whose head is still being read is closed unanswered."""
        self._done_reading(selector, reading, conn)
        self.shutdown_request(conn.sock)

    def _receive(
        self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading], conn: _Reading
    ) -> None:
        try:
            data = conn.sock.recv(8192)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._close_reading(selector, reading, conn)
            return
        conn.received += data
        # http.server's end of a head: a blank line, b"\r\n" or b"\n", after a line ended by either
        # (`Host: x\n\r\n` too, not only b"\r\n\r\n" and b"\n\n").
        head_end = max(conn.received.find(b"\n\r\n"), conn.received.find(b"\n\n"))
        if head_end < 0 and len(conn.received) < MAX_HEAD_BYTES and not _malformed_line(conn.received):
            return
        self._done_reading(selector, reading, conn)
        if head_end < 0 and len(conn.received) >= MAX_HEAD_BYTES and not _malformed_line(conn.received):
            self._answer_too_long(conn.sock, conn.received)
            return
        method = _healthz_method(bytes(conn.received)) if head_end >= 0 else None
        if method is not None:
            self._answer_healthz(conn.sock, method)
            return
        conn.sock.setblocking(True)  # the worker sets its timeouts
        try:
            self._queue.put_nowait((conn.sock, conn.address, bytes(conn.received), conn.deadline))
        except queue.Full:
            self.shutdown_request(conn.sock)

    def _answer_healthz(self, sock: socket.socket, method: str) -> None:
        self._answer(sock, *healthz_answer(method, self.probe_health))

    def _answer_too_long(self, sock: socket.socket, received: bytearray) -> None:
        """A head past MAX_HEAD_BYTES without its end: 414 while its request line has not ended,
        else 431, as http.server answers a line or a head it refuses."""
        if b"\n" in received:
            status, what = "431 Request Header Fields Too Large", "request head"
        else:
            status, what = "414 Request-URI Too Long", "request line"
        body = f"{status}: a {what} of more than {MAX_HEAD_BYTES} bytes\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        try:
            for _ in range(DRAIN_RECVS):  # what has arrived of the rest (non-blocking)
                if not sock.recv(65536):
                    break
        except OSError:  # nothing more has arrived (BlockingIOError), or the client went away
            pass
        self._answer(sock, status, headers, body)

    def _answer(self, sock: socket.socket, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        lines = [f"HTTP/1.0 {status}", *(f"{name}: {value}" for name, value in headers)]
        try:
            # A few hundred bytes into an empty send buffer: never blocks, never partial.
            sock.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        except OSError:
            pass
        self.shutdown_request(sock)

    def _work(self) -> None:
        handler_class = cast(Callable[..., Any], self.RequestHandlerClass)
        while (item := self._queue.get()) is not None:
            request, client_address, received, deadline = item
            try:
                handler_class(request, client_address, self, received, deadline)
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
        if hasattr(self, "_reader"):
            self._closing = True
            self._wake()
            with self._accepted_lock:
                self._accepted_taken.notify_all()
            self._reader.join(5)
            self._wake_r.close()
            self._wake_w.close()
            with self._accepted_lock:
                for conn in self._accepted:
                    self.shutdown_request(conn.sock)
                self._accepted = []
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
        # key -> (render start, headers, body): only while scrapes of that answer format wait (one
        # that waited for a render may be answered by the next render of its format), so that no
        # body is held between scrapes; at most one per waiting worker.
        self._cache: dict[tuple[str, bool, tuple[str, ...]], tuple[float, list[tuple[str, str]], bytes]] = {}
        self._waiting: dict[tuple[str, bool, tuple[str, ...]], int] = {}  # key -> scrapes waiting
        self.renders = 0

    @property
    def cached_bytes(self) -> int:
        """Bytes of rendered bodies the exposition holds between scrapes."""
        with self._done:
            return sum(len(body) for _, _, body in self._cache.values())

    def answer(
        self, accept: str | None, accept_encoding: str | None, names: list[str]
    ) -> tuple[list[tuple[str, str]], bytes]:
        arrived = time.monotonic()
        encoder, content_type = fast_exposition.choose(accept)
        compress = gzip_accepted(accept_encoding or "")
        key = (content_type, compress, tuple(sorted(names)))
        with self._done:
            self._waiting[key] = self._waiting.get(key, 0) + 1
            try:
                while True:
                    cached = self._cache.get(key)
                    if cached is not None and cached[0] >= arrived:  # rendered after this scrape arrived
                        return cached[1], cached[2]
                    if not self._rendering:
                        break
                    self._contended = True
                    self._done.wait()  # a render is under way: the next one may serve this scrape too
            finally:
                self._waiting[key] -= 1
                if not self._waiting[key]:  # the last scrape of this format that waited
                    del self._waiting[key]
                    self._cache.pop(key, None)
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
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
                headers.append(("Content-Encoding", "gzip"))
            rendered = (started, headers, body)
        finally:
            with self._done:
                if rendered is not None:
                    ended = time.monotonic()
                    self._next_start = ended + (ended - rendered[0]) * self._gap_factor
                    if key in self._waiting:  # for the scrapes of its format that wait
                        self._cache[key] = rendered
                    self.renders += 1
                self._rendering = False
                self._done.notify_all()
        return rendered[1], rendered[2]


# The scheme and authority of a request target in absolute form (RFC 9112 3.2.2: `GET
# http://host/healthz`, what a client sends through a proxy), which http.server leaves in the path.
_ABSOLUTE_FORM = re.compile(r"https?://[^/]*", re.IGNORECASE)


def metrics_app(exposition: Exposition, health: HealthProbe) -> WsgiApp:
    """`/healthz` from `health`; every other path the metrics (as prometheus_client answers), to GET
    and, without the body, to HEAD."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        headers: list[tuple[str, str]]
        path = environ.get("PATH_INFO", "")
        if absolute := _ABSOLUTE_FORM.match(path):
            path = path[absolute.end() :] or "/"
        if path == "/healthz" and method in HEALTHZ_METHODS:
            # The reader thread answers the plain ones (BoundedWSGIServer); the same answer here.
            status, headers, body = healthz_answer(method, health)
            start_response(status, headers)
            return [body]
        if method == "OPTIONS":
            status, headers, body = "200 OK", [("Allow", "OPTIONS,GET,HEAD")], b""
        elif method not in ("GET", "HEAD"):
            status, headers = "405 Method Not Allowed", [("Allow", "OPTIONS,GET,HEAD")]
            # The method is the client's: its control characters escaped, as any answer quoting it.
            body = f"# HTTP {status}: {escape_controls(method)}; use OPTIONS, GET or HEAD\n".encode()
            body = _cut(body, METHOD_NOT_ALLOWED_MAX_BODY)
        elif path == "/favicon.ico":
            status, headers, body = "200 OK", [], b""
        else:
            names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]", [])
            headers, body = exposition.answer(
                environ.get("HTTP_ACCEPT"), environ.get("HTTP_ACCEPT_ENCODING"), names
            )
            status = "200 OK"
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        # HEAD (RFC 9110 9.3.2: `curl -I`, load balancers' checks): GET's headers, its Content-Length
        # of the body rendered as for GET (a render like a scrape's, shared and held to the render
        # share), without the body.
        return [b"" if method == "HEAD" else body]

    return app


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: HealthProbe,
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
    Server.read_timeout_s = read_timeout_s

    class Handler(_Handler):
        pass

    Handler.read_timeout_s = read_timeout_s
    app = metrics_app(Exposition(registry, render_share), health)
    httpd = Server((host, port), Handler, health)
    httpd.set_app(app)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread

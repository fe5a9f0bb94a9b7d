"""The metrics port's HTTP server: `/metrics` (Prometheus exposition) and `/healthz`.

prometheus_client's own `start_http_server` answers every path with the metrics, so an HTTP check
of `/healthz` there always passed. Here `/healthz` is a real answer: 200 `ok` while the server is
SERVING (the same state as grpc.health.v1 ""), 503 and one line saying why otherwise.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# (serving, reason) of the whole server.
HealthProbe = Callable[[], tuple[bool, str]]
StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (it would break --log-json)."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


def health_app(
    metrics_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], health: HealthProbe | None
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """`/healthz` from `health`; every other path to the metrics app."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            serving, reason = health() if health is not None else (True, "")
            body = b"ok\n" if serving else f"not serving: {reason}\n".encode()[:512]
            status = "200 OK" if serving else "503 Service Unavailable"
            start_response(
                status,
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return metrics_app(environ, start_response)

    return app


def serve(
    host: str, port: int, registry: CollectorRegistry, health: HealthProbe | None
) -> tuple[WSGIServer, threading.Thread]:
    """Bind host:port (OSError when it cannot) and serve on a daemon thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingWSGIServer):
        address_family = family

    app = health_app(make_wsgi_app(registry), health)
    httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread

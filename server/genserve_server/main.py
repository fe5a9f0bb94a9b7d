"""`genserve-server`: the CLI and the server lifecycle.

    genserve-server serve --models DIR [--port 50051] [--metrics-port 50052] [--host 127.0.0.1]
                          [--health-port PORT] [--config FILE] [--ready-file PATH] [--no-metrics] [--log-json]
                          [--require-models NAME,NAME]
                          [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
                          [--token-file FILE] [--token-env VAR] [--watch-interval-s S]
    genserve-server health [--port 50051] [--service NAME]

Lifecycle (grpc's graceful-shutdown example): bind, start (the --health-port listener before the
serving port), load models (health NOT_SERVING until then, and after unless every required model is
READY: health.py), announce; on SIGTERM/SIGINT:
SampleStreams end after the chunk they are sending (UNAVAILABLE naming the start_index to resume
from), health NOT_SERVING, `server.stop(grace)` (the port is released, no new RPCs, in-flight unary
calls finish), batchers drain, pools shut down (off the event loop; model calls still computing at
the grace's end are aborted: Repository.close), the health listener closes, exit 0. SIGHUP
rescans the model repository (reload.py): new versions load in the background, retired ones drain.
The console script, `python -m genserve_server` and `python -m genserve_server.main` enter through
__main__.py, which holds those signals during the imports below (start_signals.py): serve() acts on
what it held.
"""

# ruff: noqa: E402
# (the entry below comes before the imports it holds the signals for)
from __future__ import annotations

if __name__ == "__main__":  # `python -m genserve_server.main`: the entry the console script has, first
    from genserve_server.__main__ import main as _entry

    raise SystemExit(_entry())

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_contract.stdio import HelpParser, Stdout
from genserve_server import accept, event_loop, kserve, probe, security, start_signals, wire
from genserve_server.admission import GENERATION_CONTROL, Admission, AdmissionLimits
from genserve_server.boundary import (
    Boundary,
    UnknownMethods,
    describe_calls,
    echo_request_id,
    flush_held_back,
)
from genserve_server.config import Limits, ServerConfig, cpu_count, load_server_config
from genserve_server.core import GenerationCore
from genserve_server.errors import GenserveError, escape_controls
from genserve_server.flag_types import bind_address, nonempty_path, nonempty_path_text, port_number, seconds
from genserve_server.health import LIVE_KEY, OVERALL_KEYS, HealthState, overall_status
from genserve_server.heap import freeze_startup_heap
from genserve_server.idle_spin import IdleSpin
from genserve_server.limits import GuardedRegistrar, Handler, guard_malformed
from genserve_server.links import every_request_fails, linked_model, serves
from genserve_server.metrics import Metrics
from genserve_server.providers import quiet_onnxruntime
from genserve_server.reload import Reloader
from genserve_server.repository import Model, Repository
from genserve_server.service import GenerationService

logger = logging.getLogger("genserve_server")

# The metrics port's default: the gRPC port + 1, as Triton pairs 8001 (gRPC) with 8002 (metrics).
# Not 9090 (Prometheus itself) and nothing in 9100-9999, the range Prometheus allocates to exporters
# (fully allocated: any port there is some exporter's, e.g. 9100 node_exporter, 9400 DCGM, 9464
# OpenTelemetry), so genserve can run on a node beside them (docs/metrics.md).
DEFAULT_METRICS_PORT = 50052

# A removed model's health key stays NOT_SERVING (docs/operations.md, hot reload) for this many of the
# names removed last; an older one is dropped (Check NOT_FOUND, as for a name never served), so a
# server whose models come and go (a name per deploy) keeps no key per name ever removed, and health
# List (health.MAX_LISTED_SERVICES) keeps answering.
REMOVED_MODEL_KEYS = 100

# `--health-port` (docs/operations.md, "Health port"): a second gRPC listener serving grpc.health.v1
# alone, for probes that open a connection each (the kubelet's). Past max_connections the serving
# port closes every new connection at accept, a probe's included; this one has a limit of its own,
# which only probes use. Off unless asked for: a third port bound by every `serve` would collide
# where servers run side by side, and only a prober that needs an answer under full load wants it.
HEALTH_MAX_CONNECTIONS = 64
# A probe closes its connection after its Check; one left open with no call is closed after this
# (a Watch stream is a call: it keeps its connection).
HEALTH_IDLE_TIMEOUT_S = 10.0
# A HealthCheckRequest is a service name: a larger request is refused before it is parsed.
HEALTH_MAX_REQUEST_BYTES = 64 * 1024
# How long before the drain grace's end a SampleStream still computing its chunk ends itself with
# where to resume (a tenth of a shorter grace): time for its status to go out before gRPC's cancel.
STREAMS_END_BEFORE_GRACE_S = 1.0

# Every connection is a file descriptor, and past the process's open-file limit gRPC cannot accept
# any: the serving port, the health port and the metrics port all wait ("File descriptor limit
# reached. Retrying."), probes time out, and the kubelet restarts a pod that is only busy. systemd,
# Docker (moby 25+) and containerd 2 start processes with a soft limit of 1024 under a far higher
# hard one: the soft limit is raised, within the hard one, to max_connections plus the health port's
# connections plus this much for everything else (model files, the metrics port, logs, threads).
OPEN_FILE_HEADROOM = 1024


def raise_open_file_limit(limits: Limits) -> None:
    """Raise RLIMIT_NOFILE's soft limit to what `limits.max_connections` needs (within the hard
    limit); a warning naming both when the hard limit is lower."""
    import resource

    needed = limits.max_connections + HEALTH_MAX_CONNECTIONS + OPEN_FILE_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            logger.warning(
                "cannot raise the open-file limit (RLIMIT_NOFILE) from %d to %d: %s", soft, target, exc
            )
    if soft < needed:
        logger.warning(
            "limits.max_connections %d needs about %d open files (with the health port and %d for the "
            "rest), but the open-file limit (RLIMIT_NOFILE) is %d: past about %d connections no "
            "port accepts any (probes included); raise the limit (ulimit -n, LimitNOFILE) or lower "
            "max_connections",
            limits.max_connections,
            needed,
            OPEN_FILE_HEADROOM,
            soft,
            max(soft - OPEN_FILE_HEADROOM, 0),
        )


# The services whose unary generation methods accept.py accepts several calls of per loop turn.
GENERATION_SERVICES = (
    genserve_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    kserve.service_name(),
)
SERVICE_NAMES = (
    GENERATION_SERVICES[0],
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    kserve.service_name(),
    reflection.SERVICE_NAME,
)


class _ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """grpc's reflection servicer, its calls' request ids in their trailing metadata (docs/metrics.md:
    every RPC's)."""

    async def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        echo_request_id(context)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        """grpc's answer, and for a method (`<package>.<service>.<method>`, which grpc.reflection's
        file_containing_symbol takes and `grpcurl describe` asks for) its service's file: protobuf's
        pool finds messages, fields, enums and services by name, not methods (NOT_FOUND)."""
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if response.HasField("error_response"):
            service_name, _, method = fully_qualified_name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                return response
            if method in service.methods_by_name:
                return super()._file_containing_symbol(request, service_name)
        return response


# Bytes a locale did not decode, as Python holds them (surrogateescape): U+DC80..U+DCFF.
_UNDECODED = re.compile("[\udc80-\udcff]+")


def readable_bytes(text: str) -> str:
    """`text` with the bytes the locale did not decode (a non-ASCII path under LANG=C without Python's
    UTF-8 mode: lone surrogates, which stderr wrote as \\udcc3) as the UTF-8 they are, and those
    that are not UTF-8 (a Latin-1 name) as \\xNN."""
    if text.isascii():
        return text
    return _UNDECODED.sub(
        lambda m: m.group().encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), text
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line (`--log-json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps({k: readable_bytes(v) if isinstance(v, str) else v for k, v in entry.items()})


class TextFormatter(logging.Formatter):
    """The human-readable format, one line per record: a message's control characters are escaped
    (a name from the repository, ONNX Runtime's message quoting a graph's node, a client's path could
    otherwise write a line of their own or terminal escapes). A traceback keeps its lines. The time is
    UTC, RFC 3339 with a `Z` (2026-11-01T05:30:00.000Z), whatever the host's time zone: local time
    with no zone could not be compared across hosts, and went back an hour at a daylight-saving end."""

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        readable = readable_bytes(text)
        if readable == text:
            return text
        # Bytes decoded may be a C1 control (\xc2\x9b: CSI): escaped as the message's own were.
        return "\n".join(escape_controls(line) for line in readable.split("\n"))

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        """The traceback (as logging.Formatter writes it), the text of each exception in it escaped as
        a record's message is: its message, its notes, a SyntaxError's fields, for every exception of
        the chain and of an ExceptionGroup (ONNX Runtime's message quotes a graph's node names). The
        traceback's own lines stay lines."""
        te = traceback.TracebackException(type(ei[1]), ei[1], ei[2], compact=True)
        nodes: list[traceback.TracebackException | None] = [te]
        seen: set[int] = set()
        while nodes:
            node = nodes.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            nodes += [node.__cause__, node.__context__, *(node.exceptions or ())]
            # str(exc), taken when the traceback was made (str(node) returns it; no public setter)
            node._str = escape_controls(str(node))  # type: ignore[attr-defined]
            notes = node.__notes__
            if isinstance(notes, Sequence):  # a str too: the traceback writes a line a character
                node.__notes__ = [_escaped_note(note) for note in notes]
            if node.exc_type is not None and issubclass(node.exc_type, SyntaxError):  # written, not _str
                node.msg = escape_controls(node.msg) if isinstance(node.msg, str) else node.msg
                node.filename = escape_controls(node.filename) if isinstance(node.filename, str) else None
                node.text = escape_controls(node.text.rstrip("\n")) if isinstance(node.text, str) else None
        text = "".join(te.format())
        return text[:-1] if text.endswith("\n") else text


def _escaped_note(note: object) -> str:
    try:
        return escape_controls(str(note))
    except Exception:  # a broken __str__: what the traceback itself writes then
        return "<note str() failed>"


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python warnings (a library's DeprecationWarning) as log records: no unformatted stderr lines.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_without_trailing_newline)  # once: addFilter dedups


def _without_trailing_newline(record: logging.LogRecord) -> bool:
    """A captured warning's text is warnings.formatwarning's, which ends with a newline: the text
    log wrote it as a literal `\\n` at the end of the line (the JSON msg ended with one)."""
    message = record.getMessage()
    if message.endswith("\n"):
        record.msg, record.args = message.rstrip("\n"), ()
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_server_options(limits: Limits) -> list[tuple[str, int]]:
    """The gRPC server's channel options from the config's limits (docs/operations.md, "Admission")."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_send_message_length", limits.max_send_message_bytes),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_connection_idle_ms", ms(limits.connection_idle_timeout_s)),
        ("grpc.server_handshake_timeout_ms", ms(limits.handshake_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", round(limits.keepalive_min_ping_interval_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(limits.keepalive_permit_without_calls)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
    ]
    if limits.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", ms(limits.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", round(limits.connection_age_grace_s * 1000)),
        ]
    if not limits.accept_compressed_requests:
        # Identity only: a gzip/deflate request is refused before it is inflated.
        options.append(("grpc.compression_enabled_algorithms_bitset", 1))
    return options


def health_server_options(limits: Limits) -> list[tuple[str, int]]:
    """The health listener's channel options: the serving port's, with its own small connection
    limit, a short idle timeout and requests no larger than a health request needs."""
    import dataclasses

    return grpc_server_options(
        dataclasses.replace(
            limits,
            max_connections=HEALTH_MAX_CONNECTIONS,
            connection_idle_timeout_s=min(limits.connection_idle_timeout_s, HEALTH_IDLE_TIMEOUT_S),
            max_receive_message_bytes=HEALTH_MAX_REQUEST_BYTES,
        )
    )


class App:
    """One server process: repository, servicers, gRPC server, metrics endpoint."""

    def __init__(
        self,
        models_dir: Path,
        config: ServerConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = DEFAULT_METRICS_PORT,
        health_port: int | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        required_models: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.requested_port = port
        self.metrics_host = metrics_host
        self.requested_metrics_port = metrics_port
        self.requested_health_port = health_port
        self.metrics = Metrics(enabled=metrics_port is not None)
        self.repository = Repository(models_dir, config, self.metrics)
        self.repository.on_fatal = self._stop_for_restart
        self.health = HealthState()
        # None: every model in the repository is required for the whole server to be SERVING.
        self.required_models = list(required_models) if required_models is not None else None
        self._loaded = False
        # Models whose loading has been tried (a repository listener has reported them): "" counts a
        # model only from then on, so that one a hot reload adds counts once it has been tried.
        self._tried: set[str] = set()
        # Each model's health key as last set (what "" counts), and for the models whose calls go
        # through another (a style generator's mapping, a code prior's decoder) that model's name:
        # their keys change when it does, with no listener call of their own (`_serves`).
        self._model_keys: dict[str, bool] = {}
        self._links: dict[str, str] = {}
        # The other way round: for each model, the models whose calls go through it (`_links`).
        self._dependents: dict[str, set[str]] = {}
        # The models whose key is NOT_SERVING: the only ones "" may not count as serving
        # (`_counts_serving`), so that a state change re-evaluates "" without visiting every model.
        self._keys_off: set[str] = set()
        # The models removed whose key is still NOT_SERVING, the last removed last (REMOVED_MODEL_KEYS).
        self._removed: dict[str, None] = {}
        self.codec_pool = ThreadPoolExecutor(
            max_workers=config.codec_threads or cpu_count(), thread_name_prefix="codec"
        )
        limits = config.limits
        # Authentication first: an unauthenticated call takes no stream slot.
        unresolved = self.metrics.unresolved()
        auth = security.auth_interceptor(
            config.security, on_reject=lambda method: unresolved.rejected["unauthenticated"].inc()
        )
        # No grpc maximum_concurrent_rpcs: it counted every call from its headers on, health included;
        # admission.py limits each class of RPC apart, once its request has arrived.
        server_interceptors = [*([auth] if auth is not None else []), *interceptors]
        self.server = grpc.aio.server(interceptors=server_interceptors, options=grpc_server_options(limits))
        # Admission and the malformed-bytes guard wrap each method handler once, here, instead of
        # running as interceptors on every call (limits.GuardedRegistrar).
        admission = Admission(
            AdmissionLimits(
                generation=limits.max_concurrent_rpcs,
                sample_streams=limits.max_concurrent_sample_streams,
                control=limits.max_concurrent_control_rpcs,
                health_watchers=limits.max_health_watchers,
                request_timeout_s=limits.request_timeout_s,
                stream_write_timeout_s=limits.stream_write_timeout_s,
            ),
            control_services=(kserve.service_name(), reflection.SERVICE_NAME),
            control_methods=GENERATION_CONTROL,
            generation_methods=(f"/{kserve.service_name()}/ModelInfer",),
            on_refused=lambda method: unresolved.rejected["concurrency"].inc(),
        )
        # The generation methods' calls are accepted accept_depth at a time (accept.py).
        accept_many = limits.accept_depth > 1 and accept.supported()

        def hot(method: str, handler: Handler) -> bool:
            """A unary generation method of genserve's or KServe's (ModelInfer)."""
            service = method[1:].partition("/")[0]
            generation = admission.classify(method) is admission.generation
            return handler.unary_unary is not None and generation and service in GENERATION_SERVICES

        def guard(method: str, handler: Handler) -> Handler:
            # Serializers that pass bytes through: the boundary serializes a large unary response on
            # the codec pool and returns its bytes (wire.py).
            unary = wire.passing_bytes_handler(handler)
            return admission.wrap(
                method,
                guard_malformed(method, unary, on_reject=lambda _: unresolved.rejected["invalid"].inc()),
            )

        guarded = GuardedRegistrar(self.server, guard, hot=hot if accept_many else None)
        registrar = guarded.as_server()
        # One core and one boundary under both servicers: rows of either protocol share batches.
        self.core = GenerationCore(self.repository, config, self.metrics, self.codec_pool)
        # Every call's end keeps the loop awake for config.idle_spin_s (idle_spin.py).
        self.idle_spin = IdleSpin(config.idle_spin_s)
        # A large unary response is serialized on the codec pool, not on the event loop (wire.py).
        self.boundary = Boundary(
            self.metrics,
            redact=self.repository.redact,
            idle_spin=self.idle_spin,
            serialize_pool=self.codec_pool,
        )
        self.service = GenerationService(
            self.repository, config, self.metrics, self.codec_pool, core=self.core, boundary=self.boundary
        )
        genserve_pb2_grpc.add_GenerationServiceServicer_to_server(self.service, registrar)
        # KServe v2 / Triton protocol on the same port, repository, batchers and metrics.
        self.kserve = kserve.InferenceService(
            self.repository,
            self.core,
            self.boundary,
            ready=lambda: self.health.serving,  # ServerReady says what grpc.health "" says
        )
        kserve.add_to_server(self.kserve, registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, registrar)
        # --health-port: the same servicer (the same answers), its Watch streams counted with the
        # serving port's by the same admission, behind the same authentication.
        self.health_server: grpc.aio.Server | None = None
        if health_port is not None:
            self.health_server = grpc.aio.server(
                interceptors=server_interceptors, options=health_server_options(limits)
            )
            health_pb2_grpc.add_HealthServicer_to_server(
                self.health.servicer, GuardedRegistrar(self.health_server, guard).as_server()
            )
        # Through the registrar (enable_server_reflection needs the server itself): admitted as control.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            _ReflectionServicer(SERVICE_NAMES), registrar
        )
        # Last: a method none of the above has is UNIMPLEMENTED with its request id (boundary.py).
        self.server.add_generic_rpc_handlers((UnknownMethods(self.boundary),))
        if self.health_server is not None:
            self.health_server.add_generic_rpc_handlers((UnknownMethods(self.boundary),))
        # Made before start()'s scan: its watch compares against the repository as scanned, so what
        # is published while start-up loads is rescanned once serving.
        self.reloader = Reloader(
            self.repository,
            drain_grace_s=config.drain_grace_s,
            watch_interval_s=config.watch_interval_s,
            on_removed=self._on_model_state,
            on_unloaded=self.core.forget_version,
        )
        self.acceptor = accept.Acceptor(
            self.server, guarded.registered, server_interceptors, limits.accept_depth
        )
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._stop = asyncio.Event()
        self.told_already_stopping = False  # a second SIGTERM/SIGINT said (_on_stop_signal)

    async def start(self) -> None:
        self.repository.scan()
        self.port = self._bind(self.server, self.requested_port, "--port")
        security.warn_outside_validity(self.config.security)  # once, not per port
        self.metrics.set_certificate_expiries(security.certificate_expiries(self.config.security))
        if self.health_server is not None and self.requested_health_port is not None:
            self.health_port = self._bind(self.health_server, self.requested_health_port, "--health-port")
        if self.requested_metrics_port is not None:
            self.metrics_port = self._bind_metrics(self.requested_metrics_port)
        for key in (*OVERALL_KEYS, LIVE_KEY):
            await self.health.set(key, False)
        for model in self.repository:
            await self.health.set(model.name, False)
            self._keep_key(model.name, False)
        self.repository.add_listener(self._on_model_state)
        # Before the serving port: a probe never finds the server up and its health listener not.
        if self.health_server is not None:
            await self.health_server.start()
        await self.server.start()
        self.acceptor.start()
        await self.repository.load_all()
        # Start-up tried every model it scanned, also where it notified none (no version to load).
        self._tried.update(m.name for m in self.repository)
        self._loaded = True
        self._refresh_overall()
        await self.health.flush()
        await self.health.set(LIVE_KEY, True)
        self.reloader.start()

    def _bind(self, server: grpc.aio.Server, port: int, flag: str) -> int:
        """Bind `server` on --host and `port` (the flag that gave it, for the messages)."""
        address = _address(self.host, port)
        _check_port_free(self.host, port, flag)
        try:
            bound = security.bind(server, address, self.config.security)
        except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
            raise GenserveError(f"cannot listen on {address} (--host/{flag}): {exc}") from None
        if bound == 0:
            raise GenserveError(f"cannot listen on {address} (--host/{flag})")
        return bound

    def _bind_metrics(self, port: int) -> int:
        try:
            limits = self.config.limits
            return self.metrics.serve(
                self.metrics_host,
                port,
                self._health_answer,
                threads=limits.metrics_threads,
                read_timeout_s=limits.metrics_read_timeout_s,
                render_share=limits.metrics_render_share,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise GenserveError(
                    f"metrics port {port} on {self.metrics_host} is already in use: "
                    "choose another with --metrics-port (or --no-metrics)"
                ) from None
            if (error := _no_ipv6(self.metrics_host, "--metrics-host", exc)) is not None:
                raise error from None
            raise GenserveError(
                f"cannot serve metrics on {_address(self.metrics_host, port)} "
                f"(--metrics-host/--metrics-port): {exc.strerror or exc}"
            ) from None

    def _health_answer(self) -> tuple[bool, str]:
        """/healthz: the whole server's state (read on the metrics thread)."""
        return self.health.serving, self.health.reason

    def _on_model_state(self, name: str, serving: bool) -> None:
        """A model's readiness may have changed (load, failure, reload, removal): its key, and the
        keys of the models whose calls go through it. Only those: this runs on every state change."""
        model = self.repository.models.get(name)
        if model is not None:
            self._tried.add(name)
            self._removed.pop(name, None)
        else:  # removed (or renamed away): a model of that name added later counts once tried
            self._tried.discard(name)
        newest = model.newest_ready() if model is not None else None
        link = linked_model(newest) if newest is not None else None
        self._set_link(name, link[1] if link is not None else None)
        self._set_model_key(name, self._serves(model) if model is not None else serving)
        if model is not None:
            self._set_ready_gauges(model)
        else:
            self._drop_old_removed_keys(name)
        for dependent in sorted(self._dependents.get(name, set()) - {name}):
            other = self.repository.models.get(dependent)
            now = other is not None and self._serves(other)
            if now != self._model_keys.get(dependent):
                self._set_model_key(dependent, now)
            if other is not None:
                self._set_ready_gauges(other)
        self._refresh_overall()

    def _set_link(self, name: str, link: str | None) -> None:
        """`_links[name] = link` (None: none), `_dependents` with it."""
        old = self._links.pop(name, None)
        if old is not None:
            dependents = self._dependents[old]
            dependents.discard(name)
            if not dependents:
                del self._dependents[old]
        if link is not None:
            self._links[name] = link
            self._dependents.setdefault(link, set()).add(name)

    def _set_model_key(self, name: str, serving: bool) -> None:
        self._keep_key(name, serving)
        self.health.set_soon(name, serving)

    def _keep_key(self, name: str, serving: bool | None) -> None:
        """`_model_keys[name] = serving` (None: forgotten), `_keys_off` with it: the one place both
        change, so that the set of keys off never drifts from the keys."""
        if serving is None:
            self._model_keys.pop(name, None)
        else:
            self._model_keys[name] = serving
        if serving is False:
            self._keys_off.add(name)
        else:
            self._keys_off.discard(name)

    def _drop_old_removed_keys(self, removed: str) -> None:
        """`removed` is the model removed last; the keys of those removed before the last
        REMOVED_MODEL_KEYS go (after their NOT_SERVING, already scheduled)."""
        self._removed.pop(removed, None)
        self._removed[removed] = None
        while len(self._removed) > REMOVED_MODEL_KEYS:
            oldest = next(iter(self._removed))
            del self._removed[oldest]
            self._keep_key(oldest, None)
            self.health.clear_soon(oldest)

    def _serves(self, model: Model) -> bool:
        """Whether `model`'s health key is SERVING: it has a READY version, and the one a request
        naming no version gets can reach the model its calls go through (a style generator's
        mapping, a code prior's decoder: not missing, not without a READY version, fitting), as
        GetModel's "every request fails: ..." says (links.serves, which KServe ModelReady asks too)."""
        return serves(self.repository, model.newest_ready())

    def _refresh_overall(self) -> None:
        # Once stopping, the server is NOT_SERVING for that (stop: "shutting down"): the loads the
        # stop cancelled are not models that failed, and warning of them as not ready is no alarm.
        if not self._loaded or self.stop_requested:
            return
        # A model a hot reload added and is still loading has not been tried: it counts once it has
        # (docs/server.md), not when another model's readiness changes meanwhile (a drain ending).
        # A name --require-models lists counts at once: it was not serving before it loads either.
        # A model counts as its health key says (`_serves`, kept by `_on_model_state`): one whose key
        # is SERVING counts as serving, so only the others are looked at, not every model (this runs
        # on every state change: a reload adding or removing n models would visit n models n times).
        repository = self.repository.models
        if self.required_models is not None:
            counted = [repository[n] for n in self.required_models if n in repository]
        elif any(n in repository for n in self._tried):
            off = [n for n in self._keys_off if n in self._tried and n in repository]
            if len(off) > 1:  # in the repository's order, as the reason lists them
                off = [n for n in repository if n in self._keys_off and n in self._tried]
            counted = [repository[n] for n in off]
            if all(self._counts_serving(m) for m in counted):  # every model tried counts as serving
                self.health.set_overall_soon(True, "")
                return
        else:
            counted = []  # no model tried: "no models in the repository"
        models = {m.name: self._counts_serving(m) for m in counted}
        # A READY model that does not count: why its calls fail (its mapping or decoder), not only its name.
        why = {
            m.name: every_request_fails(self.repository, newest)
            for m in counted
            if not models[m.name] and (newest := m.newest_ready()) is not None
        }
        self.health.set_overall_soon(*overall_status(models, self.required_models, why))

    def _counts_serving(self, model: Model) -> bool:
        """What "" counts `model` as: its health key, except while the model its calls go through is
        one the running hot reload has not tried yet (its directory is there, not yet read or loaded:
        a reload adding a generator and its mapping loads them one after the other). Until that model
        has been tried, `model` counts by its own READY version, as a model still loading does not
        count at all; then by its key (re-evaluated by that model's own state change)."""
        if self._model_keys.get(model.name, False):
            return True
        return self._untried(self._links.get(model.name)) and model.newest_ready() is not None

    def _untried(self, link: str | None) -> bool:
        """Whether `link` names a model whose directory is there that has not been tried yet (still
        to be read or loaded, at start-up or by the running hot reload)."""
        return link is not None and link not in self._tried and self.repository.has_model_dir(link)

    def _set_ready_gauges(self, model: Model) -> None:
        """genserve_model_ready of `model`'s READY versions: 1 while a request of the version can be
        served (links.serves, as its health key and KServe ModelReady say), 0 while the model its
        calls go through cannot serve them; until that model has been tried (a mapping still
        loading, a TensorRT build taking minutes) by the version's own readiness, as "" counts it.
        The repository sets the other versions' (0: loading, failed, draining)."""
        for mv in model.ready_versions():
            link = linked_model(mv)
            ready = serves(self.repository, mv) or (link is not None and self._untried(link[1]))
            mv.metrics.ready.set(1 if ready else 0)

    def request_stop(self) -> None:
        self._stop.set()
        # Every health name NOT_SERVING from the first moment of shutdown (docs/server.md), not only
        # once the drain begins: during start-up that waits for the loads to end, and `liveness` and
        # "" were set after them, SERVING after the stop.
        self.health.shutdown_soon()
        if not self._loaded:  # SIGTERM during start-up: do not finish loading first
            logger.info("stop requested during start-up: cancelling model loading")
            self.repository.cancel_loading()
        # A reload's load too: the process exits only once its thread has, and a warm-up takes seconds.
        self.reloader.begin_shutdown()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def _stop_for_restart(self, reason: str) -> None:
        """A sticky GPU failure (Repository.on_fatal): the stop a SIGTERM makes, requested here. A
        SIGTERM to this process, once it was stopping (an operator's SIGTERM, another version failing
        on the same CUDA context), was told as an operator's second signal."""
        logger.critical("stopping the server for a restart: %s", reason)
        if not self.stop_requested:
            self.request_stop()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """SampleStreams end at a chunk boundary, health NOT_SERVING -> stop accepting (gRPC closes the
        listening socket here: a new server may bind the port at once) -> in-flight RPCs finish
        within the grace -> drain -> close."""
        grace_s = self.config.drain_grace_s
        if +self.boundary.in_flight:
            draining = describe_calls(self.boundary.in_flight)
            logger.info("shutting down: draining %s for up to %g s", draining, grace_s)
        else:
            logger.info("shutting down: no call in flight (drain grace %g s)", grace_s)
        started = time.monotonic()
        self.boundary.grace_ends_at = started + grace_s  # the calls cut then are counted UNAVAILABLE
        # A bulk stream would otherwise run for the whole grace (thousands of images) only to be cut
        # at its end: it ends after the chunk it is sending, with UNAVAILABLE and where to resume.
        self.core.begin_shutdown()
        await self.health.shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace_s))
        # A SampleStream still computing its chunk then ends itself, saying where to resume, a little
        # before gRPC cancels every call left (whose clients are told only 'Cancelling all calls').
        await self._in_flight_after(started + grace_s - min(STREAMS_END_BEFORE_GRACE_S, grace_s / 10))
        self.core.end_streams()
        # The calls gRPC cancels at the grace's end (their clients get UNAVAILABLE "Cancelling all
        # calls"): taken as the grace ends, just before gRPC's own timer (started after this one).
        cut = await self._in_flight_after(started + grace_s)
        await stopping
        if cut:
            logger.warning("drain grace of %g s ended with %s: cancelled", grace_s, describe_calls(cut))
        await self.acceptor.close()
        await self.reloader.close(max(0.1, grace_s - (time.monotonic() - started)))
        await self.repository.close(max(0.1, grace_s - (time.monotonic() - started)))
        self.codec_pool.shutdown(wait=True)
        self.metrics.close()
        # Last: until here probes get NOT_SERVING (shutting down), not a refused connection.
        if self.health_server is not None:
            await self.health_server.stop(0)
        flush_held_back()  # the refusal counts whose timers would run after the loop's end
        logger.info("stopped in %.2f s", time.monotonic() - started)

    async def _in_flight_after(self, deadline: float) -> collections.Counter[str]:
        """The calls still in flight at `deadline`, or none as soon as every call has ended."""
        while +self.boundary.in_flight and (left_s := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(0.05, left_s))
        return +self.boundary.in_flight


def _no_ipv6(host: str, host_flag: str, exc: OSError) -> GenserveError | None:
    """The error for an IPv6 address where the kernel has no IPv6 (booted with ipv6.disable=1), else
    None: Python's own is a traceback ending in 'Address family not supported by protocol'."""
    if exc.errno != errno.EAFNOSUPPORT:
        return None
    return GenserveError(
        f"cannot listen on {host} ({host_flag}): this host's kernel has no IPv6 ({exc.strerror or exc}): "
        f"use {host_flag} 0.0.0.0 (every IPv4 address) or an IPv4 address"
    )


def _check_port_free(host: str, port: int, flag: str, host_flag: str = "--host") -> None:
    """A port in use is one line naming it and the flag (gRPC's own bind failure is a traceback with
    C-core log lines). A check, not a reservation: the real bind still reports a race."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        probe_socket = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if (error := _no_ipv6(host, host_flag, exc)) is not None:
            raise error from None
        return  # the real bind reports it
    with probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server bind
        try:
            probe_socket.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise GenserveError(
                    f"port {port} on {host} is already in use: free it or choose another with {flag}"
                ) from None


# Addresses that listen on every address of their family (and, for "::", on IPv4's as well).
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _check_ports_distinct(args: argparse.Namespace) -> None:
    """Two of --port, --metrics-port and --health-port given the same number on overlapping hosts:
    one line naming both flags. The second bind failed as 'already in use' of a port that nothing
    else held (the server's own first listener), which sent operators looking for another process."""
    listeners = [("--port", args.host, args.port)]
    if not args.no_metrics:
        listeners.append(("--metrics-port", args.metrics_host, args.metrics_port))
    if args.health_port is not None:
        listeners.append(("--health-port", args.host, args.health_port))
    for i, (flag, host, port) in enumerate(listeners):
        for other_flag, other_host, other_port in listeners[i + 1 :]:
            overlap = host == other_host or host in _WILDCARD_HOSTS or other_host in _WILDCARD_HOSTS
            if port != 0 and port == other_port and overlap:
                raise GenserveError(f"{flag} and {other_flag} are both {port}: give each a port of its own")


def parse_model_list(text: str) -> list[str]:
    """`--require-models a,b`: model names, comma-separated, none empty."""
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise GenserveError(f"--require-models: expected model names separated by commas, got {text!r}")
    return names


def check_ready_file(path: Path) -> None:
    """Before anything loads: a --ready-file that cannot be written is one line naming it, not a
    traceback after the server has loaded its models and printed that it listens."""
    if path.is_dir():
        raise GenserveError(f"--ready-file {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise GenserveError(f"--ready-file {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GenserveError(f"--ready-file {path}: directory {parent} is not writable")


def remove_stale_ready_file(path: Path) -> None:
    """An earlier run's --ready-file (its ports and pid) goes before anything loads: whoever waits
    for the file would otherwise take this server as ready, at the old ports, while it loads."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise GenserveError(
            f"--ready-file {path}: an earlier run's file cannot be removed: {exc.strerror or exc}"
        ) from None


def remove_own_ready_file(path: Path | None) -> None:
    """At shutdown: the --ready-file this process wrote goes (one another process wrote since stays)."""
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def write_ready_file(path: Path, port: int, metrics_port: int, health_port: int = 0) -> None:
    """Atomically, so a reader never sees half a file. A port not served is 0."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    info = {"port": port, "metrics_port": metrics_port, "health_port": health_port, "pid": os.getpid()}
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    # First: once the loop runs, a held signal also reaches its wakeup fd (uvloop sets one at its
    # start), and a handler installed later, with the App, took it a second time (_LoopSignals).
    signals = _LoopSignals()
    config = load_server_config(args.config)
    if args.log_level:
        config = _replace(config, log_level=args.log_level)
    if args.log_json:
        config = _replace(config, log_json=True)
    if args.drain_grace_s is not None:
        config = _replace(config, drain_grace_s=args.drain_grace_s)
    if args.trt_engine_cache_dir is not None:
        config = _replace(config, trt_engine_cache_dir=args.trt_engine_cache_dir)
    config = _apply_security_flags(config, args)
    setup_logging(config.log_level, config.log_json)
    raise_open_file_limit(config.limits)
    if args.ready_file is not None:
        check_ready_file(args.ready_file)
        remove_stale_ready_file(args.ready_file)
    # Before anything is loaded or logged: a port in use is one line, at once.
    _check_ports_distinct(args)
    _check_port_free(args.host, args.port, "--port")
    if not args.no_metrics:
        _check_port_free(args.metrics_host, args.metrics_port, "--metrics-port", "--metrics-host")
    if args.health_port is not None:
        _check_port_free(args.host, args.health_port, "--health-port")
    quiet_onnxruntime()
    if start_signals.stop_requested():  # SIGTERM/SIGINT during the imports: nothing to stop yet
        logger.info("stop requested during start-up: exiting")
        return 0
    app = App(
        args.models,
        config,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=None if args.no_metrics else args.metrics_port,
        health_port=args.health_port,
        required_models=parse_model_list(args.require_models) if args.require_models is not None else None,
    )
    signals.attach(app)
    await app.start()
    # The process's own start-up heap (not App's: tests run many Apps in one process): full
    # collections skip it from now on (heap.py).
    freeze_startup_heap()
    logger.info("event loop: %s", event_loop.running_loop_name())
    if not app.stop_requested:
        metrics_at = _address(args.metrics_host, app.metrics_port) if not args.no_metrics else "off"
        health_at = f" health on {_address(args.host, app.health_port)}" if app.health_server else ""
        # A stdout closed (`>&-`) or whose reader is gone (`| head -0`) takes the line nowhere: the
        # server serves on (its later writes, the final flush included, go to devnull).
        Stdout().say(
            f"genserve listening on {_address(args.host, app.port)} metrics on {metrics_at}{health_at}",
            flush=True,
        )
        if args.ready_file:
            try:
                write_ready_file(args.ready_file, app.port, app.metrics_port, app.health_port)
            except OSError as exc:  # the folder went away or filled up since check_ready_file
                # Said once, by the error that ends the start (after the shutdown's lines).
                app.request_stop()
                await app.stop()
                raise GenserveError(
                    f"--ready-file {args.ready_file}: cannot be written: {exc.strerror or exc}"
                ) from None
    await app.wait_for_stop()
    remove_own_ready_file(args.ready_file)  # no longer ready: from the first moment of shutdown
    await app.stop()
    # A sticky GPU failure stopped the server (repository.device_lost): exit non-zero for a restart.
    return 3 if app.repository.fatal_reason else 0


class _LoopSignals:
    """The event loop's handlers for the signals start_signals holds, from serve()'s first line on.

    Once the loop runs, a signal reaches both the Python handler (start_signals' until these replace
    it) and the loop's wakeup fd, which the loop reads at its next turn and hands to the handler
    installed by then. Installed only with the App (after its construction), these took a signal
    held meanwhile twice: one SIGTERM was also told as a second one ('... received while already
    stopping'), one SIGUSR1 warned twice. Installed first, they alone take it: serve() does not turn
    the loop before attach(), so the App's handlers get every signal since, once."""

    def __init__(self) -> None:
        self.app: App | None = None
        loop = asyncio.get_running_loop()
        for sig in start_signals.HELD:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def attach(self, app: App) -> None:
        """`app` takes the signals from now on; those held until now are acted on."""
        self.app = app
        # Signals before the loop's handlers were held (genserve_server/__main__.py, start_signals.py).
        if start_signals.stop_requested():
            app.request_stop()
        if start_signals.dropped_hups():
            logger.info("SIGHUP during start-up ignored: the start-up scan reads the repository after it")
        for name in start_signals.dropped_ignored():
            logger.warning(
                "%s during start-up ignored: the server acts on SIGTERM, SIGINT and SIGHUP only", name
            )

    def _on_signal(self, sig: signal.Signals) -> None:
        app = self.app
        if app is None:  # no App to act on yet: held as before the loop's handlers
            start_signals.record(sig)
        elif sig in (signal.SIGTERM, signal.SIGINT):
            _on_stop_signal(app, sig)
        elif sig == signal.SIGHUP:
            # Before start: a SIGHUP during the initial load queues a rescan instead of killing the process.
            app.reloader.request()
        else:
            _on_ignored_signal(sig)


def _take_signals(app: App) -> None:
    """The event loop's signal handlers from now on, taken by `app`; the signals held until now acted on."""
    _LoopSignals().attach(app)


def _on_stop_signal(app: App, sig: signal.Signals) -> None:
    """SIGTERM/SIGINT: the stop; one more while stopping is said once (the drain goes on: it loses no
    accepted call), not acted on again nor passed over without a word."""
    if not app.stop_requested:
        app.request_stop()
    elif not app.told_already_stopping:
        app.told_already_stopping = True
        logger.warning(
            "%s received while already stopping: the drain goes on (up to %g s for the calls in flight); "
            "SIGKILL stops at once, further SIGTERM/SIGINT are ignored",
            sig.name,
            app.config.drain_grace_s,
        )


def _on_ignored_signal(sig: signal.Signals) -> None:
    """SIGUSR1/SIGUSR2: Python's default would end the process without a word or a drain."""
    logger.warning("%s received: ignored (the server acts on SIGTERM, SIGINT and SIGHUP only)", sig.name)


def _replace(config: ServerConfig, **changes: Any) -> ServerConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _apply_security_flags(config: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    """--tls-*, --token-*, --watch-interval-s override the config file's tls/auth/watch fields.

    The token sources are one setting: a --token-file or --token-env replaces both of the config
    file's (auth.token_file and auth.token_env), so a source the flags leave out authenticates no one.
    """
    import dataclasses

    sec = config.security
    changes: dict[str, Any] = {}
    for flag, name in (
        ("tls_cert", "tls_cert_file"),
        ("tls_key", "tls_key_file"),
        ("tls_client_ca", "tls_client_ca_file"),
    ):
        if getattr(args, flag) is not None:
            changes[name] = getattr(args, flag)
    if args.token_file is not None or args.token_env is not None:
        changes["token_file"] = args.token_file
        changes["token_env"] = args.token_env
    if args.closed_health:
        changes["open_health"] = False
    sec = dataclasses.replace(sec, **changes)
    if (sec.tls_cert_file is None) != (sec.tls_key_file is None):
        raise GenserveError("--tls-cert and --tls-key go together")
    if sec.tls_client_ca_file is not None and sec.tls_cert_file is None:
        raise GenserveError(
            "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS plus a client CA)"
        )
    if not sec.open_health and not sec.auth:
        # Without a token nothing is closed, health included: say so rather than serve it open.
        raise GenserveError(
            "--closed-health (auth.open_health false) needs a token: --token-file or --token-env"
        )
    config = _replace(config, security=sec)
    if args.watch_interval_s is not None:
        if args.watch_interval_s <= 0:
            raise GenserveError(f"--watch-interval-s must be > 0, got {args.watch_interval_s}")
        config = _replace(config, watch_interval_s=args.watch_interval_s)
    return config


def _add_security_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--tls-cert", type=nonempty_path, default=None, help="server certificate (PEM); turns TLS on"
    )
    s.add_argument("--tls-key", type=nonempty_path, default=None, help="server private key (PEM)")
    s.add_argument(
        "--tls-client-ca",
        type=nonempty_path,
        default=None,
        help="CA (PEM) for client certificates: mutual TLS",
    )
    s.add_argument(
        "--token-file", type=nonempty_path, default=None, help="bearer tokens, one per line: token auth"
    )
    s.add_argument(
        "--token-env", default=None, help="environment variable with comma-separated bearer tokens"
    )
    s.add_argument(
        "--closed-health",
        action="store_true",
        help="grpc.health.v1 needs a token too (default: open for probes)",
    )
    s.add_argument(
        "--watch-interval-s",
        type=seconds(allow_zero=False),
        default=None,
        help="rescan the model repository when it changes, checked this often (default: only on SIGHUP)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = HelpParser(prog="genserve-server", description="Serve ONNX image generators over gRPC.")
    probe.add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository")
    s.add_argument("--models", type=nonempty_path, required=True, help="model repository directory")
    s.add_argument(
        "--host", type=bind_address, default="127.0.0.1", help="gRPC bind address (default 127.0.0.1)"
    )
    s.add_argument(
        "--port", type=port_number(), default=50051, help="gRPC port; 0 picks a free one (default 50051)"
    )
    s.add_argument(
        "--metrics-host",
        type=bind_address,
        default="127.0.0.1",
        help="/metrics bind address (default 127.0.0.1)",
    )
    s.add_argument(
        "--metrics-port",
        type=port_number(),
        default=DEFAULT_METRICS_PORT,
        help=f"/metrics and /healthz port; 0 picks a free one (default {DEFAULT_METRICS_PORT})",
    )
    s.add_argument("--no-metrics", action="store_true", help="record and serve no metrics")
    s.add_argument(
        "--health-port",
        type=port_number(),
        default=None,
        help="also serve grpc.health.v1 alone on this port (on --host), with connections of its own: "
        "point probes there, they answer while clients hold every max_connections connection; "
        "0 picks a free one (default: off)",
    )
    s.add_argument(
        "--require-models",
        default=None,
        metavar="NAME,NAME",
        help='health "" is SERVING only when these models are ready, a style generator\'s mapping and a '
        "code prior's decoder serving too (default: every model in the repository)",
    )
    s.add_argument(
        "--config", type=nonempty_path, default=None, help="server config JSON (limits, threads, logging)"
    )
    s.add_argument(
        "--ready-file",
        type=nonempty_path,
        default=None,
        help="write {port, metrics_port, health_port, pid} JSON when ready",
    )
    s.add_argument(
        "--event-loop",
        choices=event_loop.CHOICES,
        default="auto",
        help="asyncio loop: auto = uvloop where installed, else asyncio's own (default auto)",
    )
    s.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None)
    s.add_argument("--log-json", action="store_true", help="JSON-lines logs")
    s.add_argument(
        "--drain-grace-s",
        type=seconds(allow_zero=True),
        default=None,
        help="seconds to finish accepted work on SIGTERM, and on a version a reload retires (its open "
        "streams end after it); model calls still running then are aborted (overrides the config's "
        "drain_grace_s)",
    )
    s.add_argument(
        "--trt-engine-cache-dir",
        type=nonempty_path_text,
        default=None,
        help="TensorRT engine cache for models that set none (a volume that outlives the container)",
    )
    _add_security_arguments(s)
    h = sub.add_parser("health", help="probe a server's grpc.health.v1 status", epilog=probe.EXIT_STATUS_HELP)
    probe.add_arguments(h)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        start_signals.release()
        return probe.run(args)
    try:
        loop = event_loop.resolve(args.event_loop)
    except ValueError as exc:
        _write_fatal(str(exc), args.log_json)
        return 2
    _fill_closed_standard_fds()
    try:
        return event_loop.run(serve(args), loop)
    except GenserveError as exc:
        _write_fatal(str(exc), args.log_json)
        return 2


def _fill_closed_standard_fds() -> None:
    """A server started with stdin, stdout or stderr closed (`<&-`, `>&-`, `2>&-`): the next
    descriptor opened takes that number (a socket, a model file), and libuv aborts the process when
    it closes a descriptor under 3 (uv__close's assertion: SIGABRT at the stop, after the drain). Each
    closed one is pointed at devnull first; sys.stdout stays None, so nothing is written there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)


def _write_fatal(message: str, log_json: bool) -> None:
    """The error that ends the start: `genserve-server: MESSAGE`, or under --log-json (or the config's
    log_json, once set up) an ERROR record like every other line, not a raw line among them."""
    as_json = log_json or any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
    if as_json:
        record = logging.makeLogRecord({"name": logger.name, "levelno": logging.ERROR, "levelname": "ERROR"})
        record.msg = message
        sys.stderr.write(JsonFormatter().format(record) + "\n")
    else:
        sys.stderr.write(f"genserve-server: {message}\n")

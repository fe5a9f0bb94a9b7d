"""admission.py's classes, main.py's gRPC options and metrics_http.py's exposition, in process."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from genserve_server.admission import Admission, AdmissionLimits
from genserve_server.config import Limits
from genserve_server.main import grpc_server_options
from genserve_server.metrics_http import Exposition

MIB = 1024 * 1024


def _admission() -> Admission:
    return Admission(
        AdmissionLimits(generation=4, sample_streams=2, control=3, health_watchers=1, request_timeout_s=1.0),
        control_services=("inference.GRPCInferenceService", "grpc.reflection.v1alpha.ServerReflection"),
        generation_methods=("/inference.GRPCInferenceService/ModelInfer",),
    )


@pytest.mark.parametrize(
    ("method", "limit_name"),
    [
        ("/genserve.v1.GenerationService/Sample", "max_concurrent_rpcs"),
        ("/genserve.v1.GenerationService/SuperResolve", "max_concurrent_rpcs"),
        ("/inference.GRPCInferenceService/ModelInfer", "max_concurrent_rpcs"),
        ("/genserve.v1.GenerationService/SampleStream", "max_concurrent_sample_streams"),
        ("/genserve.v1.GenerationService/SampleCodesStream", "max_concurrent_sample_streams"),
        ("/genserve.v1.GenerationService/ListModels", "max_concurrent_control_rpcs"),
        ("/inference.GRPCInferenceService/ServerReady", "max_concurrent_control_rpcs"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "max_concurrent_control_rpcs"),
        ("/grpc.health.v1.Health/Watch", "max_health_watchers"),
        ("/grpc.health.v1.Health/Check", ""),
        ("/grpc.health.v1.Health/List", "max_concurrent_control_rpcs"),
    ],
)
def test_every_method_has_a_class_and_only_health_check_is_unlimited(method: str, limit_name: str) -> None:
    rpc_class = _admission().classify(method)
    assert rpc_class.limit_name == limit_name
    assert (rpc_class.limit is None) == (method == "/grpc.health.v1.Health/Check")


def test_every_refusal_is_reported_with_its_method() -> None:
    refused: list[str] = []
    admission = Admission(
        AdmissionLimits(generation=1, sample_streams=1, control=1, health_watchers=1, request_timeout_s=1.0),
        on_refused=refused.append,
    )
    for method in ("/genserve.v1.GenerationService/Sample", "/genserve.v1.GenerationService/SampleStream"):
        rpc_class = admission.classify(method)
        assert rpc_class.admit() and not rpc_class.admit()
        rpc_class.refusal(method)
    assert refused == ["/genserve.v1.GenerationService/Sample", "/genserve.v1.GenerationService/SampleStream"]


def test_a_class_admits_up_to_its_limit_and_names_it_beyond() -> None:
    watchers = _admission().watchers
    assert watchers.admit() and not watchers.admit()
    assert "max_health_watchers=1" in watchers.refusal("/grpc.health.v1.Health/Watch").message
    watchers.active -= 1
    assert watchers.admit()


def test_server_options_follow_the_limits() -> None:
    default = dict(grpc_server_options(Limits()))
    assert default["grpc.compression_enabled_algorithms_bitset"] == 1  # identity only
    assert default["grpc.max_connection_idle_ms"] == 120_000
    assert default["grpc.max_allowed_incoming_connections"] == 1024
    assert "grpc.max_connection_age_ms" not in default
    changed = dict(
        grpc_server_options(
            Limits(accept_compressed_requests=True, max_connection_age_s=60, connection_idle_timeout_s=0.5)
        )
    )
    assert "grpc.compression_enabled_algorithms_bitset" not in changed
    assert changed["grpc.max_connection_age_ms"] == 60_000 and changed["grpc.max_connection_idle_ms"] == 500


def test_an_accepted_compressed_request_is_bounded_after_inflating() -> None:
    """With accept_compressed_requests, grpc (1.85) applies max_receive_message_bytes to the inflated
    message: 2 MiB of zeros (a few KB compressed) is refused by a 1 MiB limit."""

    async def run() -> tuple[grpc.StatusCode, str, int]:
        received: list[int] = []

        async def echo(request: bytes, context: object) -> bytes:
            received.append(len(request))
            return b"ok"

        options = grpc_server_options(Limits(max_receive_message_bytes=MIB, accept_compressed_requests=True))
        server = grpc.aio.server(options=options)
        handler = grpc.method_handlers_generic_handler(
            "t.T", {"E": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
                call = channel.unary_unary("/t.T/E")
                assert await call(b"\0" * (MIB // 2), timeout=10) == b"ok"
                try:
                    await call(b"\0" * (2 * MIB), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or "", len(received)
                return grpc.StatusCode.OK, "", len(received)
        finally:
            await server.stop(0)

    code, details, handled = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    assert handled == 1  # the oversized message never reached the handler


class _SlowCollector(Collector):
    """A registry whose render takes `cost_s` and shows how many renders there were."""

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s
        self.renders = 0
        self.value = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.renders += 1
        time.sleep(self.cost_s)
        yield GaugeMetricFamily("probe_value", "the value when the render started", value=self.value)


def test_a_flood_of_scrapes_shares_fresh_renders_within_the_render_share() -> None:
    collector = _SlowCollector(cost_s=0.02)
    registry = CollectorRegistry()
    registry.register(collector)
    exposition = Exposition(registry, render_share=0.2)
    stale: list[tuple[int, bytes]] = []
    answers = 0
    lock = threading.Lock()

    def scraper() -> None:
        nonlocal answers
        for _ in range(15):
            with lock:
                collector.value += 1
                wanted = collector.value
            _, body = exposition.answer(None, None, [])
            seen = int(float(re.search(rb"^probe_value (\S+)$", body, re.M).group(1)))  # type: ignore[union-attr]
            with lock:
                answers += 1
                if seen < wanted:  # a render that started before this scrape's change
                    stale.append((wanted, body))

    started = time.monotonic()
    threads = [threading.Thread(target=scraper) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    assert answers == 8 * 15 and not stale
    assert collector.renders < answers / 2  # scrapes that arrive together share a render
    # Rendering took at most about its share of the time (a render costs cost_s).
    assert collector.renders * collector.cost_s <= 0.3 * elapsed


def test_renders_are_per_format() -> None:
    registry = CollectorRegistry()
    exposition = Exposition(registry)
    plain_headers, _ = exposition.answer(None, None, [])
    om_headers, _ = exposition.answer("application/openmetrics-text; version=1.0.0", "gzip", [])
    assert dict(plain_headers)["Content-Type"].startswith("text/plain")
    assert dict(om_headers)["Content-Type"].startswith("application/openmetrics-text")
    assert dict(om_headers)["Content-Encoding"] == "gzip"


def test_the_exposition_keeps_no_body_once_no_scrape_waits_for_it() -> None:
    """Rendered bodies were kept until 8 formats had been asked for, then all dropped: a few curls
    with other Accept headers, encodings or name[] held up to 8 whole bodies (~21 MB each with ~900
    versions) on an idle server. A body is kept only for scrapes that wait for it (a shared render)."""
    registry = CollectorRegistry()
    registry.register(_SlowCollector(cost_s=0.0))
    big = GaugeMetricFamily("big", "x" * 200_000, value=1)
    registry.register(type("Big", (Collector,), {"collect": lambda self: iter([big])})())
    exposition = Exposition(registry)
    formats = [
        (accept, encoding, names)
        for names in (["big"], ["probe_value"], [])
        for accept in (None, "application/openmetrics-text; version=1.0.0")
        for encoding in (None, "gzip")
    ]
    received = sum(len(exposition.answer(accept, encoding, names)[1]) for accept, encoding, names in formats)
    assert received > 200_000 and exposition.cached_bytes == 0

    # Scrapes that overlap still share renders, and leave nothing behind.
    collector = _SlowCollector(cost_s=0.05)
    slow = CollectorRegistry()
    slow.register(collector)
    exposition = Exposition(slow)
    threads = [
        threading.Thread(target=exposition.answer, args=(accept, encoding, []))
        for _ in range(4)
        for accept, encoding, _ in formats[-4:]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert collector.renders < len(threads) and exposition.cached_bytes == 0


def test_connections_beyond_max_connections_are_closed_at_accept() -> None:
    async def run() -> list[bool]:
        server = grpc.aio.server(options=grpc_server_options(Limits(max_connections=2)))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        loop = asyncio.get_running_loop()

        def closed_within(s: socket.socket, seconds: float) -> bool:
            s.settimeout(seconds)
            try:
                while s.recv(4096):
                    pass
                return True
            except (TimeoutError, ConnectionResetError) as exc:
                return isinstance(exc, ConnectionResetError)

        sockets = []
        try:
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                sockets.append(s)
                await asyncio.sleep(0.1)  # accepted in order
            return await asyncio.gather(*(loop.run_in_executor(None, closed_within, s, 1.0) for s in sockets))
        finally:
            for s in sockets:
                s.close()
            await server.stop(0)

    assert asyncio.run(run()) == [False, False, True, True]

"""/metrics is rendered by genserve_server/exposition.py, not prometheus_client's encoders: the same
bytes, without a `Sample` object per series (a scrape of ~900 loaded versions took ~5 s)."""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Summary
from prometheus_client import metrics as client_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from genserve_server import exposition
from genserve_server.batcher import Lane
from genserve_server.exposition import choose
from genserve_server.metrics import KIND_METHODS, Metrics
from genserve_server.metrics_http import Exposition

PROMETHEUS_2 = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
ACCEPTS = [
    None,
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=values",  # prometheus_client's encoder (escapes names)
    "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=dots",  # prometheus_client's encoder
    "application/openmetrics-text;version=1.0.0;escaping=values",  # prometheus_client's encoder
    "application/openmetrics-text",
    PROMETHEUS_2,
    PROMETHEUS_3,
]


def populated_metrics(versions: int) -> Metrics:
    """A server's registry with `versions` loaded versions of every kind, some traffic on each."""
    metrics = Metrics()
    kinds = sorted(KIND_METHODS)
    for i in range(versions):
        mm = metrics.for_model(f"model-{i // 3}", str(i % 3 + 1), 16, kinds[i % len(kinds)])
        mm.set_runtime("CPUExecutionProvider", "fp32", i % 2 == 0, 16)
        mm.ready.set(1)
        mm.load_duration.set(0.25 + i)
        for method in list(mm.request_duration)[:2]:
            mm.request_done(method, "OK", 0.001 * (i % 50))
        mm.request_done("Sample", "INVALID_ARGUMENT", 0.0001)
        mm.queue_duration[Lane.BULK].observe(0.003)
        mm.compute_duration.observe(0.01 * i)
        mm.batch_size.observe(i % 17)
        mm.batch_requests.observe(2)
        mm.rejected["queue_full"].inc(i)
        mm.closed["full"].inc()
    metrics.set_config_error("model-0", True)
    metrics.unresolved().request_done("ListModels", "OK", 0.002)
    return metrics


@pytest.fixture(autouse=True)
def no_created_series() -> Iterator[None]:
    """As in the server: Metrics() turns prometheus_client's `_created` series off process-wide."""
    was = client_metrics._use_created
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    yield
    if was:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]


@pytest.fixture
def created_series(no_created_series: None) -> Iterator[None]:
    """prometheus_client's `_created` series on."""
    prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]
    yield
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def odd_registry() -> CollectorRegistry:
    """Every family shape the renderer writes itself, and some it leaves to prometheus_client."""
    reg = CollectorRegistry()
    requests = Counter(
        "odd_requests_total", 'Help with "quotes", a \\ and a\nnewline.', ("zone", "a"), registry=reg
    )
    requests.labels("eu", 'x"y').inc(3)
    requests.labels("back\\slash", "new\nline").inc(1e7)
    requests.labels("ünïcode ✓", "").inc(0.1)
    requests.labels("nan", "1").inc(math.nan)
    Counter("odd_plain_total", "Unlabelled.", registry=reg).inc(2)
    Counter("odd_empty_total", "Labelled, no child yet.", ("model",), registry=reg)
    weird = GaugeMetricFamily("odd_custom", "A custom collector between families.", labels=["k"])
    weird.add_metric(["v"], 1.5)
    reg.register(_Fixed([weird]))
    level = Gauge("odd_level", "Gauges.", ("model", "version"), registry=reg)
    for labels, value in (
        (("m", "1"), -0.0),
        (("m", "2"), math.inf),
        (("m", "3"), -math.inf),
        (("m", "4"), math.nan),
        (("m", "5"), 1234567.0),
        (("m", "6"), 7),
        (("m", "7"), 1e-9),
    ):
        level.labels(*labels).set(value)
    Gauge("odd_function", "set_function.", ("model",), registry=reg).labels("m").set_function(lambda: 4.5)
    Gauge("odd_bytes", "Unlabelled gauge.", unit="bytes", registry=reg).set(-3.25)
    # Labels sorting before and after `le`, and none.
    latency = Histogram("odd_latency_seconds", "Histogram.", ("a", "model", "zone"), registry=reg)
    latency.labels("x", "m", "z").observe(0.3)
    latency.labels("y", "m", "z").observe(100)
    Histogram("odd_plain_seconds", "Unlabelled.", buckets=(1, 3.5, 2e6), registry=reg).observe(2)
    negative = Histogram("odd_negative", "No _sum.", ("model",), buckets=(-1, 0, 1), registry=reg)
    negative.labels("m").observe(-2)
    Summary("odd_summary", "A summary.", ("model",), registry=reg).labels("m").observe(1)
    Info("odd_build", "Info.", registry=reg).info({"version": "1"})
    Enum("odd_state", "Enum.", states=["a", "b"], registry=reg).state("b")
    with_exemplar = Counter("odd_exemplar_total", "Exemplar.", ("model",), registry=reg)
    with_exemplar.labels("m").inc(1, exemplar={"trace_id": "abc"})
    Histogram("odd_exemplar_seconds", "Exemplar.", registry=reg).observe(0.2, exemplar={"trace_id": "d"})
    return reg


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def library_body(registry: CollectorRegistry, accept: str | None) -> tuple[str, bytes]:
    encoder, content_type = choose_encoder(accept or "")
    return content_type, encoder(registry)


# The families prometheus_client's encoders render (exemplars only where the format shows them).
LIBRARY_FAMILIES = {"odd_custom", "odd_function", "odd_summary", "odd_build", "odd_state"}
EXEMPLAR_FAMILIES = {"odd_exemplar", "odd_exemplar_seconds"}


def library_families(registry: CollectorRegistry, accept: str | None) -> set[str]:
    """The families `accept`'s render leaves to prometheus_client."""
    render = choose(accept)[0]
    if not isinstance(render, functools.partial) or render.func is not exposition.render:
        return {m.name for m in registry.collect()}
    om = render.keywords["om"]
    return {
        m.name for c in registry._collector_to_names if exposition._family(c, om) is None for m in c.collect()
    }


@pytest.mark.parametrize("accept", ACCEPTS)
def test_the_exposition_is_prometheus_clients_byte_for_byte(accept: str | None) -> None:
    registry = odd_registry()
    leaves = library_families(registry, accept)
    if accept is None or "values" not in accept and "dots" not in accept:
        assert leaves == LIBRARY_FAMILIES | (EXEMPLAR_FAMILIES if "openmetrics" in (accept or "") else set())
    headers, body = Exposition(registry).answer(accept, None, [])
    assert (dict(headers)["Content-Type"], body) == library_body(registry, accept)
    headers, zipped = Exposition(registry).answer(accept, "gzip", [])
    assert gzip.decompress(zipped) == body


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text;version=1.0.0"])
@pytest.mark.usefixtures("created_series")
def test_created_series_are_rendered_as_prometheus_client_renders_them(accept: str | None) -> None:
    registry = odd_registry()
    _, body = Exposition(registry).answer(accept, None, [])
    assert b"odd_requests_created{" in body
    assert body == library_body(registry, accept)[1]


def _series(body: bytes, openmetrics: bool) -> set[tuple[str, tuple[tuple[str, str], ...], str]]:
    """(name, labels, value) of every genserve_ sample; process_* and python_* change by themselves."""
    text = body.decode()
    families = parse_openmetrics(text) if openmetrics else parse_text(text)
    return {
        (s.name, tuple(sorted(s.labels.items())), repr(s.value))
        for family in families
        if family.name.startswith("genserve_")
        for s in family.samples
    }


@pytest.mark.parametrize("accept", [None, PROMETHEUS_2, PROMETHEUS_3])
def test_a_servers_registry_renders_the_same_series(accept: str | None) -> None:
    metrics = populated_metrics(12)
    _, body = Exposition(metrics.registry).answer(accept, None, [])
    _, expected = library_body(metrics.registry, accept)
    openmetrics = accept is not None
    assert _series(body, openmetrics) == _series(expected, openmetrics)
    assert len(_series(body, openmetrics)) > 3000

    def genserve(lines: bytes) -> list[bytes]:
        return [line for line in lines.splitlines() if b"genserve_" in line.split(b"{", 1)[0]]

    assert genserve(body) == genserve(expected)  # the same lines, in the same order


def test_a_scrape_builds_no_sample_object_per_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost that made a scrape of ~900 versions take seconds: prometheus_client's encoders build
    a `Sample` (a dict of labels) for every line and sort and escape each line's labels again. Only
    the process_*/python_* collectors' few lines may go that way."""
    metrics = populated_metrics(300)
    samples = 0
    add_sample = Metric.add_sample

    def counted(self: Metric, *args: object, **kwargs: object) -> None:
        nonlocal samples
        samples += 1
        add_sample(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Metric, "add_sample", counted)
    for accept in (None, PROMETHEUS_2, PROMETHEUS_3):
        samples = 0
        _, body = Exposition(metrics.registry).answer(accept, "gzip", [])
        assert gzip.decompress(body).count(b"\ngenserve_") > 50_000
        assert samples < 100, f"{samples} Sample objects for one scrape ({accept})"


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text;version=abc",
        "application/openmetrics-text;version=1.0.0-rc1",
        "text/plain;version=1.x;escaping=allow-utf-8",
    ],
)
def test_an_accept_version_that_is_no_number_gets_the_text_format_not_an_error(accept: str) -> None:
    """prometheus_client's choose_encoder compares the Accept header's version part by part, so a
    part that is no number ('abc', '0-rc1') raised TypeError: any client sending one got a 500
    and the server's stderr a traceback (raw lines among --log-json's records) for each scrape.
    Such a header is answered as one the library does not recognise: the text format."""
    registry = odd_registry()
    headers, body = Exposition(registry).answer(accept, None, [])
    assert (dict(headers)["Content-Type"], body) == library_body(registry, None)


@pytest.mark.parametrize("accept_encoding", ["gzip;q=0", "identity, gzip; q=0.0", "GZIP;Q=0"])
def test_a_scraper_that_refuses_gzip_with_q_0_gets_the_body_uncompressed(accept_encoding: str) -> None:
    """q=0 marks an encoding the client does not accept (RFC 9110, 12.5.3); prometheus_client's
    gzip_accepted looks only at the name, so such a client got gzip bytes it had refused."""
    registry = odd_registry()
    headers, body = Exposition(registry).answer(None, accept_encoding, [])
    assert "Content-Encoding" not in dict(headers)
    assert body == library_body(registry, None)[1]
    headers, zipped = Exposition(registry).answer(None, "identity;q=0.5, gzip;q=0.001", [])
    assert dict(headers)["Content-Encoding"] == "gzip" and gzip.decompress(zipped) == body


@pytest.mark.parametrize("q", ["nan", "NaN", "abc", "", "-1", "-0.5", "2", "inf", "1e-3", "0.0001", "0x1"])
def test_an_invalid_gzip_weight_is_taken_as_no_weight_whatever_it_looks_like(q: str) -> None:
    """A weight is 0..1 with at most 3 decimals (RFC 9110, 12.4.2). An invalid one was read by
    float(): q=abc was taken as the name alone (gzip) but q=nan or q=-1 as a refusal of gzip. Every
    invalid weight is the name alone: gzip."""
    registry = odd_registry()
    headers, zipped = Exposition(registry).answer(None, f"gzip;q={q}", [])
    assert dict(headers).get("Content-Encoding") == "gzip"
    assert gzip.decompress(zipped) == library_body(registry, None)[1]


@pytest.mark.parametrize("accept_encoding", ["gzip;q=0.", "gzip;q=0.000", "gzip; Q = 0"])
def test_a_valid_gzip_weight_of_0_in_any_of_its_spellings_refuses_gzip(accept_encoding: str) -> None:
    registry = odd_registry()
    headers, body = Exposition(registry).answer(None, accept_encoding, [])
    assert "Content-Encoding" not in dict(headers) and body == library_body(registry, None)[1]
    headers, _ = Exposition(registry).answer(None, "gzip;q=1.000", [])
    assert dict(headers)["Content-Encoding"] == "gzip"


def test_a_scrape_with_name_queries_gets_only_the_named_series() -> None:
    """`/metrics?name[]=...` (prometheus_client's restricted registry) answers the named series
    alone, as prometheus_client's own server does, not the whole registry."""
    metrics = populated_metrics(3)
    names = ["genserve_images_total", "genserve_model_ready"]
    _, body = Exposition(metrics.registry).answer(None, None, names)
    assert body == prometheus_client.generate_latest(metrics.registry.restricted_registry(names))
    families = {family.name for family in parse_text(body.decode())}
    assert families == {"genserve_images", "genserve_model_ready"}

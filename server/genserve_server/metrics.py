"""Every Prometheus metric of genserve, declared once (docs/metrics-contract.md).

Label children are bound once per model version at load (`ModelMetrics`), so the hot path does
no label lookups. `Metrics(enabled=False)` keeps the same interface and records nothing
(`--no-metrics`, benchmarks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase

from genserve_contract.kinds import Kind
from genserve_server.batch_events import BATCH_CLOSE_REASONS
from genserve_server.batcher import Lane
from genserve_server.gpu_metrics import NvmlCollector, register_gpu_collector
from genserve_server.infer_stats import InferStats
from genserve_server.metrics_http import HealthProbe
from genserve_server.metrics_http import serve as serve_http
from genserve_server.version import package_version

# 0.5 ms .. 30 s in 1-2.5-5 steps.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
METHODS = (
    "Sample",
    "SampleStream",
    "Interpolate",
    "Encode",
    "Decode",
    "SuperResolve",
    "Translate",
    "SampleCodes",
    "SampleCodesStream",
    "MixStyles",
    "ListModels",
    "GetModel",
    "ModelInfer",  # inference.GRPCInferenceService (kserve.py); its metadata RPCs are not counted
)
# genserve_requests_total's method label for a call of a method no service has (boundary.py): one
# value for all, as model="" for every name that resolved no model, never the client's :path.
UNKNOWN_METHOD_LABEL = ""
# The methods whose requests can use a model version's series, by kind (the core's `resolve`
# refuses a wrong kind before it touches them; the same kind properties as service.py's and
# kserve.py's kind lists): only these get a pre-bound latency histogram, so no series exist for
# impossible pairs (SuperResolve x a generator). GetModel and ListModels count under model="".
_ONE_METHOD_KINDS = {
    Kind.VAE_ENCODER: "Encode",
    Kind.SUPER_RESOLUTION: "SuperResolve",
    Kind.IMAGE_TO_IMAGE: "Translate",
    Kind.TWO_WAY_TRANSLATOR: "Translate",
    Kind.CODE_PRIOR: "SampleCodes",
}


def _kind_methods(kind: Kind) -> tuple[str, ...]:
    methods: list[str] = []
    if kind.answers_sample:
        methods += ["Sample", "SampleStream", "Interpolate"]
        if kind.takes_latent and not kind.conditional:
            methods.append("Decode")
    if kind.styled:
        methods.append("MixStyles")
    if kind in _ONE_METHOD_KINDS:
        methods.append(_ONE_METHOD_KINDS[kind])
    if kind == Kind.CODE_PRIOR:
        methods.append("SampleCodesStream")
    if not kind.takes_codes and not kind.styled and not kind.maps_latent and not kind.two_way:
        methods.append("ModelInfer")
    return tuple(methods)


KIND_METHODS: dict[str, tuple[str, ...]] = {kind.value: _kind_methods(kind) for kind in Kind}
# Kinds whose responses carry encoded images (the encode histograms): not the VAE encoder, whose
# Encode answers latents. The decode histogram stays bound for every kind: a repository of
# generators alone still exports the family the dashboard and KServe's statistics read.
ENCODING_KINDS = frozenset(KIND_METHODS) - {Kind.VAE_ENCODER.value}
REJECT_REASONS = ("queue_full", "invalid", "unauthenticated", "not_ready", "concurrency", "budget")
DROP_REASONS = ("deadline", "cancelled", "unread")
FORMATS = ("png", "jpeg", "webp", "raw_uint8", "tensor_f32")


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to (and including) max_batch_size: (1, 2, 4, ..., max).

    >>> batch_size_buckets(64)
    (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    >>> batch_size_buckets(12)
    (1.0, 2.0, 4.0, 8.0, 12.0)
    """
    buckets: list[float] = []
    size = 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


class _Null:
    """Stands in for a label child when metrics are off: every call is a no-op."""

    def inc(self, amount: float = 1) -> None:
        return None

    def dec(self, amount: float = 1) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def observe(self, amount: float) -> None:
        return None

    def labels(self, *args: Any, **kwargs: Any) -> _Null:
        return self


_NULL = _Null()


# An unloaded version's counters and histograms stay this long (its gauges go at once): a series
# that vanished at the unload lost what it counted since the last scrape from every rate() and
# increase(). Several scrape intervals at the usual 15-60 s.
SERIES_GRACE_S = 300.0


class ModelMetrics:
    """Label children of one model version, bound once at load."""

    def __init__(
        self,
        metrics: Metrics,
        model: str,
        version: str,
        *,
        model_level: bool = True,
        methods: tuple[str, ...] = METHODS,
        encodes: bool = True,
        steps: bool = True,
    ) -> None:
        self.model = model
        self.version = version
        self.label = f"model {model} version {version}"  # how refusals name it (once, not per request)
        m = metrics
        on = m.enabled
        # model_level=False (RPCs that resolved no model): only request-level series, so no phantom
        # genserve_model_ready{model=""} 0 that would fire GenserveModelNotReady.
        mon = on and model_level
        mv = (model, version)
        # Indexed by batcher.Lane: bulk waits (a starved SampleStream) show apart from interactive ones.
        self.queue_duration = tuple(
            m.child(m.queue_duration, *mv, lane.name.lower()) if mon else _NULL for lane in Lane
        )
        self.compute_duration = m.child(m.compute_duration, *mv) if mon else _NULL
        self.decode_duration = m.child(m.decode_duration, *mv) if mon else _NULL
        self.batch_requests = m.child(m.batch_requests, *mv) if mon else _NULL
        self.queue_depth = m.child(m.queue_depth, *mv) if mon else _NULL
        # Only a code prior has a running set: the dashboard's code-prior panels select the models
        # with this series.
        self.step_running_rows = m.child(m.step_running_rows, *mv) if mon and steps else _NULL
        self.images = m.child(m.images, *mv) if mon else _NULL
        self.batch_failures = m.child(m.batch_failures, *mv) if mon else _NULL
        self.cache_hits = m.child(m.image_cache_lookups, *mv, "hit") if mon else _NULL
        self.cache_misses = m.child(m.image_cache_lookups, *mv, "miss") if mon else _NULL
        self.load_duration = m.child(m.model_load_duration, *mv) if mon else _NULL
        self.ready = m.child(m.model_ready, *mv) if mon else _NULL
        self.loading = m.child(m.model_loading, *mv) if mon else _NULL
        self.file_changed = m.child(m.model_file_changed, *mv) if mon else _NULL
        self.rejected = {r: (m.child(m.requests_rejected, *mv, r) if on else _NULL) for r in REJECT_REASONS}
        self.dropped = {r: (m.child(m.requests_dropped, *mv, r) if mon else _NULL) for r in DROP_REASONS}
        self.closed = {r: (m.child(m.batches_closed, *mv, r) if mon else _NULL) for r in BATCH_CLOSE_REASONS}
        self.encode_duration = {
            f: (m.child(m.encode_duration, *mv, f) if mon and encodes else _NULL) for f in FORMATS
        }
        self.request_duration = {x: (m.child(m.request_duration, *mv, x) if on else _NULL) for x in methods}
        self._requests = m.requests if on else None
        self._requests_children: dict[tuple[str, str], Any] = {}
        self.batch_size: Any = _NULL
        self._metrics = m
        self._runtime_labels: tuple[str, ...] | None = None
        # Set once the version is forgotten (Metrics.forget_version): a call that ends after its
        # unload binds no new child, which would bring a series of the gone version back.
        self.forgotten = False
        # KServe ModelStatistics (per request, as Triton counts), kept with or without Prometheus.
        self.infer_stats = InferStats()

    def on_rejected(self, reason: str) -> None:
        """A refusal marked on its call, counted by the boundary as it answers (batch_parts.Refusals)."""
        self.rejected[reason].inc()

    def on_dropped(self, reason: str) -> None:
        self.dropped[reason].inc()

    def set_runtime(self, provider: str, precision: str, gpu_requested: bool, batch_max_rows: int) -> None:
        """genserve_model_runtime_info: what the loaded version really runs on (1), and whether its
        config asked for a GPU provider; a GPU pod that fell back to CPU shows here. And
        genserve_batch_max_rows: its batcher's cap."""
        if not self._metrics.enabled:
            return
        labels = (self.model, self.version, provider, precision, "true" if gpu_requested else "false")
        self.clear_runtime()
        self._metrics.child(self._metrics.model_runtime_info, *labels).set(1)
        self._metrics.child(self._metrics.batch_max_rows, self.model, self.version).set(batch_max_rows)
        self._runtime_labels = labels

    def clear_runtime(self, shared_with: Sequence[ModelMetrics] = ()) -> None:
        """Removes the runtime series this version published, except those `shared_with` (other
        copies of the same (model, version), see `Metrics.forget_version`) published too."""
        labels = self._runtime_labels
        if labels is None:
            return
        self._runtime_labels = None
        published = [o._runtime_labels for o in shared_with if o is not self and o._runtime_labels]
        if labels not in published:
            with contextlib.suppress(KeyError):  # a copy with these labels removed them already
                self._metrics.model_runtime_info.remove(*labels)
        if not published:
            with contextlib.suppress(KeyError):
                self._metrics.batch_max_rows.remove(self.model, self.version)

    def bind_batch_size(self, max_batch_size: int) -> None:
        """The batch-size histogram's buckets depend on max_batch_size, so it is per model."""
        self.batch_size = self._metrics.batch_size_child(self.model, self.version, max_batch_size)

    def request_done(self, method: str, code: str, duration_s: float) -> None:
        if self._requests is None or self.forgotten:
            return
        self.count(method, code)
        duration = self.request_duration.get(method)
        if duration is None:  # a method the kind does not serve: bound on first use
            duration = self.request_duration[method] = self._metrics.child(
                self._metrics.request_duration, self.model, self.version, method
            )
        duration.observe(duration_s)

    def count(self, method: str, code: str) -> None:
        """genserve_requests_total alone, for a call whose duration has no place in the latency
        histogram (a method no service has: answered before anything is read)."""
        if self._requests is None or self.forgotten:
            return
        key = (method, code)
        child = self._requests_children.get(key)
        if child is None:  # bounded: 10 methods (one for all unknown ones) x 17 codes
            child = self._requests_children[key] = self._metrics.child(
                self._requests, self.model, self.version, method, code
            )
        child.inc()


class Metrics:
    """The registry and every metric family; `serve()` exposes it over HTTP."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        # Live ModelMetrics per (model, version) (for_model .. forget_version): a forgotten version's
        # counts are removed after SERIES_GRACE_S only where no copy was loaded again meanwhile.
        self._copies: collections.Counter[tuple[str, str]] = collections.Counter()
        # Unloads per (model, version): a removal scheduled by an earlier unload of a version loaded
        # again and unloaded again since leaves the counts to the last unload's (a full grace after).
        self._unloads: collections.Counter[tuple[str, str]] = collections.Counter()
        # The series bound per (model, version) (`child`), by family: what forget_version removes.
        self._children: collections.defaultdict[
            tuple[str, str], set[tuple[MetricWrapperBase, tuple[str, ...]]]
        ] = collections.defaultdict(set)
        self._children_lock = threading.Lock()
        # No `*_created` series (one more per counter and histogram child; nothing here reads them).
        # Process-wide in prometheus_client, as PROMETHEUS_DISABLE_CREATED_SERIES=true would be.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        # process_* and python_* as on the default registry.
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        # genserve_gpu_* from NVML where a GPU is present (nvidia-ml-py extra); absent otherwise.
        self.gpu: NvmlCollector | None = register_gpu_collector(reg) if enabled else None
        mv = ("model", "version")
        lat = LATENCY_BUCKETS_S
        self.requests = Counter(
            "genserve_requests_total",
            "Finished RPCs by method and gRPC status code.",
            (*mv, "method", "code"),
            registry=reg,
        )
        self.request_duration = Histogram(
            "genserve_request_duration_seconds",
            "End-to-end RPC latency.",
            (*mv, "method"),
            buckets=lat,
            registry=reg,
        )
        self.queue_duration = Histogram(
            "genserve_queue_duration_seconds",
            "Time an item waited in the batcher, by lane (interactive, bulk).",
            (*mv, "lane"),
            buckets=lat,
            registry=reg,
        )
        self.compute_duration = Histogram(
            "genserve_compute_duration_seconds", "One ONNX Runtime batch call.", mv, buckets=lat, registry=reg
        )
        self.encode_duration = Histogram(
            "genserve_encode_duration_seconds",
            "Encoding one response's images.",
            (*mv, "format"),
            buckets=lat,
            registry=reg,
        )
        self.decode_duration = Histogram(
            "genserve_decode_duration_seconds",
            "Decoding one request's input images.",
            mv,
            buckets=lat,
            registry=reg,
        )
        # Batch-size buckets depend on each model's max_batch_size; the family uses the widest
        # (4096) power-of-two ladder so every model's sizes fall on a bucket edge.
        self.batch_size = Histogram(
            "genserve_batch_size",
            "Items (images or tiles) per executed batch.",
            mv,
            buckets=batch_size_buckets(4096),
            registry=reg,
        )
        self.batch_requests = Histogram(
            "genserve_batch_requests",
            "Distinct requests sharing one executed batch.",
            mv,
            buckets=batch_size_buckets(4096),
            registry=reg,
        )
        self.queue_depth = Gauge("genserve_queue_depth", "Items waiting in the batcher.", mv, registry=reg)
        self.step_running_rows = Gauge(
            "genserve_step_running_rows",
            "Rows in a code prior's running set (step-level batching).",
            mv,
            registry=reg,
        )
        self.in_flight = Gauge(
            "genserve_requests_in_flight", "RPCs being handled.", ("method",), registry=reg
        )
        self.images = Counter("genserve_images_total", "Images (or tiles) computed.", mv, registry=reg)
        self.requests_rejected = Counter(
            "genserve_requests_rejected_total",
            "Requests refused, by reason (queue_full, invalid, unauthenticated, not_ready, concurrency, "
            "budget: a memory budget's wait ran out).",
            (*mv, "reason"),
            registry=reg,
        )
        self.requests_dropped = Counter(
            "genserve_requests_dropped_total",
            "Admitted requests that left before they were answered (deadline, cancelled, or unread: "
            "a stream ended because its client stopped reading).",
            (*mv, "reason"),
            registry=reg,
        )
        self.batches_closed = Counter(
            "genserve_batches_closed_total",
            "Batches formed, by why each went when it did (full, shared, at_once, all_queued, window, "
            "sparse, preferred, yielded, deadline): small batches that close at_once or all_queued "
            "under load mean rows reach the queue slower than the runner frees.",
            (*mv, "reason"),
            registry=reg,
        )
        self.batch_failures = Counter(
            "genserve_batch_failures_total",
            "Model calls that raised (a failed batch's retries in halves count too).",
            mv,
            registry=reg,
        )
        self.image_cache_lookups = Counter(
            "genserve_image_cache_lookups_total",
            "Images from seeds looked up in the image cache, by result (hit, miss).",
            (*mv, "result"),
            registry=reg,
        )
        self.image_cache_bytes = Gauge(
            "genserve_image_cache_bytes", "Bytes held by the image cache (0 when it is off).", registry=reg
        )
        self.response_bytes_pending = Gauge(
            "genserve_response_bytes_pending",
            "Bytes of unary responses reserved or computed and not yet sent (response_budget_bytes).",
            registry=reg,
        )
        self.sr_working_set_bytes = Gauge(
            "genserve_sr_working_set_bytes",
            "Estimated bytes of SuperResolve requests (and ModelInfer on super-resolution) being computed "
            "(sr_working_set_bytes).",
            registry=reg,
        )
        self.translate_working_set_bytes = Gauge(
            "genserve_translate_working_set_bytes",
            "Estimated bytes of Translate requests (and ModelInfer on image-to-image) being computed "
            "(translate_working_set_bytes).",
            registry=reg,
        )
        self.model_load_duration = Gauge(
            "genserve_model_load_duration_seconds", "Model load + warm-up time.", mv, registry=reg
        )
        self.model_ready = Gauge(
            "genserve_model_ready", "1 when the model version is ready, else 0.", mv, registry=reg
        )
        self.model_loading = Gauge(
            "genserve_model_loading",
            "1 while the model version loads (sessions, warm-up, TensorRT engine builds), else 0: a "
            "version not ready because it is still loading, not because it failed or drains.",
            mv,
            registry=reg,
        )
        self.model_config_error = Gauge(
            "genserve_model_config_error",
            "1 while the model's config.json or version directories on disk cannot be applied (the "
            "versions already loaded keep serving; GetModel says why), else 0.",
            ("model",),
            registry=reg,
        )
        self.model_file_changed = Gauge(
            "genserve_model_file_changed",
            "1 while a loaded version's model file on disk differs from the one it loaded (it serves "
            "the copy in memory), else 0.",
            mv,
            registry=reg,
        )
        self.model_runtime_info = Gauge(
            "genserve_model_runtime_info",
            "1 per loaded model version: the execution provider and precision it really runs on, and "
            "whether its config requested a GPU provider.",
            (*mv, "provider", "precision", "gpu_requested"),
            registry=reg,
        )
        self.batch_max_rows = Gauge(
            "genserve_batch_max_rows",
            "Rows one batch of a loaded version takes at most: max_batch_size, or less where its load "
            "capped it (efficient_batch_tolerance; by default a compute-bound CPU model's 1-2).",
            mv,
            registry=reg,
        )
        self.build_info = Gauge(
            "genserve_build_info",
            "Always 1: the genserve-server and ONNX Runtime versions of this process.",
            ("version", "onnxruntime"),
            registry=reg,
        )
        self.tls_certificate_expiry = Gauge(
            "genserve_tls_certificate_expiry_timestamp_seconds",
            "notAfter of each configured TLS file, in seconds since the epoch: file_role server_cert "
            "(--tls-cert), client_ca (--tls-client-ca, its earliest CA certificate). Read at start-up.",
            ("file_role",),
            registry=reg,
        )
        if enabled:
            self.build_info.labels(package_version(), _package_version("onnxruntime")).set(1)
        self.in_flight_children = {x: (self.in_flight.labels(x) if enabled else _NULL) for x in METHODS}
        self._lock = threading.Lock()
        self._http_server: Any = None
        self._http_thread: threading.Thread | None = None

    def batch_size_child(self, model: str, version: str, max_batch_size: int) -> Any:
        del max_batch_size  # buckets are shared; see __init__
        return self.child(self.batch_size, model, version) if self.enabled else _NULL

    def child(self, family: MetricWrapperBase, model: str, version: str, *labels: str) -> Any:
        """`family`'s child of (model, version, *labels), remembered as a series of that version:
        forget_version removes a version's series by their labels, never by walking every version's
        (remove_by_labels: quadratic when hundreds of models unload)."""
        values = (model, version, *labels)
        with self._children_lock:
            self._children[(model, version)].add((family, values))
        return family.labels(*values)

    def _remove_children(self, key: tuple[str, str], families: tuple[MetricWrapperBase, ...]) -> None:
        """The series of `key`'s version in `families` go (Metrics.child)."""
        with self._children_lock:
            bound = self._children.get(key, set())
            gone = {entry for entry in bound if entry[0] in families}
            bound -= gone
            if not bound:
                self._children.pop(key, None)
        for family, values in gone:
            family.remove(*values)  # nothing where clear_runtime removed it already

    def for_model(self, model: str, version: str, max_batch_size: int, kind: str = "") -> ModelMetrics:
        """A version's children; with `kind`, histograms only for what that kind can do."""
        self._copies[(model, version)] += 1  # until forget_version: its series stay
        known = kind in KIND_METHODS
        mm = ModelMetrics(
            self,
            model,
            version,
            methods=KIND_METHODS.get(kind, METHODS),
            encodes=not known or kind in ENCODING_KINDS,
            steps=not known or kind == Kind.CODE_PRIOR.value,
        )
        mm.bind_batch_size(max_batch_size)
        return mm

    def set_certificate_expiries(self, expiries: Mapping[str, float]) -> None:
        """genserve_tls_certificate_expiry_timestamp_seconds{file_role}: security.certificate_expiries."""
        if self.enabled:
            for role, not_after in expiries.items():
                self.tls_certificate_expiry.labels(role).set(not_after)

    def set_config_error(self, model: str, failing: bool) -> None:
        """genserve_model_config_error{model}: 1 while the model's files on disk cannot be applied."""
        if self.enabled:
            self.model_config_error.labels(model).set(1 if failing else 0)

    def forget_version(self, mm: ModelMetrics, others: Sequence[ModelMetrics] = ()) -> None:
        """A version's object is gone (drained, or never loaded): every series of its (model,
        version) goes, counters and histograms too, so that a server that loads a new version at
        each deploy does not export the dead versions' series for ever. Series are keyed by (model,
        version) only, so `others`, copies of the same (model, version) still loading, serving or
        draining (a model directory moved away and back, a version loaded again while its old copy
        drained), bind the very same children: while there is one, only what is this copy's alone
        goes (its runtime info), and the rest stays as the live copy set it."""
        key = (mm.model, mm.version)
        if self._copies[key] > 1:
            self._copies[key] -= 1
        else:  # no entry per version ever loaded: a server loading one a deploy keeps none of them
            self._copies.pop(key, None)
        live = [o for o in others if o is not mm]
        mm.clear_runtime(live)
        if live or not self.enabled:
            return
        self._remove_children(key, self.version_gauges())
        self._unloads[key] += 1
        unload = self._unloads[key]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): at once
            self._remove_counts(mm, unload)
        else:
            loop.call_later(SERIES_GRACE_S, self._remove_counts, mm, unload)

    def _remove_counts(self, mm: ModelMetrics, unload: int) -> None:
        """The counters and histograms of a forgotten version, SERIES_GRACE_S after; kept where a
        copy of the same (model, version) was loaded again meanwhile (it binds the same children),
        and left to a later unload's removal where it was unloaded again since."""
        key = (mm.model, mm.version)
        if self._copies[key] or self._unloads[key] != unload:
            return
        del self._unloads[key]
        mm.forgotten = True
        self._remove_children(key, self.version_counts())

    def forget_model(self, model: str) -> None:
        """A model left the repository: its model-level series go too."""
        with contextlib.suppress(KeyError):
            self.model_config_error.remove(model)

    def unresolved(self) -> ModelMetrics:
        """Children for RPCs that never resolved a model (unknown name, ListModels)."""
        return ModelMetrics(self, "", "", model_level=False)

    def serve(self, host: str, port: int, health: HealthProbe, **options: Any) -> int:
        """Start the /metrics and /healthz HTTP server on a daemon thread; returns the bound port.
        `health` answers /healthz (required: without it /healthz would say ready whatever the server's
        state). `options`: metrics_http.serve's threads, read_timeout_s, render_share."""
        server, thread = serve_http(host, port, self.registry, health, **options)
        self._http_server, self._http_thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self.gpu is not None:  # after the last scrape could start
            self.gpu.close()
            self.gpu = None

    def version_gauges(self) -> tuple[MetricWrapperBase, ...]:
        """The families that describe a loaded version's state (gone with it, at once)."""
        return (
            self.queue_depth,
            self.step_running_rows,
            self.model_load_duration,
            self.model_ready,
            self.model_loading,
            self.model_file_changed,
            self.model_runtime_info,
            self.batch_max_rows,
        )

    def version_counts(self) -> tuple[MetricWrapperBase, ...]:
        """The counters and histograms labelled by model and version (kept SERIES_GRACE_S after
        their version unloads, Metrics.forget_version)."""
        return (
            self.requests,
            self.request_duration,
            self.queue_duration,
            self.compute_duration,
            self.encode_duration,
            self.decode_duration,
            self.batch_size,
            self.batch_requests,
            self.images,
            self.requests_rejected,
            self.requests_dropped,
            self.batches_closed,
            self.batch_failures,
            self.image_cache_lookups,
        )

    def version_families(self) -> tuple[MetricWrapperBase, ...]:
        """The families labelled by model and version (a version's series, Metrics.forget_version)."""
        return (*self.version_counts(), *self.version_gauges())


def _package_version(name: str) -> str:
    # onnxruntime-gpu installs the `onnxruntime` module under another distribution name.
    for dist in (name, f"{name}-gpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


class BatchMetrics:
    """Adapts one model version's `ModelMetrics` to the batcher's BatchObserver protocol."""

    __slots__ = ("_m",)

    def __init__(self, model_metrics: ModelMetrics) -> None:
        self._m = model_metrics

    def on_queue_depth(self, rows: int) -> None:
        self._m.queue_depth.set(rows)

    def on_rejected(self, reason: str) -> None:
        self._m.rejected[reason].inc()

    def on_dropped(self, reason: str) -> None:
        self._m.dropped[reason].inc()

    def on_queue_wait(self, wait_s: float, lane: Lane) -> None:
        self._m.queue_duration[lane].observe(wait_s)

    def on_batch_closed(self, reason: str) -> None:
        self._m.closed[reason].inc()

    def on_batch(self, rows: int, n_requests: int, compute_s: float, ok: bool) -> None:
        m = self._m
        m.compute_duration.observe(compute_s)
        m.batch_size.observe(rows)
        m.batch_requests.observe(n_requests)
        if ok:
            m.images.inc(rows)
            m.infer_stats.batch_done(rows, compute_s)
        else:
            m.batch_failures.inc()

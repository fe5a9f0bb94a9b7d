"""Typed, frozen configuration: the server's config file, each model's config.json and card.json.

config.json's rules are the model-repository contract's (genserve_contract.config), shared with
export/. Durations are seconds (`*_s`). Every validation error names the file, the field, the rule
and the value, e.g. `models/dcgan/config.json: batching.max_batch_size must be >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve_contract import config as contract
from genserve_contract.config import KNOWN_PROVIDERS as KNOWN_PROVIDERS
from genserve_contract.config import BatchingConfig as BatchingConfig
from genserve_contract.config import ModelConfig as ModelConfig
from genserve_contract.config import VersionPolicy as VersionPolicy
from genserve_contract.kinds import KIND_NAMES
from genserve_contract.kinds import Kind as Kind
from genserve_contract.repository import (
    ACTIVATION_BYTES_FIELD,
    CARD_FORMAT_VERSION,
    activation_bytes_problem,
    read_regular_text,
)
from genserve_contract.runtime import MAX_THREADS
from genserve_server.errors import GenserveError
from genserve_server.idle_spin import DEFAULT_WINDOW_S as IDLE_SPIN_DEFAULT_S
from genserve_server.idle_spin import MAX_WINDOW_S as IDLE_SPIN_MAX_S

# Thin aliases of the contract (genserve_contract.kinds) for the modules that still compare names.
KINDS = KIND_NAMES
# Kinds whose input is a latent z (drawn from seeds or given).
LATENT_KINDS: tuple[str, ...] = tuple(k.value for k in Kind if k.takes_latent)
# Kinds that answer Sample, SampleStream and Interpolate: the latent kinds with an image output, and
# the style generator (z through its style_mapping).
SAMPLE_KINDS: tuple[str, ...] = tuple(k.value for k in Kind if k.answers_sample)
# Kinds whose input is an image (card input_range, input_channels; batches bounded by pixels).
IMAGE_INPUT_KINDS: tuple[str, ...] = tuple(k.value for k in Kind if k.takes_image)
MIB = 1024 * 1024
# The most a config.json or card.json may hold (an exported card is ~27 KB): a larger one is refused
# unread, so that a sparse file of gigabytes fails its model, never the server's memory.
MAX_JSON_BYTES = 16 * MIB


class ConfigError(GenserveError, contract.ConfigError):
    """A config/card file is invalid; the message names the file and field."""


class _Reader(contract.Reader):
    """The contract's JSON reader, raising the server's ConfigError."""

    error_type = ConfigError


def _read_json(path: Path, *, regular_only: bool = True) -> Any:
    """The parsed JSON of `path`. Whatever keeps the file from being read or parsed is a ConfigError
    naming the file and the problem (not UTF-8, a directory, no permission, nesting past Python's
    recursion limit, a number past its digit limit; a FIFO or a device, refused unread rather than
    waited on), so that it marks one model, never the server. `regular_only` False (the server's
    --config, the operator's own file read once at start-up): a pipe is read as it comes
    (`--config <(envsubst < server.json)`, `--config /dev/stdin`)."""
    return _parse_json(path, _read_json_text(path, regular_only=regular_only))


def _read_json_text(path: Path, *, regular_only: bool = True) -> str:
    """The text of the JSON file `path` (see _read_json), a ConfigError where it cannot be read."""
    try:
        return read_regular_text(path, MAX_JSON_BYTES) if regular_only else path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from exc


def _parse_json(path: Path, text: str) -> Any:
    """`text`, the file `path`'s, parsed; a ConfigError naming the file where it is not JSON."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    except ValueError as exc:  # an integer past int's digit limit: its advice is for programmers
        raise ConfigError(f"{path}: invalid JSON: {str(exc).partition(':')[0]}") from exc


# --------------------------------------------------------------------------- server config


@dataclass(frozen=True, slots=True)
class Limits:
    """Request/response limits; every violation is INVALID_ARGUMENT naming the limit."""

    # Default fits a 2048x2048 RGB float32 output (48 MiB) plus framing.
    max_receive_message_bytes: int = 64 * MIB
    max_send_message_bytes: int = 64 * MIB
    max_images_per_request: int = 256
    max_input_pixels: int = 2048 * 2048
    # SuperResolve inputs: a x4 output of 1024x1024 stays within 4096x4096.
    max_sr_input_pixels: int = 1024 * 1024
    max_images_per_image_request: int = 16
    max_stream_images: int = 10**9
    # Generation RPCs (Sample, Decode, ..., KServe ModelInfer) running at once, counted once their
    # request has arrived; beyond it RESOURCE_EXHAUSTED (admission.py: genserve's, not grpc's).
    max_concurrent_rpcs: int = 1024
    # HTTP/2 streams per connection (grpc.max_concurrent_streams).
    max_concurrent_streams: int = 1024
    # New calls of each generation method the server stands ready to accept in one event-loop turn
    # (accept.py); 1: grpc.aio's own accept, one call per method per turn.
    accept_depth: int = 32
    # SampleStream + SampleCodesStream calls at once (bulk jobs); beyond it RESOURCE_EXHAUSTED.
    max_concurrent_sample_streams: int = 64
    # --- admission.py and the gRPC server's connection options (docs/operations.md, "Admission")
    # ListModels, GetModel, KServe metadata/readiness and reflection calls at once.
    max_concurrent_control_rpcs: int = 256
    # grpc.health.v1 Watch streams at once (health Check is never limited).
    max_health_watchers: int = 64
    # A call whose request message has not arrived this long after its headers ends DEADLINE_EXCEEDED.
    request_timeout_s: float = 10.0
    # A streamed response message the client has not taken this long (its flow-control window stays
    # full: it stopped reading) ends the stream with RESOURCE_EXHAUSTED and frees its slot.
    stream_write_timeout_s: float = 60.0
    # Connections at once (grpc.max_allowed_incoming_connections): more are closed at accept.
    max_connections: int = 1024
    # A connection with no call for this long is closed (GOAWAY): grpc.max_connection_idle_ms.
    connection_idle_timeout_s: float = 120.0
    # A connection must finish its HTTP/2 (and TLS) handshake within this (grpc.server_handshake_timeout_ms).
    handshake_timeout_s: float = 10.0
    # Connections older than this are closed after connection_age_grace_s for their calls; 0 = never.
    max_connection_age_s: float = 0.0
    connection_age_grace_s: float = 30.0
    # Keepalive pings more often than this (grpc.http2.min_ping_interval_without_data_ms) are
    # strikes; two strikes close the connection (ENHANCE_YOUR_CALM, too_many_pings).
    keepalive_min_ping_interval_s: float = 30.0
    # Pings on a connection with no call are allowed (within the interval above).
    keepalive_permit_without_calls: bool = True
    # gzip/deflate request messages; off: refused (UNIMPLEMENTED) before anything is inflated. On:
    # the inflated size is still bounded by max_receive_message_bytes (grpc checks after inflating).
    accept_compressed_requests: bool = False
    # The metrics port (metrics_http.py): worker threads (for requests other than /healthz), the
    # time a client has from its accept to send its whole request head, and the most of the time
    # spent rendering /metrics however many scrape.
    metrics_threads: int = 4
    metrics_read_timeout_s: float = 5.0
    metrics_render_share: float = 0.5
    # Used when a model's config.json does not say.
    default_max_queue_size: int = BatchingConfig().max_queue_size
    # Memory budgets (response_budget.py): bytes of unary responses computed but not yet sent (8
    # full-size responses), SuperResolve's working set (two 1024x1024 x4 requests at a time) and
    # Translate's (two requests of 16 RGB 1024x1024 images, ~0.91 GB each). A request waits for its
    # budget at most budget_max_wait_s (and its deadline), then RESOURCE_EXHAUSTED.
    response_budget_bytes: int = 512 * MIB
    sr_working_set_bytes: int = 2048 * MIB
    translate_working_set_bytes: int = 2048 * MIB
    budget_max_wait_s: float = 30.0

    def input_pixels(self, kind: Kind) -> tuple[int, str]:
        """The most pixels an input image of `kind` may have, and the limit's name for messages:
        super-resolution inputs (tiled) are bounded by max_sr_input_pixels, others by max_input_pixels."""
        if kind.tiled:
            return self.max_sr_input_pixels, "max_sr_input_pixels"
        return self.max_input_pixels, "max_input_pixels"

    def fixed_input_too_large(self, card: Card) -> str:
        """Why a model whose card fixes its input image size above input_pixels takes no request
        (every image it could be sent is refused naming the limit), or "" where it fits: GetModel
        advertises 0 images and KServe's ModelConfig max_batch_size 0 for it, and its load warns."""
        if not card.kind.takes_image or card.image_size is None:
            return ""
        height, width = card.image_size
        limit, name = self.input_pixels(card.kind)
        if height * width <= limit:
            return ""
        return f"its input size {height}x{width} = {height * width} pixels is above {name} {limit}"


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """TLS, mutual TLS and bearer tokens (security.py, docs/operations.md); all off by default."""

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Set: mutual TLS; clients must present a certificate this CA signed.
    tls_client_ca_file: Path | None = None
    # Bearer tokens: one per line in the file, and/or comma-separated in this environment variable.
    token_file: Path | None = None
    token_env: str | None = None
    # grpc.health.v1 answers without a token, so probes (Kubernetes, load balancers) need none.
    open_health: bool = True

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def auth(self) -> bool:
        return self.token_file is not None or self.token_env is not None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    limits: Limits = field(default_factory=Limits)
    # Overrides every model's execution_providers when set (e.g. ["CPUExecutionProvider"]).
    execution_providers: tuple[str, ...] | None = None
    # ONNX Runtime intra-op threads per session; 0 = cores // instances (at least 1).
    intra_op_threads: int = 0
    # Image encode/decode pool; 0 = number of cores.
    codec_threads: int = 0
    log_level: str = "INFO"
    log_json: bool = False
    drain_grace_s: float = 10.0
    warmup: bool = True
    # After warm-up, hand back what its largest batches grew ONNX Runtime's CPU arenas by: the
    # default repository idles at 335 MB instead of 410 (bench/README.md, "Footprint"); the first
    # large batch regrows what it needs.
    shrink_arena_after_warmup: bool = True
    # Seconds each version may spend timing batch sizes at warm-up (calibration.py): larger sizes
    # whose step would end past it are not timed, and the batch cap is chosen among those measured.
    # 5 s: every default model READY within ~15 s of start on 2 cores (bench/README.md, start-up).
    calibration_budget_s: float = 5.0
    # Bytes one warm-up batch may take; 0 = the memory available at warm-up / (2 x instances).
    warmup_memory_bytes: int = 0
    # Versions whose load steps other than the timing ones run at once (load_gate.py); 0 = cores.
    load_concurrency: int = 0
    # A batch whose measured compute is at most this many seconds runs on the event loop thread
    # instead of hopping to the runner pool (the hop costs more); 0 = always the pool. 250 us covers
    # a tiny model's batch-1 call (80-110 us), so concurrency 1 pays no thread hand-offs. The file
    # may give it as `inline_compute_max_us` (earlier releases' name).
    inline_compute_max_s: float = 250e-6
    # After each call of a lone caller the event loop keeps turning this many seconds instead of
    # idling its CPU (idle_spin.py): a tiny model's next request then finds warm caches and an awake
    # vCPU, ~0.1 ms less at concurrency 1 on a 2-core VM; it costs up to this much CPU per call at
    # light load, none with several callers or at saturation. 0 = off.
    idle_spin_s: float = IDLE_SPIN_DEFAULT_S
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # Rescan the model repository when it changes, checked every this many seconds (reload.py);
    # None = only on SIGHUP.
    watch_interval_s: float | None = None
    # Bytes of encoded images from seeds kept for repeated requests (image_cache.py); 0 = off.
    image_cache_bytes: int = 0
    # TensorRT engine cache for every model whose config.json sets no runtime.trt_engine_cache_dir
    # (a volume that outlives the container: docs/deploy.md); None = engines built in memory only.
    trt_engine_cache_dir: str | None = None


# Limits that become gRPC channel arguments are C ints: a larger value failed in grpc with an
# OverflowError and a traceback at start-up instead of a config error naming the field.
GRPC_INT_MAX = 2**31 - 1
GRPC_MAX_S = GRPC_INT_MAX // 1000  # seconds given to grpc in milliseconds (~24.8 days)
# The metrics port's workers are started at start-up, each an OS thread: far more than a port
# reading at most 512 requests at once can use (a million kept the server building them, never
# listening).
MAX_METRICS_THREADS = 1024
# Limits the server reports in uint32 fields (ModelInfo.max_images_per_request and
# max_stream_images; KServe ModelQueuePolicy.max_queue_size for default_max_queue_size): a larger
# one could not be sent, and no request's uint32 count could reach it anyway.
UINT32_MAX = contract.MAX_QUEUE_SIZE_LIMIT


def _paths_base(path: Path) -> Path:
    """The directory the config file's relative paths are relative to: a regular file's own; for a
    pipe (`--config <(envsubst < server.json)` names /dev/fd/63, `--config /dev/stdin`), which has
    no directory of its own, the working directory, not /dev/fd."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = True
    return path.parent if regular else Path()


def load_server_config(path: Path | None) -> ServerConfig:
    if path is None:
        return ServerConfig()
    base = _paths_base(path)
    r = _Reader(str(path), _read_json(path, regular_only=False))
    lr = r.sub("limits")
    d = Limits()
    limits = Limits(
        max_receive_message_bytes=lr.integer(
            "max_receive_message_bytes", d.max_receive_message_bytes, min_value=MIB, max_value=GRPC_INT_MAX
        ),
        max_send_message_bytes=lr.integer(
            "max_send_message_bytes", d.max_send_message_bytes, min_value=MIB, max_value=GRPC_INT_MAX
        ),
        max_images_per_request=lr.integer(
            "max_images_per_request", d.max_images_per_request, min_value=1, max_value=UINT32_MAX
        ),
        max_input_pixels=lr.integer("max_input_pixels", d.max_input_pixels, min_value=1),
        max_sr_input_pixels=lr.integer("max_sr_input_pixels", d.max_sr_input_pixels, min_value=1),
        max_images_per_image_request=lr.integer(
            "max_images_per_image_request", d.max_images_per_image_request, min_value=1
        ),
        max_stream_images=lr.integer(
            "max_stream_images", d.max_stream_images, min_value=1, max_value=UINT32_MAX
        ),
        max_concurrent_rpcs=lr.integer("max_concurrent_rpcs", d.max_concurrent_rpcs, min_value=1),
        max_concurrent_streams=lr.integer(
            "max_concurrent_streams", d.max_concurrent_streams, min_value=1, max_value=GRPC_INT_MAX
        ),
        accept_depth=lr.integer("accept_depth", d.accept_depth, min_value=1, max_value=1024),
        max_concurrent_sample_streams=lr.integer(
            "max_concurrent_sample_streams", d.max_concurrent_sample_streams, min_value=1
        ),
        default_max_queue_size=lr.integer(
            "default_max_queue_size", d.default_max_queue_size, min_value=1, max_value=UINT32_MAX
        ),
        response_budget_bytes=lr.integer("response_budget_bytes", d.response_budget_bytes, min_value=MIB),
        sr_working_set_bytes=lr.integer("sr_working_set_bytes", d.sr_working_set_bytes, min_value=MIB),
        translate_working_set_bytes=lr.integer(
            "translate_working_set_bytes", d.translate_working_set_bytes, min_value=MIB
        ),
        budget_max_wait_s=lr.number("budget_max_wait_s", d.budget_max_wait_s, min_value=0.0),
        max_concurrent_control_rpcs=lr.integer(
            "max_concurrent_control_rpcs", d.max_concurrent_control_rpcs, min_value=1
        ),
        max_health_watchers=lr.integer("max_health_watchers", d.max_health_watchers, min_value=1),
        request_timeout_s=lr.number("request_timeout_s", d.request_timeout_s, min_value=0.01),
        stream_write_timeout_s=lr.number("stream_write_timeout_s", d.stream_write_timeout_s, min_value=0.01),
        max_connections=lr.integer("max_connections", d.max_connections, min_value=1, max_value=GRPC_INT_MAX),
        connection_idle_timeout_s=lr.number(
            "connection_idle_timeout_s", d.connection_idle_timeout_s, min_value=0.01, max_value=GRPC_MAX_S
        ),
        handshake_timeout_s=lr.number(
            "handshake_timeout_s", d.handshake_timeout_s, min_value=0.01, max_value=GRPC_MAX_S
        ),
        max_connection_age_s=lr.number(
            "max_connection_age_s", d.max_connection_age_s, min_value=0.0, max_value=GRPC_MAX_S
        ),
        connection_age_grace_s=lr.number(
            "connection_age_grace_s", d.connection_age_grace_s, min_value=0.0, max_value=GRPC_MAX_S
        ),
        keepalive_min_ping_interval_s=lr.number(
            "keepalive_min_ping_interval_s",
            d.keepalive_min_ping_interval_s,
            min_value=0.0,
            max_value=GRPC_MAX_S,
        ),
        keepalive_permit_without_calls=lr.boolean(
            "keepalive_permit_without_calls", d.keepalive_permit_without_calls
        ),
        accept_compressed_requests=lr.boolean("accept_compressed_requests", d.accept_compressed_requests),
        metrics_threads=lr.integer(
            "metrics_threads", d.metrics_threads, min_value=1, max_value=MAX_METRICS_THREADS
        ),
        # The reader's selector polls with it in milliseconds, a C int as grpc's are (a larger
        # value killed the reader thread at the first connection: no /healthz, no /metrics).
        metrics_read_timeout_s=lr.number(
            "metrics_read_timeout_s", d.metrics_read_timeout_s, min_value=0.01, max_value=GRPC_MAX_S
        ),
        metrics_render_share=_render_share(lr, d.metrics_render_share),
    )
    lr.finish()
    security = _security_config(r, base)
    watch = r.raw("watch_interval_s")
    if watch is not None and (not contract.is_number(watch) or watch <= 0):
        raise r.error("watch_interval_s", f"must be a number of seconds > 0 (or absent), got {watch!r}")
    s = ServerConfig()
    config = ServerConfig(
        limits=limits,
        execution_providers=r.optional_str_list("execution_providers", choices=KNOWN_PROVIDERS),
        intra_op_threads=r.integer(
            "intra_op_threads", s.intra_op_threads, min_value=0, max_value=MAX_THREADS
        ),
        codec_threads=r.integer("codec_threads", s.codec_threads, min_value=0),
        log_level=r.string("log_level", s.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        log_json=r.boolean("log_json", s.log_json),
        drain_grace_s=r.number("drain_grace_s", s.drain_grace_s, min_value=0.0),
        warmup=r.boolean("warmup", s.warmup),
        shrink_arena_after_warmup=r.boolean("shrink_arena_after_warmup", s.shrink_arena_after_warmup),
        calibration_budget_s=r.number("calibration_budget_s", s.calibration_budget_s, min_value=0.0),
        warmup_memory_bytes=r.integer("warmup_memory_bytes", s.warmup_memory_bytes, min_value=0),
        load_concurrency=r.integer("load_concurrency", s.load_concurrency, min_value=0),
        inline_compute_max_s=_inline_compute_max_s(r, s.inline_compute_max_s),
        idle_spin_s=r.number("idle_spin_s", s.idle_spin_s, min_value=0.0, max_value=IDLE_SPIN_MAX_S),
        security=security,
        watch_interval_s=None if watch is None else float(watch),
        image_cache_bytes=r.integer("image_cache_bytes", s.image_cache_bytes, min_value=0),
        trt_engine_cache_dir=_optional_dir(r, "trt_engine_cache_dir", base),
    )
    r.finish()
    return config


def _render_share(r: _Reader, default: float) -> float:
    value = r.number("metrics_render_share", default, min_value=0.01)
    if value > 1:
        raise r.error("metrics_render_share", f"must be <= 1 (a share of the time), got {value}")
    return value


def _optional_dir(r: _Reader, key: str, base: Path) -> str | None:
    """A directory path or None; a relative one is relative to `base` (_paths_base: the config
    file's directory), as the file's other paths are (docs/operations.md)."""
    value = r.raw(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise r.error(key, f"must be a directory path or null, got {value!r}")
    return str(base / value)


def _inline_compute_max_s(r: _Reader, default_s: float) -> float:
    value = r.duration_s("inline_compute_max", default_s, max_s=1.0, legacy_unit="us")
    return default_s if value is None else value


def _security_config(r: _Reader, base: Path) -> SecurityConfig:
    """`tls: {cert_file, key_file, client_ca_file}` and `auth: {token_file, token_env, open_health}`;
    relative paths are relative to `base` (_paths_base: the config file's directory)."""

    def path_or_none(reader: _Reader, key: str) -> Path | None:
        value = reader.raw(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise reader.error(key, f"must be a file path, got {value!r}")
        return base / value

    tr, ar = r.sub("tls"), r.sub("auth")
    cert, key, ca = (path_or_none(tr, k) for k in ("cert_file", "key_file", "client_ca_file"))
    tr.finish()
    if (cert is None) != (key is None):
        raise r.error("tls", "needs both cert_file and key_file")
    if ca is not None and cert is None:
        raise r.error(
            "tls.client_ca_file", "needs cert_file and key_file (mutual TLS is TLS plus a client CA)"
        )
    token_env = ar.raw("token_env")
    if token_env is not None and (not isinstance(token_env, str) or not token_env):
        # The value is not quoted: a token (or a list of them) written where its variable's name goes.
        got = "an empty string" if token_env == "" else f"a value of type {type(token_env).__name__}"
        raise ar.error("token_env", f"must be an environment variable name, got {got}")
    config = SecurityConfig(
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=ca,
        token_file=path_or_none(ar, "token_file"),
        token_env=token_env,
        open_health=ar.boolean("open_health", SecurityConfig().open_health),
    )
    ar.finish()
    return config


def cpu_count() -> int:
    """Cores this process may use (affinity-aware, so containers are sized right)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- model config.json


def load_model_config(path: Path, *, default_max_queue_size: int | None = None) -> ModelConfig:
    """A model's config.json by the contract's rules (genserve_contract.config); a relative
    runtime.trt_engine_cache_dir is relative to the file's directory, the model's
    (docs/model-repository.md), not to the server's working directory."""
    config = contract.parse_model_config(
        _read_json(path), str(path), default_max_queue_size=default_max_queue_size, reader=_Reader
    )
    cache = config.runtime.trt_engine_cache_dir
    if cache is None or Path(cache).is_absolute():
        return config
    runtime = dataclasses.replace(config.runtime, trt_engine_cache_dir=str(path.parent / cache))
    return dataclasses.replace(config, runtime=runtime)


# --------------------------------------------------------------------------- card.json


# card.json's tensor dtypes (docs/model-repository.md): what KServe's ModelMetadata, ModelConfig and
# ModelInfer map to protocol datatypes (kserve_tensors.DTYPES). Another one loaded READY and then
# failed those RPCs with INTERNAL.
CARD_DTYPES = ("float32", "int64", "float16")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Card:
    """The fields of card.json the server uses; `raw_json` is the whole file for GetModel. A loaded
    version's `name` and `version` are its directories' (loader._open), what its messages name."""

    name: str
    version: str
    kind: Kind
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latent_dim: int | None
    class_names: tuple[str, ...]
    channels: int
    input_channels: int | None
    image_size: tuple[int, int] | None
    output_range: tuple[float, float]
    input_range: tuple[float, float] | None
    scale_factor: int
    size_multiple: int
    tile_size: int | None
    tile_overlap: int | None
    min_size: int
    sha256: Mapping[str, str]
    raw_json: str
    # sha256 of the card.json bytes this card was read from (Provenance.card_sha256): the card is
    # part of what makes the images (w_avg, output_range, tile defaults); "" where not read from a file.
    file_sha256: str = ""
    # Code kinds (code_prior, code_decoder): the code grid [H, W] and its codebook size K; with
    # top_grid (and top_codebook_size) the graph also takes `top_codes` [N, Ht, Wt].
    grid: tuple[int, int] | None = None
    codebook_size: int | None = None
    top_grid: tuple[int, int] | None = None
    top_codebook_size: int | None = None
    # Style kinds: w's length (style_mapping, style_generator); the style generator's layers (ws is
    # [N, num_layers, w_dim]) and the mean w its truncation pulls toward (float32 [w_dim]).
    w_dim: int | None = None
    num_layers: int | None = None
    w_avg: tuple[float, ...] | None = None
    # two_way_translator: the names of domains A and B (Translate's direction A_TO_B maps A to B).
    domains: tuple[str, str] | None = None
    # Image kinds: the graph's intermediates at their peak, bytes per output value, as export counted
    # them (genserve_contract.ACTIVATION_BYTES_FIELD); None: not in the card (tiling.working_set_bytes
    # then counts its constant).
    activation_bytes_per_output_value: float | None = None

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def graph_inputs(self) -> tuple[str, ...]:
        """The inputs the graph must have: the kind's, plus the optional ones this card declares
        (code kinds: `label` with class_names, `top_codes` with top_grid)."""
        declared = {"label": bool(self.class_names), "top_codes": self.top_grid is not None}
        return self.kind.input_names + tuple(
            t.name for t in self.kind.optional_inputs if declared.get(t.name, False)
        )


def _optional_int(r: _Reader, key: str, *, min_value: int) -> int | None:
    """An integer >= `min_value`, or None where the field is null or absent."""
    return None if r.raw(key) is None else r.integer(key, 0, min_value=min_value)


def _grid(r: _Reader, key: str) -> tuple[int, int] | None:
    value = r.raw(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise r.error(key, f"must be [H, W] of integers >= 1, got {value!r}")
    return int(value[0]), int(value[1])


def _w_avg(r: _Reader, w_dim: int | None) -> tuple[float, ...] | None:
    value = r.raw("w_avg")
    if value is None:
        return None
    if not isinstance(value, list) or not all(contract.is_float32(v) for v in value):
        # Applied in float32 (style_sampling.truncate): 1e39 is finite here but infinite there.
        raise r.error("w_avg", f"must be a list of w_dim numbers finite as float32, got {str(value)[:80]}")
    if w_dim is not None and len(value) != w_dim:
        raise r.error("w_avg", f"must have w_dim ({w_dim}) values, got {len(value)}")
    return tuple(float(v) for v in value)


def _domains(r: _Reader, kind: Kind) -> tuple[str, str] | None:
    value = r.raw("domains")
    if value is None:
        if kind.two_way:
            raise r.error("domains", f"is required for kind {kind} (the names of domains A and B)")
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, str) and v for v in value)
        or value[0] == value[1]
    ):
        raise r.error("domains", f"must be two different non-empty names [A, B], got {value!r}")
    return str(value[0]), str(value[1])


def _activation_bytes(r: _Reader) -> float | None:
    value = r.raw(ACTIVATION_BYTES_FIELD)
    if problem := activation_bytes_problem(value):
        raise r.error(ACTIVATION_BYTES_FIELD, problem)
    return None if value is None else float(value)


def _range(r: _Reader, key: str, required: bool) -> tuple[float, float] | None:
    value = r.raw(key)
    if value is None:
        if required:
            raise r.error(key, "is required ([lo, hi])")
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(contract.is_number(v) for v in value)  # finite: to_uint8 / from_uint8 scale by them
        or not value[0] < value[1]
    ):
        raise r.error(key, f"must be [lo, hi] of finite numbers with lo < hi, got {value!r}")
    return float(value[0]), float(value[1])


def _tensors(r: _Reader, key: str) -> tuple[TensorSpec, ...]:
    value = r.raw(key)
    if not isinstance(value, list) or not value:
        raise r.error(key, f"must be a non-empty list of {{name, dtype, shape}}, got {value!r}")
    specs = []
    for i, t in enumerate(value):
        tr = _Reader(r.where, t, f"{key}[{i}].", strict=False)
        shape = tr.raw("shape")
        if not isinstance(shape, list) or not all(contract.is_int(s) for s in shape):
            raise tr.error("shape", f"must be a list of integers, got {shape!r}")
        dtype = tr.string("dtype", "float32", choices=CARD_DTYPES)
        specs.append(TensorSpec(tr.string("name", ""), dtype, tuple(shape)))
    return tuple(specs)


def _check_fixed_size(r: _Reader, card: Card) -> None:
    """ConfigError where a fully convolutional card's image_size (its graph's one input size) is not
    a multiple of size_multiple: images are padded to size_multiple before the model (and a
    super-resolution model's cut in tiles of it), a size such a graph cannot take."""
    if not card.kind.fully_convolutional or card.image_size is None:
        return
    h, w = card.image_size
    m = card.size_multiple
    if h % m or w % m:
        raise r.error(
            "image_size",
            f"{h}x{w} (the graph's one input size) must be a multiple of size_multiple {m} in H and "
            "W: images are padded to size_multiple, a size the graph cannot take; fix image_size / "
            "size_multiple",
        )


def _check_channels(r: _Reader, card: Card) -> None:
    """ConfigError where a card's image output has other than 1 or 3 channels: its images come back
    as PNG, JPEG, WebP or raw uint8 pixels, gray or RGB (an alpha channel has no format to go in)."""
    name = card.kind.image_output_name
    if name is not None and card.channels not in (1, 3):
        raise r.error(
            "channels",
            f"must be 1 (gray) or 3 (RGB): the {name!r} output's channels, served as gray or RGB "
            f"images (no alpha), got {card.channels}",
        )


def _check_format_version(r: _Reader) -> None:
    """Absent: a card from before the field; another number: rules this server does not know."""
    version = r.raw("format_version")
    if version is not None and (not contract.is_int(version) or version != CARD_FORMAT_VERSION):
        raise r.error(
            "format_version",
            f"must be {CARD_FORMAT_VERSION} (the card format this server reads; a newer "
            f"genserve-export wrote this card: upgrade the server), got {version!r}",
        )


def load_card(path: Path) -> Card:
    text = _read_json_text(path)
    data = _parse_json(path, text)
    # Cards carry training/quality/parity records the server does not interpret: not strict.
    r = _Reader(str(path), data, strict=False)
    _check_format_version(r)
    kind_name = r.string("kind", "", choices=KINDS)
    if not kind_name:
        raise r.error("kind", "is required")
    kind = Kind(kind_name)
    image_size = r.raw("image_size")
    if image_size is not None and (
        not isinstance(image_size, list)
        or len(image_size) != 2
        or not all(contract.is_int(v) and v >= 1 for v in image_size)
    ):
        raise r.error("image_size", f"must be [H, W] of integers >= 1 or null, got {image_size!r}")
    class_names = r.raw("class_names") or []
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise r.error("class_names", f"must be a list of strings, got {class_names!r}")
    sha = r.raw("sha256") or {}
    if not isinstance(sha, dict):
        raise r.error("sha256", f"must be an object of file -> hex, got {sha!r}")
    latent_dim = r.raw("latent_dim")
    if latent_dim is not None and (not contract.is_int(latent_dim) or latent_dim < 1):
        raise r.error("latent_dim", f"must be an integer >= 1, got {latent_dim!r}")
    image_input = kind.takes_image
    card = Card(
        name=r.string("name", ""),
        version=str(r.raw("version") or ""),
        kind=kind,
        description=r.string("description", ""),
        inputs=_tensors(r, "inputs"),
        outputs=_tensors(r, "outputs"),
        latent_dim=latent_dim,
        class_names=tuple(class_names),
        channels=r.integer("channels", 3, min_value=1, max_value=4),
        input_channels=r.integer("input_channels", 3, min_value=1, max_value=4) if image_input else None,
        image_size=(int(image_size[0]), int(image_size[1])) if image_size else None,
        output_range=_range(r, "output_range", kind.image_output_name is not None) or (-1.0, 1.0),
        input_range=_range(r, "input_range", image_input),
        scale_factor=r.integer("scale_factor", 1, min_value=1),
        size_multiple=r.integer("size_multiple", 1, min_value=1),
        tile_size=_optional_int(r, "tile_size", min_value=1),
        tile_overlap=_optional_int(r, "tile_overlap", min_value=0),
        min_size=r.integer("min_size", 1, min_value=1),
        sha256={str(k): str(v) for k, v in sha.items()},
        raw_json=json.dumps(data, indent=2, sort_keys=False),
        # read_regular_text decodes strict UTF-8, so encoding gives back the file's bytes.
        file_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        grid=_grid(r, "grid"),
        codebook_size=r.integer("codebook_size", 0, min_value=1) or None,
        top_grid=_grid(r, "top_grid"),
        top_codebook_size=r.integer("top_codebook_size", 0, min_value=1) or None,
        w_dim=r.integer("w_dim", 0, min_value=1) or None,
        num_layers=r.integer("num_layers", 0, min_value=2) or None,
    )
    card = dataclasses.replace(
        card,
        w_avg=_w_avg(r, card.w_dim),
        domains=_domains(r, kind),
        activation_bytes_per_output_value=_activation_bytes(r),
    )
    if (kind.takes_latent or kind.styled) and card.latent_dim is None:
        raise r.error("latent_dim", f"is required for kind {kind}")
    if kind.conditional and not card.class_names:
        raise r.error("class_names", f"is required for kind {kind}")
    _check_channels(r, card)
    needs_size = kind.image_output_name is not None or kind.takes_image
    if not kind.fully_convolutional and needs_size and card.image_size is None:
        raise r.error("image_size", f"is required for kind {kind}")
    _check_fixed_size(r, card)
    if kind.takes_codes:
        for key, value in (("grid", card.grid), ("codebook_size", card.codebook_size)):
            if value is None:
                raise r.error(key, f"is required for kind {kind}")
        if (card.top_grid is None) != (card.top_codebook_size is None):
            raise r.error("top_codebook_size", "and top_grid are given together or not at all")
    style_fields = (
        ("w_dim", card.w_dim, kind.maps_latent or kind.styled),
        ("num_layers", card.num_layers, kind.styled),
        ("w_avg", card.w_avg, kind.styled),
    )
    for key, given, required in style_fields:
        if required and given is None:
            raise r.error(key, f"is required for kind {kind}")
    return card

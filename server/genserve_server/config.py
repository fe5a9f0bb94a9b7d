"""Typed, frozen configuration: the server's config file, each model's config.json and card.json.

Every validation error names the file, the field, the rule and the value, e.g.
`models/dcgan/config.json: batching.max_batch_size must be >= 1, got 0`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve_server.errors import GenserveError
from genserve_server.ort_session import RuntimeConfig, RuntimeConfigError, parse_runtime_config

KINDS = (
    "generator",
    "conditional_generator",
    "vae_decoder",
    "vae_encoder",
    "super_resolution",
    "image_to_image",
)
# Kinds whose input is a latent z (drawn from seeds or given): they answer Sample.
LATENT_KINDS = ("generator", "conditional_generator", "vae_decoder")
# Kinds whose input is an image (card input_range, input_channels; batches bounded by pixels).
IMAGE_INPUT_KINDS = ("vae_encoder", "super_resolution", "image_to_image")
# Kinds whose input H and W vary per request: no fixed shapes, so no CUDA graphs (a graph replays
# the buffers and kernels of one shape) and no TensorRT shape profile.
SIZE_FREE_KINDS = ("super_resolution", "image_to_image")
KNOWN_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
MIB = 1024 * 1024


class ConfigError(GenserveError):
    """A config/card file is invalid; the message names the file and field."""


class _Reader:
    """Reads one JSON object with typed accessors; `finish()` rejects unknown fields."""

    def __init__(self, where: str, data: Any, prefix: str = "", *, strict: bool = True) -> None:
        self.where = where
        self.prefix = prefix
        self.strict = strict
        if not isinstance(data, Mapping):
            raise self.error(prefix.rstrip(".") or "top level", f"must be a JSON object, got {_kind(data)}")
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key} {problem}", field=self.prefix + key)

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def integer(
        self, key: str, default: int, *, min_value: int | None = None, max_value: int | None = None
    ) -> int:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"must be an integer, got {value!r}")
        if min_value is not None and value < min_value:
            raise self.error(key, f"must be >= {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise self.error(key, f"must be <= {max_value}, got {value}")
        return value

    def number(self, key: str, default: float, *, min_value: float | None = None) -> float:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"must be a number, got {value!r}")
        if min_value is not None and value < min_value:
            raise self.error(key, f"must be >= {min_value}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def string(self, key: str, default: str, *, choices: Sequence[str] | None = None) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def optional_str_list(self, key: str, *, choices: Sequence[str] | None = None) -> tuple[str, ...] | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        if choices is not None:
            for v in value:
                if v not in choices:
                    raise self.error(key, f"entries must be among {', '.join(choices)}; got {v!r}")
        return tuple(value)

    def int_list(self, key: str, default: Sequence[int], *, min_value: int = 1) -> tuple[int, ...]:
        value = self._get(key)
        if value is None:
            return tuple(default)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.error(key, f"must be a list of integers, got {value!r}")
        for v in value:
            if v < min_value:
                raise self.error(key, f"entries must be >= {min_value}, got {v}")
        return tuple(value)

    def sub(self, key: str) -> _Reader:
        value = self._get(key)
        return _Reader(self.where, {} if value is None else value, f"{self.prefix}{key}.", strict=self.strict)

    def raw(self, key: str) -> Any:
        return self._get(key)

    def finish(self) -> None:
        if not self.strict:
            return
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], f"is not a known field (known: {', '.join(sorted(self.seen))})")


def _kind(value: Any) -> str:
    return type(value).__name__


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc


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
    # gRPC maximum_concurrent_rpcs: beyond it the transport answers RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1024
    max_concurrent_streams: int = 1024
    # SampleStream calls running at once (bulk jobs); beyond it RESOURCE_EXHAUSTED (limits.py).
    max_concurrent_sample_streams: int = 64
    # Used when a model's config.json does not say.
    default_max_queue_size: int = 1024


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
    # A batch whose measured compute is at most this many microseconds runs on the event loop
    # thread instead of hopping to the runner pool (the hop costs more); 0 = always the pool. 250
    # covers a tiny model's batch-1 call (80-110 us), so concurrency 1 pays no thread hand-offs.
    inline_compute_max_us: int = 250
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # Rescan the model repository when it changes, checked every this many seconds (reload.py);
    # None = only on SIGHUP.
    watch_interval_s: float | None = None
    # Bytes of encoded images from seeds kept for repeated requests (image_cache.py); 0 = off.
    image_cache_bytes: int = 0
    # TensorRT engine cache for every model whose config.json sets no runtime.trt_engine_cache_dir
    # (a volume that outlives the container: docs/deploy.md); None = engines built in memory only.
    trt_engine_cache_dir: str | None = None


def load_server_config(path: Path | None) -> ServerConfig:
    if path is None:
        return ServerConfig()
    r = _Reader(str(path), _read_json(path))
    lr = r.sub("limits")
    d = Limits()
    limits = Limits(
        max_receive_message_bytes=lr.integer(
            "max_receive_message_bytes", d.max_receive_message_bytes, min_value=MIB
        ),
        max_send_message_bytes=lr.integer("max_send_message_bytes", d.max_send_message_bytes, min_value=MIB),
        max_images_per_request=lr.integer("max_images_per_request", d.max_images_per_request, min_value=1),
        max_input_pixels=lr.integer("max_input_pixels", d.max_input_pixels, min_value=1),
        max_sr_input_pixels=lr.integer("max_sr_input_pixels", d.max_sr_input_pixels, min_value=1),
        max_images_per_image_request=lr.integer(
            "max_images_per_image_request", d.max_images_per_image_request, min_value=1
        ),
        max_stream_images=lr.integer("max_stream_images", d.max_stream_images, min_value=1),
        max_concurrent_rpcs=lr.integer("max_concurrent_rpcs", d.max_concurrent_rpcs, min_value=1),
        max_concurrent_streams=lr.integer("max_concurrent_streams", d.max_concurrent_streams, min_value=1),
        max_concurrent_sample_streams=lr.integer(
            "max_concurrent_sample_streams", d.max_concurrent_sample_streams, min_value=1
        ),
        default_max_queue_size=lr.integer("default_max_queue_size", d.default_max_queue_size, min_value=1),
    )
    lr.finish()
    security = _security_config(r, path.parent)
    watch = r.raw("watch_interval_s")
    if watch is not None and (isinstance(watch, bool) or not isinstance(watch, int | float) or watch <= 0):
        raise r.error("watch_interval_s", f"must be a number of seconds > 0 (or absent), got {watch!r}")
    s = ServerConfig()
    config = ServerConfig(
        limits=limits,
        execution_providers=r.optional_str_list("execution_providers", choices=KNOWN_PROVIDERS),
        intra_op_threads=r.integer("intra_op_threads", s.intra_op_threads, min_value=0),
        codec_threads=r.integer("codec_threads", s.codec_threads, min_value=0),
        log_level=r.string("log_level", s.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        log_json=r.boolean("log_json", s.log_json),
        drain_grace_s=r.number("drain_grace_s", s.drain_grace_s, min_value=0.0),
        warmup=r.boolean("warmup", s.warmup),
        inline_compute_max_us=r.integer("inline_compute_max_us", s.inline_compute_max_us, min_value=0),
        security=security,
        watch_interval_s=None if watch is None else float(watch),
        image_cache_bytes=r.integer("image_cache_bytes", s.image_cache_bytes, min_value=0),
        trt_engine_cache_dir=_optional_dir(r, "trt_engine_cache_dir"),
    )
    r.finish()
    return config


def _optional_dir(r: _Reader, key: str) -> str | None:
    value = r.raw(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise r.error(key, f"must be a directory path or null, got {value!r}")
    return value


def _security_config(r: _Reader, base: Path) -> SecurityConfig:
    """`tls: {cert_file, key_file, client_ca_file}` and `auth: {token_file, token_env, open_health}`;
    relative paths are relative to the config file's directory."""

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
        raise ar.error("token_env", f"must be an environment variable name, got {token_env!r}")
    config = SecurityConfig(
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=ca,
        token_file=path_or_none(ar, "token_file"),
        token_env=token_env,
        open_health=ar.boolean("open_health", True),
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


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_batch_size: int = 64
    max_queue_delay_ms: float = 2.0
    preferred_batch_sizes: tuple[int, ...] = (1, 8, 64)
    # Items (images or tiles) waiting in the batcher; beyond it RESOURCE_EXHAUSTED.
    max_queue_size: int = 1024
    # Priority (batcher.Batcher): while interactive requests arrive (one within interactive_quiet_s),
    # a BULK batch is cut to what computes in about bulk_budget_ms; otherwise to bulk_idle_budget_ms,
    # which bounds the wait of the first interactive request after a quiet spell. None (JSON null)
    # = full batches.
    bulk_budget_ms: float | None = 5.0
    bulk_idle_budget_ms: float | None = 50.0
    interactive_quiet_s: float = 1.0
    # Batches are capped at the smallest warmed size whose compute per item is within this fraction
    # of the best warmed size's (repository.efficient_batch_size): where batching gains nothing (large
    # convolutions on a CPU) requests run one by one instead of waiting in each other's batches; on
    # a GPU the cap stays at max_batch_size. None (JSON null, the default) = always up to max_batch_size:
    # on mid-size generators the cap lost 21 % at c=64 (bench/profile.md item 21).
    efficient_batch_tolerance: float | None = None
    # Image-input kinds: a batch holds at most this many input pixels (H x W per row; at least one
    # row). pix2pix at 2048x2048 takes ~2.3 GB for one image, so a full batch of 16 would need ~36 GB.
    max_batch_pixels: int = 2048 * 2048


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    latest: int | None = 1
    specific: tuple[str, ...] | None = None

    def select(self, available: Sequence[str]) -> list[str]:
        ordered = sorted(available, key=int)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    kind: str
    batching: BatchingConfig
    instances: int = 1
    execution_providers: tuple[str, ...] = KNOWN_PROVIDERS
    precision: str = "fp32"
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    # Session tuning (threads, IO binding, CUDA graphs, TensorRT cache): ort_session.RuntimeConfig.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _nullable_number(
    r: _Reader, key: str, default: float | None, *, zero_allowed: bool, expected: str
) -> float | None:
    """A finite number (> 0, or >= 0 when `zero_allowed`), null, or absent (the default)."""
    if key not in r.data:
        r.seen.add(key)
        return default
    value = r.raw(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value < math.inf
        or not (value >= 0 if zero_allowed else value > 0)
    ):
        raise r.error(key, f"must be {expected}, got {value!r}")
    return float(value)


def _budget_ms(r: _Reader, key: str, default: float | None) -> float | None:
    """A bulk batch budget in ms: a number > 0, null (full batches), or absent (the default)."""
    return _nullable_number(
        r, key, default, zero_allowed=False, expected="a number of milliseconds > 0 or null (full batches)"
    )


def _tolerance(r: _Reader, key: str, default: float | None) -> float | None:
    """A fraction >= 0, null (off), or absent (the default)."""
    return _nullable_number(
        r, key, default, zero_allowed=True, expected="a fraction >= 0 (0.05 = within 5 %) or null (off)"
    )


def load_model_config(path: Path, *, default_max_queue_size: int = 1024) -> ModelConfig:
    r = _Reader(str(path), _read_json(path))
    kind = r.string("kind", "", choices=KINDS)
    if not kind:
        raise r.error("kind", f"is required (one of {', '.join(KINDS)})")
    br = r.sub("batching")
    d = BatchingConfig()
    max_batch_size = br.integer("max_batch_size", d.max_batch_size, min_value=1, max_value=4096)
    batching = BatchingConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_ms=br.number("max_queue_delay_ms", d.max_queue_delay_ms, min_value=0.0),
        preferred_batch_sizes=br.int_list("preferred_batch_sizes", d.preferred_batch_sizes),
        max_queue_size=br.integer("max_queue_size", default_max_queue_size, min_value=1),
        bulk_budget_ms=_budget_ms(br, "bulk_budget_ms", d.bulk_budget_ms),
        bulk_idle_budget_ms=_budget_ms(br, "bulk_idle_budget_ms", d.bulk_idle_budget_ms),
        interactive_quiet_s=br.number("interactive_quiet_s", d.interactive_quiet_s, min_value=0.0),
        efficient_batch_tolerance=_tolerance(br, "efficient_batch_tolerance", d.efficient_batch_tolerance),
        max_batch_pixels=br.integer("max_batch_pixels", d.max_batch_pixels, min_value=1),
    )
    br.finish()
    if (
        batching.bulk_budget_ms is not None
        and batching.bulk_idle_budget_ms is not None
        and batching.bulk_budget_ms > batching.bulk_idle_budget_ms
    ):
        raise r.error(
            "batching.bulk_budget_ms",
            f"must be <= batching.bulk_idle_budget_ms ({batching.bulk_idle_budget_ms:g}) (the budget while "
            f"interactive requests arrive is the tighter one), got {batching.bulk_budget_ms:g}",
        )
    if batching.max_queue_size < batching.max_batch_size:
        raise r.error(
            "batching.max_queue_size",
            f"must be >= batching.max_batch_size ({max_batch_size}), got {batching.max_queue_size}",
        )
    vr = r.sub("version_policy")
    latest = vr.raw("latest")
    specific = vr.raw("specific")
    vr.finish()
    if latest is not None and specific is not None:
        raise r.error("version_policy", "must have either latest or specific, not both")
    if specific is not None:
        if (
            not isinstance(specific, list)
            or not all(isinstance(v, str | int) for v in specific)
            or not specific
        ):
            raise r.error(
                "version_policy.specific", f"must be a non-empty list of versions, got {specific!r}"
            )
        policy = VersionPolicy(latest=None, specific=tuple(str(v) for v in specific))
    else:
        if latest is None:
            latest = 1
        if not isinstance(latest, int) or isinstance(latest, bool) or latest < 1:
            raise r.error("version_policy.latest", f"must be an integer >= 1, got {latest!r}")
        policy = VersionPolicy(latest=latest)
    providers = r.optional_str_list("execution_providers", choices=KNOWN_PROVIDERS)
    try:
        runtime = parse_runtime_config(r.raw("runtime"), str(path))
    except RuntimeConfigError as exc:
        raise ConfigError(str(exc), field="runtime") from exc
    if runtime.cuda_graph and kind in SIZE_FREE_KINDS:
        raise r.error(
            "runtime.cuda_graph",
            f"is not supported for kind {kind}: its input height and width vary per request, and a CUDA "
            "graph replays one captured shape (set it to false; io_binding still applies)",
        )
    config = ModelConfig(
        kind=kind,
        batching=batching,
        instances=r.integer("instances", 1, min_value=1, max_value=64),
        execution_providers=providers if providers else KNOWN_PROVIDERS,
        precision=r.string("precision", "fp32", choices=("fp32", "fp16")),
        version_policy=policy,
        runtime=runtime,
    )
    r.finish()
    return config


# --------------------------------------------------------------------------- card.json


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Card:
    """The fields of card.json the server uses; `raw_json` is the whole file for GetModel."""

    name: str
    version: str
    kind: str
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

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


def _range(r: _Reader, key: str, required: bool) -> tuple[float, float] | None:
    value = r.raw(key)
    if value is None:
        if required:
            raise r.error(key, "is required ([lo, hi])")
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not value[0] < value[1]
    ):
        raise r.error(key, f"must be [lo, hi] with lo < hi, got {value!r}")
    return float(value[0]), float(value[1])


def _tensors(r: _Reader, key: str) -> tuple[TensorSpec, ...]:
    value = r.raw(key)
    if not isinstance(value, list) or not value:
        raise r.error(key, f"must be a non-empty list of {{name, dtype, shape}}, got {value!r}")
    specs = []
    for i, t in enumerate(value):
        tr = _Reader(r.where, t, f"{key}[{i}].", strict=False)
        shape = tr.raw("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise tr.error("shape", f"must be a list of integers, got {shape!r}")
        specs.append(TensorSpec(tr.string("name", ""), tr.string("dtype", "float32"), tuple(shape)))
    return tuple(specs)


def load_card(path: Path) -> Card:
    data = _read_json(path)
    # Cards carry training/quality/parity records the server does not interpret: not strict.
    r = _Reader(str(path), data, strict=False)
    kind = r.string("kind", "", choices=KINDS)
    if not kind:
        raise r.error("kind", "is required")
    image_size = r.raw("image_size")
    if image_size is not None and (
        not isinstance(image_size, list)
        or len(image_size) != 2
        or not all(isinstance(v, int) for v in image_size)
    ):
        raise r.error("image_size", f"must be [H, W] or null, got {image_size!r}")
    class_names = r.raw("class_names") or []
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise r.error("class_names", f"must be a list of strings, got {class_names!r}")
    sha = r.raw("sha256") or {}
    if not isinstance(sha, dict):
        raise r.error("sha256", f"must be an object of file -> hex, got {sha!r}")
    latent_dim = r.raw("latent_dim")
    if latent_dim is not None and (not isinstance(latent_dim, int) or latent_dim < 1):
        raise r.error("latent_dim", f"must be an integer >= 1, got {latent_dim!r}")
    image_input = kind in IMAGE_INPUT_KINDS
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
        output_range=_range(r, "output_range", kind != "vae_encoder") or (-1.0, 1.0),
        input_range=_range(r, "input_range", image_input),
        scale_factor=r.integer("scale_factor", 1, min_value=1),
        size_multiple=r.integer("size_multiple", 1, min_value=1),
        tile_size=r.raw("tile_size"),
        tile_overlap=r.raw("tile_overlap"),
        min_size=r.integer("min_size", 1, min_value=1),
        sha256={str(k): str(v) for k, v in sha.items()},
        raw_json=json.dumps(data, indent=2, sort_keys=False),
    )
    if kind in LATENT_KINDS and card.latent_dim is None:
        raise r.error("latent_dim", f"is required for kind {kind}")
    if kind == "conditional_generator" and not card.class_names:
        raise r.error("class_names", "is required for kind conditional_generator")
    if (
        kind in ("generator", "conditional_generator", "vae_decoder", "vae_encoder")
        and card.image_size is None
    ):
        raise r.error("image_size", f"is required for kind {kind}")
    return card

"""config.json: its fields, defaults and limits -- the one rule set export writes by and the server reads by.

Durations are seconds, in fields named `*_s`. The millisecond names of earlier releases
(`max_queue_delay_ms`, `bulk_budget_ms`, `bulk_idle_budget_ms`) are still read, converted, and
refused together with their `*_s` twin. Every error names the file, the field, the rule and the
value, e.g. `models/dcgan/config.json: batching.max_batch_size must be >= 1, got 0`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self

from genserve_contract.kinds import KIND_NAMES, Kind
from genserve_contract.repository import NAME_PATTERN, NAME_RULE, VERSION_PATTERN
from genserve_contract.runtime import RuntimeConfig, RuntimeConfigError, parse_runtime_config

KNOWN_PROVIDERS: Final = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PRECISIONS: Final = ("fp32", "fp16")
MAX_BATCH_SIZE_LIMIT: Final = 4096
MAX_INSTANCES: Final = 64
# batching.max_queue_size's bound: KServe's ModelConfig reports it in a uint32 field
# (ModelQueuePolicy.max_queue_size), as requests count rows in uint32 fields.
MAX_QUEUE_SIZE_LIMIT: Final = 2**32 - 1
# version_policy's bounds: KServe's ModelConfig reports latest in a uint32 field
# (ModelVersionPolicy.Latest.num_versions) and specific's versions in an int64 one.
MAX_LATEST_VERSIONS: Final = 2**32 - 1
MAX_SPECIFIC_VERSION: Final = 2**63 - 1
# Fields earlier releases read, by their full name (section included), and what replaced them: an
# upgrade's refusal says so rather than "is not a known field". The same name in another section
# (another file) was never read there: it is an unknown field.
RETIRED_FIELDS: Final = {
    "limits.metrics_cache_s": "replaced by limits.metrics_render_share (the share of time the metrics port "
    "may spend rendering; default 0.5)",
}
# batching.efficient_batch_tolerance's default: the server decides per model (see BatchingConfig).
AUTO_TOLERANCE: Final = "auto"
# batching.efficient_batch_tolerance: a fraction, "auto" or None (off).
Tolerance = float | Literal["auto"] | None
# Upper bounds on the batching durations: far above any sensible value, low enough that a value
# meant as milliseconds in a `*_s` field (4 for 4 ms) is refused instead of served.
MAX_QUEUE_DELAY_LIMIT_S: Final = 1.0
MAX_BULK_BUDGET_S: Final = 10.0
# Instances export writes: on a CPU, small convolutions parallelise badly inside one call, so two
# single-threaded calls side by side beat one two-threaded call (1.5-2x; bench/README.md), and the
# server runs a batch that is alone on an all-cores session (runtime.solo_session).
EXPORT_INSTANCES: Final = 2
# code_prior sampling: the softmax temperature's upper bound (SampleCodesRequest.temperature and
# config.json sampling.temperature; the lower bound is > 0).
MAX_TEMPERATURE: Final = 10.0


class ConfigError(ValueError):
    """A config.json (or card.json, server config) field is invalid; `field` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


def _type_name(value: Any) -> str:
    return type(value).__name__


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# The smallest magnitude float32 rounds to infinity (halfway between its largest finite,
# 2^128 - 2^104, and 2^128; the tie goes to infinity).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def is_float32(value: Any) -> bool:
    """A JSON number that stays finite as a float32 (a card value the server applies in float32)."""
    return is_number(value) and abs(value) < FLOAT32_OVERFLOW


class Reader:
    """Reads one JSON object with typed accessors; `finish()` rejects unknown fields.

    `error_type` lets a user raise its own ConfigError subclass (the server's is a GenserveError).
    """

    error_type: type[ConfigError] = ConfigError

    def __init__(self, where: str, data: Any, prefix: str = "", *, strict: bool = True) -> None:
        self.where = where
        self.prefix = prefix
        self.strict = strict
        if not isinstance(data, Mapping):
            where_in = prefix.rstrip(".") or "top level"
            raise self.error(where_in, f"must be a JSON object, got {_type_name(data)}", prefixed=False)
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()

    def error(self, key: str, problem: str, *, prefixed: bool = True) -> ConfigError:
        name = self.prefix + key if prefixed else key
        return self.error_type(f"{self.where}: {name} {problem}", field=name)

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def integer(
        self, key: str, default: int, *, min_value: int | None = None, max_value: int | None = None
    ) -> int:
        value = self._get(key)
        if value is None:
            return default
        if not is_int(value):
            raise self.error(key, f"must be an integer, got {value!r}")
        if min_value is not None and value < min_value:
            raise self.error(key, f"must be >= {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise self.error(key, f"must be <= {max_value}, got {value}")
        return int(value)

    def number(
        self, key: str, default: float, *, min_value: float | None = None, max_value: float | None = None
    ) -> float:
        value = self._get(key)
        if value is None:
            return default
        if not is_number(value):
            raise self.error(key, f"must be a number, got {value!r}")
        if min_value is not None and value < min_value:
            raise self.error(key, f"must be >= {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise self.error(key, f"must be <= {max_value:g}, got {value}")
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
        if not value:
            # Absent (or null) is the default; an empty list is a mistake, not "none" or "all".
            among = f" of {', '.join(choices)}" if choices is not None else " string"
            raise self.error(key, f"must list at least one{among} (leave it out for the default), got []")
        if choices is not None:
            for v in value:
                if v not in choices:
                    raise self.error(key, f"entries must be among {', '.join(choices)}; got {v!r}")
        return tuple(value)

    def int_list(
        self, key: str, default: Sequence[int], *, min_value: int = 1, max_value: int | None = None
    ) -> tuple[int, ...]:
        value = self._get(key)
        if value is None:
            return tuple(default)
        if not isinstance(value, list) or not all(is_int(v) for v in value):
            raise self.error(key, f"must be a list of integers, got {value!r}")
        for v in value:
            if v < min_value:
                raise self.error(key, f"entries must be >= {min_value}, got {v}")
            if max_value is not None and v > max_value:
                raise self.error(key, f"entries must be <= {max_value}, got {v}")
        return tuple(value)

    def sub(self, key: str) -> Self:
        value = self._get(key)
        return type(self)(
            self.where, {} if value is None else value, f"{self.prefix}{key}.", strict=self.strict
        )

    def raw(self, key: str) -> Any:
        return self._get(key)

    def finish(self) -> None:
        if not self.strict:
            return
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            retired = RETIRED_FIELDS.get(self.prefix + unknown[0])
            if retired is not None:
                raise self.error(unknown[0], f"is no longer read: {retired}")
            raise self.error(unknown[0], f"is not a known field (known: {', '.join(sorted(self.seen))})")

    def duration_s(
        self,
        name: str,
        default_s: float | None,
        *,
        max_s: float,
        nullable: bool = False,
        zero_allowed: bool = True,
        legacy_unit: str = "ms",
    ) -> float | None:
        """`<name>_s` in seconds or, from earlier releases, `<name>_<legacy_unit>` (ms or us); absent =
        `default_s`. Giving both is an error: they are one setting."""
        key_s, key_old = f"{name}_s", f"{name}_{legacy_unit}"
        self.seen.update((key_s, key_old))
        given = [k for k in (key_s, key_old) if k in self.data]
        if len(given) == 2:
            raise self.error(
                key_old, f"and {self.prefix}{key_s} are one setting in two units: give only {key_s}"
            )
        if not given:
            return default_s
        key = given[0]
        scale, unit = (1.0, "seconds") if key == key_s else _LEGACY_UNITS[legacy_unit]
        value = self.data[key]
        if value is None:
            # null: "full batches" where a field takes it, else the default, as for every other
            # field (and as the earlier releases read their millisecond names).
            return None if nullable else default_s
        if is_number(value) and (value >= 0 if zero_allowed else value > 0) and value * scale <= max_s:
            return float(value) * scale
        expected = f"a number of {unit} {'>=' if zero_allowed else '>'} 0 and <= {max_s / scale:g}"
        if nullable:
            expected += " or null (full batches)"
        raise self.error(key, f"must be {expected}, got {value!r}")


_LEGACY_UNITS: Final = {"ms": (1e-3, "milliseconds"), "us": (1e-6, "microseconds")}


# --------------------------------------------------------------------------- config.json


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """config.json's `batching`; these defaults are the server's for absent fields (export writes
    its kind's `Kind.spec.export_batching` on top)."""

    max_batch_size: int = 64
    # The batch window: how long the oldest queued row may wait for others.
    max_queue_delay_s: float = 0.002
    # Sizes a batch may close at before its window ends, when waiting would not reach the next one
    # (batcher.Batcher); sorted, each <= max_batch_size.
    preferred_batch_sizes: tuple[int, ...] = (1, 8, 64)
    # Items (images or tiles) waiting in the batcher; beyond it RESOURCE_EXHAUSTED.
    max_queue_size: int = 1024
    # Priority (batcher.Batcher): while interactive requests arrive (one within interactive_quiet_s),
    # a BULK batch is cut to what computes in about bulk_budget_s; otherwise to bulk_idle_budget_s,
    # which bounds the wait of the first interactive request after a quiet spell. None (JSON null)
    # = full batches. 2 ms: against 5 ms, interactive p99 under a bulk stream 2.44 vs 3.13 ms
    # (medians of 5 and 7 runs of bench.priority, dcgan-digits) for 14 % less bulk throughput while
    # interactive requests arrive (bench/profile.md, tenth round); 1 ms cut bulk 30 % for no more.
    bulk_budget_s: float | None = 0.002
    bulk_idle_budget_s: float | None = 0.05
    interactive_quiet_s: float = 1.0
    # Batches are capped at the smallest warmed size whose compute per item is within this fraction
    # of the best warmed size's (loader.efficient_batch_size): where batching gains nothing (large
    # convolutions on a CPU) requests run one by one or in pairs instead of waiting in each other's
    # batches; on a GPU the cap stays at max_batch_size. None (JSON null) = always up to
    # max_batch_size. "auto" (the default) = a cap of 1-2 rows only for a compute-bound CPU model,
    # one whose one-row call takes 20 ms or more at load and computes no faster in a batch
    # (loader.compute_bound_cap), and none otherwise: on mid-size generators a cap costs a saturated
    # server 8-27 % (bench/profile.md, nineteenth round).
    efficient_batch_tolerance: Tolerance = AUTO_TOLERANCE
    # Image-input kinds: a batch holds at most this many input pixels (H x W per row; at least one
    # row). pix2pix at 2048x2048 takes ~2.3 GB for one image, so a full batch of 16 would need ~36 GB.
    max_batch_pixels: int = 2048 * 2048

    # Millisecond views for readers of earlier releases' names (KServe's config reports microseconds).
    @property
    def max_queue_delay_ms(self) -> float:
        return self.max_queue_delay_s * 1e3

    @property
    def bulk_budget_ms(self) -> float | None:
        return None if self.bulk_budget_s is None else self.bulk_budget_s * 1e3

    @property
    def bulk_idle_budget_ms(self) -> float | None:
        return None if self.bulk_idle_budget_s is None else self.bulk_idle_budget_s * 1e3


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    latest: int | None = 1
    specific: tuple[str, ...] | None = None

    def select(self, available: Sequence[str]) -> list[str]:
        ordered = sorted(available, key=int)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]

    def missing(self, available: Sequence[str]) -> list[str]:
        """The versions `specific` lists with no directory among `available`, in version order
        (none for a `latest` policy)."""
        return sorted({v for v in self.specific or () if v not in available}, key=int)


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """config.json's `sampling` (code_prior only): SampleCodes' options where a request leaves them
    unset, so a plain request gets the setting the model's card scores (e.g. its class accuracy)."""

    # Softmax temperature, 0 < t <= MAX_TEMPERATURE (applied rounded to float32, as the request's).
    temperature: float = 1.0
    # Sample among the top_k most likely codes, 0 (every code) .. the card's codebook_size.
    top_k: int = 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    kind: Kind
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    instances: int = 1
    execution_providers: tuple[str, ...] = KNOWN_PROVIDERS
    precision: str = "fp32"
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    # Session tuning (threads, IO binding, CUDA graphs, TensorRT cache): runtime.RuntimeConfig.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # code_prior only: the code_decoder model (a name in the same repository) that turns the
    # sampled grids into images (its highest ready version at request time). Empty: SampleCodes
    # returns the grids only (a top prior, whose grids a bottom prior takes as top_codes).
    decoder: str = ""
    # code_prior with a top grid only: the code_prior model that samples that top grid when the
    # caller gives none (same seed, label and options). Empty: the caller must give top_codes.
    top_prior: str = ""
    # style_generator only (required there; the server refuses to load one without it, export writes
    # it once the mapping's name is known): the style_mapping model (a name in the same repository) that
    # maps z to w (its highest ready version at request time).
    mapping: str = ""
    # code_prior only: the sampling options of a SampleCodes request that leaves them unset.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


CONFIG_FIELDS: Final = (
    "kind",
    "batching",
    "instances",
    "execution_providers",
    "precision",
    "version_policy",
    "runtime",
    "decoder",
    "top_prior",
    "mapping",
    "sampling",
)


def _tolerance(r: Reader, key: str, default: Tolerance) -> Tolerance:
    """A finite number >= 0, "auto", null (off), or absent (the default)."""
    if key not in r.data:
        r.seen.add(key)
        return default
    value = r.raw(key)
    if value is None:
        return None
    if value == AUTO_TOLERANCE:
        return "auto"
    if not is_number(value) or value < 0:
        raise r.error(
            key, f'must be a fraction >= 0 (0.05 = within 5 %), "auto" or null (off), got {value!r}'
        )
    return float(value)


def _batching(
    r: Reader, default_max_queue_size: int, *, server_default: bool = False, queued: bool = True
) -> BatchingConfig:
    """`server_default`: `default_max_queue_size` is the server config's limits.default_max_queue_size.
    `queued`: the kind's rows wait in a batcher (all but a code_prior, which is sampled step by step
    within its row budget, max_batch_size): only then must its queue hold a batch and its bulk
    budgets be in order (a prior's other fields are still checked each on its own)."""
    d = BatchingConfig()
    max_batch_size = r.integer(
        "max_batch_size", d.max_batch_size, min_value=1, max_value=MAX_BATCH_SIZE_LIMIT
    )
    delay = r.duration_s("max_queue_delay", d.max_queue_delay_s, max_s=MAX_QUEUE_DELAY_LIMIT_S)
    preferred = r.int_list(
        "preferred_batch_sizes",
        [p for p in d.preferred_batch_sizes if p <= max_batch_size],
        max_value=max_batch_size,
    )
    bulk = r.duration_s(
        "bulk_budget", d.bulk_budget_s, max_s=MAX_BULK_BUDGET_S, nullable=True, zero_allowed=False
    )
    idle = r.duration_s(
        "bulk_idle_budget", d.bulk_idle_budget_s, max_s=MAX_BULK_BUDGET_S, nullable=True, zero_allowed=False
    )
    batching = BatchingConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_s=d.max_queue_delay_s if delay is None else delay,
        preferred_batch_sizes=tuple(sorted(set(preferred))),
        max_queue_size=r.integer(
            "max_queue_size", default_max_queue_size, min_value=1, max_value=MAX_QUEUE_SIZE_LIMIT
        ),
        bulk_budget_s=bulk,
        bulk_idle_budget_s=idle,
        interactive_quiet_s=r.number("interactive_quiet_s", d.interactive_quiet_s, min_value=0.0),
        efficient_batch_tolerance=_tolerance(r, "efficient_batch_tolerance", d.efficient_batch_tolerance),
        max_batch_pixels=r.integer("max_batch_pixels", d.max_batch_pixels, min_value=1),
    )
    r.finish()
    if queued and bulk is not None and idle is not None and bulk > idle:
        # Named as the file gives them: an earlier release's millisecond names, in milliseconds.
        (bulk_key, bulk_shown), (idle_key, idle_shown) = (
            _as_given(r, "bulk_budget", bulk),
            _as_given(r, "bulk_idle_budget", idle),
        )
        raise r.error(
            bulk_key,
            f"must be <= {r.prefix}{idle_key} ({idle_shown}) (the budget while interactive requests "
            f"arrive is the tighter one), got {bulk_shown}",
        )
    if queued and batching.max_queue_size < max_batch_size:
        given = ""
        if r.raw("max_queue_size") is None:  # the default applied: say where it came from
            source, fix = "the default", ""
            if server_default:
                source = "the server config's limits.default_max_queue_size"
                fix = " or raise limits.default_max_queue_size"
            given = (
                f" ({source}: this file sets no {r.prefix}max_queue_size; set one >= {max_batch_size}{fix})"
            )
        raise r.error(
            "max_queue_size",
            f"must be >= {r.prefix}max_batch_size ({max_batch_size}), got {batching.max_queue_size}{given}",
        )
    return batching


def _as_given(r: Reader, name: str, value_s: float) -> tuple[str, str]:
    """The key a duration was read from (`<name>_ms` of an earlier release, else `<name>_s`) and its
    value in that key's unit."""
    if f"{name}_ms" in r.data:
        return f"{name}_ms", f"{value_s * 1e3:g}"
    return f"{name}_s", f"{value_s:g}"


def _sampling(r: Reader, kind: Kind) -> SamplingConfig:
    """`sampling`: code_prior only; temperature in (0, MAX_TEMPERATURE], top_k >= 0 (the card's
    codebook_size bounds it: the server checks that at load, where it reads the card)."""
    given = r.raw("sampling") is not None
    sr = r.sub("sampling")
    d = SamplingConfig()
    temperature = sr.raw("temperature")
    if temperature is None:
        temperature = d.temperature
    elif not (is_number(temperature) and 0 < temperature <= MAX_TEMPERATURE):
        raise sr.error("temperature", f"must be a number > 0 and <= {MAX_TEMPERATURE:g}, got {temperature!r}")
    top_k = sr.integer("top_k", d.top_k, min_value=0)
    sr.finish()
    if given and not kind.autoregressive:
        raise r.error("sampling", f"applies to kind code_prior only, not {kind}")
    return SamplingConfig(temperature=float(temperature), top_k=top_k)


def _version_policy(r: Reader) -> VersionPolicy:
    vr = r.sub("version_policy")
    latest = vr.raw("latest")
    specific = vr.raw("specific")
    vr.finish()
    if latest is not None and specific is not None:
        raise r.error("version_policy", "must have either latest or specific, not both")
    if specific is not None:
        versions = [str(v) for v in specific] if isinstance(specific, list) else []
        if (
            not versions
            or not all(isinstance(v, str) or is_int(v) for v in specific)
            or not all(VERSION_PATTERN.match(v) and int(v) <= MAX_SPECIFIC_VERSION for v in versions)
        ):
            raise r.error(
                "version_policy.specific",
                "must be a non-empty list of versions (positive integers) of at most "
                f"{MAX_SPECIFIC_VERSION}, got {specific!r}",
            )
        return VersionPolicy(latest=None, specific=tuple(versions))
    if latest is None:
        latest = VersionPolicy().latest
    if not is_int(latest) or not 1 <= latest <= MAX_LATEST_VERSIONS:
        raise r.error(
            "version_policy.latest", f"must be an integer in 1..{MAX_LATEST_VERSIONS}, got {latest!r}"
        )
    return VersionPolicy(latest=latest)


def parse_model_config(
    data: Any,
    where: str = "config.json",
    *,
    default_max_queue_size: int | None = None,
    reader: type[Reader] = Reader,
) -> ModelConfig:
    """Validate a parsed config.json; the first problem raises `reader.error_type` naming the field.

    `default_max_queue_size`: the queue bound where config.json gives none (the server's config
    may set it); BatchingConfig's default otherwise.
    """
    r = reader(where, data)
    kind_name = r.string("kind", "", choices=KIND_NAMES)
    if not kind_name:
        raise r.error("kind", f"is required (one of {', '.join(KIND_NAMES)})")
    kind = Kind(kind_name)
    queue = BatchingConfig().max_queue_size if default_max_queue_size is None else default_max_queue_size
    batching = _batching(
        r.sub("batching"),
        queue,
        server_default=default_max_queue_size is not None,
        queued=not kind.autoregressive,
    )
    policy = _version_policy(r)
    providers = r.optional_str_list("execution_providers", choices=KNOWN_PROVIDERS)
    try:
        runtime = parse_runtime_config(r.raw("runtime"), where)
    except RuntimeConfigError as exc:
        raise r.error_type(str(exc), field="runtime") from exc
    d = ModelConfig(kind=kind)
    if runtime.cuda_graph and d.kind.fully_convolutional:
        raise r.error(
            "runtime.cuda_graph",
            f"is not supported for kind {d.kind}: its input height and width vary per request, and a CUDA "
            "graph replays one captured shape (set it to false; io_binding still applies)",
        )
    decoder = r.string("decoder", "")
    top_prior = r.string("top_prior", "")
    for key, value in (("decoder", decoder), ("top_prior", top_prior)):
        if value and not NAME_PATTERN.match(value):
            raise r.error(key, f"must be a model name ({NAME_RULE}), got {value!r}")
        if value and not d.kind.autoregressive:
            raise r.error(key, f"applies to kind code_prior only, not {d.kind}")
    mapping = r.string("mapping", "")
    if mapping and not NAME_PATTERN.match(mapping):
        raise r.error("mapping", f"must be a model name ({NAME_RULE}), got {mapping!r}")
    if mapping and not d.kind.styled:
        raise r.error("mapping", f"applies to kind style_generator only, not {d.kind}")
    config = ModelConfig(
        kind=d.kind,
        decoder=decoder,
        top_prior=top_prior,
        mapping=mapping,
        batching=batching,
        instances=r.integer("instances", d.instances, min_value=1, max_value=MAX_INSTANCES),
        execution_providers=providers if providers else d.execution_providers,
        precision=r.string("precision", d.precision, choices=PRECISIONS),
        version_policy=policy,
        runtime=runtime,
        sampling=_sampling(r, d.kind),
    )
    r.finish()
    return config


def export_config(kind: Kind, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json export writes for `kind`: its batching profile, then `overrides` (`batching`
    merged key by key). Not validated here: parse_model_config does that."""
    batching = {k: list(v) if isinstance(v, tuple) else v for k, v in kind.spec.export_batching.items()}
    config: dict[str, Any] = {
        "kind": kind.value,
        "batching": batching,
        "instances": EXPORT_INSTANCES,
        "execution_providers": list(KNOWN_PROVIDERS),
        "precision": ModelConfig(kind).precision,
        "version_policy": {"latest": VersionPolicy().latest},
    }
    for key, value in (overrides or {}).items():
        if key == "batching" and isinstance(value, Mapping):
            for name, setting in value.items():
                # An override in either unit replaces the profile's value in the other.
                twin = (
                    name[:-3] + "_s"
                    if name.endswith("_ms")
                    else name[:-2] + "_ms"
                    if name.endswith("_s")
                    else ""
                )
                batching.pop(twin, None)
                batching[name] = setting
        else:
            config[key] = value
    return config

"""card.json and config.json: their fields, defaults and validation (docs/model-repository.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from genserve_export.kinds import KINDS, kind_spec

CARD_FORMAT_VERSION = 1
FP32_ATOL = 1e-4
FP16_ATOL = 1e-2
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
VERSION_PATTERN = re.compile(r"^[1-9][0-9]*$")

# Every field a card carries, in the order it is written. Fields that do not apply to a kind are
# written as null so that a reader can rely on the key being present.
CARD_FIELDS: tuple[str, ...] = (
    "format_version",
    "name",
    "version",
    "kind",
    "description",
    "recipe",
    "inputs",
    "outputs",
    "latent_dim",
    "class_names",
    "channels",
    "input_channels",
    "image_size",
    "output_range",
    "input_range",
    "scale_factor",
    "size_multiple",
    "tile_size",
    "tile_overlap",
    "min_size",
    "training",
    "quality",
    "holdout",
    "parity",
    "opset",
    "sha256",
    "onnxruntime_version",
    "torch_version",
)
TRAINING_FIELDS = ("data", "command", "seed", "source_commit", "steps", "duration_s")
PARITY_FIELDS = ("fp32_max_abs_diff", "fp32_atol", "fp16_max_abs_diff", "fp16_atol")

# Fields a caller of export_model must supply in `card=`, because no graph can tell them.
USER_CARD_FIELDS: dict[str, tuple[str, ...]] = {
    kind: ("description", "output_range")
    + (("input_range",) if spec.image_input else ())
    + (("class_names",) if spec.conditional else ())
    for kind, spec in KINDS.items()
}

# Every field the server's config.json reader accepts (server/genserve_server/config.py); the server
# itself checks the values of those the exporter never writes (bulk budgets, runtime).
CONFIG_FIELDS = (
    "kind",
    "batching",
    "instances",
    "execution_providers",
    "precision",
    "version_policy",
    "runtime",
)
BATCHING_FIELDS = (
    "max_batch_size",
    "max_queue_delay_ms",
    "preferred_batch_sizes",
    "max_queue_size",
    "efficient_batch_tolerance",
    "max_batch_pixels",
    "bulk_budget_ms",
    "bulk_idle_budget_ms",
    "interactive_quiet_s",
)
DEFAULT_EXECUTION_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

# Generators are cheap per item and served to many small requests: batch widely with a short
# window. Image-input kinds carry large tensors (tiles, photos): smaller batches, longer window.
_DEFAULT_BATCHING: dict[str, dict[str, Any]] = {
    "generator": {
        "max_batch_size": 64,
        "max_queue_delay_ms": 4.0,
        "preferred_batch_sizes": [1, 8, 64],
        "max_queue_size": 1024,
    },
    "conditional_generator": {
        "max_batch_size": 64,
        "max_queue_delay_ms": 4.0,
        "preferred_batch_sizes": [1, 8, 64],
        "max_queue_size": 1024,
    },
    "vae_decoder": {
        "max_batch_size": 64,
        "max_queue_delay_ms": 4.0,
        "preferred_batch_sizes": [1, 8, 64],
        "max_queue_size": 1024,
    },
    "vae_encoder": {
        "max_batch_size": 64,
        "max_queue_delay_ms": 4.0,
        "preferred_batch_sizes": [1, 8, 64],
        "max_queue_size": 1024,
    },
    "super_resolution": {
        "max_batch_size": 16,
        "max_queue_delay_ms": 5.0,
        "preferred_batch_sizes": [1, 4, 16],
        "max_queue_size": 256,
    },
    "image_to_image": {
        "max_batch_size": 16,
        "max_queue_delay_ms": 5.0,
        "preferred_batch_sizes": [1, 4, 16],
        "max_queue_size": 256,
    },
}


DEFAULT_INSTANCES = 2


def default_config(kind: str) -> dict[str, Any]:
    """The config.json written for ``kind`` when the caller overrides nothing."""
    kind_spec(kind)
    return {
        "kind": kind,
        "batching": dict(_DEFAULT_BATCHING[kind]),
        # On a CPU, small convolutions parallelise badly inside one call: two single-threaded calls
        # side by side beat one two-threaded call (1.5-2x; bench/README.md), and the server runs a
        # batch that is alone on an all-cores session (runtime.solo_session).
        "instances": DEFAULT_INSTANCES,
        "execution_providers": list(DEFAULT_EXECUTION_PROVIDERS),
        "precision": "fp32",
        "version_policy": {"latest": 1},
    }


def merge_config(kind: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults for ``kind`` updated by ``overrides`` (``batching`` is merged key by key)."""
    config = default_config(kind)
    for key, value in (overrides or {}).items():
        if key == "batching" and isinstance(value, Mapping):
            config["batching"].update(value)
        else:
            config[key] = value
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(_is_number(v) for v in value)
        and value[0] < value[1]
    )


def _validate_batching(batching: Any, where: str) -> list[str]:
    if not isinstance(batching, Mapping):
        return [f"{where}: field 'batching' must be an object"]
    problems: list[str] = []
    for key in batching:
        if key not in BATCHING_FIELDS:
            problems.append(f"{where}: unknown field 'batching.{key}'")
    max_batch = batching.get("max_batch_size", 1)
    if not _is_int(max_batch) or max_batch < 1:
        problems.append(f"{where}: 'batching.max_batch_size' must be a positive int, got {max_batch!r}")
    delay = batching.get("max_queue_delay_ms", 0.0)
    if not _is_number(delay) or delay < 0:
        problems.append(f"{where}: 'batching.max_queue_delay_ms' must be a number >= 0, got {delay!r}")
    preferred = batching.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list) or not all(_is_int(p) and p >= 1 for p in preferred):
        problems.append(f"{where}: 'batching.preferred_batch_sizes' must be a list of positive ints")
    elif _is_int(max_batch) and any(p > max_batch for p in preferred):
        problems.append(
            f"{where}: 'batching.preferred_batch_sizes' {preferred} exceed max_batch_size {max_batch}"
        )
    queue = batching.get("max_queue_size", 1)
    if not _is_int(queue) or queue < 1:
        problems.append(f"{where}: 'batching.max_queue_size' must be a positive int, got {queue!r}")
    tolerance = batching.get("efficient_batch_tolerance")
    if tolerance is not None and (not _is_number(tolerance) or tolerance < 0):
        problems.append(
            f"{where}: 'batching.efficient_batch_tolerance' must be a number >= 0 or null, got {tolerance!r}"
        )
    return problems


def _validate_policy(policy: Any, where: str) -> list[str]:
    problems: list[str] = []
    if not isinstance(policy, Mapping) or len(policy) != 1:
        problems.append(f"{where}: 'version_policy' must be {{'latest': N}} or {{'specific': [...]}}")
    elif "latest" in policy:
        if not _is_int(policy["latest"]) or policy["latest"] < 1:
            problems.append(f"{where}: 'version_policy.latest' must be a positive int")
    elif "specific" in policy:
        specific = policy["specific"]
        if not isinstance(specific, list) or not all(
            isinstance(v, str) and VERSION_PATTERN.match(v) for v in specific
        ):
            problems.append(f"{where}: 'version_policy.specific' must be a list of version strings")
    else:
        problems.append(f"{where}: 'version_policy' must have 'latest' or 'specific'")
    return problems


def validate_config(config: Mapping[str, Any], *, where: str = "config.json") -> list[str]:
    """Every problem with a config.json's content, each naming the file and field."""
    problems: list[str] = []
    for key in config:
        if key not in CONFIG_FIELDS:
            problems.append(f"{where}: unknown field {key!r}")
    if config.get("kind") not in KINDS:
        problems.append(f"{where}: field 'kind' is {config.get('kind')!r}, expected one of {sorted(KINDS)}")
    problems += _validate_batching(config.get("batching", {}), where)
    instances = config.get("instances", 1)
    if not _is_int(instances) or instances < 1:
        problems.append(f"{where}: 'instances' must be a positive int, got {instances!r}")
    providers = config.get("execution_providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        problems.append(f"{where}: 'execution_providers' must be a list of strings")
    if config.get("precision", "fp32") not in ("fp32", "fp16"):
        problems.append(f"{where}: 'precision' must be 'fp32' or 'fp16', got {config.get('precision')!r}")
    problems += _validate_policy(config.get("version_policy", {"latest": 1}), where)
    return problems


def _validate_tensor_list(value: Any, field: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        return [f"{where}: field {field!r} must be a non-empty list of {{name, dtype, shape}}"]
    problems = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or set(entry) != {"name", "dtype", "shape"}:
            problems.append(f"{where}: {field}[{i}] must have exactly the keys name, dtype, shape")
            continue
        if entry["dtype"] not in ("float32", "int64", "float16"):
            problems.append(f"{where}: {field}[{i}].dtype {entry['dtype']!r} is not float32/int64/float16")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and (d == -1 or d > 0) for d in shape):
            problems.append(f"{where}: {field}[{i}].shape must be a list of positive ints or -1")
        elif not shape or shape[0] != -1:
            problems.append(f"{where}: {field}[{i}].shape axis 0 (batch) must be -1 (dynamic)")
    return problems


def _validate_kind_fields(card: Mapping[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    kind = card["kind"]
    spec = KINDS[kind]

    def need(field: str, ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"{where}: field {field!r} must be {what} for kind {kind}, got {card[field]!r}")

    need("channels", _is_int(card["channels"]) and card["channels"] > 0, "a positive int")
    need("output_range", _is_range(card["output_range"]), "[lo, hi] with lo < hi")
    need("opset", _is_int(card["opset"]) and card["opset"] >= 17, "an int >= 17")
    if spec.latent_input or kind == "vae_encoder":
        need("latent_dim", _is_int(card["latent_dim"]) and card["latent_dim"] > 0, "a positive int")
    if spec.conditional:
        names = card["class_names"]
        need(
            "class_names",
            isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names),
            "a non-empty list of strings",
        )
    if spec.image_input:
        need("input_range", _is_range(card["input_range"]), "[lo, hi] with lo < hi")
        need(
            "input_channels", _is_int(card["input_channels"]) and card["input_channels"] > 0, "a positive int"
        )
    if spec.fully_convolutional:
        need("image_size", card["image_size"] is None, "null")
        need("size_multiple", _is_int(card["size_multiple"]) and card["size_multiple"] >= 1, "a positive int")
        need("min_size", _is_int(card["min_size"]) and card["min_size"] >= 1, "a positive int")
    else:
        size = card["image_size"]
        need(
            "image_size",
            isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size),
            "[H, W]",
        )
    if kind == "super_resolution":
        need("scale_factor", _is_int(card["scale_factor"]) and card["scale_factor"] >= 1, "a positive int")
        need("tile_size", _is_int(card["tile_size"]) and card["tile_size"] >= 1, "a positive int")
        need("tile_overlap", _is_int(card["tile_overlap"]) and card["tile_overlap"] >= 0, "an int >= 0")
    return problems


def _validate_objects(card: Mapping[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    for obj in ("training", "quality", "holdout", "parity", "sha256"):
        if not isinstance(card[obj], Mapping):
            problems.append(f"{where}: field {obj!r} must be an object")
    if not problems:
        problems += [
            f"{where}: missing field 'training.{k}'" for k in TRAINING_FIELDS if k not in card["training"]
        ]
        problems += [f"{where}: missing field 'parity.{k}'" for k in PARITY_FIELDS if k not in card["parity"]]
        thresholds = card["quality"].get("thresholds", {})
        if not isinstance(thresholds, Mapping):
            problems.append(f"{where}: 'quality.thresholds' must be an object")
        else:
            for metric, bound in thresholds.items():
                if not isinstance(bound, Mapping) or not set(bound) <= {"min", "max"} or not bound:
                    problems.append(
                        f"{where}: 'quality.thresholds.{metric}' must be {{'min': x}} and/or {{'max': y}}"
                    )
        if "model.onnx" not in card["sha256"]:
            problems.append(f"{where}: 'sha256' must list model.onnx")
    return problems


def validate_card(card: Mapping[str, Any], *, where: str = "card.json") -> list[str]:
    """Every problem with a card's fields: presence, types, and agreement with its kind."""
    problems: list[str] = []
    for key in CARD_FIELDS:
        if key not in card:
            problems.append(f"{where}: missing field {key!r}")
    if problems:
        return problems
    kind = card["kind"]
    if kind not in KINDS:
        return [f"{where}: field 'kind' is {kind!r}, expected one of {sorted(KINDS)}"]
    spec = KINDS[kind]
    if card["format_version"] != CARD_FORMAT_VERSION:
        problems.append(f"{where}: format_version must be {CARD_FORMAT_VERSION}")
    if not isinstance(card["name"], str) or not NAME_PATTERN.match(card["name"]):
        problems.append(f"{where}: name {card['name']!r} must match {NAME_PATTERN.pattern}")
    if not isinstance(card["version"], str) or not VERSION_PATTERN.match(card["version"]):
        problems.append(f"{where}: version {card['version']!r} must be a positive integer string")
    if not isinstance(card["description"], str) or not card["description"].strip():
        problems.append(f"{where}: field 'description' must be a non-empty string")
    problems += _validate_tensor_list(card["inputs"], "inputs", where)
    problems += _validate_tensor_list(card["outputs"], "outputs", where)
    if not problems:
        names_in = [t["name"] for t in card["inputs"]]
        names_out = [t["name"] for t in card["outputs"]]
        if sorted(names_in) != sorted(t.name for t in spec.inputs):
            problems.append(
                f"{where}: inputs {names_in} do not fit kind {kind} ({[t.name for t in spec.inputs]})"
            )
        if sorted(names_out) != sorted(t.name for t in spec.outputs):
            problems.append(
                f"{where}: outputs {names_out} do not fit kind {kind} ({[t.name for t in spec.outputs]})"
            )

    problems += _validate_kind_fields(card, where)
    problems += _validate_objects(card, where)
    return problems


def check_thresholds(figures: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Every threshold in ``thresholds`` that ``figures`` misses (a missing figure fails too)."""
    failures = []
    for metric, bound in thresholds.items():
        value = figures.get(metric)
        if not _is_number(value):
            failures.append(f"quality figure {metric!r} was not computed (threshold {dict(bound)})")
            continue
        if "min" in bound and value < bound["min"]:
            failures.append(f"quality {metric} = {value:.4g} is below the minimum {bound['min']}")
        if "max" in bound and value > bound["max"]:
            failures.append(f"quality {metric} = {value:.4g} is above the maximum {bound['max']}")
    return failures

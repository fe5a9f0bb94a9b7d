"""card.json and config.json: their fields, defaults and validation (docs/model-repository.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from genserve_contract.config import (
    ConfigError,
    export_config,
    is_float32,
    is_int,
    is_number,
    parse_model_config,
)
from genserve_contract.kinds import KIND_NAMES, Kind
from genserve_contract.repository import (
    ACTIVATION_BYTES_FIELD,
    CARD_FORMAT_VERSION,
    NAME_PATTERN,
    NAME_RULE,
    RESERVED_NAMES,
    VERSION_PATTERN,
    activation_bytes_problem,
)

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
    "grid",
    "codebook_size",
    "top_grid",
    "top_codebook_size",
    "training",
    "quality",
    "holdout",
    "parity",
    "opset",
    "sha256",
    "onnxruntime_version",
    "torch_version",
)
# Fields added with the code kinds: written in every card (null where they do not apply), but a card
# written before them may lack them (absent = null).
CODE_CARD_FIELDS = ("grid", "codebook_size", "top_grid", "top_codebook_size")
TRAINING_FIELDS = ("data", "command", "seed", "source_commit", "steps", "duration_s")
PARITY_FIELDS = ("fp32_max_abs_diff", "fp32_atol", "fp16_max_abs_diff", "fp16_atol")

# Fields a caller of export_model must supply in `card=`, because no graph can tell them.
# A style_mapping has no image (no output_range); a style_generator cannot tell its mapping's z size
# nor the mean w its truncation pulls toward.
USER_CARD_FIELDS: dict[Kind, tuple[str, ...]] = {
    kind: ("description",)
    + (("output_range",) if kind.image_output_name is not None else ())
    + (("input_range",) if kind.takes_image else ())
    + (("class_names",) if kind.conditional else ())
    + (("latent_dim", "w_avg") if kind.styled else ())
    + (("domains",) if kind.two_way else ())
    for kind in Kind
}
# The most image channels the server loads a card with: input_channels, and channels where the kind
# has no image output (genserve_server.config.load_card).
MAX_INPUT_CHANNELS = 4
# Fields of the style kinds only (written for them, absent from other kinds' cards).
STYLE_CARD_FIELDS: tuple[str, ...] = ("w_dim", "num_layers", "w_avg")


def default_config(kind: str) -> dict[str, Any]:
    """The config.json written for ``kind`` when the caller overrides nothing."""
    return merge_config(kind, None)


def merge_config(kind: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The kind's config.json profile (genserve_contract) updated by ``overrides`` (``batching``
    is merged key by key)."""
    return export_config(Kind.parse(kind), overrides)


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(is_number(v) for v in value)
        and value[0] < value[1]
    )


def validate_config(config: Mapping[str, Any], *, where: str = "config.json") -> list[str]:
    """The problem with a config.json's content, by the rules the server reads it with
    (genserve_contract.config): an empty list, or the first problem, naming the file and field."""
    try:
        parse_model_config(config, where)
    except ConfigError as exc:
        return [str(exc)]
    return []


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
        if not isinstance(shape, list) or not all(is_int(d) and (d == -1 or d > 0) for d in shape):
            problems.append(f"{where}: {field}[{i}].shape must be a list of positive ints or -1")
        elif not shape or shape[0] != -1:
            problems.append(f"{where}: {field}[{i}].shape axis 0 (batch) must be -1 (dynamic)")
    return problems


def _check_style_fields(card: Mapping[str, Any], kind: Kind, need: Callable[[str, bool, str], None]) -> None:
    """w_dim of the style kinds; num_layers and w_avg of a style_generator."""
    if kind.maps_latent or kind.styled:
        w_dim: Any = card.get("w_dim")
        need("w_dim", is_int(w_dim) and w_dim > 0, "a positive int")
    if kind.styled:
        layers: Any = card.get("num_layers")
        w_avg: Any = card.get("w_avg")
        need("num_layers", is_int(layers) and layers >= 2, "an int >= 2")
        need(
            "w_avg",
            isinstance(w_avg, list) and len(w_avg) == card.get("w_dim") and all(is_float32(v) for v in w_avg),
            "a list of w_dim numbers finite as float32",
        )


def _check_channels(card: Mapping[str, Any], kind: Kind, need: Callable[[str, bool, str], None]) -> None:
    """channels: null where there is no image; 1 or 3 for an image output (served as gray or RGB
    images: the server's load refuses others, config.load_card); up to MAX_INPUT_CHANNELS for a kind
    that only takes an image (the server reads channels no higher); null for a code_prior, which has
    no image, where the server's load also takes an int in 1..MAX_INPUT_CHANNELS (and refuses others)."""
    channels: Any = card["channels"]
    if kind.maps_latent:  # w, no image: the image fields are null (image_size: below)
        need("channels", channels is None, "null")
    elif kind.image_output_name is not None:
        need("channels", is_int(channels) and channels in (1, 3), "1 (gray) or 3 (RGB)")
    elif kind.takes_image:
        need(
            "channels",
            is_int(channels) and 1 <= channels <= MAX_INPUT_CHANNELS,
            f"an int in 1..{MAX_INPUT_CHANNELS} (the server refuses more)",
        )
    else:  # a code prior: no image in or out
        need(
            "channels",
            channels is None or (is_int(channels) and 1 <= channels <= MAX_INPUT_CHANNELS),
            f"null (the kind has no image; the server loads an int in 1..{MAX_INPUT_CHANNELS} there "
            "too and refuses anything else)",
        )


def _validate_kind_fields(card: Mapping[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    kind = Kind(card["kind"])

    def need(field: str, ok: bool, what: str) -> None:
        if not ok:
            got = card.get(field)
            problems.append(f"{where}: field {field!r} must be {what} for kind {kind}, got {got!r}")

    has_image = kind.image_output_name is not None or kind.takes_image
    _check_channels(card, kind, need)
    if kind.image_output_name is not None:
        need("output_range", _is_range(card["output_range"]), "[lo, hi] with lo < hi")
    else:  # the range of the image output: none to give (style_mapping, vae_encoder, code_prior);
        # export writes null, but cards written before it did may hold a range, which the server reads
        # and ignores (config.load_card): one it would refuse is refused, verify notes the others
        need(
            "output_range",
            card["output_range"] is None or _is_range(card["output_range"]),
            "null (the kind has no image output; an older card's [lo, hi] with lo < hi is ignored)",
        )
    _check_style_fields(card, kind, need)
    need("opset", is_int(card["opset"]) and card["opset"] >= 17, "an int >= 17")
    if kind.has_latent_dim:
        need("latent_dim", is_int(card["latent_dim"]) and card["latent_dim"] > 0, "a positive int")
    if kind.conditional:
        names = card["class_names"]
        need(
            "class_names",
            isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names),
            "a non-empty list of strings",
        )
    if kind.takes_image:
        need("input_range", _is_range(card["input_range"]), "[lo, hi] with lo < hi")
        need(
            "input_channels",
            is_int(card["input_channels"]) and 1 <= card["input_channels"] <= MAX_INPUT_CHANNELS,
            f"an int in 1..{MAX_INPUT_CHANNELS} (the server refuses more)",
        )
    if kind.takes_codes:
        problems += _code_field_problems(card, kind, where)
    if not has_image:
        need("image_size", card["image_size"] is None, "null")
    if kind.fully_convolutional:
        # null (any size), or the one input size of a graph exported at a fixed size, as the
        # server takes it (docs/model-repository.md)
        size = card["image_size"]
        need(
            "image_size",
            size is None
            or (isinstance(size, list) and len(size) == 2 and all(is_int(s) and s > 0 for s in size)),
            "null or [H, W] (the one input size of a graph exported at a fixed size)",
        )
        need("size_multiple", is_int(card["size_multiple"]) and card["size_multiple"] >= 1, "a positive int")
        need("min_size", is_int(card["min_size"]) and card["min_size"] >= 1, "a positive int")
        multiple = card["size_multiple"]
        if isinstance(size, list) and all(is_int(s) for s in size) and is_int(multiple) and multiple >= 1:
            need(
                "image_size",
                all(s % multiple == 0 for s in size),
                f"a multiple of size_multiple {multiple} in H and W (the server pads images to it, a "
                "size a graph of one input size cannot take; its load refuses the card)",
            )
    elif has_image:
        size = card["image_size"]
        need(
            "image_size",
            isinstance(size, list) and len(size) == 2 and all(is_int(s) and s > 0 for s in size),
            "[H, W]",
        )
    if kind.tiled:
        need("scale_factor", is_int(card["scale_factor"]) and card["scale_factor"] >= 1, "a positive int")
        need("tile_size", is_int(card["tile_size"]) and card["tile_size"] >= 1, "a positive int")
        need("tile_overlap", is_int(card["tile_overlap"]) and card["tile_overlap"] >= 0, "an int >= 0")
    return problems


def _is_grid(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)


def _is_codebook(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def _code_field_problems(card: Mapping[str, Any], kind: Kind, where: str) -> list[str]:
    problems: list[str] = []
    grid, k = card.get("grid"), card.get("codebook_size")
    top_grid, top_k = card.get("top_grid"), card.get("top_codebook_size")
    if not _is_grid(grid):
        problems.append(
            f"{where}: field 'grid' must be [H, W] of positive ints for kind {kind}, got {grid!r}"
        )
    if not _is_codebook(k):
        problems.append(f"{where}: field 'codebook_size' must be an int >= 2 for kind {kind}, got {k!r}")
    if (top_grid is None) != (top_k is None):
        problems.append(
            f"{where}: fields 'top_grid' and 'top_codebook_size' are given together or not at all"
        )
    elif top_grid is not None and (not _is_grid(top_grid) or not _is_codebook(top_k)):
        problems.append(
            f"{where}: 'top_grid' must be [H, W] and 'top_codebook_size' an int >= 2, "
            f"got {top_grid!r}, {top_k!r}"
        )
    names = card.get("class_names")
    if names is not None and not (
        isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    ):
        problems.append(f"{where}: field 'class_names' must be null or a non-empty list of strings")
    return problems


def _validate_recipe(card: Mapping[str, Any], where: str) -> list[str]:
    """`recipe` names the recipe verify recomputes quality with, or is null (a user's model)."""
    recipe = card["recipe"]
    if recipe is None or (isinstance(recipe, str) and recipe):
        return []
    return [f"{where}: field 'recipe' must be a string or null, got {recipe!r}"]


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
        if key not in card and key not in CODE_CARD_FIELDS:
            problems.append(f"{where}: missing field {key!r}")
    if problems:
        return problems
    if card["kind"] not in KIND_NAMES:
        return [f"{where}: field 'kind' is {card['kind']!r}, expected one of {sorted(KIND_NAMES)}"]
    kind = Kind(card["kind"])
    version: Any = card["format_version"]
    if not is_int(version) or version != CARD_FORMAT_VERSION:  # `true` and `1.0` equal 1 in Python
        problems.append(
            f"{where}: format_version must be {CARD_FORMAT_VERSION} (an integer: the server refuses "
            f"any other), got {version!r}"
        )
    if not isinstance(card["name"], str) or not NAME_PATTERN.match(card["name"]):
        problems.append(f"{where}: name {card['name']!r} must match {NAME_RULE}")
    elif card["name"] in RESERVED_NAMES:
        problems.append(f"{where}: name {card['name']!r} is the server's own grpc.health key, not a model's")
    if not isinstance(card["version"], str) or not VERSION_PATTERN.match(card["version"]):
        problems.append(f"{where}: version {card['version']!r} must be a positive integer string")
    if not isinstance(card["description"], str) or not card["description"].strip():
        problems.append(f"{where}: field 'description' must be a non-empty string")
    problems += _validate_tensor_list(card["inputs"], "inputs", where)
    problems += _validate_tensor_list(card["outputs"], "outputs", where)
    if not problems:
        names_in = [t["name"] for t in card["inputs"]]
        names_out = [t["name"] for t in card["outputs"]]
        declared = {"label": bool(card.get("class_names")), "top_codes": card.get("top_grid") is not None}
        wanted = list(kind.input_names) + [
            t.name for t in kind.optional_inputs if declared.get(t.name, False)
        ]
        if sorted(names_in) != sorted(wanted):
            problems.append(f"{where}: inputs {names_in} do not fit kind {kind} and its card ({wanted})")
        if sorted(names_out) != sorted(kind.output_names):
            problems.append(
                f"{where}: outputs {names_out} do not fit kind {kind} ({list(kind.output_names)})"
            )

    problems += _validate_kind_fields(card, where)
    problems += _validate_objects(card, where)
    problems += _validate_recipe(card, where)
    domains = card.get("domains")
    if kind.two_way and (
        not isinstance(domains, list)
        or len(domains) != 2
        or not all(isinstance(d, str) and d for d in domains)
        or domains[0] == domains[1]
    ):
        problems.append(f"{where}: field 'domains' must be two different names [A, B], got {domains!r}")
    if problem := activation_bytes_problem(card.get(ACTIVATION_BYTES_FIELD)):
        problems.append(f"{where}: field {ACTIVATION_BYTES_FIELD!r} {problem}")
    return problems


def check_thresholds(figures: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Every threshold in ``thresholds`` that ``figures`` misses (a missing figure fails too)."""
    failures = []
    for metric, bound in thresholds.items():
        value = figures.get(metric)
        if not is_number(value):
            failures.append(f"quality figure {metric!r} was not computed (threshold {dict(bound)})")
            continue
        if "min" in bound and value < bound["min"]:
            failures.append(f"quality {metric} = {value:.4g} is below the minimum {bound['min']}")
        if "max" in bound and value > bound["max"]:
            failures.append(f"quality {metric} = {value:.4g} is above the maximum {bound['max']}")
    return failures

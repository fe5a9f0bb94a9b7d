"""export/ and server/ read the model repository by one contract (genserve_contract): same kinds,
patterns, tolerances and config.json limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from server_support import fails_within

import genserve_contract
from genserve_contract import Kind
from genserve_contract.repository import read_regular_text
from genserve_export import card as export_card
from genserve_export import export as export_module
from genserve_export import verify as export_verify
from genserve_server import config as server_config
from genserve_server import loader, ort_session, repository

# Each case sits on one side of a limit (or breaks one rule); export and server must agree on all.
CONFIGS: list[dict[str, Any]] = [
    {"kind": "generator"},
    {"kind": "generator", "batching": {"max_batch_size": 4096, "max_queue_size": 4096}},
    {"kind": "generator", "batching": {"max_batch_size": 4097, "max_queue_size": 8192}},
    {"kind": "generator", "batching": {"max_batch_size": 8, "preferred_batch_sizes": [1, 8]}},
    {"kind": "generator", "batching": {"max_batch_size": 8, "preferred_batch_sizes": [1, 16]}},
    {"kind": "generator", "batching": {"max_batch_size": 64, "max_queue_size": 32}},
    {"kind": "generator", "batching": {"max_queue_delay_s": 1.0}},
    {"kind": "generator", "batching": {"max_queue_delay_s": 1.5}},
    {"kind": "generator", "batching": {"max_queue_delay_ms": 4.0}},
    {"kind": "generator", "batching": {"bulk_budget_s": 0}},
    {"kind": "generator", "batching": {"bulk_budget_s": 0.1, "bulk_idle_budget_s": 0.05}},
    {"kind": "generator", "batching": {"efficient_batch_tolerance": -1}},
    {"kind": "generator", "instances": 64},
    {"kind": "generator", "instances": 65},
    {"kind": "generator", "execution_providers": ["CPUExecutionProvider"]},
    {"kind": "generator", "execution_providers": ["MysteryExecutionProvider"]},
    {"kind": "generator", "precision": "fp8"},
    {"kind": "generator", "version_policy": {"specific": ["1", "3"]}},
    {"kind": "generator", "version_policy": {"specific": ["01"]}},
    {"kind": "generator", "version_policy": {"latest": 1, "specific": ["1"]}},
    {"kind": "generator", "runtime": {"graph_optimization": "most"}},
    {"kind": "generator", "runtime": {"cuda_graph": True}},
    {"kind": "super_resolution", "runtime": {"cuda_graph": True}},
    {"kind": "generator", "colour": "red"},
    {"kind": "gan"},
]


def server_problem(tmp_path: Path, config: dict[str, Any]) -> str | None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    try:
        server_config.load_model_config(path)
    except server_config.ConfigError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, separators=(",", ":")))
def test_export_and_server_accept_and_refuse_the_same_config_json(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    exported = export_card.validate_config(config, where="config.json")
    served = server_problem(tmp_path, config)
    assert [p.removeprefix("config.json: ") for p in exported] == ([] if served is None else [served])


def test_the_cases_cover_both_sides() -> None:
    verdicts = {bool(export_card.validate_config(c)) for c in CONFIGS}
    assert verdicts == {True, False}


@pytest.mark.parametrize("kind", list(Kind))
def test_what_export_writes_for_every_kind_the_server_reads_as_written(tmp_path: Path, kind: Kind) -> None:
    written = export_card.default_config(kind.value)
    assert server_problem(tmp_path, written) is None
    read = server_config.load_model_config(tmp_path / "config.json")
    assert read.kind is kind
    profile = kind.spec.export_batching
    assert read.batching.max_batch_size == profile["max_batch_size"]
    assert read.batching.max_queue_delay_s == profile["max_queue_delay_s"]
    assert read.batching.preferred_batch_sizes == tuple(profile["preferred_batch_sizes"])


def test_both_sides_use_the_contracts_patterns_tolerances_and_digest() -> None:
    assert export_card.NAME_PATTERN is repository.NAME_PATTERN is genserve_contract.NAME_PATTERN
    assert export_card.VERSION_PATTERN is repository.VERSION_PATTERN is genserve_contract.VERSION_PATTERN
    assert export_module.FP16_ATOL == ort_session.FP16_ATOL == ort_session.RuntimeConfig().fp16_atol
    assert export_module.FP32_ATOL == genserve_contract.FP32_ATOL
    assert export_verify.sha256_file is loader.sha256_file is genserve_contract.sha256_file
    assert tuple(server_config.KINDS) == genserve_contract.KIND_NAMES
    assert set(server_config.LATENT_KINDS) == {k for k in Kind if k.takes_latent}
    assert set(server_config.IMAGE_INPUT_KINDS) == {k for k in Kind if k.takes_image}
    assert set(server_config.SAMPLE_KINDS) == set(genserve_contract.SAMPLE_KINDS)


@pytest.mark.parametrize("special", ["a FIFO", "a character device"])
def test_the_contracts_readers_refuse_a_file_that_is_not_regular_naming_it_without_blocking(
    tmp_path: Path, special: str
) -> None:
    """A FIFO no one writes to blocks its reader forever and /dev/zero reads without end: in place of
    a model file, config.json or card.json, either hung `verify`, a server's start-up or its rescan."""
    path = tmp_path / "model.onnx"
    if special == "a FIFO":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    for read in (genserve_contract.sha256_file, read_regular_text):
        with pytest.raises(OSError) as excinfo, fails_within(30):
            read(path)
        assert excinfo.value.filename == str(path)
        assert excinfo.value.strerror == f"not a regular file ({special})"
    directory = tmp_path / "card.json"
    directory.mkdir()
    with pytest.raises(IsADirectoryError):
        read_regular_text(directory)


def test_every_kind_declares_its_tensors_and_properties_consistently() -> None:
    for kind in Kind:
        assert kind.inputs and kind.outputs
        # A kind's input is a latent, an image, a code grid or per-layer styles.
        assert [kind.takes_latent, kind.takes_image, kind.takes_codes, kind.styled].count(True) == 1
        # What answers Sample gives images; the style mapping only feeds its style generator.
        assert not kind.answers_sample or kind.image_output_name == "image"
        assert not kind.maps_latent or (kind.takes_latent and not kind.answers_sample)
        assert not set(kind.input_names) & {t.name for t in kind.optional_inputs}
        assert not kind.autoregressive or kind.takes_codes
        assert not kind.conditional or kind.takes_latent
        assert not kind.fully_convolutional or (kind.takes_image and kind.image_output_name == "output_image")
        assert not kind.tiled or kind.fully_convolutional
        assert Kind.parse(kind.value) is kind
    with pytest.raises(ValueError, match="unknown kind 'gan'; known kinds: generator"):
        Kind.parse("gan")


def test_the_contract_imports_no_torch_onnxruntime_or_protobuf() -> None:
    code = (
        "import sys, genserve_contract\n"
        "heavy = ('torch', 'onnxruntime', 'google.protobuf', 'grpc', 'numpy')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


ACTIVATION_VALUES: list[tuple[Any, bool]] = [
    ("absent", True),
    (None, True),
    (25.333, True),
    (4, True),
    (0, False),
    (-1.5, False),
    ("25", False),
    (True, False),
    (float("inf"), False),
    (float("nan"), False),
]


@pytest.mark.parametrize(("value", "valid"), ACTIVATION_VALUES, ids=lambda v: repr(v))
def test_activation_bytes_per_output_value_is_optional_and_both_sides_refuse_one_not_finite_and_positive(
    tmp_path: Path, value: Any, valid: bool
) -> None:
    """card.json's activation_bytes_per_output_value (export counts it, the server sizes working sets
    from it): a card without it (every card before it) stays valid; one that is not a finite number
    > 0 is refused by export's check and by the server's load alike, naming the field."""
    field = "activation_bytes_per_output_value"
    card = json.loads((Path(__file__).parents[2] / "models/sr-photos-x4/1/card.json").read_text())
    card.pop(field, None)
    if value != "absent":
        card[field] = value
    problems = export_card.validate_card(card)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    if valid:
        assert problems == []
        read = server_config.load_card(path)
        assert read.activation_bytes_per_output_value == (None if value in ("absent", None) else value)
    else:
        assert len(problems) == 1 and field in problems[0], problems
        with pytest.raises(server_config.ConfigError, match=field):
            server_config.load_card(path)


def test_a_card_named_as_the_servers_liveness_key_is_refused() -> None:
    """`liveness` matches NAME_PATTERN but is the server's own grpc.health key (a model's key is its
    name): the server skips such a directory, so export refuses the name rather than publish a
    model no server will serve."""
    validate_card = export_card.validate_card
    card = json.loads(
        (
            Path(__file__).resolve().parents[2] / "models" / "vae-digits-encoder" / "1" / "card.json"
        ).read_text()
    )
    assert validate_card(card) == []
    problems = validate_card({**card, "name": "liveness"})
    assert any("'liveness'" in p and "health" in p for p in problems), problems


W_AVG_VALUES = [
    (3.0e38, True),  # float32 holds it (its largest finite is 3.4028235e38)
    (-3.0e38, True),
    (1.0e39, False),  # finite as JSON's float64, infinite as the float32 truncation pulls toward
    (-1.0e39, False),
    (float("inf"), False),
]


@pytest.mark.parametrize(("value", "valid"), W_AVG_VALUES, ids=lambda v: repr(v))
def test_a_w_avg_value_float32_cannot_hold_is_refused_by_export_and_the_server_naming_the_field(
    tmp_path: Path, value: float, valid: bool
) -> None:
    """A style generator's w_avg is applied in float32 (style_sampling.truncate): a value finite in
    JSON but infinite as a float32 loaded READY, and then every Sample or MixStyles given a psi
    other than 1 failed INTERNAL 'the model's output is not finite ... a diverged or overflowing
    model', blaming the graph for the card. Both sides refuse it, naming the field."""
    card = json.loads((Path(__file__).parents[2] / "models/stylegan-digits/1/card.json").read_text())
    card["w_avg"][3] = value
    problems = export_card.validate_card(card)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    if valid:
        assert problems == []
        assert server_config.load_card(path).w_avg == tuple(card["w_avg"])
    else:
        assert len(problems) == 1 and "w_avg" in problems[0], problems
        with pytest.raises(server_config.ConfigError, match="w_avg") as excinfo:
            server_config.load_card(path)
        assert excinfo.value.field == "w_avg"


def test_export_and_the_server_hand_onnx_runtime_a_c_locale_path_by_one_rule() -> None:
    """Under a locale that is not UTF-8 a non-ASCII name's bytes are lone surrogates, which ONNX
    Runtime's binding refuses: both sides hand it the bytes decoded as UTF-8, by the contract's one
    helper; bytes that are not UTF-8 keep their surrogates."""
    from genserve_contract.runtime import ort_path
    from genserve_export import onnx_utils

    assert ort_session.ort_path is ort_path
    assert onnx_utils.ort_path is ort_path
    assert ort_path(Path("/srv/mod\udcc3\udca8les/model.onnx")) == "/srv/modèles/model.onnx"
    assert ort_path(Path("/srv/r\udce9sultats")) == "/srv/r\udce9sultats"


# One shipped card of each kind (every kind has one in models/).
CARD_OF_KIND = {
    kind: next(
        path
        for path in sorted((Path(__file__).parents[2] / "models").glob("*/1/card.json"))
        if json.loads(path.read_text())["kind"] == kind.value
    )
    for kind in Kind
}
CHANNELS_VALUES: list[Any] = [None, -1, 0, 1, 2, 3, 4, 5, 16, True, 2.5, "3"]


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_verify_and_the_servers_load_agree_on_a_cards_channels_for_every_kind(
    tmp_path: Path, kind: Kind
) -> None:
    """card.json's channels: the server's load reads an int in 1..4 for every kind (config.load_card;
    1 or 3 where the kind has an image output), and export's card check (genserve-export verify)
    looked at it only for kinds with an image, so a code_prior card of channels 5 (or 0, or "3")
    verified OK and never loaded. Over a sweep of values, what the load refuses, verify refuses,
    naming channels; what the load takes, verify takes, but where verify asks more than the load by
    design: a count for a kind with an image (the load reads null as 3, which verify could not check
    against the graph) and null for a style_mapping (docs/model-repository.md)."""
    card = json.loads(CARD_OF_KIND[kind].read_text())
    path = tmp_path / "card.json"
    has_image = kind.image_output_name is not None or kind.takes_image
    for value in CHANNELS_VALUES:
        card["channels"] = value
        path.write_text(json.dumps(card))
        problems = export_card.validate_card(card)
        assert all("'channels'" in p for p in problems), (value, problems)
        try:
            server_config.load_card(path)
        except server_config.ConfigError as exc:
            assert exc.field == "channels", (value, exc)
            assert problems, f"{kind}: channels {value!r} verifies, but the server's load refuses it: {exc}"
        else:
            stricter = (value is None) if has_image else (kind.maps_latent and value is not None)
            assert bool(problems) is stricter, f"{kind}: channels {value!r} loads, verify says {problems}"


def test_every_name_the_contract_package_exports_loads_from_the_module_it_is_mapped_to() -> None:
    """genserve_contract's names load on first use (PEP 562) from a map kept beside __all__ and the
    type checker's imports: a name in one list and not the other would be an AttributeError (or a
    name mypy sees that the package cannot give) only where it is first used."""
    import importlib

    import genserve_contract

    mapping = genserve_contract._MODULES
    assert set(mapping) == set(genserve_contract.__all__)
    for name, module in mapping.items():
        assert getattr(genserve_contract, name) is getattr(
            importlib.import_module(f"genserve_contract.{module}"), name
        ), name

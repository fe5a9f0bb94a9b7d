"""`genserve-export verify` passes a version exactly when the server would load it: a card or
config.json the server refuses at load (docs/model-repository.md) fails verify too, naming the model,
the file and the field, on a copy of a committed model damaged as an operator or a bad export could."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from genserve_export import verify_repository

MODELS = Path(__file__).resolve().parents[2] / "models"


def _copy(tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "models"
    for name in names:
        shutil.copytree(MODELS / name, root / name)
    return root


def _edit(path: Path, **fields: Any) -> None:
    """Set (or, given ..., remove) top-level fields of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in fields.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _verify_errors(root: Path) -> list[str]:
    report = verify_repository(root, recompute_quality=False)
    assert not report.ok, report.format()
    return [*report.errors, *(f"{m.name}/{m.version}: {e}" for m in report.models for e in m.errors)]


def _server_reason(root: Path, name: str) -> str:
    """Why the server's load refuses `name`'s version 1, else what it reports of the model (a
    config error: GetModel's reason); '' where neither."""
    pytest.importorskip("genserve_server")
    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    async def load() -> str:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            model = repo.models[name]
            mv = model.versions.get("1")
            if mv is None:
                return str(model.reason)
            return str(model.reason) if mv.state == ModelState.READY else mv.reason
        finally:
            await repo.close(2.0)

    return asyncio.run(load())


@pytest.mark.parametrize("value", [True, 1.0], ids=["true", "float"])
def test_a_card_format_version_the_server_refuses_fails_verify_naming_the_field(
    tmp_path: Path, value: object
) -> None:
    """`format_version: true` or `1.0` equals 1 in Python, but is no integer 1: the server refuses it."""
    name = "stylegan-digits-mapping"
    root = _copy(tmp_path, name)
    _edit(root / name / "1" / "card.json", format_version=value)
    assert "format_version must be 1" in _server_reason(root, name)
    errors = _verify_errors(root)
    named = [e for e in errors if f"{name}/1/card.json" in e and "format_version" in e]
    assert any(repr(value) in e for e in named), errors


def test_a_sampling_top_k_above_the_cards_codebook_size_fails_verify_naming_both(tmp_path: Path) -> None:
    """config.json's sampling.top_k may not exceed the card's codebook_size: the server's load
    refuses the version; verify, which read each file's fields on their own, passed it."""
    name = "vqvae-digits-top-prior"  # codebook_size 32
    root = _copy(tmp_path, name)
    _edit(root / name / "config.json", sampling={"temperature": 0.4, "top_k": 33})
    assert "sampling.top_k must be <= the card's codebook_size (32), got 33" in _server_reason(root, name)
    errors = _verify_errors(root)
    named = [e for e in errors if f"{name}/config.json" in e and "sampling.top_k" in e]
    assert any("codebook_size" in e and "32" in e and "33" in e for e in named), errors


def test_a_sampling_top_k_equal_to_the_cards_codebook_size_passes_verify_as_the_server_loads_it(
    tmp_path: Path,
) -> None:
    """top_k may be the codebook_size itself (every code kept): the server's load takes it, so verify
    passes it too (a check of `>=` refused a version the server serves)."""
    name = "vqvae-digits-top-prior"  # codebook_size 32
    root = _copy(tmp_path, name)
    _edit(root / name / "config.json", sampling={"temperature": 0.4, "top_k": 32})
    assert _server_reason(root, name) == ""
    report = verify_repository(root, recompute_quality=False)
    assert report.ok, report.format()


def test_a_style_generator_whose_config_names_no_mapping_fails_verify_naming_the_field(
    tmp_path: Path,
) -> None:
    """A style_generator's config.json must name its mapping: the server's load refuses the version
    without one; the contract's parser, which verify read config.json with, leaves it to the load."""
    name = "stylegan-digits"
    root = _copy(tmp_path, name)
    _edit(root / name / "config.json", mapping=...)
    assert "mapping is required for kind style_generator" in _server_reason(root, name)
    errors = _verify_errors(root)
    assert any(f"{name}/config.json" in e and "'mapping'" in e and "required" in e for e in errors), errors


def test_a_card_listing_more_classes_than_the_graph_takes_fails_verify_naming_class_names(
    tmp_path: Path,
) -> None:
    """One class_names entry more than the graph's embedding has rows: the server's load runs a row
    of the last class and refuses the version; verify ran random labels, which may miss the last."""
    name = "cgan-digits"  # 10 classes
    root = _copy(tmp_path, name)
    _edit(root / name / "1" / "card.json", class_names=[str(i) for i in range(11)])
    assert "class_names" in _server_reason(root, name)
    errors = _verify_errors(root)
    named = [e for e in errors if e.startswith(f"{name}/1: ") and "'class_names'" in e]
    assert any("model.onnx" in e and "label 10" in e and "11" in e for e in named), errors


@pytest.mark.parametrize(
    ("specific", "server_says"),
    [
        (["3"], "version_policy picks none of the version directories on disk (1)"),
        (["1", "3"], "version_policy's specific lists versions with no version directory on disk (3)"),
    ],
    ids=["picks-none", "names-a-missing-one"],
)
def test_a_version_policy_naming_a_version_not_on_disk_fails_verify_naming_it(
    tmp_path: Path, specific: list[str], server_says: str
) -> None:
    """The server serves nothing of a model whose `specific` picks no version directory, and reports
    a config error (GetModel's reason, genserve_model_config_error) where it names one not on disk."""
    name = "stylegan-digits-mapping"
    root = _copy(tmp_path, name)
    _edit(root / name / "config.json", version_policy={"specific": specific})
    assert server_says in _server_reason(root, name)
    errors = _verify_errors(root)
    named = [e for e in errors if f"{name}/config.json" in e and "version_policy" in e]
    assert any("'3'" in e and "no version directory" in e for e in named), errors

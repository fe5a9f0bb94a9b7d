"""The committed stubs in api/ are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True
    )
    for package in ("genserve", "inference"):
        fresh, committed = tmp_path / package, ROOT / "api" / package
        if not fresh.exists():
            assert not committed.exists(), f"api/{package} has no .proto left in protos/"
            continue
        fresh_files, committed_files = _tree(fresh), _tree(committed)
        assert fresh_files == committed_files, "stub files differ: run `make protos`"
        stale = [f for f in sorted(fresh_files) if not filecmp.cmp(fresh / f, committed / f, shallow=False)]
        assert not stale, f"stale stubs {stale}: run `make protos`"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _floors(pyproject: Path) -> dict[str, tuple[int, ...]]:
    """name -> the `>=` floor of each dependency that declares one."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found = (
        re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", d.split(";")[0].strip()) for d in dependencies
    )
    return {m.group(1): _version(m.group(2)) for m in found if m}


def test_declared_floors_are_what_the_stubs_check_at_import() -> None:
    """A protobuf older than the stubs' gencode (or a grpcio older than the grpc stubs) installs but
    fails at import with VersionError: every package that ships or imports stubs declares at least
    those versions."""
    api = ROOT / "api"
    gencode = max(
        _version(".".join(m))
        for p in api.rglob("*_pb2.py")
        for m in re.findall(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", p.read_text())
    )
    grpc_generated = max(
        _version(v)
        for p in api.rglob("*_pb2_grpc.py")
        for v in re.findall(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", p.read_text())
    )
    for package in ("api", "clients", "server"):
        floors = _floors(ROOT / package / "pyproject.toml")
        assert floors.get("protobuf", ()) >= gencode, f"{package}/pyproject.toml: protobuf>={gencode}"
        assert floors.get("grpcio", ()) >= grpc_generated, (
            f"{package}/pyproject.toml: grpcio>={grpc_generated}"
        )


def test_the_servers_grpcio_and_protobuf_floors_are_what_its_grpc_packages_require() -> None:
    """genserve's stubs check only grpcio>=1.81.1 (api/pyproject.toml); the server's higher floors
    come from grpcio-health-checking and grpcio-reflection, whose oldest declared version requires
    them (and whose own stubs check that grpcio at import), as server/pyproject.toml says."""
    import importlib.metadata

    floors = _floors(ROOT / "server" / "pyproject.toml")
    for package in ("grpcio-health-checking", "grpcio-reflection"):
        if _version(importlib.metadata.version(package)) != floors[package]:
            continue  # only the version at the floor says what the floor needs
        required = {
            m.group(1): _version(m.group(2))
            for r in importlib.metadata.requires(package) or []
            if (m := re.fullmatch(r"(grpcio|protobuf)\s*(?:<[^,]*,\s*)?>=\s*([0-9.]+)", r.strip()))
        }
        assert required == {"grpcio": floors["grpcio"], "protobuf": floors["protobuf"]}, (package, required)


def _proto_compat() -> Any:
    spec = importlib.util.spec_from_file_location("proto_compat", ROOT / "scripts" / "proto_compat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_is_wire_compatible_with_its_snapshot() -> None:
    """api/compat/descriptors.json is the API as released; refreshed on purpose only
    (`python scripts/proto_compat.py --write`)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "proto_compat.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _mutated(compat: Any, mutate: Callable[[Any], None]) -> list[str]:
    files = compat.committed_descriptors()
    by_name = {f.name: f for f in files}
    mutate(by_name)
    return list(
        compat.incompatibilities(compat.summarize(compat.committed_descriptors()), compat.summarize(files))
    )


def _message(files: Any, name: str) -> Any:
    return next(m for m in files["genserve/v1/genserve.proto"].message_type if m.name == name)


def _field(files: Any, message: str, name: str) -> Any:
    return next(f for f in _message(files, message).field if f.name == name)


def _service(files: Any) -> Any:
    return files["genserve/v1/genserve.proto"].service[0]


def _drop_field(files: Any, message: str, name: str) -> None:
    fields = _message(files, message).field
    fields.remove(_field(files, message, name))


def _drop_method(files: Any, name: str) -> None:
    _service(files).method.remove(next(m for m in _service(files).method if m.name == name))


def _drop_enum_value(files: Any, enum: str, name: str) -> None:
    values = next(e for e in files["genserve/v1/genserve.proto"].enum_type if e.name == enum).value
    values.remove(next(v for v in values if v.name == name))


def _drop_presence(field: Any) -> None:
    """`optional float x` -> `float x`: protoc leaves out the synthetic oneof too."""
    field.proto3_optional = False
    field.ClearField("oneof_index")


def _drop_message(files: Any, name: str) -> None:
    files["genserve/v1/genserve.proto"].message_type.remove(_message(files, name))


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (
            lambda f: _drop_field(f, "SampleRequest", "seeds"),
            "field genserve.v1.SampleRequest.seeds = 4: removed without `reserved 4;`",
        ),
        (
            lambda f: setattr(_field(f, "GetModelRequest", "version"), "number", 3),
            "field genserve.v1.GetModelRequest.version = 2: renumbered to 3",
        ),
        (
            lambda f: setattr(_field(f, "SampleRequest", "count"), "type", 5),  # TYPE_INT32
            "field genserve.v1.SampleRequest.count = 3: type TYPE_UINT32 -> TYPE_INT32",
        ),
        (
            lambda f: setattr(_field(f, "SampleRequest", "seeds"), "label", 1),  # LABEL_OPTIONAL
            "field genserve.v1.SampleRequest.seeds = 4: label LABEL_REPEATED -> LABEL_OPTIONAL",
        ),
        (
            lambda f: setattr(_field(f, "SampleRequest", "output"), "type_name", ".genserve.v1.Tensor"),
            "field genserve.v1.SampleRequest.output = 9: type_name .genserve.v1.OutputOptions"
            " -> .genserve.v1.Tensor",
        ),
        (
            lambda f: _drop_presence(_field(f, "StyleMix", "truncation_psi")),
            "field genserve.v1.StyleMix.truncation_psi = 4: proto3_optional True -> False",
        ),
        (
            lambda f: _field(f, "LatentPoint", "latent").ClearField("oneof_index"),
            "field genserve.v1.LatentPoint.latent = 2: oneof point -> -",
        ),
        (
            lambda f: setattr(_field(f, "ModelInfo", "kind"), "name", "kind_name"),
            "field genserve.v1.ModelInfo.kind = 2: renamed to kind_name",
        ),
        (lambda f: _drop_message(f, "StyleMix"), "message genserve.v1.StyleMix: removed"),
        (lambda f: _drop_method(f, "GetModel"), "method genserve.v1.GenerationService.GetModel: removed"),
        (
            lambda f: setattr(_service(f).method[0], "server_streaming", True),
            "method genserve.v1.GenerationService.Sample: server_streaming False -> True",
        ),
        (
            lambda f: _drop_enum_value(f, "ModelState", "MODEL_STATE_DRAINING"),
            "enum value genserve.v1.ModelState.MODEL_STATE_DRAINING = 4: removed",
        ),
    ],
)
def test_the_compat_guard_names_a_wire_incompatible_change(mutate: Callable[[Any], None], named: str) -> None:
    assert _mutated(_proto_compat(), mutate) == [named]


def _add_everything(files: Any) -> None:
    _message(files, "SampleRequest").field.add(name="extra", number=99, type=9, label=1)
    files["genserve/v1/genserve.proto"].message_type.add(name="NewMessage")
    _service(files).method.add(
        name="NewMethod", input_type=".genserve.v1.NewMessage", output_type=".genserve.v1.NewMessage"
    )
    next(e for e in files["genserve/v1/genserve.proto"].enum_type if e.name == "ModelState").value.add(
        name="MODEL_STATE_NEW", number=9
    )


def _remove_with_reserved(files: Any) -> None:
    _drop_field(files, "SampleRequest", "seeds")
    _message(files, "SampleRequest").reserved_range.add(start=4, end=5)
    _drop_enum_value(files, "ModelState", "MODEL_STATE_DRAINING")
    next(
        e for e in files["genserve/v1/genserve.proto"].enum_type if e.name == "ModelState"
    ).reserved_range.add(start=4, end=4)


@pytest.mark.parametrize("mutate", [lambda f: None, _add_everything, _remove_with_reserved])
def test_the_compat_guard_passes_additions_and_reserved_removals(mutate: Callable[[Any], None]) -> None:
    assert _mutated(_proto_compat(), mutate) == []


def test_the_compat_check_exits_1_naming_what_a_snapshot_has_and_the_api_lost(tmp_path: Path) -> None:
    snapshot = json.loads((ROOT / "api" / "compat" / "descriptors.json").read_text())
    snapshot["messages"]["genserve.v1.GetModelRequest"]["fields"]["3"] = {
        "name": "label",
        "type": "TYPE_STRING",
        "type_name": "",
        "label": "LABEL_OPTIONAL",
    }
    (tmp_path / "old.json").write_text(json.dumps(snapshot))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "proto_compat.py"), "--snapshot", str(tmp_path / "old.json")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "field genserve.v1.GetModelRequest.label = 3: removed without `reserved 3;`" in result.stderr
    assert "Traceback" not in result.stderr

"""The committed stubs in api/ are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
import tomllib
from pathlib import Path

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

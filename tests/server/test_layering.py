"""The serving core imports no protocol: grpc, protobuf and the generated stubs stay in the edge
modules, and the two servicers are siblings (docs/server.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import genserve_server

PACKAGE = Path(genserve_server.__file__).parent
# The gRPC edge: the two servicers, the boundary they share, and the server's wiring and admission.
EDGE = {"service", "kserve", "kserve_tensors", "kserve_metadata", "boundary", "main", "health", "probe"}
EDGE |= {"accept", "limits", "admission", "security", "service_codes", "service_parts", "service_styles"}
EDGE |= {"wire"}  # a large response's protobuf bytes, built off the event loop
PROTOCOL_PACKAGES = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "genserve")
SERVICERS = ("service", "kserve")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_protocol(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PROTOCOL_PACKAGES)


def test_no_core_module_imports_grpc_protobuf_or_the_generated_stubs() -> None:
    core = sorted(p for p in PACKAGE.glob("*.py") if p.stem not in EDGE)
    assert {p.stem for p in core} >= {
        "core",
        "validate",
        "encoding",
        "batcher",
        "runner",
        "batch_keys",
        "errors",
    }
    offenders = {
        p.stem: sorted(n for n in imported_modules(p) if _is_protocol(n))
        for p in core
        if any(_is_protocol(n) for n in imported_modules(p))
    }
    assert not offenders, f"core modules importing a protocol: {offenders}"


def test_the_two_servicers_are_siblings() -> None:
    for servicer in SERVICERS:
        imports = imported_modules(PACKAGE / f"{servicer}.py")
        others = [f"genserve_server.{other}" for other in SERVICERS if other != servicer]
        assert not imports & set(others), f"{servicer}.py imports {sorted(imports & set(others))}"


def test_the_check_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import grpc\n\ndef f():\n    from genserve.v1 import types_pb2\n")
    assert {n for n in imported_modules(sample) if _is_protocol(n)} == {
        "grpc",
        "genserve.v1",
        "genserve.v1.types_pb2",
    }

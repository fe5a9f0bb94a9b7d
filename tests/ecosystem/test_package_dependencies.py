"""Each installable package declares what its code imports.

A `pip install` of one package brings only its declared dependencies (and theirs): an import of a
distribution the package does not name works only while some other package happens to bring it.
Every absolute import in api/, server/, clients/ and export/ (module level or inside a function;
not under `if TYPE_CHECKING:`, which never runs)
that is not the standard library or the package itself must name a distribution in its
pyproject.toml's dependencies or extras; the module -> distribution map is the dev venv's.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from ecosystem_helpers import ROOT

PACKAGES = {"api": ("genserve", "genserve_contract"), "server": ("genserve_server",),
            "clients": ("genserve_client",), "export": ("genserve_export",)}  # fmt: skip


def _is_type_checking(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) block: its imports are the type checker's."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(sources: list[Path]) -> dict[str, str]:
    """Top-level module -> one place that imports it."""
    found: dict[str, str] = {}
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {  # the block's body, not its `else:`, which runs
            id(n)
            for block in ast.walk(tree)
            if _is_type_checking(block)
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:  # never imported at run time (typeshed's _typeshed, say)
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _declared(package: str) -> set[str]:
    project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_distribution_a_package_imports_is_a_declared_dependency(package: str) -> None:
    own = PACKAGES[package]
    sources = [p for top in own for p in (ROOT / package / top).rglob("*.py")]
    distributions = importlib.metadata.packages_distributions()
    declared = _declared(package)
    undeclared = {}
    for module, where in _imported_modules(sources).items():
        if module in sys.stdlib_module_names or module in own or module == "__future__":
            continue
        candidates = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not candidates & declared:
            undeclared[module] = (sorted(candidates), where)
    assert not undeclared, f"{package}/pyproject.toml does not declare: {undeclared}"


def test_the_server_reports_the_version_its_package_is_built_as() -> None:
    """KServe's ServerMetadata and the provenance of every response report SERVER_VERSION, while
    genserve_build_info reads the installed genserve-server's version, built from server/pyproject.toml:
    two copies of one number, which a release must change together."""
    from genserve_server.version import SERVER_VERSION

    built = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]["version"]
    assert SERVER_VERSION == built, "server/genserve_server/version.py and server/pyproject.toml differ"


@pytest.mark.parametrize(
    ("folder", "module"), [("clients", "genserve_client"), ("export", "genserve_export")]
)
def test_a_tool_reports_the_version_its_package_is_built_as(folder: str, module: str) -> None:
    """`genserve-client --version` and `genserve-export --version` fall back to the package's
    __version__ where it is not installed (a checkout on PYTHONPATH): the number its pyproject.toml
    builds, which a release must change together."""
    import importlib

    built = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.import_module(module).__version__ == built

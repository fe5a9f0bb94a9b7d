"""The `>>>` examples in the docstrings of the server, client and export packages run, and say what
the code answers: pytest is not run with --doctest-modules (that would import every module of the
export package, torch included), so each module that has an example is run here with doctest.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The directory each installable package sits in, and the package.
PACKAGES = {"server": "genserve_server", "clients": "genserve_client", "export": "genserve_export"}


def _example_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith(">>>"))


def _modules_with_examples() -> list[tuple[str, int]]:
    """(dotted module name, number of `>>>` lines) of each module of the three packages that has one."""
    found = []
    for top, package in PACKAGES.items():
        for path in sorted((ROOT / top / package).rglob("*.py")):
            lines = _example_lines(path)
            if lines:
                module = ".".join(path.relative_to(ROOT / top).with_suffix("").parts)
                found.append((module.removesuffix(".__init__"), lines))
    return found


MODULES = _modules_with_examples()


def test_the_packages_have_docstring_examples_to_run() -> None:
    # The scan itself: a layout change that finds nothing would pass every case below by having none.
    assert "genserve_server.metrics" in {module for module, _ in MODULES}


@pytest.mark.parametrize(("module_name", "example_lines"), MODULES, ids=[m for m, _ in MODULES])
def test_docstring_examples_answer_what_they_show(module_name: str, example_lines: int) -> None:
    module = importlib.import_module(module_name)
    results = doctest.testmod(module, report=True)
    # Every `>>>` line is an example doctest found (one in a nested function's docstring, or in a
    # comment, is not run by testmod: it would be an example nobody checks).
    assert results.attempted == example_lines, (
        f"{module_name}: {example_lines} '>>>' lines, doctest ran {results.attempted}"
    )
    assert results.failed == 0, f"{module_name}: {results.failed} docstring example(s) wrong (output above)"

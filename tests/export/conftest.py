"""Shared fixtures for the export tests: torch on one thread, quiet ONNX Runtime."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("genserve_export")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~30 s")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # The 2-core machines are shared with training jobs.
    torch.set_num_threads(1)

"""Fixtures of the monitoring tests: one genserve-server with metrics on a tiny model repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from monitoring_support import MonitoredServer, start_server, write_tiny_repository


@pytest.fixture(scope="session")
def monitoring_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repository(tmp_path_factory.mktemp("monitoring-models"))


@pytest.fixture(scope="session")
def monitored_server(
    monitoring_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MonitoredServer]:
    """A genserve-server on 127.0.0.1 with /metrics on an OS-chosen port. Shared by the monitoring
    tests, which assert on deltas between scrapes, never on absolute counts."""
    server = start_server(monitoring_models, tmp_path_factory.mktemp("monitored-server"))
    try:
        yield server
    finally:
        server.stop()

"""Shared fixtures: tiny model repository and a real genserve server subprocess on 127.0.0.1:0."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import port_support
import pytest
from server_support import ServerProcess, build_tiny_repo, healthy_models, start_server

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = REPO_ROOT / "models"
TEMP = Path(tempfile.gettempdir())


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one tiny ONNX graph of every kind (+ slow and broken models)."""
    return build_tiny_repo(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server over the tiny repository, shared by the integration tests."""
    # tiny-broken fails on purpose: the server is SERVING for every other model (health.py).
    server = start_server(
        tiny_repo, tmp_path_factory.mktemp("tiny-server"), extra_args=healthy_models(tiny_repo)
    )
    yield server
    server.stop()


@pytest.fixture
def idle_port() -> Iterator[int]:
    """A 127.0.0.1 port where nothing listens, nor can for the whole test: connections are refused
    (gRPC: UNAVAILABLE). Not a port found free and let go, which the other worker's servers could
    take meanwhile (port_support)."""
    with port_support.refused_port() as port:
        yield port


@pytest.fixture
def server_port() -> Iterator[int]:
    """A 127.0.0.1 port kept for the servers the test starts on it (one after another: a restart on
    the same port) and for no one else, from before the first starts to the test's end: refused
    while none of them listens (port_support)."""
    with port_support.reserved_port() as port:
        yield port


def _free_disk(path: Path) -> str:
    return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB"


def pytest_report_header(config: pytest.Config) -> str:
    """Free disk where tests write: a disk that fills mid-run fails every later tmp_path as an error."""
    return f"free disk: {_free_disk(TEMP)} in the temp folder, {_free_disk(REPO_ROOT)} in the checkout"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"free disk at the end: {_free_disk(TEMP)} in the temp folder")

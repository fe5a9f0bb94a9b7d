"""Shared fixtures for the export tests: torch on one thread, quiet ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("genserve_export")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~30 s")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # The 2-core machines are shared with training jobs.
    torch.set_num_threads(1)


@pytest.fixture
def quality_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The batch sizes of each graph's runs in verify's quality figures (not its checks' runs), by
    the graph's name: ``<entry>`` for a model.onnx, ``<entry>/<file>`` for an auxiliary graph."""
    from genserve_export import verify

    names: dict[int, str] = {}  # the sessions verify loads, by id
    runs: dict[str, list[int]] = {}
    checking = []
    plain_session, plain_run = verify.session, verify.run_session
    plain_checks, plain_last_class = verify._check_runs, verify._last_class_problems

    def named_session(path: Path, threads: int = 1) -> Any:
        sess = plain_session(path, threads)
        names[id(sess)] = path.parent.parent.name + ("" if path.name == "model.onnx" else f"/{path.name}")
        return sess

    def counted_run(sess: Any, feeds: Any) -> Any:
        if not checking:
            runs.setdefault(names[id(sess)], []).append(len(next(iter(feeds.values()))))
        return plain_run(sess, feeds)

    def not_counted(check: Any) -> Any:
        def run(*args: Any) -> Any:
            checking.append(True)
            try:
                return check(*args)
            finally:
                checking.pop()

        return run

    monkeypatch.setattr(verify, "session", named_session)
    monkeypatch.setattr(verify, "run_session", counted_run)
    # verify's checks run graphs too (random rows; a row of the card's last class): not figures
    monkeypatch.setattr(verify, "_check_runs", not_counted(plain_checks))
    monkeypatch.setattr(verify, "_last_class_problems", not_counted(plain_last_class))
    return runs

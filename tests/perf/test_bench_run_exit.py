"""bench.run's exit code and README: a run whose levels failed is no result to publish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.common import DEFAULT_MODELS, find_models


class _Server:
    def __init__(self, name: str) -> None:
        self.name, self.pid, self.port, self.target = name, 1, 1, "127.0.0.1:1"

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_run_whose_levels_all_failed_exits_non_zero_and_leaves_the_readme(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Every call refused (a model that does not load, a server out of memory): bench.run printed a
    # table of "–", rewrote bench/README.md's results with it and exited 0, so `make bench` passed.
    model = next(m for m in find_models(DEFAULT_MODELS) if m.name == "dcgan-digits")
    raw = {
        "model": model.name,
        "kind": str(model.kind),
        "input_shapes": {"z": [100]},
        "max_batch_size": 64,
        "points": [{"batch": 1, "images_per_s": 9000.0, "latency_p50_ms": 0.11, "ms_per_image": 0.11}],
        "concurrent_points": [],
    }
    readme = tmp_path / "README.md"
    monkeypatch.setattr(run, "assemble_repository", lambda *a: tmp_path)
    monkeypatch.setattr(run, "find_models", lambda repo: [model])
    monkeypatch.setattr(run.raw_limit, "measure_model", lambda m, duration_s: raw)
    monkeypatch.setattr(run, "client_bench", lambda *a, **k: {})
    monkeypatch.setattr(run.ServerProcess, "genserve", classmethod(lambda cls, repo: _Server("genserve")))
    monkeypatch.setattr(run.ServerProcess, "naive", classmethod(lambda cls, repo: _Server("naive")))
    monkeypatch.setattr(run.ServerProcess, "naive_sync", classmethod(lambda cls, repo: _Server("naive-sync")))

    def refused(server: Any, name: str, c: int, *a: Any, **k: Any) -> dict[str, Any]:
        raise run.BenchError(f"{server.name} {name} c={c}: 10 of 10 requests failed (UNAVAILABLE x10)")

    monkeypatch.setattr(run, "measured_level", refused)
    monkeypatch.setattr(run, "update_readme", lambda path, table: readme.write_text(table))
    out = tmp_path / "out.json"
    code = run.main(["--quick", "--no-priority", "--out", str(out)])
    assert code != 0
    assert out.exists()  # what was measured (the raw limit, the failures) is still written
    assert not readme.exists()  # a failed run does not replace the published figures

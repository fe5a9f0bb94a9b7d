"""The benchmark's own files (bench.common.write_json's results, bench.naive_server's ready file):
whole when read, and two writers at once each rename a file of their own."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import common


def _another_writer_before_the_first_renames(
    monkeypatch: pytest.MonkeyPatch, write_other: Callable[[], object]
) -> None:
    """os.replace runs `write_other` (the other writer, whole) once, before the first writer's rename."""
    real_replace = os.replace
    calls: list[object] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(src)
        if len(calls) == 1:
            write_other()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_two_runs_writing_one_results_file_at_once_each_rename_a_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_json staged as `<out>.tmp`: a second run with the same --out truncated and renamed the
    file the first was about to rename, and the first, its rounds measured, failed with
    FileNotFoundError (or renamed the other's half-written file into place)."""
    out = tmp_path / "results" / "bench.json"
    _another_writer_before_the_first_renames(monkeypatch, lambda: common.write_json(out, {"run": 2}))
    common.write_json(out, {"run": 1})
    assert json.loads(out.read_text()) == {"run": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]  # nothing staged left

"""The benchmark's own files (bench.common.write_json's results, bench.naive_server's ready file):
whole when read, and two writers at once each rename a file of their own."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import common, naive_server


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


def test_two_naive_servers_ready_files_that_differ_in_suffix_only_do_not_share_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The naive server staged its ready file as ready_file.with_suffix(".tmp"): `run.json` and
    `run.ready` (two servers started at once in one folder) both went through `run.tmp`: one failed
    (FileNotFoundError), or renamed the other's port into its own ready file."""
    first, other = tmp_path / "run.json", tmp_path / "run.ready"
    _another_writer_before_the_first_renames(monkeypatch, lambda: naive_server._write_ready(other, 2222))
    naive_server._write_ready(first, 1111)
    assert json.loads(first.read_text())["port"] == 1111
    assert json.loads(other.read_text())["port"] == 2222
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.ready"]

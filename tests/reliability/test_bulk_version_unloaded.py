"""A bulk job (the CLI's `bulk`) against a real server under faults between its chunks."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from reliability_support import copy_version_atomically, write_gen
from server_support import start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve_client import GenserveClient
from genserve_client import bulk as bulk_module
from genserve_client.bulk import BulkJob, read_manifest
from genserve_client.cli import main


def test_a_reload_that_unloads_the_pinned_version_mid_job_stops_it_as_a_resume_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job pins version 1; after its first chunk a reload serves version 2 (version_policy
    # latest 1: version 1 drains and unloads). The job must not mix versions, and it must stop the
    # way docs/client.md says a resume refuses a model the server no longer serves: exit 2, naming
    # both versions, and no "resumable" hint whose command would only fail the same way.
    monkeypatch.setattr(bulk_module, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(bulk_module, "BACKOFF_MAX_S", 0.2)
    repo = tmp_path / "models"
    write_gen(repo)
    write_gen(tmp_path / "staging", version="2", seed=1)
    server = start_server(repo, tmp_path / "server", config={"warmup": False, "drain_grace_s": 30})
    out = tmp_path / "job"
    write_chunk = BulkJob._write_chunk
    reloaded: list[bool] = []

    def served(version: str) -> bool:
        with GenserveClient(server.target) as client:
            info = client.get_model("gen")
        return any(v.version == version and v.state == pb.MODEL_STATE_READY for v in info.versions)

    def write_then_reload(self: BulkJob, chunk: Any, sink: Any) -> None:
        write_chunk(self, chunk, sink)
        if not reloaded:
            reloaded.append(True)
            copy_version_atomically(repo / "gen", "2", "2", tmp_path / "staging" / "gen")
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: served("2"), 30, "version 2 READY")

    monkeypatch.setattr(BulkJob, "_write_chunk", write_then_reload)
    try:
        # One chunk per stream: the job opens its next stream after the reload.
        rc = main(
            [
                "--target", server.target, "bulk", "--model", "gen", "--n", "32", "--chunk-size", "8",
                "--stream-images", "8", "--retry-window", "20", "--out", str(out),
            ]
        )  # fmt: skip
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert reloaded
    entries, _ = read_manifest(out / "manifest.jsonl")
    assert entries and {e["version"] for e in entries} == {"1"}  # nothing of version 2 was written
    assert rc == 2, err
    assert "version 1" in err and "2 (READY)" in err, err
    assert "resumable" not in err, err
    shutil.rmtree(tmp_path / "staging")

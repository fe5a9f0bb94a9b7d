"""Bulk jobs against a real server that refuses some of their streams (RESOURCE_EXHAUSTED at its
max_concurrent_sample_streams): the job must go on while the server serves it, not give up."""

from __future__ import annotations

import time
from pathlib import Path

from reliability_support import write_slow
from server_support import running_server

from genserve_client import GenserveClient
from genserve_client.bulk import BulkJob, BulkParams, read_manifest
from genserve_client.cli import BULK_RETRY

MODEL = "gen"


def test_a_job_with_more_workers_than_stream_slots_finishes_while_it_progresses(tmp_path: Path) -> None:
    """--concurrency 2 against max_concurrent_sample_streams=1 (or 16 shards of 8 workers against the
    default 64): the worker that holds the slot opens its next stream the moment its last one ends,
    so the refused worker rarely finds the slot free. The job progresses the whole time, so the
    retry window (the time *without progress*) must not run out and stop it."""
    repo = tmp_path / "models"
    write_slow(repo, MODEL, iterations=10_000)  # ~0.1 s an image: each stream holds its slot a while
    out = tmp_path / "job"
    one_slot = {"limits": {"max_concurrent_sample_streams": 1}}
    with running_server(repo, tmp_path / "work", config=one_slot) as server:
        with GenserveClient(server.target, retry=BULK_RETRY) as client:
            job = BulkJob(
                client,
                BulkParams(MODEL, n=64, base_seed=5),
                out,
                concurrency=2,
                chunk_size=1,
                stream_images=4,
                retry_window_s=3.0,
            )
            started = time.monotonic()
            job.run()  # 64 images x ~0.1 s: several s of steady progress, far beyond the 3 s window
            assert time.monotonic() - started > 3.0
    entries = read_manifest(out / "manifest.jsonl")[0]
    assert sorted(int(e["index"]) for e in entries) == list(range(64))

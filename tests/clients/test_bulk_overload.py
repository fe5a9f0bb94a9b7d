"""Bulk jobs against a real server that refuses some of their streams (RESOURCE_EXHAUSTED at its
max_concurrent_sample_streams): the job must go on while the server serves it, not give up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from client_fakes import FakeService
from server_support import TINY_LATENT, running_server, slow_generator_graph, write_model

from genserve.v1 import genserve_pb2_grpc
from genserve_client import GenserveClient, RetryPolicy
from genserve_client.bulk import BulkJob, BulkParams, read_manifest
from genserve_client.cli import BULK_RETRY

MODEL = "gen"
STREAM_HOLD_S = 0.3


def test_a_job_with_more_workers_than_stream_slots_finishes_while_it_progresses(tmp_path: Path) -> None:
    """--concurrency 2 against max_concurrent_sample_streams=1 (or 16 shards of 8 workers against the
    default 64): the worker that holds the slot opens its next stream the moment its last one ends,
    so the refused worker rarely finds the slot free. The job progresses the whole time, so the
    retry window (the time *without progress*) must not run out and stop it."""
    repo = tmp_path / "models"
    # Each stream holds its slot a while, the same on any machine: its 4 rows wait out the queue
    # delay for a batch of 8 that never fills (one stream at a time), so the 16 streams of the job
    # take 4.8 s at least. (A model slow by its compute, 64 images in 6 s on a busy 2-core VM, ran
    # the job in 2.4 s when made twice as fast: on a faster machine the job ended inside the window.)
    write_model(
        repo,
        MODEL,
        "generator",
        slow_generator_graph(TINY_LATENT, 100),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={
            "batching": {
                "max_batch_size": 8,
                "preferred_batch_sizes": [8],
                "max_queue_delay_s": STREAM_HOLD_S,
                "max_queue_size": 8,
            }
        },
    )
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
            job.run()  # 16 streams x STREAM_HOLD_S: steady progress, far beyond the 3 s window
            assert time.monotonic() - started > 3.0
    entries = read_manifest(out / "manifest.jsonl")[0]
    assert sorted(int(e["index"]) for e in entries) == list(range(64))


class OneSlotService(FakeService):
    """One SampleStream at a time, as a server at max_concurrent_sample_streams=1 serves them: the
    stream holding the slot sends a chunk every CHUNK_S; any other is refused RESOURCE_EXHAUSTED."""

    CHUNK_S = 0.1

    def __init__(self) -> None:
        super().__init__()
        self._slot = threading.Lock()
        self.refused = 0

    def SampleStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if not self._slot.acquire(blocking=False):
            self.refused += 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_concurrent_sample_streams (1) reached")
        try:
            for chunk in super().SampleStream(request, context):
                time.sleep(self.CHUNK_S)
                yield chunk
        finally:
            self._slot.release()


def test_a_worker_refused_for_longer_than_the_window_goes_on_while_the_job_progresses(tmp_path: Path) -> None:
    """The test above cannot tell the window's clock: its workers take turns at the slot within a
    second or two, so a window run from the refused stream's own last chunk (the defect) never runs
    out there either. Here the first worker holds the only slot for a whole range (32 chunks, 3.2 s),
    longer than the 2 s window, while the second is refused all that time: the job progresses (a
    chunk every 0.1 s), so the second worker must wait on and stream its range after."""
    service = OneSlotService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(service, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    out = tmp_path / "job"
    try:
        # No retries of the client's own: each refusal reaches the job's retry window at once.
        with GenserveClient(target, retry=RetryPolicy(max_attempts=1)) as client:
            BulkJob(
                client,
                BulkParams("fake-gen", n=64, base_seed=5),
                out,
                concurrency=2,
                chunk_size=1,
                stream_images=32,
                retry_window_s=2.0,
            ).run()
    finally:
        server.stop(grace=None)
    assert service.refused >= 2  # the second worker was refused, and retried, while the first streamed
    entries = read_manifest(out / "manifest.jsonl")[0]
    assert sorted(int(e["index"]) for e in entries) == list(range(64))

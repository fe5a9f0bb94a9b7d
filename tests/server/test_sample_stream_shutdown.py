"""A SampleStream that ends early inside the server (a shutdown, GenerationCore.begin_shutdown, or a
failed chunk): what the chunks computed ahead of the one being sent count as when they are dropped."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import write_tiny_generator

from genserve.v1 import types_pb2 as tpb
from genserve_server import validate
from genserve_server.batcher import Lane
from genserve_server.config import ServerConfig
from genserve_server.core import STREAM_CHUNKS_AHEAD, Call, GenerationCore
from genserve_server.errors import Internal, Unavailable
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository

CHUNK = 1  # one-row chunks in batches of one: the first batch is the first chunk


@pytest.mark.parametrize("ends_by", ["shutdown", "failed_chunk"])
def test_chunks_ahead_dropped_when_a_stream_ends_are_not_counted_as_a_cancelled_caller(
    tmp_path: Path, ends_by: str
) -> None:
    """At a shutdown the stream sends the chunk in flight and ends UNAVAILABLE (counted as
    rejected{not_ready}); when a chunk fails, the stream ends with its error. Either way the chunks
    computed ahead leave the queue, and they were cancelled as if their caller had gone away:
    genserve_requests_dropped_total{reason="cancelled"} rose though the client was still reading."""
    write_tiny_generator(
        tmp_path,
        config={"instances": 1, "batching": {"max_batch_size": CHUNK, "max_queue_delay_ms": 0.0}},
    )

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=True)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        core = GenerationCore(repo, config, metrics, pool)
        out = validate.output_spec(tpb.IMAGE_FORMAT_RAW_UINT8, 0, None, False)
        call = Call("SampleStream", "test", time.monotonic(), metrics.unresolved())
        try:
            mv = core.resolve(call, "gen", "", ("generator",), "SampleStream")
            batcher = mv.batcher
            assert batcher is not None
            gate, computing = asyncio.Event(), asyncio.Event()
            run_batch = batcher._run_batch

            async def held_once(key: Any, inputs: Any) -> Any:
                if not computing.is_set():
                    computing.set()
                    await gate.wait()
                    if ends_by == "failed_chunk":
                        raise RuntimeError("boom")
                return await run_batch(key, inputs)

            batcher._run_batch = held_once
            batcher._run_bulk_batch = held_once
            chunks = core.sample_range(
                mv, call, 0, 100, 0, CHUNK, np.zeros(0, np.int64), None, out, Lane.BULK
            )
            first = asyncio.ensure_future(anext(chunks))
            await computing.wait()
            while batcher.queued_rows < STREAM_CHUNKS_AHEAD * CHUNK:  # the chunks ahead queued
                await asyncio.sleep(0.001)
            if ends_by == "shutdown":
                core.begin_shutdown()
                while batcher.queued_rows:  # the chunks ahead leave the queue
                    await asyncio.sleep(0.001)
                gate.set()
                start, seeds, _, _ = await first
                assert (start, seeds) == (0, [0])
                with pytest.raises(Unavailable, match=f"start_index={CHUNK}"):
                    await anext(chunks)
            else:
                gate.set()
                with pytest.raises(Internal):
                    await first
                while batcher.queued_rows:  # the chunks ahead leave the queue
                    await asyncio.sleep(0.001)
        finally:
            if call.stream_batcher is not None:
                call.stream_batcher.release(stream=True)
            await repo.close(1)
            pool.shutdown()
        labels = {"model": "gen", "version": "1"}
        dropped = {
            reason: metrics.registry.get_sample_value(
                "genserve_requests_dropped_total", {**labels, "reason": reason}
            )
            for reason in ("cancelled", "deadline")
        }
        assert dropped == {"cancelled": 0, "deadline": 0}

    asyncio.run(asyncio.wait_for(main(), 60))

"""SuperResolve's working-set estimate (tiling.working_set_bytes, held against sr_working_set_bytes)
against what the request really allocates: the Python/numpy bytes traced by tracemalloc around
GenerationCore.upscale on a real loaded model, less the encoded response (the response budget holds
those). ONNX Runtime's own buffers are not traced: the estimate must bound the traced bytes alone."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import super_resolution_graph, write_model

from genserve.v1 import types_pb2 as tpb
from genserve_server import tiling, validate
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository

RAW, PNG, TENSOR = tpb.IMAGE_FORMAT_RAW_UINT8, tpb.IMAGE_FORMAT_PNG, tpb.IMAGE_FORMAT_TENSOR_F32

# (images, height, width, tile_size, tile_overlap, format)
CASES = [
    (1, 256, 256, 64, 8, RAW),
    (1, 240, 200, 48, 8, PNG),
    (1, 256, 256, 32, 8, RAW),
    (2, 160, 160, 64, 8, RAW),
    (1, 200, 200, 64, 8, TENSOR),
    (3, 120, 120, 1024, 0, RAW),  # one tile an image: no blend
]


@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_the_working_set_estimate_bounds_what_a_super_resolve_allocates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_batch_size: int
) -> None:
    """The estimate counted every tile's input and output, intermediates for one batch of tiles and
    the blend canvases, but not the decoded input nor the encode's copies of the output image (a
    float32 scaled copy and two uint8 ones, each as large as the image): with a small batch the
    allocations measured at the encode were 1.2-1.5x the estimate held against sr_working_set_bytes."""
    write_model(
        tmp_path,
        "sr",
        "super_resolution",
        super_resolution_graph(2),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "size_multiple": 1,
            "tile_size": 96,
            "tile_overlap": 8,
            "min_size": 4,
        },
        config={
            "batching": {"max_batch_size": max_batch_size, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}
        },
    )
    estimates: list[int] = []
    real_estimate = tiling.working_set_bytes

    def recording(*args: Any, **kwargs: Any) -> int:
        estimates.append(real_estimate(*args, **kwargs))
        return estimates[-1]

    monkeypatch.setattr(tiling, "working_set_bytes", recording)
    rng = np.random.default_rng(0)

    async def main() -> list[tuple[Any, int, int]]:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(2)
        core = GenerationCore(repo, config, metrics, pool)
        measured = []
        try:
            for case in CASES:
                n, h, w, tile, overlap, fmt = case
                image = tpb.Image(
                    format=RAW,
                    data=rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes(),
                    shape=[h, w, 3],
                )
                out = validate.output_spec(fmt, 0, None, False)
                call = Call("SuperResolve", "test", time.monotonic(), metrics.unresolved())
                mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
                estimates.clear()
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    upscaled = await core.upscale(mv, call, [image] * n, tile, overlap, out)
                    peak = tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()
                    if call.batcher is not None:
                        call.batcher.release()
                response = sum(len(im.data) for im in upscaled.images)
                assert len(estimates) == 1
                measured.append((case, peak - response, estimates[0]))
        finally:
            await repo.close(1)
            pool.shutdown()
        return measured

    measured = asyncio.run(asyncio.wait_for(main(), 120))
    over = [
        (case, real, estimate, round(real / estimate, 2))
        for case, real, estimate in measured
        if real > estimate
    ]
    assert not over, f"allocated more than the working-set estimate: {over}"

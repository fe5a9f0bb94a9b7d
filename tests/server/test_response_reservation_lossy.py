"""The response budget's reservation for JPEG and WebP (validate.predicted_send_size: their raw
pixels, "smaller in practice", docs/operations.md) against the real serialized size of a Sample
response built as the servicer builds it (service_parts.add_generated, ByteSize), for generators of
several shapes: the reservation must not be below the response it stands for before compute."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from server_support import generator_graph, write_model

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb
from genserve_server import validate
from genserve_server.batcher import Lane
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.service_parts import add_generated

JPEG, WEBP = tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_WEBP


@pytest.mark.parametrize(("fmt", "quality"), [(JPEG, 100), (JPEG, 90), (WEBP, 100)])
@pytest.mark.parametrize(("channels", "side"), [(1, 8), (1, 28), (1, 64), (3, 8)])
def test_the_reservation_of_a_jpeg_or_webp_sample_bounds_its_response(
    tmp_path: Path, fmt: int, quality: int, channels: int, side: int
) -> None:
    """JPEG and WebP responses were held at their raw pixels until they existed: a Sample(count=256)
    of a 64x64 gray generator in JPEG at quality 100 reserved 1.1 MB and was 1.7 MB (1.56x); of an
    8x8 one 82 KB for 118 KB: the budget admitted that much more than it holds while they compute."""
    write_model(
        tmp_path,
        "gen",
        "generator",
        generator_graph(16, channels, side, side),
        {"latent_dim": 16, "channels": channels, "image_size": [side, side]},
        config={"batching": {"max_batch_size": 64, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}},
    )
    n = 256

    async def main() -> tuple[int, int]:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(2)
        core = GenerationCore(repo, config, metrics, pool)
        try:
            call = Call("Sample", "test", time.monotonic(), metrics.unresolved())
            call.unary = True
            mv = core.resolve(call, "gen", "", ("generator",), "Sample")
            out = validate.output_spec(fmt, quality, None, False)
            seeds = list(range(n))
            generated = await core.sample(mv, call, seeds, None, None, out, Lane.INTERACTIVE)
            assert call.response is not None
            reserved = call.response.held
            response = pb.SampleResponse()
            add_generated(response.images, generated.images, generated.latents, seeds, None, out)
            call.response.release()
            if call.batcher is not None:
                call.batcher.release()
            return reserved, response.ByteSize()
        finally:
            await repo.close(1)
            pool.shutdown()

    reserved, real = asyncio.run(asyncio.wait_for(main(), 60))
    assert real <= reserved, f"response {real} bytes, reserved {reserved} ({real / reserved:.2f}x)"

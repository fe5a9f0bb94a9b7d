"""The client processes of server_support.concurrent_samples. Spawned, each imports this module to
run sample_seeds: grpc and the genserve.v1 stubs only, so a process is ready in a fraction of a
second (server_support's onnx, onnxruntime and server imports took ~5 s a process on 2 cores)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb


def sample_seeds(args: tuple[str, str, list[int], int, list[int], Any]) -> dict[int, tuple[bytes, int]]:
    """One client process: `clients` closed-loop aio clients over 2 connections share `seeds`."""
    target, model, seeds, clients, labels, start_barrier = args
    output = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)

    async def run() -> dict[int, tuple[bytes, int]]:
        results: dict[int, tuple[bytes, int]] = {}
        pending = list(reversed(seeds))
        channels = [grpc.aio.insecure_channel(target) for _ in range(2)]
        for ch in channels:
            await ch.channel_ready()
        # All processes start sending together: spawned processes come up seconds apart on a busy
        # machine, and a staggered start is not the concurrency the caller asked for.
        await asyncio.to_thread(start_barrier.wait, 120)

        async def client(i: int) -> None:
            stub = pb_grpc.GenerationServiceStub(channels[i % len(channels)])
            while pending:
                seed = pending.pop()
                response = await stub.Sample(
                    pb.SampleRequest(model=model, seeds=[seed], labels=labels, output=output)
                )
                batch = max(response.provenance.executed_batch_sizes)
                results[seed] = (response.images[0].image.data, batch)

        try:
            await asyncio.gather(*(client(i) for i in range(clients)))
        finally:
            for ch in channels:
                await ch.close()
        return results

    return asyncio.run(run())

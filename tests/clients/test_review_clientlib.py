"""Review of the client library: sync/asyncio parity on a closed client, keyword options, images."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2
from genserve_client import AsyncGenserveClient, GenserveClient, GenserveClientError


class SlowService(genserve_pb2_grpc.GenerationServiceServicer):
    """Answers only after a while, so that a client can be closed while its call runs."""

    def Sample(self, request: object, context: grpc.ServicerContext) -> genserve_pb2.SampleResponse:
        deadline = time.monotonic() + 5
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return genserve_pb2.SampleResponse()

    def SampleStream(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        for i in range(50):
            time.sleep(0.1)
            if not context.is_active():
                return
            yield genserve_pb2.SampleStreamChunk(images=[types_pb2.GeneratedImage(index=i)])

    def SampleCodesStream(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        for i in range(50):
            time.sleep(0.1)
            if not context.is_active():
                return
            yield genserve_pb2.SampleCodesChunk(level="codes", filled=i, positions=50)


@pytest.fixture
def slow_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(SlowService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("rpc", ["sample", "sample_stream", "sample_codes_progress"])
def test_closing_the_client_during_a_call_raises_the_one_error_type_in_both_clients(
    slow_target: str, rpc: str
) -> None:
    """The sync client answers GenserveClientError(CANCELLED) to a call whose client is closed
    under it; the asyncio client raised asyncio.CancelledError in a task nobody cancelled (which
    `except Exception` misses and gather/TaskGroup take for a cancellation)."""

    def sync_call(client: GenserveClient) -> None:
        if rpc == "sample":
            client.sample("m", 1)
        else:
            for _ in getattr(client, rpc)("m", 50):
                pass

    sync = GenserveClient(slow_target)
    threading.Timer(0.3, sync.close).start()
    with pytest.raises(GenserveClientError) as sync_info:
        sync_call(sync)
    assert sync_info.value.code == grpc.StatusCode.CANCELLED

    async def scenario() -> GenserveClientError:
        client = AsyncGenserveClient(slow_target)

        async def call() -> None:
            if rpc == "sample":
                await client.sample("m", 1)
            else:
                async for _ in getattr(client, rpc)("m", 50):
                    pass

        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.3)
        await client.close()
        try:
            await task
        except GenserveClientError as exc:
            return exc
        except asyncio.CancelledError:
            pytest.fail("the asyncio client raised CancelledError in a task nobody cancelled")
        pytest.fail("no error")

    error = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.CANCELLED and error.request_id


def test_cancelling_an_asyncio_call_still_cancels_the_task(slow_target: str) -> None:
    async def scenario() -> None:
        async with AsyncGenserveClient(slow_target) as client:
            task = asyncio.ensure_future(client.sample("m", 1))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_an_asyncio_timeout_around_a_call_is_still_a_timeout(slow_target: str) -> None:
    async def scenario() -> None:
        async with AsyncGenserveClient(slow_target) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.sample("m", 1), 0.2)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    async for _ in client.sample_stream("m", 50):
                        pass

    asyncio.run(scenario())

"""A unary call whose outputs are encoded on the codec pool (Codec.encode's EncodeQueue: Sample,
Interpolate, Decode, MixStyles, SampleCodes) that leaves (cancelled, its deadline) while its encode
runs holds its response bytes (response_budget_bytes) until that encode has ended: the encode
builds the response's bytes (up to max_send_message_bytes a call, 64 MiB by default, an eighth of
the default budget). A caller that waits its encode out, or leaves before its encode is handed to
the pool (the encode then never runs), adds nothing to the call's `computing`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cancel_support import cancel_while_held, held_on_the_pool
from code_models import write_code_models
from server_support import UnaryContext, run_with_core, write_tiny_generator
from style_models import write_style_models

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb
from genserve_server import encoding, validate
from genserve_server.core import GenerationCore
from genserve_server.encoding import Codec
from genserve_server.metrics import Metrics, ModelMetrics
from genserve_server.repository import Repository
from genserve_server.service import GenerationService

JPEG = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG)  # always encoded on the pool


def request_of(rpc: str, names: dict[str, str]) -> Any:
    if rpc == "Sample":
        return pb.SampleRequest(model="gen", seeds=[1, 2, 3], output=JPEG)
    if rpc == "MixStyles":
        mixes = [pb.StyleMix(coarse_seed=1, fine_seed=2), pb.StyleMix(coarse_seed=2, fine_seed=1)]
        return pb.MixStylesRequest(model=names["generator"], mixes=mixes, crossover=2, output=JPEG)
    return pb.SampleCodesRequest(model=names["prior"], seeds=[1], labels=[0], output=JPEG)


@pytest.mark.parametrize(
    ("rpc", "raises"),
    [("Sample", False), ("Sample", True), ("MixStyles", False), ("SampleCodes", False)],
    ids=["Sample-returns", "Sample-raises", "MixStyles-returns", "SampleCodes-returns"],
)
def test_a_cancelled_call_holds_its_response_bytes_until_its_encode_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rpc: str, raises: bool
) -> None:
    """A call cancelled while its outputs were encoded on the codec pool gave its response bytes back
    at once (core passed its encodes no `computing`): the budget admitted other calls beside bytes
    still being built."""
    names: dict[str, str] = {}
    if rpc == "Sample":
        write_tiny_generator(tmp_path, "gen", channels=3)
    elif rpc == "MixStyles":
        names = write_style_models(tmp_path)
    else:
        names = write_code_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        service = GenerationService(repo, core.config, core.metrics, core.codec.pool, core=core)
        handler = getattr(service, rpc)
        with held_on_the_pool(monkeypatch, encoding, "encode_sync", raises) as (entered, go):
            task = asyncio.create_task(handler(request_of(rpc, names), UnaryContext()))
            await cancel_while_held(task, entered, core.responses, go, "its encode")
        # The next call is answered: its encode is not held up by the one left behind.
        answer = await handler(request_of(rpc, names), UnaryContext())
        assert answer.images and all(g.image.format == tpb.IMAGE_FORMAT_JPEG for g in answer.images)

    run_with_core(tmp_path, body)


Encode = Callable[[list[asyncio.Future[None]]], Coroutine[Any, Any, list[Any]]]


def run_with_codec(body: Callable[[Encode], Awaitable[None]]) -> None:
    """`body(encode)`, 30 s at most: encode(computing) encodes two 8x8 RGB images as JPEG with a Codec
    on a pool of one thread, passing it `computing`."""
    metrics = ModelMetrics(Metrics(enabled=False), "m", "1")
    out = validate.output_spec(tpb.IMAGE_FORMAT_JPEG, 0, None, False)
    images = np.zeros((2, 3, 8, 8), np.float32)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            codec = Codec(pool, 1, 64 << 20)

            def encode(computing: list[asyncio.Future[None]]) -> Coroutine[Any, Any, list[Any]]:
                return codec.encode(metrics, images, out, (-1.0, 1.0), computing=computing)

            await body(encode)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_encode_waited_out_or_left_before_it_reached_the_pool_adds_nothing_to_computing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path pays no future per encode: a caller that waits its encode out leaves `computing`
    as it was; one that leaves while its encode is still queued (not yet handed to the pool) adds
    nothing either, and its encode never runs."""

    async def body(encode: Encode) -> None:
        computing: list[asyncio.Future[None]] = []
        done = await encode(computing)
        assert len(done) == 2
        assert computing == []
        ran = []
        real = encoding.encode_sync

        def counted(*args: Any) -> Any:
            ran.append(1)
            return real(*args)

        monkeypatch.setattr(encoding, "encode_sync", counted)
        task = asyncio.create_task(encode(computing))
        await asyncio.sleep(0)  # queued: the flush comes at the end of this turn of the loop
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert computing == []
        # A later encode runs alone: the one left behind never did.
        await encode(computing)
        assert ran == [1]
        assert computing == []

    run_with_codec(body)


def test_a_caller_cancelled_while_its_chunk_runs_is_told_once_the_chunk_has_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two callers' encodes share a pool chunk; one leaves while the chunk runs: its `computing` gets
    one future, resolved once the chunk has ended (the other caller is answered)."""

    async def body(encode: Encode) -> None:
        left: list[asyncio.Future[None]] = []
        stays: list[asyncio.Future[None]] = []
        with held_on_the_pool(monkeypatch, encoding, "encode_sync") as (entered, go):
            leaving = asyncio.create_task(encode(left))
            staying = asyncio.create_task(encode(stays))
            deadline = time.monotonic() + 10
            while not entered.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            assert entered.is_set()
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            assert len(left) == 1 and not left[0].done()
            go.set()
            assert len(await staying) == 2
            await asyncio.wait_for(left[0], 10)
        assert stays == []

    run_with_codec(body)


def test_an_encode_whose_caller_left_before_its_turn_in_a_running_chunk_never_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three callers' encodes share one pool chunk; the second leaves while the first's encode runs.
    Its encode was run all the same once the first's ended (CPU spent on bytes nobody reads, under
    the load at which callers give up): now the chunk skips it. The third caller is answered, and the
    one that left is told once the chunk has ended."""

    async def body(encode: Encode) -> None:
        ran: list[int] = []
        first: list[asyncio.Future[None]] = []
        left: list[asyncio.Future[None]] = []
        third: list[asyncio.Future[None]] = []
        with held_on_the_pool(monkeypatch, encoding, "encode_sync") as (entered, go):
            held = encoding.encode_sync

            def counted(*args: Any) -> Any:
                ran.append(1)
                return held(*args)

            monkeypatch.setattr(encoding, "encode_sync", counted)
            tasks = [asyncio.create_task(encode(c)) for c in (first, left, third)]
            deadline = time.monotonic() + 10
            while not entered.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            assert entered.is_set() and len(ran) == 1
            tasks[1].cancel()
            with pytest.raises(asyncio.CancelledError):
                await tasks[1]
            assert len(left) == 1 and not left[0].done()
            go.set()
            assert len(await tasks[0]) == 2
            assert len(await tasks[2]) == 2
            await asyncio.wait_for(left[0], 10)
        assert len(ran) == 2  # the first's and the third's
        assert first == [] and third == []

    run_with_codec(body)

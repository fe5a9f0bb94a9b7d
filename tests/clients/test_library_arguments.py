"""The client library at its edges: a client closed under a call (sync and asyncio alike), keyword
options a method does not take, values a field cannot hold, one image where a list belongs."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_fakes import FakeServer
from PIL import Image

from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2
from genserve_client import AsyncGenserveClient, GenserveClient, GenserveClientError, calls
from genserve_client.retry import RetryPolicy


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


@pytest.mark.parametrize("rpc", ["sample_stream", "sample_codes_progress"])
def test_a_sync_streaming_call_whose_client_closes_before_its_first_iteration_raises_cancelled(
    slow_target: str, rpc: str
) -> None:
    """The sync client's streaming calls begin at the call (their arguments are checked there), so
    a client closed before the first iteration closed it under the call: sample_stream raised
    GenserveClientError CANCELLED, but sample_codes_progress grpc's `ValueError: Cannot invoke RPC:
    Channel closed!`, which `except GenserveClientError` misses."""
    client = GenserveClient(slow_target)
    chunks = getattr(client, rpc)("m", 4)
    client.close()
    with pytest.raises(GenserveClientError) as info:
        list(chunks)
    assert info.value.code == grpc.StatusCode.CANCELLED and info.value.request_id


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


@pytest.mark.parametrize(
    ("method", "args", "option"),
    [
        ("sample", ("fake-gen", 2), {"seed": 42}),  # the CLI's --seed; the library's base_seed
        ("sample", ("fake-gen", 2), {"label": [3]}),
        ("sample_stream", ("fake-gen", 8), {"seeds": [5, 6, 7]}),  # SampleStream takes no seeds
        ("sample_stream", ("fake-gen", 8), {"priority": 1}),
        ("interpolate", ("fake-gen", 1, 2, 4), {"priority": 1}),
        ("decode", ("fake-gen", [[0.0] * 4]), {"psi": 0.5}),
        ("encode", ("fake-gen", []), {"format": "raw"}),
        ("super_resolve", ("fake-gen", []), {"tile": 64}),
        ("sample_codes", ("fake-gen", 2), {"temprature": 0.5}),
        ("sample_codes", ("fake-gen", 2), {"preview_every": 4}),  # SampleCodesStream's only
        ("mix_styles", ("fake-gen", [(1, 2)]), {"seeds": [1]}),
    ],
)
def test_an_option_the_method_does_not_take_is_refused_not_dropped(
    fake_server: FakeServer, method: str, args: tuple[object, ...], option: dict[str, object]
) -> None:
    """`**opts` took any keyword and the request builders read only their own, so
    `client.sample(m, 4, seed=42)` drew 4 random seeds and `sample_stream(m, n, seeds=[...])` drew
    base_seed + i, without a word."""
    (name,) = option
    with pytest.raises(TypeError, match=f"{method}\\(\\) got unexpected keyword argument '{name}'"):
        getattr(calls, method)(*args, **option)
    with GenserveClient(fake_server.target) as client, pytest.raises(TypeError, match=repr(name)):
        result = getattr(client, method)(*args, **option)
        list(result) if method == "sample_stream" else None

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            with pytest.raises(TypeError, match=repr(name)):
                if method == "sample_stream":
                    async for _ in client.sample_stream(*args, **option):
                        pass
                else:
                    await getattr(client, method)(*args, **option)

    asyncio.run(scenario())
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call


def test_every_documented_option_is_still_accepted() -> None:
    calls.sample(
        "g",
        2,
        seeds=[1, 2],
        base_seed=1,
        labels=[1],
        psi=0.5,
        version="1",
        priority=1,
        format="raw",
        quality=90,
        png_compression=3,
        return_latents=True,
    )
    calls.sample_stream(
        "g", 4, base_seed=1, labels=[1], psi=0.5, version="1", start_index=1, chunk_size=2, format="png"
    )
    calls.sample_codes_progress(
        "g",
        2,
        seeds=[1, 2],
        temperature=0.5,
        top_k=3,
        return_codes=True,
        preview_every=2,
        labels=[1],
        version="1",
    )
    calls.translate("g", [], direction="b_to_a", version="1", format="webp")
    calls.super_resolve("g", [], tile_size=64, tile_overlap=4)
    calls.encode("g", [], sample=True, seed=3, version="1")


def test_each_option_reaches_the_request_field_it_names() -> None:
    """An option accepted but put in another field, or dropped, changes what the server computes
    without a word: interpolate's mode="lerp" drawn as a slerp, translate's direction="b_to_a" run
    A -> B, sample_stream's psi (a bulk job's --psi) never sent."""
    modes = {
        None: genserve_pb2.INTERPOLATION_MODE_UNSPECIFIED,
        "lerp": genserve_pb2.INTERPOLATION_MODE_LERP,
        "slerp": genserve_pb2.INTERPOLATION_MODE_SLERP,
    }
    for mode, wire in modes.items():
        opts = {} if mode is None else {"mode": mode}
        assert calls.interpolate("g", 1, 2, 5, **opts).request.mode == wire, mode  # type: ignore[arg-type]
    directions = {
        None: genserve_pb2.DIRECTION_UNSPECIFIED,
        "a_to_b": genserve_pb2.DIRECTION_A_TO_B,
        "b_to_a": genserve_pb2.DIRECTION_B_TO_A,
    }
    for direction, wire in directions.items():
        opts = {} if direction is None else {"direction": direction}
        assert calls.translate("g", [], **opts).request.direction == wire, direction  # type: ignore[arg-type]
    stream = calls.sample_stream(
        "g", 8, base_seed=7, labels=[3], psi=0.5, version="2", start_index=2, chunk_size=4, format="jpeg"
    ).request
    assert (stream.start_index, stream.chunk_size) == (2, 4)
    sample = stream.sample
    assert (sample.model, sample.version, sample.count, sample.base_seed) == ("g", "2", 8, 7)
    assert list(sample.labels) == [3] and sample.truncation_psi == pytest.approx(0.5)
    assert sample.output.format == types_pb2.IMAGE_FORMAT_JPEG
    assert not calls.sample_stream("g", 8).request.sample.HasField("truncation_psi")
    codes = calls.sample_codes("g", 2, temperature=0.5, top_k=3, top_temperature=2.0, top_top_k=16).request
    assert (codes.temperature, codes.top_k, codes.top_temperature, codes.top_top_k) == (0.5, 3, 2.0, 16)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: calls.sample("g", -1), "count: must be in [0, 4294967295] (uint32), got -1"),
        (lambda: calls.sample("g", seeds=[1, 2**63]), "seeds[1]: must be in [-9223372036854775808, "),
        (lambda: calls.sample("g", 2, labels=[2**31]), "labels[0]: must be in [-2147483648, 2147483647]"),
        # a generator: its items were consumed by the first try, so the field went unnamed
        (
            lambda: calls.sample("g", seeds=(s for s in [1, 2**63])),
            "seeds[1]: must be in [-9223372036854775808, ",
        ),
        (
            lambda: calls.sample_stream("g", 4, labels=iter([1, 2**31])),
            "labels[1]: must be in [-2147483648, ",
        ),
        (lambda: calls.sample("g", 2, base_seed=2**64), "base_seed: must be in"),
        (lambda: calls.sample("g", 2, quality=-1), "output.quality: must be in [0, 4294967295]"),
        (lambda: calls.sample("g", 2, png_compression=-2), "output.png_compression: must be in"),
        (lambda: calls.sample_stream("g", 2**32), "count: must be in [0, 4294967295] (uint32)"),
        (lambda: calls.sample_stream("g", 8, chunk_size=-1), "chunk_size: must be in [0, 4294967295]"),
        (lambda: calls.interpolate("g", 1, -(2**63) - 1, 4), "end.seed: must be in"),
        (lambda: calls.interpolate("g", 1, 2, -4), "steps: must be in [0, 4294967295]"),
        (lambda: calls.mix_styles("g", [(1, 2), (3, 4, -1)]), "mixes[1].crossover: must be in"),
        (lambda: calls.sample_codes("g", 2, top_k=-1), "top_k: must be in [0, 4294967295]"),
        (lambda: calls.super_resolve("g", [], tile_overlap=-8), "tile_overlap: must be in"),
        (lambda: calls.encode("g", [], seed=2**63), "seed: must be in"),
    ],
)
def test_a_value_a_field_cannot_hold_is_refused_naming_the_field_and_its_range(
    build: object, field: str
) -> None:
    """protobuf's own refusal was `ValueError: Value out of range: -1`, naming neither the field
    nor the range (`client.sample(m, -1)`, `seeds=[2**63]`, `chunk_size=-1`)."""
    with pytest.raises(ValueError) as info:
        build()  # type: ignore[operator]
    assert str(info.value).startswith(field), str(info.value)


def test_a_value_of_the_wrong_type_names_the_field() -> None:
    with pytest.raises(TypeError, match="^truncation_psi: .*'0.7'"):
        calls.sample("g", 2, psi="0.7")  # type: ignore[typeddict-item]


def test_a_version_given_as_an_int_is_refused_naming_version_in_every_method(fake_server: FakeServer) -> None:
    """Every method's `version` is a str, refused naming the field otherwise (`sample(m, 2,
    version=1)`: `version: ... (got 1)`), but get_model built its request without the builders, so
    `get_model(m, 1)` raised protobuf's bare 'bad argument type for built-in operation'."""
    with pytest.raises(TypeError, match=r"^version: .*\(got 1\)"):
        calls.sample("fake-gen", 2, version=1)  # type: ignore[typeddict-item]
    with pytest.raises(TypeError, match=r"^version: .*\(got 1\)"):
        calls.get_model("fake-gen", 1)  # type: ignore[arg-type]
    with GenserveClient(fake_server.target) as client, pytest.raises(TypeError, match=r"^version: "):
        client.get_model("fake-gen", 1)  # type: ignore[arg-type]

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            with pytest.raises(TypeError, match=r"^version: "):
                await client.get_model("fake-gen", 1)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    assert calls.get_model("fake-gen", "2").request.version == "2"


@pytest.mark.parametrize(
    ("args", "opts", "field"),
    [
        (("fake-gen", "3"), {}, "count"),
        (("fake-gen", 3), {"start_index": "1"}, "start_index"),
    ],
)
def test_a_stream_count_or_start_index_that_is_not_an_int_is_refused_naming_it(
    fake_server: FakeServer, args: tuple[object, ...], opts: dict[str, object], field: str
) -> None:
    """sample_stream compared count and start_index with ints before the builder named any field:
    `sample_stream(m, "3")` raised "'<' not supported between instances of 'str' and 'int'"."""
    message = f"^sample_stream: {field} must be an int, got "
    with pytest.raises(TypeError, match=message):
        calls.sample_stream(*args, **opts)  # type: ignore[arg-type]
    with GenserveClient(fake_server.target) as client, pytest.raises(TypeError, match=message):
        client.sample_stream(*args, **opts)  # type: ignore[arg-type]

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            with pytest.raises(TypeError, match=message):
                async for _ in client.sample_stream(*args, **opts):  # type: ignore[arg-type]
                    pass

    asyncio.run(scenario())
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    assert calls.sample_stream("fake-gen", np.int64(3), start_index=np.int64(1)).request.start_index == 1


@pytest.mark.parametrize("mixes", [[1, 2], (1, 2), np.array([1, 2])])
def test_a_mix_that_is_not_a_tuple_of_seeds_is_refused_naming_it_and_what_a_mix_is(mixes: object) -> None:
    """`mix_styles(m, [1, 2])` (one mix's seeds where the list of mixes belongs) raised
    "object of type 'int' has no len()", naming neither the mix nor what a mix must be."""
    what = r"^mixes\[0\] must be \(coarse_seed, fine_seed\[, crossover\]\), got .*1.*for one mix"
    with pytest.raises(TypeError, match=what):
        calls.mix_styles("g", mixes)  # type: ignore[arg-type]
    assert len(calls.mix_styles("g", [(1, 2)]).request.mixes) == 1


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [(1.0, 2, "start"), (1, np.float32(2.0), "end"), (np.array(0.5), [0.0] * 8, "start")],
)
def test_an_interpolation_end_given_as_a_float_is_refused_saying_a_seed_is_an_int(
    start: object, end: object, field: str
) -> None:
    """A float scalar (`interpolate(m, 1.0, 2.0, n)`) went as a latent of one value, which the
    server refused as 'start.latent.shape ... got [1]', never saying that a seed is an int."""
    what = f"^{field}: a seed is an int and a latent a 1-D array of latent_dim floats, got "
    with pytest.raises(TypeError, match=what):
        calls.interpolate("g", start, end, 4)  # type: ignore[arg-type]
    request = calls.interpolate("g", np.int64(1), np.zeros(8, np.float32), 4).request
    assert request.start.seed == 1 and list(request.end.latent.shape) == [8]


@pytest.mark.parametrize(("start", "end", "field"), [(True, 2, "start"), (1, False, "end")])
def test_an_interpolation_end_given_as_a_bool_is_refused_as_every_seed_is(
    start: object, end: object, field: str
) -> None:
    """Every other seed refuses a bool (`seeds=[True]`, `base_seed=True`: protobuf's 'Expected an
    int, got a boolean'), but an interpolation's end took True as seed 1 (bool is an int)."""
    with pytest.raises(TypeError, match=rf"^{field}\.seed: .*got a boolean"):
        calls.interpolate("g", start, end, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^base_seed: .*got a boolean"):
        calls.sample("g", 2, base_seed=True)


@pytest.mark.parametrize(
    ("method", "opts", "error"),
    [
        ("sample_stream", {"chunk_size": -1}, ValueError),
        ("sample_codes_progress", {"top_k": -1}, ValueError),
        ("sample_codes_progress", {"temprature": 0.5}, TypeError),
    ],
)
def test_the_streaming_methods_check_their_arguments_at_the_call_in_the_sync_client(
    fake_server: FakeServer, method: str, opts: dict[str, object], error: type[Exception]
) -> None:
    """The sync sample_stream refuses bad arguments at the call, but sample_codes_progress (a
    generator) checked them only when first iterated, so a refusal surfaced far from the call that
    made it, or never where the iterator was dropped. The asyncio client's two check theirs when
    first iterated, as async generators do."""
    with GenserveClient(fake_server.target) as client, pytest.raises(error):
        getattr(client, method)("fake-gen", 2, **opts)  # not iterated

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            with pytest.raises(error):
                async for _ in getattr(client, method)("fake-gen", 2, **opts):
                    pass

    asyncio.run(scenario())
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "pil", "hw-array", "hwc-array"])
@pytest.mark.parametrize("method", ["encode", "super_resolve", "translate"])
def test_one_image_where_a_list_belongs_is_refused_saying_so(tmp_path: Path, kind: str, method: str) -> None:
    """`client.super_resolve(m, "photo.png")` failed with `No such file or directory: 'p'` (a str
    is a sequence of one-letter paths), one PNG's bytes with `dtype int64`, a Path or PIL image
    with `not iterable`, a gray HW array with `got shape (W,)`, a colour HWC array was H gray
    images of W x 3 pixels."""
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    one = {
        "str": str(path),
        "path": path,
        "bytes": path.read_bytes(),
        "pil": Image.open(path),
        "hw-array": np.zeros((8, 8), np.uint8),
        "hwc-array": np.zeros((8, 8, 3), np.uint8),
    }[kind]
    with pytest.raises(TypeError, match=r"^images: must be a list of images, .*pass \[image\]"):
        getattr(calls, method)("m", one)
    assert len(getattr(calls, method)("m", [one]).request.images) == 1


@pytest.mark.parametrize("method", ["encode", "super_resolve", "translate"])
def test_an_array_image_of_the_wrong_dtype_or_layout_is_refused_naming_its_index(method: str) -> None:
    """A float or CHW array among several images is refused before any call naming the one it is
    (images[1]), so a batch of many says which image to fix."""
    good = np.zeros((8, 8, 3), np.uint8)
    for bad, why in (
        (np.zeros((8, 8, 3), np.float32), "must be uint8 HWC or HW, got dtype float32"),
        (np.zeros((3, 8, 8), np.uint8), "must be HW or HWC with C in 1..4, got shape (3, 8, 8)"),
    ):
        with pytest.raises(ValueError, match=r"^images\[1\]: image arrays " + re.escape(why)):
            getattr(calls, method)("m", [good, bad])


@pytest.mark.parametrize("method", ["encode", "super_resolve", "translate"])
def test_a_1d_array_of_paths_or_encoded_files_is_still_a_list_of_images(tmp_path: Path, method: str) -> None:
    """A 1-D numpy array whose items are images (paths from `df["path"].to_numpy()`, PNG bytes in an
    object array) was sent as a list of images; the one-image check refused it as 'a 1-D array'."""
    paths = []
    for i in range(2):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(path)
        paths.append(path)
    as_strings = np.array([str(p) for p in paths])  # dtype <U..
    as_bytes = np.empty(2, dtype=object)
    as_bytes[:] = [p.read_bytes() for p in paths]
    for images in (as_strings, as_bytes):
        request = getattr(calls, method)("m", images).request
        assert [m.data for m in request.images] == [p.read_bytes() for p in paths]
    # a 1-D array of pixels is still no list of images
    with pytest.raises(TypeError, match=r"^images: must be a list of images"):
        getattr(calls, method)("m", np.zeros(8, np.uint8))


class UnavailableService(genserve_pb2_grpc.GenerationServiceServicer):
    """Always UNAVAILABLE: the client retries after a backoff."""

    def Sample(self, request: object, context: grpc.ServicerContext) -> genserve_pb2.SampleResponse:
        context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def SampleStream(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        yield genserve_pb2.SampleStreamChunk()


@pytest.mark.parametrize("rpc", ["sample", "sample_stream"])
def test_closing_the_client_while_a_call_waits_to_retry_raises_cancelled_in_both_clients(rpc: str) -> None:
    """A client closed while its call waited out a retry backoff (server UNAVAILABLE) raised
    `ValueError: Cannot invoke RPC on closed channel!` (sync) or grpc's cygrpc.UsageError
    'Channel is closed.' (asyncio) from the next attempt, not GenserveClientError."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(UnavailableService(), server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    retry = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=1.0, multiplier=1.0)
    try:
        sync = GenserveClient(target, retry=retry, rng=random.Random(0))
        threading.Timer(0.4, sync.close).start()
        with pytest.raises(GenserveClientError) as sync_info:
            if rpc == "sample":
                sync.sample("m", 1)
            else:
                list(sync.sample_stream("m", 4))
        assert sync_info.value.code == grpc.StatusCode.CANCELLED

        async def scenario() -> GenserveClientError:
            client = AsyncGenserveClient(target, retry=retry, rng=random.Random(0))

            async def call() -> None:
                if rpc == "sample":
                    await client.sample("m", 1)
                else:
                    async for _ in client.sample_stream("m", 4):
                        pass

            task = asyncio.ensure_future(call())
            await asyncio.sleep(0.4)
            await client.close()
            with pytest.raises(GenserveClientError) as info:
                await task
            return info.value

        error = asyncio.run(scenario())
        assert error.code == grpc.StatusCode.CANCELLED and error.request_id
    finally:
        server.stop(grace=None)


class _LongestBackoff(random.Random):
    """Every backoff is its cap: the wait a close or cancel must cut short is certain."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("how", ["sample", "sample_stream", "stream_cancel"])
def test_closing_or_cancelling_during_a_retry_backoff_ends_the_call_at_once_in_both_clients(how: str) -> None:
    """close() (or SampleStream.cancel()) while a call waited out a retry backoff let the call sleep
    the rest of it (time.sleep / asyncio.sleep, up to max_backoff_s: 5 s by default) before it
    noticed: a web app closing its client at shutdown, or a bulk job stopping its streams, waited
    that long for every call in backoff."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(UnavailableService(), server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    retry = RetryPolicy(max_attempts=5, initial_backoff_s=6.0, max_backoff_s=6.0, multiplier=1.0)
    try:
        sync = GenserveClient(target, retry=retry, rng=_LongestBackoff())
        began = time.monotonic()
        if how == "stream_cancel":
            stream = sync.sample_stream("m", 4)
            threading.Timer(0.4, stream.cancel).start()
            assert list(stream) == []
        else:
            threading.Timer(0.4, sync.close).start()
            with pytest.raises(GenserveClientError) as sync_info:
                sync.sample("m", 1) if how == "sample" else list(sync.sample_stream("m", 4))
            assert sync_info.value.code == grpc.StatusCode.CANCELLED
        assert time.monotonic() - began < 3.0, "the sync call slept out its backoff"
        sync.close()
        if how == "stream_cancel":
            return

        async def scenario() -> float:
            client = AsyncGenserveClient(target, retry=retry, rng=_LongestBackoff())

            async def call() -> None:
                if how == "sample":
                    await client.sample("m", 1)
                else:
                    async for _ in client.sample_stream("m", 4):
                        pass

            task = asyncio.ensure_future(call())
            await asyncio.sleep(0.4)
            began = time.monotonic()
            await client.close()
            with pytest.raises(GenserveClientError) as info:
                await asyncio.wait_for(task, 10)
            assert info.value.code == grpc.StatusCode.CANCELLED
            return time.monotonic() - began

        assert asyncio.run(scenario()) < 2.5, "the asyncio call slept out its backoff"
    finally:
        server.stop(grace=None)


def test_cancelling_an_asyncio_call_in_its_retry_backoff_still_cancels_the_task() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(UnavailableService(), server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    retry = RetryPolicy(max_attempts=5, initial_backoff_s=6.0, max_backoff_s=6.0, multiplier=1.0)

    async def scenario() -> None:
        async with AsyncGenserveClient(target, retry=retry, rng=_LongestBackoff()) as client:
            task = asyncio.ensure_future(client.sample("m", 1))
            await asyncio.sleep(0.4)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.sample("m", 1), 0.5)

    try:
        asyncio.run(scenario())
    finally:
        server.stop(grace=None)


def test_an_asyncio_client_used_in_another_event_loop_says_so(fake_server: FakeServer) -> None:
    """An AsyncGenserveClient is a grpc.aio channel bound to the loop it was created in. Used from
    another loop (a client kept across asyncio.run calls, a session fixture under per-test loops,
    one made in a loop running in another thread) its calls raised asyncio's 'Event loop is closed'
    (while the caller's loop runs) or 'Task ... got Future ... attached to a different loop', naming
    neither the client nor what to do, and leaving a 'coroutine was never awaited' warning."""
    messages: list[str] = []

    async def make() -> AsyncGenserveClient:
        client = AsyncGenserveClient(fake_server.target)
        await client.list_models()
        return client

    async def use(client: AsyncGenserveClient) -> None:
        with pytest.raises(RuntimeError) as info:
            await asyncio.wait_for(client.list_models(), 5)
        messages.append(str(info.value))
        with pytest.raises(RuntimeError) as info:
            async for _ in client.sample_stream("fake-gen", 4):
                pass
        messages.append(str(info.value))
        with pytest.raises(RuntimeError) as info:
            async for _ in client.sample_codes_progress("fake-gen", 4):
                pass
        messages.append(str(info.value))

    closed_loops_client = asyncio.run(make())  # its loop is closed by now
    asyncio.run(use(closed_loops_client))

    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    try:
        running_elsewhere = asyncio.run_coroutine_threadsafe(make(), other).result(10)
        asyncio.run(use(running_elsewhere))
        asyncio.run_coroutine_threadsafe(running_elsewhere.close(), other).result(10)
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join(5)
        other.close()
    for message in messages:
        assert "AsyncGenserveClient" in message and "event loop" in message, message
        assert "create" in message, message

    async def same_loop() -> None:  # the client still works in the loop it was made in
        async with AsyncGenserveClient(fake_server.target) as client:
            assert await client.list_models()

    asyncio.run(same_loop())


def mypy_strict(tmp_path: Path, source: str) -> str:
    """mypy --strict's report on a user's script `source` importing the library from this checkout."""
    import genserve.v1
    import genserve_client

    script = tmp_path / "user_script.py"
    script.write_text(source)
    roots = [Path(genserve_client.__file__).parents[1], Path(next(iter(genserve.v1.__path__))).parents[1]]
    env = {**os.environ, "MYPYPATH": os.pathsep.join(map(str, roots))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            "",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    return done.stdout + done.stderr


def test_the_documented_image_inputs_type_check_in_both_clients(tmp_path: Path) -> None:
    """docs/client.md: an N x H x W x C uint8 array is N images and a 1-D array of paths is a list,
    as the clients take them at run time; their `images` hint was Sequence[...], which no numpy
    array is, so mypy --strict refused the documented calls."""
    report = mypy_strict(
        tmp_path,
        """
import numpy as np
from genserve_client import AsyncGenserveClient, GenserveClient

batch = np.zeros((2, 8, 8, 3), np.uint8)
paths = np.array(["a.png", "b.png"])


def sync(client: GenserveClient) -> None:
    client.super_resolve("sr", batch)
    client.translate("i2i", paths, direction="b_to_a")
    client.encode("enc", batch)
    client.super_resolve("sr", [np.zeros((8, 8, 3), np.uint8), "c.png", b"png bytes"])


async def aio(client: AsyncGenserveClient) -> None:
    await client.super_resolve("sr", batch)
    await client.translate("i2i", paths)
    await client.encode("enc", batch, sample=True)
""",
    )
    assert "Success: no issues found" in report, report


def test_seeds_and_labels_given_as_numpy_integer_arrays_type_check_in_both_clients(tmp_path: Path) -> None:
    """`seeds=np.arange(8)`, `labels=np.repeat(np.arange(10), 4)`: protobuf takes numpy integer
    arrays and the calls ran, but the options were hinted Sequence[int], which no numpy array is,
    so mypy --strict refused them in user code."""
    report = mypy_strict(
        tmp_path,
        """
import numpy as np
from genserve_client import AsyncGenserveClient, GenserveClient

seeds = np.arange(8)
labels = np.repeat(np.arange(10), 4)


def sync(client: GenserveClient) -> None:
    client.sample("cgan", seeds=seeds, labels=labels[:8])
    client.sample_codes("prior", seeds=seeds, labels=labels)
    client.interpolate("cgan", 1, 2, 8, labels=labels[:1])
    for _ in client.sample_stream("cgan", 40, labels=labels):
        pass
    client.sample("cgan", 2, labels=[3, 4], seeds=range(2))


async def aio(client: AsyncGenserveClient) -> None:
    await client.sample("cgan", seeds=seeds, labels=labels[:8])
    async for _ in client.sample_codes_progress("prior", seeds=seeds, labels=labels):
        pass
""",
    )
    assert "Success: no issues found" in report, report
    request = calls.sample("cgan", seeds=np.arange(3), labels=np.array([7, 8, 9])).request
    assert (list(request.seeds), list(request.labels)) == ([0, 1, 2], [7, 8, 9])


def test_numpy_integer_mixes_crossovers_and_stream_counts_type_check_in_both_clients(tmp_path: Path) -> None:
    """mix_styles takes numpy integer seeds and crossovers (a crossover from np.arange, a 0 refused
    as an int 0 is) and sample_stream a numpy integer count and start_index, as they check at run
    time, but they were hinted int, so mypy --strict refused those calls in user code."""
    report = mypy_strict(
        tmp_path,
        """
import numpy as np
from genserve_client import AsyncGenserveClient, GenserveClient

crossovers = np.arange(1, 4)
done = np.int64(3)


def sync(client: GenserveClient) -> None:
    client.mix_styles("style", [(1, 2, k) for k in crossovers], crossover=crossovers[0])
    client.mix_styles("style", [(np.int64(1), np.uint32(2))])
    for _ in client.sample_stream("gen", np.int64(10), start_index=done):
        pass


async def aio(client: AsyncGenserveClient) -> None:
    await client.mix_styles("style", [(1, 2, crossovers[1])], crossover=np.int32(2))
    async for _ in client.sample_stream("gen", done * 2, start_index=done):
        pass
""",
    )
    assert "Success: no issues found" in report, report


def test_a_provenances_replay_options_type_check_as_sample_codes_options(tmp_path: Path) -> None:
    """docs/client.md: `client.sample_codes(model, seeds=..., **result.provenance.replay_options())`
    gives the same bytes; replay_options() was hinted dict[str, float | int], which mypy --strict
    refused unpacked into sample_codes' typed options (a float is no `version: str`, ...)."""
    report = mypy_strict(
        tmp_path,
        """
from genserve_client import AsyncGenserveClient, CodesResult, GenserveClient


def sync(client: GenserveClient, result: CodesResult) -> None:
    client.sample_codes("prior", seeds=[1, 2], return_codes=True, **result.provenance.replay_options())
    temperature: float = result.provenance.replay_options()["temperature"]


async def aio(client: AsyncGenserveClient, result: CodesResult) -> None:
    await client.sample_codes("prior", seeds=[1, 2], **result.provenance.replay_options())
""",
    )
    assert "Success: no issues found" in report, report


def test_the_async_streams_are_async_generators_that_aclosing_takes(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """The async sample_stream and sample_codes_progress are async generators, but were hinted
    AsyncIterator, so `contextlib.aclosing(client.sample_stream(...))` (which ends the server's work
    at once on leaving the loop early while a reference is held) was refused by mypy --strict."""

    async def made() -> list[bool]:
        async with AsyncGenserveClient(fake_server.target) as client:
            streams = [client.sample_stream("fake-gen", 4), client.sample_codes_progress("prior", 2)]
            kinds = [inspect.isasyncgen(stream) for stream in streams]
            for stream in streams:
                await stream.aclose()
            return kinds

    assert asyncio.run(made()) == [True, True]
    report = mypy_strict(
        tmp_path,
        """
from contextlib import aclosing

from genserve_client import AsyncGenserveClient, CodesResult


async def aio(client: AsyncGenserveClient) -> None:
    async with aclosing(client.sample_stream("gen", 100)) as images:
        async for image in images:
            if 3 in image.indices:
                break
    async with aclosing(client.sample_codes_progress("prior", 2)) as progress:
        async for item in progress:
            if isinstance(item, CodesResult):
                break
    await client.sample_stream("gen", 1).aclose()
""",
    )
    assert "Success: no issues found" in report, report


@pytest.mark.parametrize(
    "top_codes",
    [
        np.full((7, 7), 3.7),  # went as code 3
        [[1.5] * 7] * 7,  # went as code 1
        np.full((7, 7), np.nan),  # went as -2^63 (numpy's cast of NaN), with a RuntimeWarning
        np.full((7, 7), 2**64 - 1, np.uint64),  # wrapped to -1
    ],
)
def test_top_codes_that_are_not_int64_integers_are_refused_naming_the_field_not_truncated(
    fake_server: FakeServer, top_codes: object
) -> None:
    """sample_codes' top_codes went through numpy's unchecked cast to int64: 3.7 was sent as code 3
    (another grid than the caller's, sampled without a word), NaN as -2^63, a uint64 above 2^63 - 1
    wrapped negative; a float array of whole numbers is a grid all the same."""
    with pytest.raises(ValueError, match=r"^top_codes: codes must be integers .*, got "):
        calls.sample_codes("prior", 1, top_codes=top_codes)  # type: ignore[arg-type]
    with GenserveClient(fake_server.target) as client, pytest.raises(ValueError, match=r"^top_codes: "):
        client.sample_codes("prior", 1, top_codes=top_codes)  # type: ignore[arg-type]
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    for whole in (np.full((7, 7), 3.0), np.full((7, 7), 3, np.uint8), [[3] * 7] * 7):
        sent = calls.sample_codes("prior", 1, top_codes=whole).request.top_codes  # type: ignore[arg-type]
        assert np.frombuffer(sent.data, "<i8").tolist() == [3] * 49 and list(sent.shape) == [7, 7]


@pytest.mark.parametrize("timeout_s", [1e10, 1e300, math.inf])
def test_a_timeout_longer_than_grpc_can_hold_is_no_deadline_not_an_instant_deadline_exceeded(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str], timeout_s: float
) -> None:
    """gRPC Python turns a timeout into time.time() + timeout in int64 nanoseconds: past ~7e9 s it
    wrapped, and every call (unary or stream, sync or asyncio, the CLI's --timeout 1e10) failed
    DEADLINE_EXCEEDED at once, before it was sent, where a longer timeout can only mean a later one.
    An infinite one is no deadline too: only a NaN is refused (calls.check_timeout)."""
    with GenserveClient(fake_server.target, timeout_s=timeout_s) as client:
        assert len(client.sample("fake-gen", 2).items) == 2
        assert len(client.sample("fake-gen", 1, timeout_s=timeout_s).items) == 1
        assert sum(len(r.items) for r in client.sample_stream("fake-gen", 3, timeout_s=timeout_s)) == 3
        assert list(client.sample_codes_progress("fake-prior", 2, timeout_s=timeout_s))

    async def both() -> None:
        async with AsyncGenserveClient(fake_server.target, timeout_s=timeout_s) as client:
            assert len((await client.sample("fake-gen", 2)).items) == 2
            assert (
                sum([len(r.items) async for r in client.sample_stream("fake-gen", 3, timeout_s=timeout_s)])
                == 3
            )
            assert [p async for p in client.sample_codes_progress("fake-prior", 2, timeout_s=timeout_s)]

    asyncio.run(both())
    from client_fakes import cli_main

    code, out, err = cli_main(capsys, "--target", fake_server.target, "--timeout", "1e10", "models")
    assert code == 0 and "fake-gen" in out, (code, err)


def test_an_asyncio_client_created_outside_a_running_loop_names_itself_and_the_fix() -> None:
    """grpc.aio binds a channel to the thread's current event loop: an AsyncGenserveClient created
    in a thread with none (a worker thread, the main thread after an asyncio.run) failed with
    asyncio's bare 'There is no current event loop in thread ...'."""
    errors: list[BaseException] = []

    def make() -> None:
        try:
            AsyncGenserveClient("127.0.0.1:1")
        except BaseException as e:  # noqa: BLE001 - the test reads what it was
            errors.append(e)

    worker = threading.Thread(target=make)
    worker.start()
    worker.join(10)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    message = str(errors[0])
    assert "AsyncGenserveClient" in message and "event loop" in message, message
    assert "async" in message and "create" in message, message


def test_latents_past_float32s_range_are_refused_naming_the_argument_and_index(
    fake_server: FakeServer,
) -> None:
    """Latents travel as float32: a float64 value past float32's range (1e39) became Inf in the
    cast, and the server's refusal 'latents: values must be finite' named no value the caller sent."""
    past = np.zeros((2, 8))
    past[1, 3] = -1e39
    limit = r"\|value\| <= 3\.40282e\+38"
    with pytest.raises(ValueError, match=rf"^latents\[1, 3\]: -1e\+39 is past float32's range \({limit}\)"):
        calls.decode("vae", past)
    with pytest.raises(ValueError, match=rf"^latents\[1, 3\]: -1e\+39 is past float32's range \({limit}\)"):
        calls.sample("gan", latents=past)
    with pytest.raises(ValueError, match=rf"^end\[5\]: 1e\+300 is past float32's range \({limit}\)"):
        calls.interpolate("gan", 1, [0.0] * 5 + [1e300, 0.0, 0.0], 4)
    with GenserveClient(fake_server.target) as client, pytest.raises(ValueError, match=r"^latents\[1, 3\]: "):
        client.decode("vae", past)
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    # Values float32 holds (its max itself, a float64 rounding to it) and NaN/Inf the caller wrote
    # go as ever (the server names the latter).
    edge = np.array([[3.4028235e38, -3.4028235e38, np.inf, np.nan]])
    sent = calls.decode("vae", edge).request.latents
    got = np.frombuffer(sent.data, "<f4")
    assert got[0] == np.finfo(np.float32).max and got[1] == -np.finfo(np.float32).max
    assert np.isinf(got[2]) and np.isnan(got[3])


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: calls.decode("vae", "abc"), "latents"),
        (lambda: calls.sample("gan", latents=[["0.5", "x"]]), "latents"),
        (lambda: calls.decode("vae", [[0.5], [0.5, 0.5]]), "latents"),
        (lambda: calls.decode("vae", [[10**40, "x"]]), "latents"),
        (lambda: calls.interpolate("gan", 1, ["a", "b"], 4), "end"),
    ],
)
def test_latents_that_are_not_numbers_are_refused_naming_the_argument(
    fake_server: FakeServer, build: object, field: str
) -> None:
    """A str (or a ragged list) where a latent belongs raised numpy's own text ('could not convert
    string to float', 'inhomogeneous shape'), naming no argument."""
    with pytest.raises(ValueError, match=rf"^{field}: must be a float32 array"):
        build()  # type: ignore[operator]
    with GenserveClient(fake_server.target) as client, pytest.raises(ValueError, match=r"^latents: "):
        client.decode("vae", "abc")
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    # Numbers written as strings still convert, as numpy converts them.
    sent = calls.decode("vae", [["0.5", "1"]]).request.latents
    assert np.frombuffer(sent.data, "<f4").tolist() == [0.5, 1.0]


def test_latents_of_python_ints_past_float32s_range_are_refused_naming_the_argument_and_index(
    fake_server: FakeServer,
) -> None:
    """Python ints too big for int64 make numpy an object array, which the float32 range check did not
    look at: 10**40 became Inf in the cast (the server then refused 'values must be finite', naming no
    value the caller sent) and 10**400 raised a bare OverflowError 'int too large to convert to
    float'. Each is refused before the call naming the argument and the index."""
    limit = r"\|value\| <= 3\.40282e\+38"
    past: list[list[int | float]] = [[0.0] * 8, [0, 0, 0, 10**40, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match=rf"^latents\[1, 3\]: 1e\+40 is past float32's range \({limit}\)"):
        calls.decode("vae", past)
    past[1][3] = -(10**400)
    with pytest.raises(ValueError, match=rf"^latents\[1, 3\]: -1e\+400 is past float32's range \({limit}\)"):
        calls.sample("gan", latents=past)
    with pytest.raises(ValueError, match=rf"^end\[5\]: -1e\+40 is past float32's range \({limit}\)"):
        calls.interpolate("gan", 1, [0.0] * 5 + [-(10**40), 0.0, 0.0], 4)
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    # Python ints past int64 that float32 holds go as their float32 values.
    sent = calls.decode("vae", [[10**20, 2**64, 1, 0.5]]).request.latents
    assert np.frombuffer(sent.data, "<f4").tolist() == np.array([1e20, 2.0**64, 1, 0.5], np.float32).tolist()


def test_a_nan_timeout_is_a_value_error_naming_timeout_s_not_an_instant_deadline_exceeded(
    fake_server: FakeServer,
) -> None:
    """docs/client.md: `timeout_s` is the call's deadline. A NaN one (a computed budget gone wrong)
    became a deadline that had passed (max(0.0, nan) is 0.0; gRPC took min(nan, 1e9) as one too):
    every call, unary or stream, sync or asyncio, failed DEADLINE_EXCEEDED at once, unsent, as if the
    server had been too slow. It is the caller's error, named as the CLI's --timeout names it."""
    nan = float("nan")
    with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
        GenserveClient(fake_server.target, timeout_s=nan)
    with GenserveClient(fake_server.target) as client:
        with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
            client.sample("fake-gen", 1, timeout_s=nan)
        with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
            client.sample_stream("fake-gen", 3, timeout_s=nan)
        with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
            list(client.sample_codes_progress("fake-prior", 2, timeout_s=nan))

    async def both() -> None:
        with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
            AsyncGenserveClient(fake_server.target, timeout_s=nan)
        async with AsyncGenserveClient(fake_server.target) as client:
            with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
                await client.sample("fake-gen", 1, timeout_s=nan)
            with pytest.raises(ValueError, match=r"^timeout_s: .*got nan"):
                [r async for r in client.sample_stream("fake-gen", 3, timeout_s=nan)]

    asyncio.run(both())
    assert sum(fake_server.service.calls.values()) == 0  # refused before any call
    # A deadline that has passed (0, or a negative budget left) stays gRPC's DEADLINE_EXCEEDED. The
    # fake answers slowly: at deadline "now" an in-process answer could otherwise beat the core's check.
    fake_server.service.sample_delay_s = 5.0
    with GenserveClient(fake_server.target) as client, pytest.raises(GenserveClientError) as info:
        client.sample("fake-gen", 1, timeout_s=-1.0)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

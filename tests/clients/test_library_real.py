"""Every RPC of both clients against a real server (the shared tiny-model server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from genserve_client import AsyncGenserveClient, GenserveClient, GenserveClientError


@pytest.fixture(scope="module")
def client(tiny_server: Any) -> Any:
    with GenserveClient(tiny_server.target) as c:
        yield c


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_models_and_cards(client: GenserveClient) -> None:
    kinds = {m.name: m.kind for m in client.list_models()}
    assert kinds["tiny-cond"] == "conditional_generator" and kinds["tiny-sr"] == "super_resolution"
    info = client.get_model("tiny-cond")
    assert list(info.class_names) == [str(i) for i in range(10)] and info.latent_dim == 16


def test_sample_formats_agree_and_seeds_are_pure(client: GenserveClient) -> None:
    raw = client.sample("tiny-cond", seeds=[5, 6, 7], labels=[1, 2, 3], format="raw", return_latents=True)
    png = client.sample("tiny-cond", seeds=[6], labels=[2], format="png")
    tensor = client.sample("tiny-cond", seeds=[6], labels=[2], format="tensor")
    assert raw.seeds == [5, 6, 7] and raw.labels == [1, 2, 3]
    assert raw.images[0].shape == (8, 8, 1) and raw.images[0].dtype == np.uint8
    np.testing.assert_array_equal(png.images[0], raw.images[1])  # alone or in a batch: same image
    assert tensor.images[0].shape == (1, 8, 8) and tensor.images[0].dtype == np.float32
    assert raw.latents is not None and raw.latents.shape == (3, 16)
    # Explicit latents reproduce the seeded images.
    again = client.sample("tiny-cond", latents=raw.latents, labels=[1, 2, 3], format="raw")
    for a, b in zip(again.images, raw.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert raw.provenance.model == "tiny-cond" and raw.provenance.rng_algorithm
    assert raw.request_id


def test_stream_interpolate_encode_decode(client: GenserveClient) -> None:
    chunks = list(
        client.sample_stream("tiny-gen", 12, base_seed=40, chunk_size=5, start_index=2, format="raw")
    )
    assert [i for c in chunks for i in c.indices] == list(range(2, 12))
    single = client.sample("tiny-gen", seeds=[45], format="raw")
    np.testing.assert_array_equal(chunks[0].images[3], single.images[0])  # index 5 = seed 45

    path = client.interpolate("tiny-gen", 1, 2, 5, mode="lerp", format="raw", return_latents=True)
    ends = client.sample("tiny-gen", seeds=[1, 2], format="raw")
    assert len(path.items) == 5
    np.testing.assert_array_equal(path.images[0], ends.images[0])
    np.testing.assert_array_equal(path.images[-1], ends.images[1])

    digit = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    enc = client.encode("tiny-vae-enc", [digit, Image.fromarray(digit)], sample=True, seed=3)
    assert enc.mu.shape == (2, 8) and enc.logvar.shape == (2, 8) and enc.z is not None
    np.testing.assert_allclose(enc.mu[0], enc.mu[1])  # ndarray and PIL inputs are the same image
    dec = client.decode("tiny-vae-dec", enc.mu, format="raw")
    assert [im.shape for im in dec.images] == [(8, 8, 1)] * 2


def test_a_stream_resumed_at_its_end_is_empty_not_refused(tiny_server: Any, client: GenserveClient) -> None:
    # A job that wrote its last image and then crashed before it recorded that it finished resumes
    # at start_index == count: nothing is left, a finished stream (genserve.proto: 0 <= start_index
    # <= count, as the server answers), not a ValueError. Past the end is still refused.
    assert list(client.sample_stream("tiny-gen", 12, base_seed=40, start_index=12)) == []
    with pytest.raises(ValueError, match="start_index"):
        client.sample_stream("tiny-gen", 12, start_index=13)

    async def scenario() -> list[Any]:
        async with AsyncGenserveClient(tiny_server.target) as aio:
            return [c async for c in aio.sample_stream("tiny-gen", 12, base_seed=40, start_index=12)]

    assert asyncio.run(scenario()) == []


def test_super_resolve_and_translate(client: GenserveClient) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb(12, 16)).save(buf, format="PNG")
    sr = client.super_resolve("tiny-sr", [rgb(10, 14), buf.getvalue()], format="raw")
    assert [im.shape for im in sr.images] == [(20, 28, 3), (24, 32, 3)]
    assert len(sr.tiles) == 2 and all(t >= 1 for t in sr.tiles)
    tr = client.translate("tiny-i2i", [rgb(12, 20)])
    assert tr.images[0].shape == (12, 20, 3) and tr.pil()[0].size == (20, 12)


def test_one_hwc_array_is_refused_as_one_image_and_an_nhwc_array_is_n_images(tiny_server: Any) -> None:
    """`client.super_resolve(m, np.asarray(Image.open("photo.png")))` (one colour picture, H x W x 3)
    was read as H gray pictures of W x 3 pixels: the server answered `images[0]: must be at least 4
    pixels on each side, got 3x20`, and a model that takes such slivers would have served them
    silently. One HWC image where the list belongs is refused before any call, like a path or a PIL
    image; N x H x W x C is N images."""
    photo, other = rgb(12, 20), rgb(12, 20, seed=1)
    refused = (
        r"^images: must be a list of images, got one HWC image \(an array of shape \(12, 20, 3\)\); "
        r"pass \[image\]"
    )
    with GenserveClient(tiny_server.target) as client:
        for method, model in [
            ("super_resolve", "tiny-sr"),
            ("translate", "tiny-i2i"),
            ("encode", "tiny-vae-enc"),
        ]:
            with pytest.raises(TypeError, match=refused):
                getattr(client, method)(model, photo)
        with pytest.raises(TypeError, match=r"^images: .*one HWC image \(an array of shape \(8, 8, 1\)\)"):
            client.encode("tiny-vae-enc", np.zeros((8, 8, 1), np.uint8))
        one = client.super_resolve("tiny-sr", [photo], format="raw")
        both = client.super_resolve("tiny-sr", np.stack([photo, other]), format="raw")
        assert [im.shape for im in both.images] == [(24, 40, 3)] * 2
        np.testing.assert_array_equal(both.images[0], one.images[0])

    async def scenario() -> None:
        async with AsyncGenserveClient(tiny_server.target) as aio:
            with pytest.raises(TypeError, match=refused):
                await aio.translate("tiny-i2i", photo)

    asyncio.run(scenario())


def test_arrays_with_alpha_travel_as_the_server_reads_the_same_png(client: GenserveClient) -> None:
    """`[np.asarray(Image.open("logo.png"))]` of a PNG with alpha (H x W x 4, or gray+alpha H x W x
    2) was refused ("C in (1, 3)") while the same file, path or bytes, or PIL image is served with
    its alpha dropped."""
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    from_array = client.super_resolve("tiny-sr", [rgba], format="raw")
    from_file = client.super_resolve("tiny-sr", [buf.getvalue()], format="raw")
    np.testing.assert_array_equal(from_array.images[0], from_file.images[0])
    la = rng.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(la, "LA").save(buf, format="PNG")
    enc = client.encode("tiny-vae-enc", [buf.getvalue(), la, Image.fromarray(la, "LA"), la[:, :, 0]])
    for mu in enc.mu[1:]:
        np.testing.assert_allclose(mu, enc.mu[0], rtol=1e-5)  # rows of one batch: float32 ulps


def test_errors_carry_code_message_and_request_id(client: GenserveClient) -> None:
    with pytest.raises(GenserveClientError) as info:
        client.sample("tiny-gen", 1000)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "count" in info.value.details and info.value.request_id
    with pytest.raises(GenserveClientError) as info:
        client.get_model("no-such-model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def _in_a_forked_child(work: Any, limit_s: float = 20.0) -> str:
    """What `work()` returned or raised in a child forked from this process ('hung' when it had not
    ended within `limit_s`: the child is killed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running the parent's cleanup
        try:
            said = f"returned {work()!r}"
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        os.write(write_end, said.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    try:
        deadline = time.monotonic() + limit_s
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "hung"
            time.sleep(0.05)
        return os.read(read_end, 4000).decode()
    finally:
        os.close(read_end)


def test_a_client_used_in_a_forked_child_is_refused_saying_how_to_use_processes(tiny_server: Any) -> None:
    # gRPC channels do not survive fork(): a child using its parent's channel worked, hung past its
    # deadline or crashed, as the parent's other threads happened to be in calls at the fork.
    with GenserveClient(tiny_server.target) as client:
        client.list_models()  # connected, as a client an application made at start is
        sampled = _in_a_forked_child(lambda: len(client.sample("tiny-gen", 1, timeout_s=5).images))
        streamed = _in_a_forked_child(lambda: list(client.sample_stream("tiny-gen", 2, timeout_s=5)))
        for said in (sampled, streamed):
            assert said.startswith("RuntimeError: GenserveClient: ") and "created in process" in said, said
            assert "spawn" in said and "create the client in the process that uses it" in said, said
        assert client.list_models()  # the parent's client is untouched


def test_an_async_client_used_in_a_forked_child_is_refused_saying_how_to_use_processes(
    tiny_server: Any,
) -> None:
    # As GenserveClient's: a child forked from a process whose loop (not running at the fork) holds
    # a connected AsyncGenserveClient ran that same loop, passed the loop check, and its call on the
    # parent's grpc.aio channel hung past its deadline, until the caller's own timeout or forever.
    loop = asyncio.new_event_loop()
    try:

        async def make() -> AsyncGenserveClient:
            client = AsyncGenserveClient(tiny_server.target)
            await client.list_models()  # connected, as a client an application made at start is
            return client

        client = loop.run_until_complete(make())

        def call() -> int:
            return len(loop.run_until_complete(asyncio.wait_for(client.list_models(timeout_s=2), 6)))

        said = _in_a_forked_child(call, limit_s=10.0)
        assert said.startswith("RuntimeError: AsyncGenserveClient: ") and "created in process" in said, said
        assert "spawn" in said and "create the client in the process that uses it" in said, said
        assert loop.run_until_complete(client.list_models())  # the parent's client is untouched
        loop.run_until_complete(client.close())
    finally:
        loop.close()


def test_async_client_calls_every_rpc(tiny_server: Any) -> None:
    async def scenario() -> None:
        async with AsyncGenserveClient(tiny_server.target) as client:
            many = await asyncio.gather(
                *(client.sample("tiny-gen", seeds=[s], format="raw") for s in range(8))
            )
            batch = await client.sample("tiny-gen", seeds=list(range(8)), format="raw")
            for one, image in zip(many, batch.images, strict=True):
                np.testing.assert_array_equal(one.images[0], image)
            streamed = [i async for c in client.sample_stream("tiny-gen", 9, chunk_size=4) for i in c.indices]
            assert streamed == list(range(9))
            assert len((await client.interpolate("tiny-gen", 3, 4, 3)).items) == 3
            enc = await client.encode("tiny-vae-enc", [np.zeros((8, 8), np.uint8)])
            assert (await client.decode("tiny-vae-dec", enc.mu)).images[0].shape == (8, 8, 1)
            assert (await client.super_resolve("tiny-sr", [rgb(8, 8)])).images[0].shape == (16, 16, 3)
            assert (await client.translate("tiny-i2i", [rgb(8, 8)])).images[0].shape == (8, 8, 3)
            assert {m.name for m in await client.list_models()} >= {"tiny-gen", "tiny-cond"}
            assert (await client.get_model("tiny-gen")).kind == "generator"
            with pytest.raises(GenserveClientError) as info:
                await client.sample("tiny-gen", 0)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())

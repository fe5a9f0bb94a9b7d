"""Large unary responses are serialized off the event loop (wire.py, Boundary.unary): their bytes are
what protobuf writes, small responses stay messages serialized by grpc, and a tiny request is
answered while a large response is being serialized."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf.message import Message
from server_support import (
    TINY_LATENT,
    UnaryContext,
    generator_graph,
    image_to_image_graph,
    reserving_handler,
    super_resolution_graph,
    write_model,
    write_tiny_generator,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import boundary, kserve_tensors, wire
from genserve_server.boundary import Boundary
from genserve_server.config import ServerConfig, TensorSpec
from genserve_server.main import App
from genserve_server.metrics import Metrics
from genserve_server.response_budget import ByteBudget

F32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True)


def _generated(rng: np.random.Generator, i: int) -> tpb.GeneratedImage:
    return tpb.GeneratedImage(
        index=i,
        image=tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=rng.bytes(1000 + i), shape=[3, 8, 8]),
        seed=2**40 + i if i else 0,  # an optional field set to its default is written too
        label=i % 3,
        from_cache=bool(i % 2),
        latent=tpb.Tensor(shape=[16], dtype=tpb.DTYPE_FLOAT32, data=rng.bytes(64)),
    )


def _responses() -> list[Message]:
    rng = np.random.default_rng(0)
    provenance = tpb.Provenance(
        model="m",
        version="1",
        model_sha256="ab" * 32,
        executed_batch_sizes=[64, 3, 300],
        used_models=[tpb.UsedModel(model="mapping", version="2")],
    )
    infer = kpb.ModelInferResponse(
        model_name="m", model_version="1", id="réq-1", raw_output_contents=[rng.bytes(300), b""]
    )
    infer.parameters["seed"].int64_param = 12345
    infer.outputs.add(name="image", datatype="FP32", shape=[2, 3, 8, 8])
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=rng.bytes(5000), shape=[50, 50, 2])
    return [
        pb.SampleResponse(images=[_generated(rng, i) for i in range(5)], provenance=provenance),
        # More items than wire.FEW_ITEMS: each serialized whole.
        pb.SampleResponse(images=[_generated(rng, i) for i in range(wire.FEW_ITEMS + 3)]),
        pb.SampleResponse(),
        pb.ImageResponse(images=[image, tpb.Image()], provenance=provenance, tiles=[17, 300]),
        pb.SampleCodesResponse(  # field 4 declared before field 3
            images=[_generated(rng, 0)],
            codes=[tpb.Tensor(shape=[4, 4], dtype=tpb.DTYPE_INT64, data=rng.bytes(128))],
            top_codes=[tpb.Tensor(shape=[2, 2], dtype=tpb.DTYPE_INT64, data=rng.bytes(32))],
            provenance=provenance,
        ),
        pb.EncodeResponse(
            latents=[
                pb.LatentDistribution(mu=tpb.Tensor(shape=[8], data=rng.bytes(32)), logvar=tpb.Tensor())
            ],
            provenance=provenance,
        ),
        infer,
    ]


@pytest.mark.parametrize("response", _responses(), ids=lambda m: type(m).__name__)
def test_serialize_writes_the_bytes_protobuf_writes(response: Message) -> None:
    assert wire.serialize(response) == response.SerializeToString()


def test_serializers_pass_serialized_responses_through_and_serialize_messages() -> None:
    serializer = wire.passing_bytes(pb.SampleResponse.SerializeToString)
    assert serializer is not None
    message = pb.SampleResponse(images=[tpb.GeneratedImage(index=3)])
    assert serializer(b"\x0a\x02\x28\x03") == b"\x0a\x02\x28\x03"
    assert serializer(message) == message.SerializeToString()
    assert wire.passing_bytes(None) is None


def _answer(predicted: int, response: pb.SampleResponse, budget: ByteBudget) -> Any:
    handler = reserving_handler(budget, predicted, response)

    async def main() -> Any:
        with ThreadPoolExecutor(1) as pool:
            ends = Boundary(Metrics(), serialize_pool=pool)
            return await ends.unary("Sample", object(), UnaryContext(), handler)  # type: ignore[arg-type]

    return asyncio.run(main())


def test_a_response_predicted_large_is_answered_as_its_bytes_and_holds_their_size() -> None:
    response = pb.SampleResponse(
        images=[tpb.GeneratedImage(index=i, image=tpb.Image(data=bytes(300_000))) for i in range(4)]
    )
    budget = ByteBudget("response budget", 64 << 20, 1.0)
    answer = _answer(wire.OFF_LOOP_BYTES, response, budget)
    assert type(answer) is bytes
    assert answer == response.SerializeToString()
    assert budget.held == len(answer)  # settled to the real size (released by grpc's done callback)


def test_a_response_predicted_small_stays_a_message_for_grpc_to_serialize() -> None:
    response = pb.SampleResponse(images=[tpb.GeneratedImage(index=1, image=tpb.Image(data=bytes(1000)))])
    budget = ByteBudget("response budget", 64 << 20, 1.0)
    answer = _answer(wire.OFF_LOOP_BYTES - 1, response, budget)
    assert answer is response
    assert budget.held == response.ByteSize()


def test_a_tiny_request_is_answered_while_a_large_response_is_being_serialized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    write_tiny_generator(models, "tiny-gen")
    write_model(  # 64 TENSOR_F32 images of 3x64x64 with latents: ~3 MiB, above wire.OFF_LOOP_BYTES
        models,
        "wide-gen",
        "generator",
        generator_graph(TINY_LATENT, 3, 64, 64),
        {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [64, 64]},
    )
    serializing, finish = threading.Event(), threading.Event()
    real_serialize = boundary.serialize

    def held_serialize(message: Message) -> bytes:
        serializing.set()
        finish.wait(30)  # held until the tiny request is answered (a bound, not a timing)
        return real_serialize(message)

    monkeypatch.setattr(boundary, "serialize", held_serialize)

    async def main() -> None:
        app = App(models, ServerConfig(), port=0, metrics_port=None)
        await app.start()
        try:
            options = [("grpc.max_receive_message_length", 64 << 20)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                big = asyncio.ensure_future(
                    stub.Sample(
                        pb.SampleRequest(model="wide-gen", count=64, base_seed=7, output=F32), timeout=60
                    )
                )
                assert await asyncio.to_thread(serializing.wait, 30), (
                    "the large response was never serialized"
                )
                try:
                    tiny = await stub.Sample(pb.SampleRequest(model="tiny-gen", count=1), timeout=20)
                    assert len(tiny.images) == 1
                    assert not big.done()  # its serialization is still held
                finally:
                    finish.set()
                answer: pb.SampleResponse = await big
                # The large answer holds what smaller requests of the same seeds get.
                last = await stub.Sample(
                    pb.SampleRequest(model="wide-gen", seeds=[7 + 63], output=F32), timeout=20
                )
            assert [g.seed for g in answer.images] == list(range(7, 7 + 64))
            assert answer.images[63].image == last.images[0].image
            assert answer.images[63].latent == last.images[0].latent
        finally:
            finish.set()
            await app.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_super_resolve_and_translate_put_each_image_in_the_response_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upscaled or translated image is written into the response's own repeated field, as
    Sample's are (service_parts.add_generated): an Image message built apart and then given to
    ImageResponse(images=...) is copied a second time on the event loop, ~150 ms of a 50 MB one in
    which no other call on the server made progress."""
    models = tmp_path / "models"
    write_model(
        models,
        "sr",
        "super_resolution",
        super_resolution_graph(2),
        {"channels": 3, "input_channels": 3, "input_range": [0.0, 1.0], "scale_factor": 2, "min_size": 4},
    )
    write_model(
        models,
        "i2i",
        "image_to_image",
        image_to_image_graph(4),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 4},
    )
    built_apart: list[int] = []
    real_image = tpb.Image

    def counting_image(*args: Any, **kwargs: Any) -> tpb.Image:
        if kwargs.get("data"):
            built_apart.append(len(kwargs["data"]))
        return real_image(*args, **kwargs)

    monkeypatch.setattr(tpb, "Image", counting_image)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = real_image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=pixels.tobytes(), shape=[16, 16, 3])
    raw = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)

    async def main() -> tuple[pb.ImageResponse, pb.ImageResponse]:
        app = App(models, ServerConfig(), port=0, metrics_port=None)
        await app.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                upscaled = await stub.SuperResolve(
                    pb.ImageRequest(model="sr", images=[image, image], output=raw), timeout=30
                )
                translated = await stub.Translate(
                    pb.ImageRequest(model="i2i", images=[image], output=raw), timeout=30
                )
                return upscaled, translated
        finally:
            await app.stop()

    upscaled, translated = asyncio.run(asyncio.wait_for(main(), 120))
    assert [list(im.shape) for im in upscaled.images] == [[32, 32, 3], [32, 32, 3]]
    assert [list(im.shape) for im in translated.images] == [[16, 16, 3]]
    assert all(im.format == tpb.IMAGE_FORMAT_RAW_UINT8 and im.data for im in upscaled.images)
    assert upscaled.provenance.model == "sr" and translated.provenance.model == "i2i"
    assert built_apart == []  # no image message built apart to be copied into its response


def test_a_large_model_infer_response_is_built_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ModelInfer whose outputs pass wire.OFF_LOOP_BYTES has its response built on the codec pool,
    its raw_output_contents written into the response's bytes once: built on the event loop (a copy
    by tobytes, another into the message) it held the loop ~70-700 ms for a 50 MB SR output, in
    which no other call on the server made progress. The bytes are what the message would be."""
    models = tmp_path / "models"
    write_tiny_generator(models, "tiny-gen")
    write_model(
        models,
        "sr",
        "super_resolution",
        super_resolution_graph(2),
        {"channels": 3, "input_channels": 3, "input_range": [0.0, 1.0], "scale_factor": 2, "min_size": 4},
    )
    building, finish = threading.Event(), threading.Event()
    released: list[bool] = []
    real_datatype = kserve_tensors.protocol_datatype

    def held_datatype(spec: TensorSpec) -> str:
        if spec.name == "output_image":  # the response's tensor metadata, as its bytes are built
            building.set()
            released.append(finish.wait(10))  # a bound: True when the tiny call was answered meanwhile
        return real_datatype(spec)

    monkeypatch.setattr(kserve_tensors, "protocol_datatype", held_datatype)
    image = np.random.default_rng(3).random((1, 3, 160, 160), dtype=np.float32)  # out: 1.2 MB
    request = kpb.ModelInferRequest(model_name="sr", id="big-1", raw_input_contents=[image.tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=image.shape)

    async def main() -> kpb.ModelInferResponse:
        app = App(models, ServerConfig(), port=0, metrics_port=None)
        await app.start()
        try:
            options = [("grpc.max_receive_message_length", 64 << 20)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
                big = asyncio.ensure_future(
                    kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
                )
                assert await asyncio.to_thread(building.wait, 30), "the response was never built"
                try:
                    stub = pb_grpc.GenerationServiceStub(channel)
                    tiny = await stub.Sample(pb.SampleRequest(model="tiny-gen", count=1), timeout=20)
                    assert len(tiny.images) == 1
                finally:
                    finish.set()
                answer: kpb.ModelInferResponse = await big
                return answer
        finally:
            finish.set()
            await app.stop()

    answer = asyncio.run(asyncio.wait_for(main(), 120))
    assert released == [True]  # the tiny call was answered while the large response was built
    session = ort.InferenceSession(super_resolution_graph(2).SerializeToString())
    expected = session.run(None, {"image": image})[0].astype("<f4")
    assert (answer.model_name, answer.model_version, answer.id) == ("sr", "1", "big-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [
        ("output_image", "FP32", [1, 3, 320, 320])
    ]
    assert len(answer.raw_output_contents) == 1
    got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_bytes_field_appended_to_a_serialized_head_is_what_protobuf_writes() -> None:
    rng = np.random.default_rng(1)
    values = [rng.bytes(wire.COPY_CHUNK_BYTES * 2 + 17), b"", rng.bytes(300)]
    head = kpb.ModelInferResponse(model_name="m", model_version="1", id="réq")
    head.parameters["seed"].int64_param = 5
    head.outputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8])
    whole = kpb.ModelInferResponse()
    whole.CopyFrom(head)
    whole.raw_output_contents.extend(values)
    views = [memoryview(np.frombuffer(v, np.uint8)) for v in values]
    assert wire.with_bytes_field(head.SerializeToString(), 6, views) == whole.SerializeToString()

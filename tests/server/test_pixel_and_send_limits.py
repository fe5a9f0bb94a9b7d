"""Review (limits that meet, image kinds): pixel budgets, tiles and the model's own minimum size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper
from server_support import (
    ServerProcess,
    _image,
    _init,
    _model,
    generator_graph,
    image_to_image_graph,
    running_server,
    start_server,
    super_resolution_graph,
    write_model,
    write_vae_encoder,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

MIN_SIDE = 16  # the reflect-padded SR model below fails on inputs of 8 or fewer pixels a side


def reflect_sr_graph(scale: int) -> onnx.ModelProto:
    """Pad reflect 8 -> Conv 17x17 (no pad) -> Resize x scale -> Tanh: a receptive-field radius of 8,
    and ONNX Runtime refuses a reflect pad of 8 on a side of 8 or less (card min_size 16)."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Pad", ["image", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "K"], ["conv"]),
        helper.make_node("Resize", ["conv", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Tanh", ["up"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr_reflect",
        [_image("image", 3, "h", "w")],
        [_image("output_image", 3, "H", "W")],
        [
            _init("pads", np.array([0, 0, 8, 8, 0, 0, 8, 8], np.int64)),
            _init("K", rng.normal(0, 0.02, (3, 3, 17, 17)).astype(np.float32)),
            _init("scales", np.array([1, 1, scale, scale], np.float32)),
        ],
    )
    return _model(graph)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("pixels-models")
    write_model(
        root,
        "sr-min",
        "super_resolution",
        reflect_sr_graph(2),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "size_multiple": 1,
            "tile_size": 64,
            "tile_overlap": 16,
            "min_size": MIN_SIDE,
        },
        config={"batching": {"max_batch_size": 8, "max_queue_delay_ms": 1.0, "max_queue_size": 256}},
    )
    proc = start_server(root, tmp_path_factory.mktemp("pixels-server"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _rgb(side: int) -> tpb.Image:
    data = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8).tobytes()
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=data, shape=[side, side, 3])


def test_super_resolve_of_an_image_at_min_size_is_served(stub: pb_grpc.GenerationServiceStub) -> None:
    response = stub.SuperResolve(pb.ImageRequest(model="sr-min", images=[_rgb(MIN_SIDE)]), timeout=30)
    assert list(response.images[0].shape)[:2] == [2 * MIN_SIDE, 2 * MIN_SIDE]


@pytest.mark.parametrize(("tile_size", "tile_overlap"), [(8, 0), (12, 2)])
def test_a_tile_size_below_the_models_min_size_is_refused_naming_tile_size(
    stub: pb_grpc.GenerationServiceStub, tile_size: int, tile_overlap: int
) -> None:
    """Tiles are model inputs: a tile smaller than the card's min_size was fed to the model, which
    failed every call (INTERNAL 'model call failed', after halving the batch down to single rows)."""
    request = pb.ImageRequest(
        model="sr-min", images=[_rgb(64)], tile_size=tile_size, tile_overlap=tile_overlap
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SuperResolve(request, timeout=30)
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "tile_size" in err.details() and str(MIN_SIDE) in err.details(), err.details()


def test_size_refusals_name_an_image_height_by_width_as_its_shape_gives_it(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Every size in a refusal reads H x W, the order of the shape the client sent ([H, W, C] raw,
    a card's image_size, KServe's [N, C, H, W]); the minimum-size and decode-limit refusals printed
    W x H, so an image of shape [20, 8, 3] was 'got 8x20' beside Encode's 'must be 28x28, got 20x8'."""

    def refusal(shape: list[int]) -> str:
        image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(int(np.prod(shape))), shape=shape)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SuperResolve(pb.ImageRequest(model="sr-min", images=[image]), timeout=30)
        err = excinfo.value
        assert isinstance(err, grpc.Call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        return str(err.details())

    narrow = refusal([20, 8, 3])
    assert narrow == f"images[0]: must be at least {MIN_SIDE} pixels on each side, got 20x8", narrow
    tall = refusal([1100, 1000, 3])
    assert "1100x1000 = 1100000 pixels exceeds max_sr_input_pixels" in tall, tall


# ------------------------------------------------------------ images + latents vs the send limit

SEND_LIMIT = 1024 * 1024  # the smallest max_send_message_bytes the server takes
BIG_Z = 512  # 2 KiB of float32 latent per image
SIDE = 48  # 1 x 48 x 48 RAW_UINT8: 2,304 bytes per image
WIDE = 256  # 1 x 256 x 256: 256 KiB of float32 an image, 3 of which fit 1 MiB
ROWS = 256  # images 589,824 bytes and latents 524,288 bytes: each fits 1 MiB, together they do not


@pytest.fixture(scope="module")
def send_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("send-models")
    write_model(
        root,
        "g-big-z",
        "generator",
        generator_graph(BIG_Z, 1, SIDE, SIDE),
        {"latent_dim": BIG_Z, "channels": 1, "image_size": [SIDE, SIDE]},
        config={"batching": {"max_batch_size": 64, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}},
    )
    write_model(
        root,
        "g-wide",
        "generator",
        generator_graph(4, 1, WIDE, WIDE),
        {"latent_dim": 4, "channels": 1, "image_size": [WIDE, WIDE]},
        config={"batching": {"max_batch_size": 64, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}},
    )
    proc = start_server(
        root,
        tmp_path_factory.mktemp("send-server"),
        config={"limits": {"max_send_message_bytes": SEND_LIMIT}},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def send_stub(send_server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(send_server.target, options=options) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


RAW_WITH_LATENTS = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8, return_latents=True)
LATENTS = tpb.Tensor(
    shape=[ROWS, BIG_Z], dtype=tpb.DTYPE_FLOAT32, data=np.zeros((ROWS, BIG_Z), "<f4").tobytes()
)


@pytest.mark.parametrize(
    "rpc",
    ["Sample", "Decode", "Interpolate", "SampleStream"],
)
def test_images_and_latents_together_above_the_send_limit_are_refused_naming_output(
    send_stub: pb_grpc.GenerationServiceStub, rpc: str
) -> None:
    """The images and the returned latents were each checked against max_send_message_bytes, never
    their sum: the response was computed, then failed RESOURCE_EXHAUSTED 'Sent message larger than
    max' (which clients retry) with a server traceback."""
    if rpc == "Sample":
        call = lambda: send_stub.Sample(  # noqa: E731
            pb.SampleRequest(model="g-big-z", count=ROWS, base_seed=0, output=RAW_WITH_LATENTS), timeout=60
        )
    elif rpc == "Decode":
        call = lambda: send_stub.Decode(  # noqa: E731
            pb.DecodeRequest(model="g-big-z", latents=LATENTS, output=RAW_WITH_LATENTS), timeout=60
        )
    elif rpc == "Interpolate":
        call = lambda: send_stub.Interpolate(  # noqa: E731
            pb.InterpolateRequest(
                model="g-big-z",
                start=pb.LatentPoint(seed=1),
                end=pb.LatentPoint(seed=2),
                steps=ROWS,
                output=RAW_WITH_LATENTS,
            ),
            timeout=60,
        )
    else:
        sample = pb.SampleRequest(model="g-big-z", count=ROWS, output=RAW_WITH_LATENTS)
        call = lambda: list(  # noqa: E731
            send_stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=ROWS), timeout=60)
        )
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "max_send_message_bytes" in err.details() and "output" in err.details(), err.details()


def test_images_with_latents_within_the_send_limit_are_served(
    send_stub: pb_grpc.GenerationServiceStub,
) -> None:
    half = ROWS // 2
    response = send_stub.Sample(
        pb.SampleRequest(model="g-big-z", count=half, base_seed=0, output=RAW_WITH_LATENTS), timeout=60
    )
    assert len(response.images) == half and len(response.images[0].latent.data) == 4 * BIG_Z


def test_a_streams_default_chunk_holds_what_fits_the_send_limit(
    send_stub: pb_grpc.GenerationServiceStub,
) -> None:
    """chunk_size 0 means 64 images, or fewer where the server's limits are smaller: the send limit
    is one of them. The server refused its own default chunk (8 float32 images of 256 KiB under
    1 MiB) naming the client's chunk_size, so a bulk job had to guess --chunk-size."""
    tensor = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)
    sample = pb.SampleRequest(model="g-wide", count=8, base_seed=3, output=tensor)
    chunks = list(send_stub.SampleStream(pb.SampleStreamRequest(sample=sample), timeout=60))
    assert [image.index for chunk in chunks for image in chunk.images] == list(range(8))
    assert max(len(chunk.images) for chunk in chunks) == 3  # (1 MiB - framing) // 256 KiB
    # A chunk the client asks for is checked as before: refused before compute, naming output.
    with pytest.raises(grpc.RpcError) as excinfo:
        list(send_stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=8), timeout=60))
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "max_send_message_bytes" in err.details(), err.details()


# ---------------------------------------------------------------------------- per-image framing at the limit

MANY = 4096  # an operator's max_images_per_request for tiny images
TINY_H, TINY_W = 15, 16  # 240 bytes RAW_UINT8: 4096 images are exactly max_send_message_bytes - 64 KiB


@pytest.fixture(scope="module")
def many_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("many-models")
    write_model(
        root,
        "g-tiny",
        "generator",
        generator_graph(8, 1, TINY_H, TINY_W),
        {"latent_dim": 8, "channels": 1, "image_size": [TINY_H, TINY_W]},
        config={"batching": {"max_batch_size": 512, "max_queue_delay_ms": 1.0, "max_queue_size": MANY}},
    )
    proc = start_server(
        root,
        tmp_path_factory.mktemp("many-server"),
        config={"limits": {"max_send_message_bytes": SEND_LIMIT, "max_images_per_request": MANY}},
    )
    yield proc
    proc.stop()


def test_many_small_images_whose_framing_passes_the_send_limit_are_refused_naming_output(
    many_server: ServerProcess,
) -> None:
    """The send check adds a fixed 64 KiB for protobuf framing, but each image carries its own (index,
    seed, shape, field tags: ~26 bytes): 4096 images of 240 bytes passed the check and the response
    failed RESOURCE_EXHAUSTED 'Sent message larger than max' after compute (clients retry it)."""
    assert MANY * TINY_H * TINY_W + 64 * 1024 == SEND_LIMIT  # exactly at the limit the check allowed
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(many_server.target, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.SampleRequest(
            model="g-tiny", count=MANY, output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
        )
        try:
            response = stub.Sample(request, timeout=60)
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "output" in err.details() and "max_send_message_bytes" in err.details(), err.details()
        else:
            assert response.ByteSize() <= SEND_LIMIT


# ---------------------------------------------------------------------------- max_input_pixels on every input


@pytest.fixture(scope="module")
def small_pixels_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("pixels-enc-models")
    write_vae_encoder(root, "enc")  # 8x8 gray
    proc = start_server(
        root, tmp_path_factory.mktemp("pixels-enc-server"), config={"limits": {"max_input_pixels": 63}}
    )
    yield proc
    proc.stop()


@pytest.mark.parametrize("protocol", ["genserve.v1", "kserve"])
def test_an_encoder_input_above_max_input_pixels_is_refused_by_both_protocols(
    small_pixels_server: ServerProcess, protocol: str
) -> None:
    """docs/operations.md: max_input_pixels bounds every input image. KServe's ModelInfer refused an
    8x8 encoder input under max_input_pixels 63, genserve.v1 Encode decoded and encoded it (its bound
    was the encoder's own size)."""
    with grpc.insecure_channel(small_pixels_server.target) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            if protocol == "kserve":
                image = np.zeros((1, 1, 8, 8), "<f4")
                request = kpb.ModelInferRequest(model_name="enc", raw_input_contents=[image.tobytes()])
                request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
                kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            else:
                image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(64), shape=[8, 8, 1])
                pb_grpc.GenerationServiceStub(channel).Encode(
                    pb.EncodeRequest(model="enc", images=[image]), timeout=30
                )
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "max_input_pixels" in err.details() and "63" in err.details(), err.details()


def test_get_model_advertises_no_images_for_an_encoder_whose_input_is_above_max_input_pixels(
    small_pixels_server: ServerProcess,
) -> None:
    """ModelInfo.max_images_per_request is the most images an Encode may send, 0 where Encode takes
    none (genserve.proto). An encoder whose fixed input (8x8 = 64 pixels) is above max_input_pixels
    (63) refuses every Encode naming that limit, yet GetModel and ListModels advertised 256: a client
    sizing its requests from them sent requests that could never succeed."""
    with grpc.insecure_channel(small_pixels_server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(name="enc"), timeout=30)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert info.kind == "vae_encoder"
    assert info.max_images_per_request == 0
    assert [m.max_images_per_request for m in listed.models if m.name == "enc"] == [0]


def test_kserve_model_config_and_the_load_log_say_an_encoder_above_max_input_pixels_takes_no_rows(
    small_pixels_server: ServerProcess,
) -> None:
    """GetModel advertises 0 images for an encoder whose fixed input (8x8) is above max_input_pixels
    (63), as every Encode and ModelInfer is refused; KServe's ModelConfig advertised max_batch_size 16
    (a Triton client batches up to it), and the load, READY, said nothing of why it takes no call."""
    with grpc.insecure_channel(small_pixels_server.target) as channel:
        config = kpb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            kpb.ModelConfigRequest(name="enc"), timeout=30
        )
    assert config.config.max_batch_size == 0
    log = small_pixels_server.log_path.read_text()
    warning = [line for line in log.splitlines() if "WARNING" in line and "max_input_pixels" in line]
    assert warning and "enc" in warning[0] and "63" in warning[0], log


def test_get_model_says_a_translator_whose_fixed_input_is_above_max_input_pixels_takes_no_request(
    tmp_path: Path,
) -> None:
    """A translator whose card fixes its input at 8x8 (64 pixels) under max_input_pixels 63 refuses
    every Translate naming the limit, and KServe's ModelConfig advertises max_batch_size 0 for it,
    but GetModel advertised max_batch_size 16 beside a READY version with no reason: a client had
    nothing to tell it that no request fits. The READY version's reason says so, as its load log."""
    graph = image_to_image_graph(4)
    for tensor in (graph.graph.input[0], graph.graph.output[0]):  # a graph of fixed 8x8 images
        for dim in tensor.type.tensor_type.shape.dim[2:]:
            dim.dim_value = 8
    models = tmp_path / "models"
    write_model(
        models,
        "i2i",
        "image_to_image",
        graph,
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [-1.0, 1.0],
            "image_size": [8, 8],
            "size_multiple": 4,
            "min_size": 4,
        },
    )
    with running_server(models, tmp_path / "work", config={"limits": {"max_input_pixels": 63}}) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(8 * 8 * 3), shape=[8, 8, 3])
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.Translate(pb.ImageRequest(model="i2i", images=[image]), timeout=30)
            refused = excinfo.value
            assert isinstance(refused, grpc.Call)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
            assert "max_input_pixels" in (refused.details() or ""), refused.details()
            info = stub.GetModel(pb.GetModelRequest(name="i2i"), timeout=30)
            listed = [
                m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.name == "i2i"
            ]
    assert [v.state for v in info.versions] == [pb.MODEL_STATE_READY]
    for version in (info.versions[0], listed[0].versions[0]):
        assert "takes no request" in version.reason and "max_input_pixels 63" in version.reason, version


def _fixed_size_models(root: Path) -> None:
    """Image kinds whose cards fix their input at 8x8: a translator of a fixed 8x8 graph, one of a
    graph of dynamic dimensions, and a super-resolution model of a dynamic graph."""
    i2i_card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [-1.0, 1.0],
        "image_size": [8, 8],
        "size_multiple": 4,
        "min_size": 4,
    }
    fixed = image_to_image_graph(4)
    for tensor in (fixed.graph.input[0], fixed.graph.output[0]):
        for dim in tensor.type.tensor_type.shape.dim[2:]:
            dim.dim_value = 8
    write_model(root, "i2i-fixed", "image_to_image", fixed, i2i_card)
    write_model(root, "i2i-dynamic", "image_to_image", image_to_image_graph(4), i2i_card)
    sr_card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [0.0, 1.0],
        "scale_factor": 2,
        "size_multiple": 1,
        "tile_size": 96,
        "tile_overlap": 8,
        "min_size": 4,
        "image_size": [8, 8],
    }
    write_model(root, "sr-fixed", "super_resolution", super_resolution_graph(2), sr_card)


def test_an_image_not_of_the_size_the_card_fixes_is_refused_naming_both_sizes(tmp_path: Path) -> None:
    """A Translate or SuperResolve of a model whose card fixes its input size (image_size) did not
    check the image's size: a 4x4 image sent to a fixed 8x8 graph failed INTERNAL 'model call failed',
    and one sent to a graph of dynamic dimensions was served despite the card. Each is refused
    INVALID_ARGUMENT naming the image, the size the card fixes and the size given, as KServe's
    ModelInfer refuses it; an 8x8 image is served."""
    models = tmp_path / "models"
    _fixed_size_models(models)
    with running_server(models, tmp_path / "work") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            calls = [
                (stub.Translate, "i2i-fixed"),
                (stub.Translate, "i2i-dynamic"),
                (stub.SuperResolve, "sr-fixed"),
            ]
            for call, model in calls:
                served = call(pb.ImageRequest(model=model, images=[_rgb(8)]), timeout=30)
                assert len(served.images) == 1
                with pytest.raises(grpc.RpcError) as excinfo:
                    call(pb.ImageRequest(model=model, images=[_rgb(8), _rgb(4)]), timeout=30)
                refused = excinfo.value
                assert isinstance(refused, grpc.Call)
                details = refused.details() or ""
                assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (model, details)
                assert details.startswith("images[1]: must be 8x8 ") and details.endswith("got 4x4"), details
                assert "image_size" in details, details
            request = kpb.ModelInferRequest(
                model_name="i2i-dynamic", raw_input_contents=[np.zeros((1, 3, 4, 4), np.float32).tobytes()]
            )
            request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 4, 4])
            with pytest.raises(grpc.RpcError) as excinfo:
                kserve.ModelInfer(request, timeout=30)
            refused = excinfo.value
            assert isinstance(refused, grpc.Call)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
            assert (refused.details() or "").startswith("inputs[image].shape: must be 8x8 "), (
                refused.details()
            )
            assert (refused.details() or "").endswith("got 4x4"), refused.details()

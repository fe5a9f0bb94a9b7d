"""Two-way translators (kind two_way_translator, CycleGAN) served by a real server on 127.0.0.1:
Translate with a direction. References come from ONNX Runtime running each direction's generator
on its own (translator_models.py), on the same inputs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from server_support import (
    F32,
    ServerProcess,
    healthy_models,
    image_to_image_graph,
    start_server,
    tensor_of,
    write_model,
)
from translator_models import A_TO_B_SEED, B_TO_A_SEED, DOMAINS, one_way_graph, write_translator

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.config import ConfigError, load_card

MODEL = "tiny-cyclegan"
ONE_WAY = "tiny-i2i"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("translator-models")
    write_translator(root, MODEL)
    card = {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 8}
    write_model(root, ONE_WAY, "image_to_image", image_to_image_graph(4), card)
    server = start_server(root, tmp_path_factory.mktemp("translator-server"), extra_args=healthy_models(root))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _session(seed: int) -> ort.InferenceSession:
    return ort.InferenceSession(one_way_graph(seed).SerializeToString(), providers=["CPUExecutionProvider"])


REFERENCE = {pb.DIRECTION_A_TO_B: _session(A_TO_B_SEED), pb.DIRECTION_B_TO_A: _session(B_TO_A_SEED)}


def digits(n: int, side: int = 12, seed: int = 0) -> np.ndarray:
    """float32 [n, 1, side, side] in [0, 1]."""
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, side, side)).astype(np.float32)


def f32(image: np.ndarray) -> tpb.Image:
    return tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=image.tobytes(), shape=image.shape)


def translate(
    stub: pb_grpc.GenerationServiceStub, images: np.ndarray, direction: int, model: str = MODEL
) -> pb.ImageResponse:
    request = pb.ImageRequest(model=model, images=[f32(i) for i in images], output=F32, direction=direction)
    response: pb.ImageResponse = stub.Translate(request)
    return response


def expected(images: np.ndarray, direction: int) -> np.ndarray:
    out: np.ndarray = REFERENCE[direction].run(["output_image"], {"image": images})[0]
    return out


def error_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()  # type: ignore[operator]
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err.code(), str(err.details())


@pytest.mark.parametrize("direction", [pb.DIRECTION_A_TO_B, pb.DIRECTION_B_TO_A])
def test_each_direction_matches_its_generator_in_onnx_runtime(
    stub: pb_grpc.GenerationServiceStub, direction: int
) -> None:
    images = digits(3, seed=direction)
    response = translate(stub, images, direction)
    got = np.stack([tensor_of(i) for i in response.images])
    np.testing.assert_allclose(got, expected(images, direction), atol=1e-6)
    other = pb.DIRECTION_B_TO_A if direction == pb.DIRECTION_A_TO_B else pb.DIRECTION_A_TO_B
    assert np.abs(got - expected(images, other)).max() > 1e-2  # the directions really differ


def test_unset_direction_is_a_to_b(stub: pb_grpc.GenerationServiceStub) -> None:
    images = digits(2, seed=5)
    unset = translate(stub, images, pb.DIRECTION_UNSPECIFIED)
    explicit = translate(stub, images, pb.DIRECTION_A_TO_B)
    assert [i.data for i in unset.images] == [i.data for i in explicit.images]


@pytest.mark.parametrize("direction", [pb.DIRECTION_A_TO_B, pb.DIRECTION_B_TO_A])
def test_rows_are_byte_identical_alone_and_in_a_batch(
    stub: pb_grpc.GenerationServiceStub, direction: int
) -> None:
    images = digits(6, seed=10 + direction)
    batched = translate(stub, images, direction)
    assert max(batched.provenance.executed_batch_sizes) > 1
    alone = [translate(stub, images[i : i + 1], direction) for i in range(len(images))]
    assert all(list(a.provenance.executed_batch_sizes) == [1] for a in alone)
    assert [i.data for i in batched.images] == [a.images[0].data for a in alone]


def test_concurrent_requests_of_both_directions_each_get_their_own(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # Within one batch window (20 ms): rows of both directions reach the batcher together, and
    # each must still be computed by its own generator.
    jobs = [(i % 2 + 1, digits(2, seed=100 + i)) for i in range(12)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: translate(stub, job[1], job[0]), jobs))
    for (direction, images), response in zip(jobs, responses, strict=True):
        got = np.stack([tensor_of(i) for i in response.images])
        np.testing.assert_allclose(got, expected(images, direction), atol=1e-6)


def test_padded_sizes_are_cropped_back(stub: pb_grpc.GenerationServiceStub) -> None:
    image = digits(1, side=10, seed=3)
    response = translate(stub, image, pb.DIRECTION_B_TO_A)
    got = tensor_of(response.images[0])
    assert got.shape == (1, 10, 10)
    padded = np.pad(image[0], ((0, 0), (0, 2), (0, 2)), mode="reflect")[np.newaxis]
    np.testing.assert_allclose(got, expected(padded, pb.DIRECTION_B_TO_A)[0, :, :10, :10], atol=1e-6)


def test_a_one_way_model_refuses_b_to_a_naming_the_field(stub: pb_grpc.GenerationServiceStub) -> None:
    rgb = np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    ok = translate(stub, rgb, pb.DIRECTION_A_TO_B, model=ONE_WAY)
    assert len(ok.images) == 1
    code, details = error_of(lambda: translate(stub, rgb, pb.DIRECTION_B_TO_A, model=ONE_WAY))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "direction" in details and "one-way" in details and "DIRECTION_B_TO_A" in details


def test_an_unknown_direction_value_is_invalid(stub: pb_grpc.GenerationServiceStub) -> None:
    code, details = error_of(lambda: translate(stub, digits(1), 7))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "direction" in details and "7" in details


def test_super_resolve_takes_no_direction(stub: pb_grpc.GenerationServiceStub) -> None:
    request = pb.ImageRequest(model=MODEL, images=[f32(digits(1)[0])], direction=pb.DIRECTION_B_TO_A)
    code, details = error_of(lambda: stub.SuperResolve(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "direction" in details


def test_card_names_the_domains(stub: pb_grpc.GenerationServiceStub) -> None:
    info = stub.GetModel(pb.GetModelRequest(name=MODEL))
    assert info.kind == "two_way_translator"
    assert json.loads(info.versions[0].card_json)["domains"] == DOMAINS


def test_kserve_model_infer_refuses_a_two_way_translator(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
        code, details = error_of(lambda: kstub.ModelInfer(kpb.ModelInferRequest(model_name=MODEL)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "two_way_translator" in details


def test_a_card_without_domains_is_refused(tmp_path: Path) -> None:
    version_dir = write_translator(tmp_path, domains=False)
    with pytest.raises(ConfigError, match="domains"):
        load_card(version_dir / "card.json")


# ----------------------------------------------------------------------------- client library and CLI


def test_client_library_translates_both_ways(server: ServerProcess) -> None:
    from genserve_client import AsyncGenserveClient, GenserveClient

    image = (digits(1, seed=42)[0, 0] * 255).round().astype(np.uint8)  # a gray [H, W] digit
    as_input = image.astype(np.float32)[np.newaxis, np.newaxis] / 255
    with GenserveClient(server.target) as client:
        for name, direction in (("a_to_b", pb.DIRECTION_A_TO_B), ("b_to_a", pb.DIRECTION_B_TO_A)):
            result = client.translate(MODEL, [image], direction=name, format="raw")
            want = np.rint(np.clip(expected(as_input, direction)[0, 0], 0, 1) * 255)
            assert np.abs(result.images[0][:, :, 0].astype(np.int64) - want).max() <= 1
        with pytest.raises(ValueError, match="direction must be one of a_to_b, b_to_a"):
            client.translate(MODEL, [image], direction="sideways")

    async def both_clients_agree() -> None:
        async with AsyncGenserveClient(server.target) as aclient:
            got = await aclient.translate(MODEL, [image], direction="b_to_a", format="raw")
        with GenserveClient(server.target) as client:
            assert got.raw == client.translate(MODEL, [image], direction="b_to_a", format="raw").raw

    asyncio.run(both_clients_agree())


def test_cli_translate_direction(server: ServerProcess, tmp_path: Path) -> None:
    from genserve_client.cli import main

    src = tmp_path / "digit.png"
    Image.fromarray((digits(1, seed=8)[0, 0] * 255).round().astype(np.uint8)).save(src)
    outputs = {}
    for direction in ("a_to_b", "b_to_a"):
        out = tmp_path / f"{direction}.png"
        argv = ["--target", server.target, "translate", str(src), str(out), "--model", MODEL]
        assert main([*argv, "--direction", direction]) == 0
        with Image.open(out) as picture:
            outputs[direction] = np.asarray(picture)
    assert outputs["a_to_b"].shape == outputs["b_to_a"].shape == (12, 12)
    assert not np.array_equal(outputs["a_to_b"], outputs["b_to_a"])
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(
            [
                "--target",
                server.target,
                "translate",
                str(src),
                str(tmp_path / "x.png"),
                "--model",
                MODEL,
                "--direction",
                "up",
            ]
        )

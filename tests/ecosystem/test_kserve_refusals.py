"""KServe ModelInfer and ModelConfig refusals: they name the KServe field the client set and the
limit, never a genserve.v1 field or option, and never end as INTERNAL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from server_support import (
    ServerProcess,
    generator_graph,
    start_server,
    super_resolution_graph,
    write_model,
    write_tiny_generator,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve_server import kserve_tensors
from genserve_server.config import CARD_DTYPES, Card, load_card
from genserve_server.errors import GenserveError
from genserve_server.kserve_tensors import DTYPES

SEND_LIMIT = 1024 * 1024  # the smallest max_send_message_bytes the server takes
WIDE = 256  # 1 x 256 x 256 float32: 256 KiB an image, 3 of which fit 1 MiB (less 64 KiB overhead)
SR_CARD = {
    "channels": 3,
    "input_channels": 3,
    "input_range": [0.0, 1.0],
    "scale_factor": 2,
    "size_multiple": 1,
    "tile_size": 96,
    "tile_overlap": 8,
    "min_size": 4,
}
BATCHING = {"max_batch_size": 16, "max_queue_delay_ms": 1.0, "max_queue_size": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("kserve-refusal-models")
    write_model(
        root,
        "g-wide",
        "generator",
        generator_graph(4, 1, WIDE, WIDE),
        {"latent_dim": 4, "channels": 1, "image_size": [WIDE, WIDE]},
        config={"batching": BATCHING},
    )
    write_model(
        root, "sr", "super_resolution", super_resolution_graph(2), SR_CARD, config={"batching": BATCHING}
    )
    # The same net taking float16 images (card dtype float16): KServe clients send it FP16.
    version = write_model(root, "sr-fp16", "super_resolution", _float16_image_input(), SR_CARD)
    card = json.loads((version / "card.json").read_text())
    card["inputs"][0]["dtype"] = "float16"
    (version / "card.json").write_text(json.dumps(card))
    # A card whose tensor dtype is none of card.json's (docs/model-repository.md: float32, int64,
    # float16): a hand-written "float" for z.
    version = write_tiny_generator(root, "g-bad-dtype")
    card = json.loads((version / "card.json").read_text())
    card["inputs"][0]["dtype"] = "float"
    (version / "card.json").write_text(json.dumps(card))
    proc = start_server(
        root,
        tmp_path_factory.mktemp("kserve-refusal-server"),
        config={"limits": {"max_send_message_bytes": SEND_LIMIT}},
        extra_args=("--require-models", "g-wide,sr"),
    )
    yield proc
    proc.stop()


def _float16_image_input() -> onnx.ModelProto:
    """super_resolution_graph(2) whose input `image` is float16, cast to float first."""
    graph = super_resolution_graph(2)
    for node in graph.graph.node:
        node.input[:] = ["image_in" if i == "image" else i for i in node.input]
    graph.graph.node.insert(0, helper.make_node("Cast", ["image"], ["image_in"], to=TensorProto.FLOAT))
    image = next(i for i in graph.graph.input if i.name == "image")
    image.type.tensor_type.elem_type = TensorProto.FLOAT16
    return graph


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[kpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel)


def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    return error.code(), error.details()


def test_a_response_over_the_send_limit_names_the_kserve_rows_field_and_what_fits(
    stub: kpb_grpc.GRPCInferenceServiceStub,
) -> None:
    """The refusal named genserve.v1's `output` (no such ModelInferRequest field) and told the client
    to ask for an encoded format (PNG/JPEG/WEBP), which ModelInfer cannot: it names the field whose
    rows made the response too large, the limit, and how many rows fit."""
    by_count = kpb.ModelInferRequest(model_name="g-wide")
    by_count.parameters["count"].int64_param = 4
    z = np.zeros((4, 4), np.float32)
    by_z = kpb.ModelInferRequest(
        model_name="g-wide",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="z", datatype="FP32", shape=[4, 4])],
        raw_input_contents=[z.tobytes()],
    )
    image = np.full((2, 3, 256, 256), 0.5, np.float32)  # 2 x 3 x 512 x 512 float32 out: 6 MiB
    sr = kpb.ModelInferRequest(
        model_name="sr",
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[2, 3, 256, 256])
        ],
        raw_input_contents=[image.tobytes()],
    )
    for request, field, fits in (
        (by_count, "parameters[count]", "at most 3 rows fit"),
        (by_z, "inputs[z].shape[0]", "at most 3 rows fit"),
        (sr, "inputs[image].shape", "smaller images"),
    ):
        code, details = _refusal(lambda r=request: stub.ModelInfer(r, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(f"{field}: "), details
        assert f"max_send_message_bytes={SEND_LIMIT}" in details and fits in details, details
        assert "PNG" not in details and "format" not in details, details
    # What the message says fits is served.
    by_count.parameters["count"].int64_param = 3
    assert len(stub.ModelInfer(by_count, timeout=30).raw_output_contents[0]) == 3 * WIDE * WIDE * 4


def test_a_card_dtype_outside_card_json_s_is_refused_at_load_not_internal_at_model_config(
    stub: kpb_grpc.GRPCInferenceServiceStub,
) -> None:
    """A card.json tensor dtype other than float32/int64/float16 loaded READY; ModelMetadata called it
    FP32, while ModelConfig and every ModelInfer with the input answered INTERNAL (a KeyError). The
    version is now UNAVAILABLE with the reason naming the card's field."""
    code, details = _refusal(lambda: stub.ModelConfig(kpb.ModelConfigRequest(name="g-bad-dtype"), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert "inputs[0].dtype" in details and "'float'" in details, details
    assert not stub.ModelReady(kpb.ModelReadyRequest(name="g-bad-dtype"), timeout=10).ready
    assert set(CARD_DTYPES) == set(DTYPES)  # every dtype a card may have has a protocol datatype


def _card(tmp_path: Path, dtype: str) -> Card:
    path = tmp_path / "card.json"
    card = {
        "kind": "generator",
        "inputs": [{"name": "z", "dtype": dtype, "shape": [-1, 4]}],
        "outputs": [{"name": "image", "dtype": dtype, "shape": [-1, 1, 8, 8]}],
        "latent_dim": 4,
        "image_size": [8, 8],
        "output_range": [-1.0, 1.0],
    }
    path.write_text(json.dumps(card))
    return load_card(path)


@pytest.mark.parametrize(
    ("dtype", "datatype", "field", "expected"),
    [
        (
            "float32",
            "FP32",
            "fp64_contents",
            "needs 4 values in fp32_contents, got 0 (4 values in fp64_contents",
        ),
        ("float16", "FP16", "fp32_contents", "FP16 has no typed contents: send z in raw_input_contents"),
    ],
)
def test_typed_contents_in_the_wrong_field_are_named_not_counted_as_none(
    tmp_path: Path, dtype: str, datatype: str, field: str, expected: str
) -> None:
    """Values sent in a contents field the datatype does not use were refused as 'needs 4 values, got
    0': the client saw its 4 values counted as none, and for FP16 (which the protocol sends only as
    raw bytes) was told to send values in a field that does not exist."""
    request = kpb.ModelInferRequest(
        model_name="g",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="z", datatype=datatype, shape=[1, 4])],
    )
    getattr(request.inputs[0].contents, field).extend([0.5] * 4)
    with pytest.raises(GenserveError) as caught:
        kserve_tensors.read_inputs(request, _card(tmp_path, dtype))
    assert str(caught.value).startswith("inputs[0].contents: "), caught.value
    assert expected in str(caught.value), caught.value


def test_tensor_names_and_datatypes_the_client_sent_as_paths_come_back_as_it_sent_them(
    stub: kpb_grpc.GRPCInferenceServiceStub,
) -> None:
    """An input or output name, or a datatype, that looks like a path ('/etc/passwd') is the
    client's own text: the refusal quotes it as sent, not as a server path hidden by redact."""
    z = kpb.ModelInferRequest.InferInputTensor(name="z", datatype="FP32", shape=[1, 4])
    z.contents.fp32_contents.extend([0.5] * 4)
    for sent in ("/etc/passwd", "/srv/models/g-wide/1/model.onnx"):
        named = kpb.ModelInferRequest.InferInputTensor(name=sent, datatype="FP32", shape=[1, 4])
        typed = kpb.ModelInferRequest.InferInputTensor(name="z", datatype=sent, shape=[1, 4])
        output = kpb.ModelInferRequest.InferRequestedOutputTensor(name=sent)
        for request, expected in (
            (
                kpb.ModelInferRequest(model_name="g-wide", inputs=[named]),
                "inputs[0].name: g-wide has inputs",
            ),
            (
                kpb.ModelInferRequest(model_name="g-wide", inputs=[typed]),
                "inputs[0].datatype: z must be FP32",
            ),
            (
                kpb.ModelInferRequest(model_name="g-wide", inputs=[z], outputs=[output]),
                "outputs[0].name: g-wide has outputs",
            ),
        ):
            code, details = _refusal(lambda r=request: stub.ModelInfer(r, timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert details.startswith(expected), details
            assert details.endswith(f"got {sent!r}"), details
            assert "outside the repository" not in details, details


def test_a_parameter_the_client_sent_as_a_path_is_named_as_it_sent_it(
    stub: kpb_grpc.GRPCInferenceServiceStub,
) -> None:
    """A request parameter the model does not take is named in the refusal: a key that looks like a
    path ('/etc/passwd') is the client's own text, named as sent, not hidden as a server path; its
    control characters are escaped as in every refusal."""
    for key, shown in (("/etc/passwd", "/etc/passwd"), ("/srv/x\nforged", "/srv/x\\nforged")):
        request = kpb.ModelInferRequest(model_name="g-wide")
        request.parameters[key].int64_param = 1
        code, details = _refusal(lambda r=request: stub.ModelInfer(r, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith(f"parameters[{shown}]: "), details
        assert "takes no such parameter" in details, details
        assert "outside the repository" not in details, details
        assert "\n" not in details, details


def test_an_fp16_image_outside_the_input_range_is_refused_naming_fp16(
    stub: kpb_grpc.GRPCInferenceServiceStub,
) -> None:
    """A model whose card takes float16 images gets FP16 from KServe clients (ModelMetadata says so):
    its input_range refusal called them 'FP32 values', a datatype the client never sent."""
    image = np.full((1, 3, 8, 8), 3.0, np.float16)
    request = kpb.ModelInferRequest(
        model_name="sr-fp16",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="image", datatype="FP16", shape=image.shape)],
        raw_input_contents=[image.tobytes()],
    )
    code, details = _refusal(lambda: stub.ModelInfer(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    expected = "inputs[image]: FP16 values must be in the model's input_range [0, 1], got 3..3"
    assert details == expected, details
    ok = np.full((1, 3, 8, 8), 0.5, np.float16)
    request.raw_input_contents[0] = ok.tobytes()
    assert stub.ModelInfer(request, timeout=30).outputs[0].shape == [1, 3, 16, 16]

"""A model whose card takes 4 (or 2) input channels loads READY (config.py: input_channels 1..4) and is
served through KServe ModelInfer, whose tensors carry any channel count; a genserve.v1 image has 1 or 3
channels (codecs.decode_image), which the server converts only between gray and RGB. Such a request is
the client's to change (INVALID_ARGUMENT naming the image and the model's channels), never INTERNAL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from server_support import ServerProcess, _image, _init, _model, running_server, write_model

from genserve_client import GenserveClient
from genserve_client.errors import GenserveClientError

LATENT = 8
SIDE = 8


def four_channel_encoder(root: Path) -> None:
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "Wmu"], ["mu"]),
            helper.make_node("MatMul", ["flat", "Wlv"], ["logvar"]),
        ],
        "vae_encoder",
        [_image("image", 4, SIDE, SIDE)],
        [
            helper.make_tensor_value_info("mu", TensorProto.FLOAT, ["batch", LATENT]),
            helper.make_tensor_value_info("logvar", TensorProto.FLOAT, ["batch", LATENT]),
        ],
        [
            _init("Wmu", rng.normal(0, 0.1, (4 * SIDE * SIDE, LATENT)).astype(np.float32)),
            _init("Wlv", rng.normal(0, 0.1, (4 * SIDE * SIDE, LATENT)).astype(np.float32)),
        ],
    )
    card = {
        "latent_dim": LATENT,
        "channels": None,
        "input_channels": 4,
        "image_size": [SIDE, SIDE],
        "output_range": None,
        "input_range": [0.0, 1.0],
    }
    write_model(root, "enc4", "vae_encoder", _model(graph), card)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("models")
    four_channel_encoder(root)
    with running_server(root, tmp_path_factory.mktemp("work")) as process:
        yield process


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_for_a_four_channel_encoder_is_refused_naming_the_channels_not_internal(
    server: ServerProcess, channels: int
) -> None:
    client = GenserveClient(server.target)
    try:
        with pytest.raises(GenserveClientError) as caught:
            client.encode("enc4", [np.zeros((SIDE, SIDE, channels), np.uint8)])
    finally:
        client.close()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "images[0]" in caught.value.details and "input_channels" in caught.value.details
    assert "ModelInfer" in caught.value.details, caught.value.details

"""An encoder whose logvar is too large to sample from. Encode with `sample` draws z = mu +
exp(logvar / 2) * eps on the server; float32's exp overflows for logvar above ~177 (a diverged or
fp16-overflowing encoder), and the server answered OK with an infinite z, which Decode then refused
("latents: values must be finite"). The sampled z is the server's own arithmetic: it fails INTERNAL
naming the model and the cause, while mu and logvar alone (no `sample`) are answered as the model
gives them."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from server_support import ServerProcess, _image, _init, _model, running_server, write_model

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.core import sampled_z
from genserve_server.errors import Internal

SIDE, Z = 8, 4


def _encoder(logvar: float) -> object:
    """image [N, 1, 8, 8] -> mu = flat @ W, logvar = mu * 0 + `logvar` (every row, every unit)."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mu"]),
        helper.make_node("Mul", ["mu", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "lv"], ["logvar"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vae_encoder",
        [_image("image", 1, SIDE, SIDE)],
        [
            helper.make_tensor_value_info("mu", TensorProto.FLOAT, ["batch", Z]),
            helper.make_tensor_value_info("logvar", TensorProto.FLOAT, ["batch", Z]),
        ],
        [
            _init("W", rng.normal(0, 0.1, (SIDE * SIDE, Z)).astype(np.float32)),
            _init("zero", np.zeros((), np.float32)),
            _init("lv", np.full((), logvar, np.float32)),
        ],
    )
    return _model(graph)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("logvar") / "models"
    card = {
        "latent_dim": Z,
        "channels": None,
        "input_channels": 1,
        "image_size": [SIDE, SIDE],
        "output_range": None,
        "input_range": [0.0, 1.0],
    }
    write_model(root, "huge-logvar", "vae_encoder", _encoder(400.0), card)  # type: ignore[arg-type]
    write_model(root, "fine-logvar", "vae_encoder", _encoder(-2.0), card)  # type: ignore[arg-type]
    with running_server(root, tmp_path_factory.mktemp("logvar-work")) as process:
        yield process


def _image_request(model: str, sample: bool) -> pb.EncodeRequest:
    gray = (np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE, 1) * 3).astype(np.uint8)
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=gray.tobytes(), shape=[SIDE, SIDE, 1])
    return pb.EncodeRequest(model=model, images=[image, image], sample=sample, seed=3 if sample else 0)


def test_a_z_that_overflows_is_an_internal_error_naming_the_model_not_an_infinite_latent(
    server: ServerProcess,
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Encode(_image_request("huge-logvar", sample=True), timeout=30)
        assert excinfo.value.code() == grpc.StatusCode.INTERNAL, excinfo.value
        details = str(excinfo.value.details())
        assert "huge-logvar" in details and "logvar" in details, details
        # Without sampling, the distribution is the model's answer, as it gives it.
        plain = stub.Encode(_image_request("huge-logvar", sample=False), timeout=30)
        logvar = np.frombuffer(plain.latents[0].logvar.data, "<f4")
        assert np.all(logvar == 400.0) and not plain.latents[0].HasField("z")
        fine = stub.Encode(_image_request("fine-logvar", sample=True), timeout=30)
        assert all(np.isfinite(np.frombuffer(d.z.data, "<f4")).all() for d in fine.latents)


@pytest.mark.parametrize(
    ("bad_mu", "bad_logvar", "cause"),
    [
        (np.nan, 0.0, "mu holds NaN"),
        (np.inf, 0.0, "mu is infinite"),
        (0.0, np.nan, "logvar holds NaN"),
        (0.0, 400.0, "largest logvar there 400"),
    ],
)
def test_a_z_that_is_not_finite_is_refused_naming_its_real_cause(
    bad_mu: float, bad_logvar: float, cause: str
) -> None:
    """A NaN mu (with a finite logvar) was refused as 'largest logvar there 0; exp(logvar / 2)
    overflows float32 above ~177': a cause it was not. The message names what made z non-finite."""
    mu = np.zeros((3, Z), np.float32)
    logvar = np.zeros((3, Z), np.float32)
    mu[1, 2], logvar[1, 2] = bad_mu, bad_logvar
    eps = np.ones((3, Z), np.float32)
    with pytest.raises(Internal) as excinfo:
        sampled_z("model enc version 1", mu, logvar, eps)
    message = str(excinfo.value)
    assert message.startswith("model enc version 1: ") and "image(s) 1 " in message, message
    assert cause in message, message
    if cause != "largest logvar there 400":
        assert "overflows" not in message, message

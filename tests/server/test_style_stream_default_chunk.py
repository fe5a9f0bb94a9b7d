"""SampleStream's default chunk on a style generator: the chunk must fit the send limit with the
latents the stream really returns (output.return_latents: each image's z [latent_dim], as Sample
returns them), not w [w_dim]."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from server_support import ServerProcess, start_server, write_model
from style_models import mapping_graph, synthesis_graph

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import latents

SEND_LIMIT = 1 << 20  # the smallest max_send_message_bytes the server takes
Z_DIM, W_DIM, LAYERS, SIDE = 2048, 4, 2, 64  # z much longer than w; 16 KiB float32 images


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("style-chunk-models")
    batching = {"max_batch_size": 64, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}
    write_model(
        root,
        "map",
        "style_mapping",
        mapping_graph(latent_dim=Z_DIM, w_dim=W_DIM),
        {"latent_dim": Z_DIM, "w_dim": W_DIM, "output_range": None},
        config={"batching": batching},
    )
    write_model(
        root,
        "style",
        "style_generator",
        synthesis_graph(num_layers=LAYERS, w_dim=W_DIM, side=SIDE),
        {
            "latent_dim": Z_DIM,
            "w_dim": W_DIM,
            "num_layers": LAYERS,
            "w_avg": [0.0] * W_DIM,
            "channels": 1,
            "image_size": [SIDE, SIDE],
        },
        config={"mapping": "map", "batching": batching},
    )
    proc = start_server(
        root,
        tmp_path_factory.mktemp("style-chunk-server"),
        config={"limits": {"max_send_message_bytes": SEND_LIMIT}},
    )
    yield proc
    proc.stop()


def test_a_style_streams_default_chunk_fits_the_send_limit_with_the_z_it_returns(
    server: ServerProcess,
) -> None:
    """chunk_size 0: 64 images, or fewer where 64 images and their returned latents could exceed
    max_send_message_bytes (genserve.proto). A style generator's stream returns each image's z
    [latent_dim] (as its Sample does), but the default chunk was sized for w [w_dim]: with z longer
    than w the server refused its own default chunk, naming a chunk_size the client never sent."""
    out = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True)
    sample = pb.SampleRequest(model="style", count=70, base_seed=5, output=out)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        chunks = list(stub.SampleStream(pb.SampleStreamRequest(sample=sample), timeout=120))
    images = [image for chunk in chunks for image in chunk.images]
    assert [image.index for image in images] == list(range(70))
    assert all(chunk.ByteSize() <= SEND_LIMIT for chunk in chunks)
    # The latents returned are the seeds' z (latent_dim floats), as Sample's on a style generator.
    z = latents.latents_for_seeds([5, 74], Z_DIM)
    assert images[0].latent.data == z[0].tobytes()
    assert np.frombuffer(images[-1].latent.data, "<f4").shape == (Z_DIM,)
    assert images[-1].latent.data == z[1].tobytes()

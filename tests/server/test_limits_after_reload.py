"""ModelInfo.max_images_per_request and a style generator's mapping reason against what the
serving versions do, across a hot reload and a mapping that failed to load."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest
from client_fakes import cli_main
from server_support import (
    TINY_LATENT,
    generator_graph,
    start_server,
    wait_until,
    write_model,
    write_tiny_generator,
)
from style_models import write_style_models

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc


def test_max_images_per_request_is_the_serving_versions_after_a_config_edit(tmp_path: Path) -> None:
    # A valid config.json edit applies to versions loaded from then on (docs/operations.md): the
    # loaded version keeps its queue of 4. ModelInfo said the edited file's 64, so a client that
    # sent a call of that size (the CLI's sample does) was refused 'count: must be in 1..4'.
    root = tmp_path / "models"
    write_tiny_generator(root, "gen", config={"batching": {"max_batch_size": 4, "max_queue_size": 4}})
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            assert stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10).max_images_per_request == 4
            config_path = root / "gen" / "config.json"
            config = json.loads(config_path.read_text())
            config["batching"]["max_queue_size"] = 64
            config["batching"]["max_batch_size"] = 16
            config_path.write_text(json.dumps(config))
            write_tiny_generator(root, "zz-marker")  # rescanned after gen: READY once gen's done
            server.proc.send_signal(signal.SIGHUP)

            def marker_ready() -> bool:
                try:
                    info = stub.GetModel(pb.GetModelRequest(name="zz-marker"), timeout=10)
                except grpc.RpcError:
                    return False
                return any(v.state == pb.MODEL_STATE_READY for v in info.versions)

            wait_until(marker_ready, 60, "the rescan")
            per_request = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10).max_images_per_request
            # What it says one Sample may ask for is served.
            response = stub.Sample(pb.SampleRequest(model="gen", count=per_request), timeout=30)
            assert len(response.images) == per_request
            assert per_request == 4
            # The same for its batch size (a code prior's row budget is read from it).
            assert stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10).max_batch_size == 4
    finally:
        server.stop()


def test_a_style_generator_whose_mapping_failed_to_load_says_why(tmp_path: Path) -> None:
    # The mapping's only version fails to load (its model file does not match card.json's sha256):
    # every request of the READY generator fails UNAVAILABLE, and GetModel's version reason said
    # nothing (the failed version's card "fits"), though it says so for a mapping with no version.
    root = tmp_path / "models"
    names = write_style_models(root)
    onnx_path = root / names["mapping"] / "1" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # sha256 no longer matches
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            mapping = stub.GetModel(pb.GetModelRequest(name=names["mapping"]), timeout=10)
            assert mapping.versions[0].state == pb.MODEL_STATE_UNAVAILABLE
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.Sample(pb.SampleRequest(model=names["generator"], count=1), timeout=30)
            assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            generator = stub.GetModel(pb.GetModelRequest(name=names["generator"]), timeout=10)
            assert generator.versions[0].state == pb.MODEL_STATE_READY
            reason = generator.versions[0].reason
            assert reason.startswith("every request fails: its mapping "), reason
            assert names["mapping"] in reason
    finally:
        server.stop()


def test_the_cli_sample_of_a_named_version_sends_calls_that_version_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Under `latest: 2`, version 1 (loaded with a queue of 4) serves beside version 2 (loaded after
    # an edit raised it to 64). `sample --version 1 --n 10` sized its calls by the serving version's
    # ModelInfo (64), and its one call of 10 came back 'count: must be in 1..4'.
    root = tmp_path / "models"
    policy = {"version_policy": {"latest": 2}}
    write_tiny_generator(
        root, "gen", config={**policy, "batching": {"max_batch_size": 4, "max_queue_size": 4}}
    )
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            card = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]}
            batching = {"max_batch_size": 4, "max_queue_size": 64}
            graph = generator_graph(TINY_LATENT, 1, 8, 8)
            write_model(
                root, "gen", "generator", graph, card, config={**policy, "batching": batching}, version="2"
            )
            server.proc.send_signal(signal.SIGHUP)

            def both_ready() -> bool:
                info = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
                return [v.state for v in info.versions].count(pb.MODEL_STATE_READY) == 2

            wait_until(both_ready, 60, "version 2 beside version 1")
            assert stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10).max_images_per_request == 64
            named = stub.GetModel(pb.GetModelRequest(name="gen", version="1"), timeout=10)
            assert named.max_images_per_request == 4
            out = tmp_path / "out"
            args = ("--target", server.target, "sample", "--model", "gen", "--version", "1")
            code, _, err = cli_main(capsys, *args, "--n", "10", "--seed", "3", "--out", str(out))
            assert code == 0, err
            assert len(list(out.glob("*.png"))) == 10
    finally:
        server.stop()

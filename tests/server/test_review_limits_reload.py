"""ModelInfo.max_images_per_request and a style generator's mapping reason against what the
serving versions do, across a hot reload and a mapping that failed to load."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
from server_support import start_server, wait_until, write_tiny_generator

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
    finally:
        server.stop()

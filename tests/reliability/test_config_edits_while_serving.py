"""config.json edited in place while a version serves, then a reload: a valid edit applies to
versions loaded from then on (docs/operations.md, "Hot reload"), so what routes a request and what
GetModel, ListModels and KServe report must be the loaded versions' settings, not the file's."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_support import (
    DIGITS,
    TINY_LATENT,
    ServerProcess,
    conditional_graph,
    start_server,
    wait_until,
    write_model,
    write_tiny_generator,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

WAIT_S = 60.0


def _edit_config(root: Path, name: str, **fields: object) -> None:
    path = root / name / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _reload_and_wait(
    server: ServerProcess, stub: pb_grpc.GenerationServiceStub, root: Path, marker: str
) -> None:
    """SIGHUP with a new model `marker` that sorts after every other: READY once the rescan did them."""
    write_tiny_generator(root, marker)
    server.proc.send_signal(signal.SIGHUP)

    def marker_ready() -> bool:
        try:
            info = stub.GetModel(pb.GetModelRequest(name=marker), timeout=10)
        except grpc.RpcError:
            return False
        return any(v.state == pb.MODEL_STATE_READY for v in info.versions)

    wait_until(marker_ready, WAIT_S, "the rescan")


def _code(call: object) -> grpc.StatusCode:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    return excinfo.value.code()


def test_a_kind_edit_routes_requests_by_the_kind_of_the_loaded_version(tmp_path: Path) -> None:
    # gen (a generator) gets kind super_resolution, cond (a conditional_generator) kind generator.
    # Neither version reloads (a valid edit applies to later loads), yet routing checked config.json's
    # kind: Sample on gen was refused 'gen is a super_resolution model', SuperResolve reached the
    # generator (INTERNAL, an AssertionError in the log), and Decode reached the conditional
    # generator without labels (INTERNAL 'model call failed'); GetModel named the file's kind.
    root = tmp_path / "models"
    write_tiny_generator(root, "gen", channels=3)
    write_model(
        root,
        "cond",
        "conditional_generator",
        conditional_graph(TINY_LATENT, 10, 1, 8, 8),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8], "class_names": DIGITS},
    )
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            _edit_config(root, "gen", kind="super_resolution")
            _edit_config(root, "cond", kind="generator")
            _reload_and_wait(server, stub, root, "zz-marker")

            gen = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
            assert [(v.version, v.state) for v in gen.versions] == [("1", pb.MODEL_STATE_READY)]
            assert gen.kind == "generator"  # what serves it: version 1's card and config
            assert stub.GetModel(pb.GetModelRequest(name="gen", version="1"), timeout=10).kind == "generator"
            listed = {m.name: m.kind for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
            assert listed["gen"] == "generator" and listed["cond"] == "conditional_generator"
            assert len(stub.Sample(pb.SampleRequest(model="gen", count=2), timeout=30).images) == 2
            image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(8 * 8 * 3), shape=[8, 8, 3])
            upscale = pb.ImageRequest(model="gen", images=[image])
            assert _code(lambda: stub.SuperResolve(upscale, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT

            cond = stub.GetModel(pb.GetModelRequest(name="cond"), timeout=10)
            assert cond.kind == "conditional_generator" and list(cond.class_names) == DIGITS
            labelled = stub.Sample(pb.SampleRequest(model="cond", count=2, labels=[3, 4]), timeout=30)
            assert len(labelled.images) == 2
            z = np.zeros((1, TINY_LATENT), np.float32)
            latents = tpb.Tensor(shape=[1, TINY_LATENT], dtype=tpb.DTYPE_FLOAT32, data=z.tobytes())
            decode = pb.DecodeRequest(model="cond", latents=latents)
            assert _code(lambda: stub.Decode(decode, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
            log = (tmp_path / "work" / "server.log").read_text()
            assert "Traceback" not in log and "model call failed" not in log
    finally:
        server.stop()


def test_kserve_model_config_reports_the_version_policy_a_reload_applies(tmp_path: Path) -> None:
    # Versions 1 and 2 on disk, `latest: 1`: version 2 serves. The policy is edited to `latest: 2`
    # and version 1 loads beside 2: the policy applies at the rescan. ModelConfig of the version a
    # request gets (2) said `latest: 1`, the policy of the file it loaded with, while two versions
    # served; version 1's said `latest: 2`.
    root = tmp_path / "models"
    write_tiny_generator(root, "gen", config={"version_policy": {"latest": 1}})
    (root / "gen" / "1").rename(root / "gen" / "2")
    write_tiny_generator(root / "old", "gen")
    (root / "old" / "gen" / "1").rename(root / "gen" / "1")
    card = json.loads((root / "gen" / "2" / "card.json").read_text())
    (root / "gen" / "2" / "card.json").write_text(json.dumps({**card, "version": "2"}))
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            info = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
            assert [v.version for v in info.versions] == ["2"]
            _edit_config(root, "gen", version_policy={"latest": 2})
            _reload_and_wait(server, stub, root, "zz-marker")
            info = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
            assert [(v.version, v.state) for v in info.versions] == [
                ("1", pb.MODEL_STATE_READY),
                ("2", pb.MODEL_STATE_READY),
            ]
            for version in ("", "1", "2"):
                config = kserve.ModelConfig(
                    kpb.ModelConfigRequest(name="gen", version=version), timeout=10
                ).config
                assert config.version_policy.latest.num_versions == 2, version
    finally:
        server.stop()


def test_a_kind_edit_the_loaded_version_keeps_serving_past_is_reported(tmp_path: Path) -> None:
    """An edited `kind` applies to versions loaded from then on; the loaded one serves as it was
    loaded, but a restart would refuse it (its card and graph are of the old kind) and take the model
    down. Nothing said so: GetModel's reason was empty and genserve_model_config_error 0. It says both
    kinds and what a restart would do; setting the kind back clears it."""
    root = tmp_path / "models"
    write_tiny_generator(root, "gen", channels=3)
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            _edit_config(root, "gen", kind="super_resolution")
            _reload_and_wait(server, stub, root, "zz-marker")
            reason = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10).reason
            assert "super_resolution" in reason and "generator" in reason and "restart" in reason, reason
            assert len(stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=30).images) == 1
            _edit_config(root, "gen", kind="generator")
            _reload_and_wait(server, stub, root, "zz-marker-2")
            assert stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10).reason == ""
    finally:
        server.stop()

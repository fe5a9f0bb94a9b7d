"""Model versions end to end on a real server: numeric order (9 < 10 < 100) in every list and
default, folder names that are not versions, and the order after a hot reload rolls back."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
from pathlib import Path

import grpc
import pytest
from server_support import (
    TINY_LATENT,
    generator_graph,
    start_server,
    super_resolution_graph,
    wait_until,
    write_model,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.config import ServerConfig
from genserve_server.metrics import Metrics
from genserve_server.reload import Reloader
from genserve_server.repository import ModelState, Repository

CARD = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]}


def write_versions(root: Path, name: str, versions: list[str], policy: dict[str, object]) -> None:
    for version in versions:
        write_model(
            root,
            name,
            "generator",
            generator_graph(TINY_LATENT, 1, 8, 8, seed=len(version) + sum(map(ord, version))),
            CARD,
            version=version,
            config={"version_policy": policy},
        )


def test_versions_are_ordered_by_number_and_folders_that_are_no_version_say_so(tmp_path: Path) -> None:
    """latest 3 of 1, 2, 9, 10, 11, 100 serves 10, 11 and 100 (not 9, as text order would);
    a request without a version gets 100; folders named 01 or v3 are not versions. A model whose
    only folders are such names said just 'no version directories' (and no log line), so an
    operator who published "01" saw the folder on disk and a model that denied it."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["1", "2", "9", "10", "11", "100"], {"latest": 3})
    (root / "gen" / "v3").mkdir()
    write_versions(root, "padded", ["01"], {"latest": 1})
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            info = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
            assert [v.version for v in info.versions] == ["10", "11", "100"]
            meta = kstub.ModelMetadata(kpb.ModelMetadataRequest(name="gen"), timeout=10)
            assert list(meta.versions) == ["10", "11", "100"]
            response = stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=30)
            assert response.provenance.version == "100"
            pinned = stub.Sample(pb.SampleRequest(model="gen", version="10", count=1), timeout=30)
            assert pinned.provenance.version == "10"
            for version in ("9", "010"):
                with pytest.raises(grpc.RpcError) as excinfo:
                    stub.Sample(pb.SampleRequest(model="gen", version=version, count=1), timeout=30)
                assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
                assert f"no version '{version}'" in excinfo.value.details()
            assert server.metric("genserve_model_ready", model="gen", version="100") == 1

            padded = stub.GetModel(pb.GetModelRequest(name="padded"), timeout=10)
            assert not any(v.state == pb.MODEL_STATE_READY for v in padded.versions)
            # Names the folder it did not take, and what a version folder's name must be.
            assert "01" in padded.reason, padded.reason
            assert "leading zero" in padded.reason, padded.reason
    finally:
        server.stop()


def test_versions_stay_in_numeric_order_after_a_reload_rolls_back(tmp_path: Path) -> None:
    """latest 2 of 2, 9, 10 serves 9 and 10; removing 10 brings 2 back. KServe ModelMetadata
    listed ['9', '2'] (the order versions were loaded in) while GetModel said ['2', '9']."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["2", "9", "10"], {"latest": 2})
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            shutil.rmtree(root / "gen" / "10")
            server.proc.send_signal(signal.SIGHUP)

            def rolled_back() -> bool:
                info = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
                return [(v.version, v.state) for v in info.versions] == [
                    ("2", pb.MODEL_STATE_READY),
                    ("9", pb.MODEL_STATE_READY),
                ]

            wait_until(rolled_back, 60, "the rollback to versions 2 and 9")
            meta = kstub.ModelMetadata(kpb.ModelMetadataRequest(name="gen"), timeout=10)
            assert list(meta.versions) == ["2", "9"]
            stats = kstub.ModelStatistics(kpb.ModelStatisticsRequest(name="gen"), timeout=10)
            assert [s.version for s in stats.model_stats] == ["2", "9"]
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.Sample(pb.SampleRequest(model="gen", version="10", count=1), timeout=30)
            assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
            assert "versions: 2, 9" in excinfo.value.details()
    finally:
        server.stop()


def test_a_folder_that_is_no_version_is_logged_beside_versions_that_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model with "1" and a mistyped "02" serves 1, and the log names "02" (it was silent)."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["1", "02"], {"latest": 1})
    repo = Repository(root, ServerConfig(), Metrics(enabled=False))
    with caplog.at_level(logging.WARNING):
        repo.scan()
    assert list(repo.get("gen").versions) == ["1"] and not repo.get("gen").reason
    assert any("02" in r.getMessage() and "leading zeros" in r.getMessage() for r in caplog.records)


def test_folder_names_ending_in_a_newline_are_no_model_and_no_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/model-repository.md: a model folder is named [a-z0-9][a-z0-9-]*, a version folder a
    positive integer. The patterns ended in `$`, which also matches before a final newline: a
    folder 'gen\\n' (a name read from a file, `mkdir "$(cat name)"`) was served as model 'gen\\n',
    and a version folder '1\\n' as version '1\\n' beside '1'. Both are skipped, named in the log."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["1", "2"], {"latest": 2})
    (root / "gen" / "2").rename(root / "gen" / "2\n")
    shutil.copytree(root / "gen", root / "gen\n")
    repo = Repository(root, ServerConfig(), Metrics(enabled=False))
    with caplog.at_level(logging.WARNING):
        repo.scan()
    assert sorted(m.name for m in repo) == ["gen"]
    assert list(repo.get("gen").versions) == ["1"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "must match" in logged and "leading zeros" in logged, logged


def test_messages_name_the_model_and_version_as_served_not_as_the_card_says(tmp_path: Path) -> None:
    """A version directory copied to another version (docs/operations.md's publish recipe: a canary
    copied from 1 to 2) or another model keeps its card's `name` and `version`. The load's log and
    the refusals sent to clients named the card's ("sr/1: tile receptive-field radius" while
    sr-canary version 2 loaded); they name what serves, as provenance does."""
    root = tmp_path / "models"
    card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [0.0, 1.0],
        "scale_factor": 2,
        "size_multiple": 1,
        "min_size": 4,
    }
    write_model(root, "sr", "super_resolution", super_resolution_graph(2), card, version="1")
    shutil.copytree(root / "sr" / "1", root / "sr-canary" / "2")  # card.json: name sr, version 1
    shutil.copy(root / "sr" / "config.json", root / "sr-canary" / "config.json")
    shutil.rmtree(root / "sr")
    server = start_server(root, tmp_path / "work", config={"warmup": False})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(8 * 8 * 3), shape=[8, 8, 3])
            served = stub.SuperResolve(pb.ImageRequest(model="sr-canary", images=[image]), timeout=30)
            assert (served.provenance.model, served.provenance.version) == ("sr-canary", "2")
            tensors = {}
            for name in ("x", "image"):
                tensors[name] = kpb.ModelInferRequest.InferInputTensor(
                    name=name, datatype="FP32", shape=[1, 3, 8, 8]
                )
                tensors[name].contents.fp32_contents.extend([0.5] * (3 * 8 * 8))
            wrong_output = kpb.ModelInferRequest.InferRequestedOutputTensor(name="y")
            for request, field in (
                (kpb.ModelInferRequest(model_name="sr-canary", inputs=[tensors["x"]]), "has inputs"),
                (
                    kpb.ModelInferRequest(
                        model_name="sr-canary", inputs=[tensors["image"]], outputs=[wrong_output]
                    ),
                    "has outputs",
                ),
            ):
                with pytest.raises(grpc.RpcError) as excinfo:
                    kstub.ModelInfer(request, timeout=30)
                assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details = excinfo.value.details()
                assert f"sr-canary {field}" in details, details
        log = server.log()
        radius = [line for line in log.splitlines() if "tile receptive-field radius" in line]
        assert radius and all("sr-canary/2" in line for line in radius), radius
        assert "sr/1" not in log, log
    finally:
        server.stop()


def test_a_specific_policy_listing_a_version_not_on_disk_says_so_once_beside_the_versions_it_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`specific: ["1", "3"]` with only 1 on disk serves 1; the missing 3 (a typo, a version not yet
    published) was ignored silently, at start-up and on reload alike: only a policy that picks
    nothing was reported. The model's reason names it (ModelInfo.reason: the files on disk are not
    what serves) and one warning says so, not one at every rescan."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["1"], {"specific": ["1", "3"]})

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        with caplog.at_level(logging.WARNING):
            repo.scan()
            await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            model = repo.get("gen")
            assert list(model.versions) == ["1"] and model.resolve("").state == ModelState.READY
            assert "version_policy" in model.reason and "(3)" in model.reason, model.reason
            assert sum("(3)" in r.getMessage() for r in caplog.records) == 1
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                await reloader.rescan()
                await reloader.rescan()
            assert "(3)" in model.reason and model.resolve("").state == ModelState.READY
            assert not [r.getMessage() for r in caplog.records if "(3)" in r.getMessage()]
            config = json.loads((root / "gen" / "config.json").read_text())
            config["version_policy"] = {"specific": ["1", "3", "4"]}
            (root / "gen" / "config.json").write_text(json.dumps(config))
            with caplog.at_level(logging.WARNING):
                await reloader.rescan()
                await reloader.rescan()
            assert "(3, 4)" in model.reason, model.reason
            assert sum("(3, 4)" in r.getMessage() for r in caplog.records) == 1
            config["version_policy"] = {"specific": ["1"]}
            (root / "gen" / "config.json").write_text(json.dumps(config))
            await reloader.rescan()
            assert model.reason == "" and model.resolve("").state == ModelState.READY
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_version_link_pointing_nowhere_is_named_in_the_log_and_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version folder that is a symbolic link whose target was deleted (a blue/green release link
    left pointing nowhere) was skipped without a word, and a model with no other version said only
    'no version directories': the warning and the reason name the link and its missing target."""
    from genserve_server.repository import Model

    root = tmp_path / "models"
    write_versions(root, "gen", ["1"], {"latest": 1})
    release = tmp_path / "releases" / "b"
    (root / "gen" / "2").symlink_to(release)
    (root / "lone").mkdir()
    (root / "lone" / "3").symlink_to(release)
    with caplog.at_level(logging.WARNING, logger="genserve_server.repository"):
        assert Repository.available_versions(Model("gen", root / "gen", None)) == ["1"]
        lone = Model("lone", root / "lone", None)
        assert Repository.available_versions(lone) == []
    assert f"{root / 'gen'}: ignoring 2: a symbolic link to {release}, which does not exist" in caplog.text, (
        caplog.text
    )
    assert f"ignoring 3: a symbolic link to {release}, which does not exist" in caplog.text, caplog.text
    assert "3 is a symbolic link to" in lone.reason and str(release) in lone.reason, lone.reason


def test_statistics_without_a_version_list_the_ready_versions_as_triton_does(tmp_path: Path) -> None:
    """KServe ModelStatistics naming no version answers for the versions a request can reach, as
    Triton does (its ready versions) and as ModelMetadata lists them: a version that failed to load
    is not among them, so a Triton client reading model_stats[0] (tritonclient's
    get_inference_statistics(model)) reads the serving version's counts, not the failed one's
    zeros. Naming the failed version is UNAVAILABLE, as before."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["1", "2"], {"latest": 2})
    (root / "gen" / "1" / "model.onnx").write_bytes(b"not a model")  # sha256 mismatch: UNAVAILABLE
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            info = stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)
            assert [(v.version, v.state) for v in info.versions] == [
                ("1", pb.MODEL_STATE_UNAVAILABLE),
                ("2", pb.MODEL_STATE_READY),
            ]
            stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=30)
            meta = kstub.ModelMetadata(kpb.ModelMetadataRequest(name="gen"), timeout=10)
            for request in (kpb.ModelStatisticsRequest(name="gen"), kpb.ModelStatisticsRequest()):
                stats = kstub.ModelStatistics(request, timeout=10).model_stats
                listed = [(s.name, s.version) for s in stats]
                assert listed == [("gen", v) for v in meta.versions] == [("gen", "2")]
                assert stats[0].inference_stats.success.count == 1
            with pytest.raises(grpc.RpcError) as excinfo:
                kstub.ModelStatistics(kpb.ModelStatisticsRequest(name="gen", version="1"), timeout=10)
            assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_statistics_of_a_model_with_no_ready_version_are_unavailable_as_in_triton(tmp_path: Path) -> None:
    """KServe ModelStatistics naming a model whose every version failed to load answered an empty
    model_stats, as for a model that serves and was never called: tritonclient's
    get_inference_statistics(model) read model_stats[0] and raised IndexError, a dashboard showed
    the model as idle. Triton answers an error ('requested model X is not available'); so does this
    server, UNAVAILABLE with the reason, as ModelMetadata does. Without a model, the ready models."""
    root = tmp_path / "models"
    write_versions(root, "gen", ["1"], {"latest": 1})
    (root / "gen" / "1" / "model.onnx").write_bytes(b"not a model")  # sha256 mismatch: UNAVAILABLE
    write_versions(root, "ok", ["1"], {"latest": 1})
    server = start_server(root, tmp_path / "work")
    try:
        with grpc.insecure_channel(server.target) as channel:
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as metadata:
                kstub.ModelMetadata(kpb.ModelMetadataRequest(name="gen"), timeout=10)
            with pytest.raises(grpc.RpcError) as excinfo:
                kstub.ModelStatistics(kpb.ModelStatisticsRequest(name="gen"), timeout=10)
            assert excinfo.value.code() == metadata.value.code() == grpc.StatusCode.UNAVAILABLE
            assert excinfo.value.details() == metadata.value.details()
            assert "model gen has no ready version" in excinfo.value.details()
            stats = kstub.ModelStatistics(kpb.ModelStatisticsRequest(), timeout=10).model_stats
            assert [(s.name, s.version) for s in stats] == [("ok", "1")]
    finally:
        server.stop()

"""A reload that cannot apply the repository's files keeps the loaded versions serving and says why;
a model file changed under a loaded version is reported while the copy in memory keeps serving.

The server tests of this module share one server and run in order (a broken config.json, a
version_policy that picks nothing, the only version directory deleted mid-replace, a model file
corrupted in place). Each waits for the rescan's outcome: the metric, or the model going away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from reliability_support import (
    as_unprivileged_user,
    copy_version_atomically,
    loaded_repository,
    version_states,
    wait_on_loop,
    write_gen,
)
from server_support import TINY_LATENT, ServerProcess, externalize_weights, start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import Unavailable
from genserve_server.launcher import genserve_command
from genserve_server.metrics import Metrics
from genserve_server.reload import Reloader
from genserve_server.repository import ModelState, Repository

WAIT_S = 30.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keep-models")
    write_gen(root, "gen", version="1", seed=0)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(repo, tmp_path_factory.mktemp("keep-server"), config={"drain_grace_s": 2.0})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _info(stub: pb_grpc.GenerationServiceStub) -> pb.ModelInfo:
    return stub.GetModel(pb.GetModelRequest(name="gen"), timeout=10)


def _states(stub: pb_grpc.GenerationServiceStub) -> dict[str, int]:
    return {v.version: v.state for v in _info(stub).versions}


def _config_error(server: ServerProcess) -> float:
    return server.metric("genserve_model_config_error", model="gen")


def _served_version(stub: pb_grpc.GenerationServiceStub) -> str:
    return str(stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=10).provenance.version)


def _reload_until(server: ServerProcess, stub: pb_grpc.GenerationServiceStub, done: object) -> None:
    """SIGHUP, then wait until the rescan's outcome shows: `done()`, or no READY version left (what
    a reload that unloads the model does)."""
    server.proc.send_signal(signal.SIGHUP)

    def settled() -> bool:
        assert callable(done)
        return bool(done()) or pb.MODEL_STATE_READY not in _states(stub).values()

    wait_until(settled, WAIT_S, "the rescan's outcome")


def _good_config(repo: Path) -> str:
    return (repo / "gen" / "config.json").read_text()


def test_a_broken_config_json_keeps_the_version_serving_and_says_so(
    server: ServerProcess, repo: Path, stub: pb_grpc.GenerationServiceStub
) -> None:
    assert _config_error(server) == 0
    good = _good_config(repo)
    (repo / "gen" / "config.json").write_text(good[: len(good) // 2])  # cut mid-write: invalid JSON
    _reload_until(server, stub, lambda: _config_error(server) == 1)
    assert _states(stub) == {"1": pb.MODEL_STATE_READY}
    assert _served_version(stub) == "1"
    assert _config_error(server) == 1
    info = _info(stub)
    assert "config.json: invalid JSON" in info.reason and "still serving version 1" in info.reason
    assert str(repo) not in info.reason  # redacted: the client sees <models>/gen/config.json
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert listed["gen"].reason == info.reason
    # Fixed: the reason and the metric clear.
    (repo / "gen" / "config.json").write_text(good)
    _reload_until(server, stub, lambda: _config_error(server) == 0)
    assert _info(stub).reason == ""
    assert _served_version(stub) == "1"


def test_a_version_policy_that_picks_no_version_on_disk_keeps_the_version_serving(
    server: ServerProcess, repo: Path, stub: pb_grpc.GenerationServiceStub
) -> None:
    good = _good_config(repo)
    typo = {**json.loads(good), "version_policy": {"specific": ["11"]}}  # meant "1": valid JSON
    (repo / "gen" / "config.json").write_text(json.dumps(typo))
    _reload_until(server, stub, lambda: _config_error(server) == 1)
    assert _states(stub) == {"1": pb.MODEL_STATE_READY}
    assert _served_version(stub) == "1"
    assert "version_policy picks none of the version directories on disk (1)" in _info(stub).reason
    (repo / "gen" / "config.json").write_text(good)
    _reload_until(server, stub, lambda: _config_error(server) == 0)
    assert _served_version(stub) == "1"


def test_deleting_the_only_version_directory_mid_replace_keeps_it_serving(
    server: ServerProcess, repo: Path, stub: pb_grpc.GenerationServiceStub, tmp_path: Path
) -> None:
    write_gen(tmp_path / "staging", "gen", version="2", seed=1)
    shutil.rmtree(repo / "gen" / "1")  # the replace deletes the old version first
    _reload_until(server, stub, lambda: _config_error(server) == 1)
    assert _states(stub) == {"1": pb.MODEL_STATE_READY}
    assert _served_version(stub) == "1"
    assert "no version directories" in _info(stub).reason
    # The replace completes: version 2 loads, version 1 drains away, and the error clears.
    copy_version_atomically(repo / "gen", "2", "2", tmp_path / "staging" / "gen")
    _reload_until(server, stub, lambda: _states(stub) == {"2": pb.MODEL_STATE_READY})
    assert _states(stub) == {"2": pb.MODEL_STATE_READY}
    assert _config_error(server) == 0 and _info(stub).reason == ""
    assert _served_version(stub) == "2"


def test_a_model_file_corrupted_under_a_loaded_version_is_reported_while_it_keeps_serving(
    server: ServerProcess, repo: Path, stub: pb_grpc.GenerationServiceStub
) -> None:
    version = max(_states(stub), key=int)
    model_file = repo / "gen" / version / "model.onnx"
    good = model_file.read_bytes()

    def changed() -> float:
        return server.metric("genserve_model_file_changed", model="gen", version=version)

    assert changed() == 0
    model_file.write_bytes(good[: len(good) // 2])  # corrupted in place
    _reload_until(server, stub, lambda: changed() == 1)
    [info] = _info(stub).versions
    assert info.state == pb.MODEL_STATE_READY  # the sessions hold the file as it loaded
    assert "model.onnx changed on disk" in info.reason and "a restart would refuse it" in info.reason
    assert _served_version(stub) == version
    assert changed() == 1
    # Restored: the report clears.
    model_file.write_bytes(good)
    _reload_until(server, stub, lambda: changed() == 0)
    assert _info(stub).versions[0].reason == ""
    assert server.proc.poll() is None


def test_the_file_check_runs_without_a_watch_or_a_signal(tmp_path: Path) -> None:
    """In process: with no watch and no SIGHUP, the periodic check finds a deleted model file, and
    the version keeps serving."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=0.05)
        reloader.start()
        try:
            mv = repo.models["gen"].versions["1"]
            (root / "gen" / "1" / "model.onnx").unlink()
            for _ in range(200):
                if mv.file_changed:
                    break
                await asyncio.sleep(0.05)
            assert "model.onnx is gone from disk" in mv.file_changed
            assert "a restart would find no file" in mv.file_changed
            assert mv.state == ModelState.READY and repo.get("gen").resolve("") is mv
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_loaded_model_file_that_cannot_be_read_is_reported_as_unreadable_not_gone(tmp_path: Path) -> None:
    """A loaded version's directory made unreadable (chmod 000) under a running server: its
    model.onnx is still on disk, so the report says it cannot be read and why, not that it is gone
    and a restart would find no file; restored, the report clears."""
    prefix = as_unprivileged_user()  # root reads a directory of mode 0000
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    version_dir = root / "gen" / "1"
    server = ServerProcess.start([*prefix, *genserve_command(root)], tmp_path / "server")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def changed() -> float:
                return server.metric("genserve_model_file_changed", model="gen", version="1")

            version_dir.chmod(0)
            try:
                _reload_until(server, stub, lambda: changed() == 1)
                [info] = _info(stub).versions
                assert info.state == pb.MODEL_STATE_READY
                assert "model.onnx cannot be read on disk (Permission denied)" in info.reason, info.reason
                assert "gone" not in info.reason and "find no file" not in info.reason, info.reason
                assert _served_version(stub) == "1"
            finally:
                version_dir.chmod(0o755)
            _reload_until(server, stub, lambda: changed() == 0)
            assert _info(stub).versions[0].reason == ""
    finally:
        server.stop()


def test_a_file_replaced_with_its_card_updated_says_a_restart_loads_it(tmp_path: Path) -> None:
    """In process: a new file whose sha256 card.json now names is still reported (it is not what
    serves), and the reason says a restart would load it rather than refuse it."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(tmp_path / "other", "gen", version="1", seed=5)  # a different valid model and card

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            for name in ("model.onnx", "card.json"):
                shutil.copyfile(tmp_path / "other" / "gen" / "1" / name, root / "gen" / "1" / name)
            await reloader.rescan()
            mv = repo.models["gen"].versions["1"]
            assert "model.onnx changed on disk" in mv.file_changed
            assert "a restart loads the new file" in mv.file_changed
            assert mv.state == ModelState.READY
            labels = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["renamed over", "rewritten in place"])
def test_a_model_file_replaced_with_the_same_size_and_mtime_is_reported(tmp_path: Path, how: str) -> None:
    """In process: a loaded model.onnx replaced by a file of the same size whose mtime was kept is
    reported, though its size and mtime read as before: renamed over (a new inode: `rsync -t`, a
    Kubernetes volume's `..data` link swapped) or rewritten in place (`cp -p`, which sets the mtime
    back after writing)."""
    root = tmp_path / "models"
    served = write_gen(root, "gen", version="1", seed=0) / "model.onnx"
    other = write_gen(tmp_path / "other", "gen", version="1", seed=5) / "model.onnx"
    assert other.stat().st_size == served.stat().st_size  # the same graph, other weights

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            mv = repo.models["gen"].versions["1"]
            await reloader.rescan()
            assert mv.file_changed == ""
            before = served.stat()
            target = served.with_name(".model.onnx.tmp") if how == "renamed over" else served
            shutil.copyfile(other, target)
            os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
            if target != served:
                os.replace(target, served)
            after = served.stat()
            assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
            await reloader.rescan()
            assert "model.onnx changed on disk" in mv.file_changed, mv.file_changed
            assert mv.state == ModelState.READY
            labels = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_external_weights_changed_in_place_are_reported_as_the_graph_is(tmp_path: Path) -> None:
    """In process: a loaded graph's external data file (model.onnx.data, torch.onnx.export's
    default) changed in place is reported, naming it and that a restart would refuse it, and
    genserve_model_file_changed goes to 1, as for model.onnx itself; the version keeps serving."""
    root = tmp_path / "models"
    external = externalize_weights(write_gen(root, "gen", version="1", seed=0))

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            mv = repo.models["gen"].versions["1"]
            assert mv.state == ModelState.READY, mv.reason
            await reloader.rescan()
            assert mv.file_changed == ""
            with external.open("r+b") as handle:
                handle.write(b"\0" * 64)
            await reloader.rescan()
            assert "model.onnx.data (external data of model.onnx) changed on disk" in mv.file_changed, (
                mv.file_changed
            )
            assert "a restart would refuse it" in mv.file_changed, mv.file_changed
            assert mv.state == ModelState.READY
            labels = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_card_json_edited_under_a_loaded_version_is_reported_with_what_a_restart_would_do(
    tmp_path: Path,
) -> None:
    """In process: card.json edited in place under a READY version whose model file still matches
    (its sha256 entry changed, then the card broken) was never reported, though a restart refuses
    the version: the reason names card.json and says so, genserve_model_file_changed goes to 1, the
    version keeps serving; the card restored clears it."""
    root = tmp_path / "models"
    version_dir = write_gen(root, "gen", version="1", seed=0)
    card_path = version_dir / "card.json"
    original = card_path.read_text()

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        labels = {"model": "gen", "version": "1"}
        try:
            mv = repo.models["gen"].versions["1"]
            assert mv.state == ModelState.READY, mv.reason
            await reloader.rescan()
            assert mv.file_changed == ""
            card = json.loads(original)
            card["sha256"]["model.onnx"] = "0" * 64
            card_path.write_text(json.dumps(card))
            await reloader.rescan()
            assert "card.json changed on disk since this version loaded" in mv.file_changed, mv.file_changed
            assert "its sha256 of model.onnx is now 0000000000000000..." in mv.file_changed, mv.file_changed
            assert "a restart would refuse this version" in mv.file_changed, mv.file_changed
            assert mv.state == ModelState.READY and repo.get("gen").resolve("") is mv
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
            card_path.write_text("{not json")
            await reloader.rescan()
            assert "card.json no longer loads" in mv.file_changed, mv.file_changed
            assert "a restart would refuse this version" in mv.file_changed, mv.file_changed
            card_path.write_text(original)
            await reloader.rescan()
            assert mv.file_changed == ""
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 0
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_card_json_restored_under_a_loaded_version_is_logged_as_card_json_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: card.json broken under a READY version is an ERROR naming card.json; restoring
    it was logged as 'its model file on disk matches the loaded one again', though the model file
    never changed: the line that ends the error names what it cleared, card.json."""
    root = tmp_path / "models"
    card_path = write_gen(root, "gen", version="1", seed=0) / "card.json"
    original = card_path.read_text()

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            await reloader.rescan()
            card_path.write_text("{not json")
            with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
                await reloader.rescan()
                errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
                assert len(errors) == 1 and "card.json no longer loads" in errors[0], errors
                caplog.clear()
                card_path.write_text(original)
                await reloader.rescan()
            assert repo.models["gen"].versions["1"].file_changed == ""
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    cleared = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model gen version 1:")]
    assert len(cleared) == 1 and "card.json no longer loads" in cleared[0], cleared
    assert "model file" not in cleared[0], cleared


def test_a_changed_fp16_twin_names_the_file_a_restart_would_load_under_the_precision_now(
    tmp_path: Path,
) -> None:
    """In process: a loaded model.fp16.onnx replaced with its card updated said "a restart loads the
    new file", and went on saying so once config.json's precision was set to fp32, under which a
    restart loads model.onnx and never opens the twin: the reason names what a restart would load."""
    import hashlib

    import onnx

    root = tmp_path / "models"
    version_dir = write_gen(root, "gen", version="1", seed=0, precision="fp16")
    write_gen(tmp_path / "other", "gen", version="1", seed=5)
    twin = onnx.load(version_dir / "model.onnx")
    twin.doc_string = "the twin"  # the same graph, within any parity; another file and sha256
    data = twin.SerializeToString()
    (version_dir / "model.fp16.onnx").write_bytes(data)
    card = json.loads((version_dir / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
    (version_dir / "card.json").write_text(json.dumps(card))

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            mv = repo.models["gen"].versions["1"]
            assert mv.precision == "fp16"
            new = (tmp_path / "other" / "gen" / "1" / "model.onnx").read_bytes()
            (version_dir / "model.fp16.onnx").write_bytes(new)
            card["sha256"]["model.fp16.onnx"] = hashlib.sha256(new).hexdigest()
            (version_dir / "card.json").write_text(json.dumps(card))
            await reloader.rescan()
            assert "model.fp16.onnx changed on disk" in mv.file_changed
            assert "a restart loads the new file" in mv.file_changed, mv.file_changed
            config = json.loads((root / "gen" / "config.json").read_text())
            (root / "gen" / "config.json").write_text(json.dumps({**config, "precision": "fp32"}))
            await reloader.rescan()
            assert mv.state == ModelState.READY and repo.get("gen").resolve("") is mv
            assert "model.fp16.onnx changed on disk" in mv.file_changed
            assert "a restart loads the new file" not in mv.file_changed, mv.file_changed
            assert "a restart would load model.onnx (config.json precision fp32)" in mv.file_changed, (
                mv.file_changed
            )
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_changed_model_onnx_under_a_version_serving_fp16_is_reported_as_a_restart_would_refuse_it(
    tmp_path: Path,
) -> None:
    """In process: with fp16 served only model.fp16.onnx was watched, but a restart checks model.onnx,
    the fp16 parity check's fp32 reference, against card.json's sha256 too (31d6dfa) and refuses the
    version where it differs: a model.onnx changed on disk went unreported until the restart."""
    import hashlib

    import onnx

    root = tmp_path / "models"
    version_dir = write_gen(root, "gen", version="1", seed=0, precision="fp16")
    write_gen(tmp_path / "other", "gen", version="1", seed=5)
    twin = onnx.load(version_dir / "model.onnx")
    twin.doc_string = "the twin"  # the same graph, within any parity; another file and sha256
    data = twin.SerializeToString()
    (version_dir / "model.fp16.onnx").write_bytes(data)
    card = json.loads((version_dir / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
    (version_dir / "card.json").write_text(json.dumps(card))
    good = (version_dir / "model.onnx").read_bytes()

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        labels = {"model": "gen", "version": "1"}
        try:
            mv = repo.models["gen"].versions["1"]
            assert mv.precision == "fp16"
            await reloader.rescan()
            assert mv.file_changed == ""
            shutil.copyfile(tmp_path / "other" / "gen" / "1" / "model.onnx", version_dir / "model.onnx")
            await reloader.rescan()
            assert "model.onnx" in mv.file_changed and "changed on disk" in mv.file_changed, mv.file_changed
            assert "a restart would refuse" in mv.file_changed, mv.file_changed
            assert mv.state == ModelState.READY and repo.get("gen").resolve("") is mv
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
            # What the reason foretells: a restart refuses the version.
            restarted, _ = await loaded_repository(root)
            try:
                [other] = restarted.models["gen"].versions.values()
                assert (
                    other.state == ModelState.UNAVAILABLE and "sha256 mismatch for model.onnx" in other.reason
                )
            finally:
                await restarted.close(1.0)
            (version_dir / "model.onnx").write_bytes(good)  # restored: the report clears
            await reloader.rescan()
            assert mv.file_changed == ""
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 0
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_changed_fp16_twin_byte_identical_to_model_onnx_at_load_is_reported(tmp_path: Path) -> None:
    """In process: the watch found the file a version loaded by its sha256 in card.json, so with a
    model.fp16.onnx byte-identical to model.onnx (both entries the same digest) it watched
    model.onnx, the first, while the twin served: the twin replaced on disk went unreported."""
    root = tmp_path / "models"
    version_dir = write_gen(root, "gen", version="1", seed=0, precision="fp16")
    write_gen(tmp_path / "other", "gen", version="1", seed=5)
    shutil.copyfile(version_dir / "model.onnx", version_dir / "model.fp16.onnx")
    card = json.loads((version_dir / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = card["sha256"]["model.onnx"]
    card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
    (version_dir / "card.json").write_text(json.dumps(card))

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            mv = repo.models["gen"].versions["1"]
            assert mv.precision == "fp16"
            await reloader.rescan()
            assert mv.file_changed == ""
            shutil.copyfile(tmp_path / "other" / "gen" / "1" / "model.onnx", version_dir / "model.fp16.onnx")
            await reloader.rescan()
            assert "model.fp16.onnx changed on disk" in mv.file_changed, mv.file_changed
            assert "a restart would refuse it" in mv.file_changed
            assert mv.state == ModelState.READY and repo.get("gen").resolve("") is mv
            labels = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_file_changed_beside_a_card_too_deeply_nested_to_parse_is_reported(tmp_path: Path) -> None:
    """In process: a model file changed under a loaded version, beside a card.json nested too deep
    for json (RecursionError, not a ValueError), failed the whole rescan with a traceback ('repository
    rescan failed'), and the change was never reported: the check had recorded the file's new size
    and mtime, so later checks found nothing new."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            model_file = root / "gen" / "1" / "model.onnx"
            model_file.write_bytes(model_file.read_bytes()[:100])
            (root / "gen" / "1" / "card.json").write_text("[" * 100_000 + "]" * 100_000)
            await reloader.rescan()
            mv = repo.models["gen"].versions["1"]
            assert "model.onnx changed on disk" in mv.file_changed
            assert "a restart would refuse it" in mv.file_changed
            assert mv.state == ModelState.READY
            labels = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_file_changed", labels) == 1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_config_error_at_start_up_shows_in_the_metric_and_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "bad", version="1", seed=0)
    (root / "bad" / "config.json").write_text('{"kind": "generator", "version_policy": {"lastest": 2}}')
    metrics = Metrics()
    repo = Repository(root, ServerConfig(), metrics)
    repo.scan()
    assert "version_policy" in repo.models["bad"].reason
    assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "bad"}) == 1
    assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "gen"}) == 0


@pytest.mark.parametrize(
    ("problem", "message"),
    [("not UTF-8", "not UTF-8 text"), ("a directory", "cannot be read: Is a directory")],
)
def test_a_config_json_that_cannot_be_read_on_reload_keeps_serving_and_the_rescan_goes_on(
    tmp_path: Path, problem: str, message: str
) -> None:
    """In process: config.json turned unreadable (not UTF-8, a directory) is reported like an invalid
    one, and the rescan goes on to the other models (b's new version loads)."""
    root = tmp_path / "models"
    write_gen(root, "a", version="1", seed=0)
    write_gen(root, "b", version="1", seed=0)
    config = root / "a" / "config.json"
    good = config.read_text()

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            config.unlink()
            if problem == "a directory":
                config.mkdir()
            else:
                config.write_bytes(b"\xff\xfe{}")
            copy_version_atomically(root / "b", "1", "2", root / "b")
            report = await reloader.rescan()
            a = repo.get("a")
            assert a.reason.startswith(f"{config}: {message}"), a.reason
            assert a.reason.endswith("not applied: still serving version 1 as loaded"), a.reason
            assert report.config_errors == ["a"]
            assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "a"}) == 1
            assert a.resolve("").version == "1"
            assert repo.get("b").resolve("").version == "2"

            if config.is_dir():
                config.rmdir()
            config.write_text(good)
            await reloader.rescan()
            assert a.reason == "" and a.resolve("").version == "1"
            assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "a"}) == 0
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_new_version_that_fails_to_load_does_not_describe_the_model_that_serves(tmp_path: Path) -> None:
    """In process: v2's card says another latent_dim and description, and its file fails its sha256.
    ListModels and GetModel describe v1, which answers every request; GetModel naming version 2
    describes v2 (its card, its reason)."""
    from concurrent.futures import ThreadPoolExecutor

    from genserve_server.service import GenerationService

    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    aside = root / "gen" / ".tmp-2"
    shutil.copytree(root / "gen" / "1", aside)
    card = json.loads((aside / "card.json").read_text())
    card.update(version="2", description="never served", latent_dim=99)
    (aside / "card.json").write_text(json.dumps(card))
    with open(aside / "model.onnx", "ab") as model_file:
        model_file.write(b"corrupt")

    async def scenario() -> None:
        metrics = Metrics(enabled=False)
        repo = Repository(root, ServerConfig(), metrics)
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            aside.rename(root / "gen" / "2")
            await reloader.rescan()
            model = repo.get("gen")
            assert model.versions["2"].state == ModelState.UNAVAILABLE
            assert model.resolve("").version == "1"
            with ThreadPoolExecutor(1) as pool:
                service = GenerationService(repo, ServerConfig(), metrics, pool)
                served, asked = service._model_info(model), service._model_info(model, "2")
            assert (served.description, served.latent_dim) == ("tiny generator", TINY_LATENT)
            assert (asked.description, asked.latent_dim) == ("never served", 99)
            assert [v.version for v in asked.versions] == ["2"] and "sha256" in asked.versions[0].reason
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_failed_new_version_under_latest_n_leaves_every_loaded_version_serving(tmp_path: Path) -> None:
    """In process, `latest: 2` with versions 1 and 2 serving: version 3 fails its sha256, so version 1
    (which it would replace) keeps serving beside 2, and the model says why. Once 3 is fixed, 2 and 3
    serve and 1 drains away."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0, version_policy={"latest": 2})
    write_gen(tmp_path / "staging", "gen", version="2", seed=1)
    write_gen(tmp_path / "staging", "gen", version="3", seed=2)
    copy_version_atomically(root / "gen", "2", "2", tmp_path / "staging" / "gen")
    good = (tmp_path / "staging" / "gen" / "3" / "model.onnx").read_bytes()

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        error = {"model": "gen"}
        try:
            assert version_states(repo) == {"1": "READY", "2": "READY"}
            (tmp_path / "staging" / "gen" / "3" / "model.onnx").write_bytes(good[:100])
            copy_version_atomically(root / "gen", "3", "3", tmp_path / "staging" / "gen")
            report = await reloader.rescan()
            assert version_states(repo) == {"1": "READY", "2": "READY", "3": "UNAVAILABLE"}
            assert report.retired == [] and report.kept == ["model gen version 1"]
            assert repo.get("gen").resolve("1").state == ModelState.READY
            assert repo.get("gen").resolve("").version == "2"
            reason = repo.models["gen"].reason
            assert "version 3 failed to load: sha256 mismatch" in reason, reason
            assert "still serving model gen version 1" in reason, reason
            assert metrics.registry.get_sample_value("genserve_model_config_error", error) == 1
            # Fixed: 3 loads, 1 is retired (nothing holds it) and the reason clears.
            (root / "gen" / "3" / "model.onnx").write_bytes(good)
            await reloader.rescan()
            await wait_on_loop(lambda: version_states(repo) == {"2": "READY", "3": "READY"}, "2 and 3 alone")
            assert repo.models["gen"].reason == ""
            assert metrics.registry.get_sample_value("genserve_model_config_error", error) == 0
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_refusal_of_a_version_that_is_not_ready_counts_against_that_version(tmp_path: Path) -> None:
    """The per-version metrics (KServe ModelStatistics lists ready versions only, as Triton): a call
    naming version 1, which failed to load, is a failure of version 1, not of version 2, which
    never saw it."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", version_policy={"latest": 2})
    write_gen(root, "gen", version="2", version_policy={"latest": 2})
    (root / "gen" / "1" / "model.onnx").write_bytes(b"not a model")  # sha256 mismatch

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        pool = ThreadPoolExecutor(1)
        try:
            core = GenerationCore(repo, ServerConfig(), metrics, pool)
            versions = repo.models["gen"].versions
            assert versions["1"].state == ModelState.UNAVAILABLE and versions["2"].state == ModelState.READY
            call = Call("ModelInfer", "test", 0.0, metrics.unresolved())
            with pytest.raises(Unavailable):
                core.resolve(call, "gen", "1", ("generator",), "ModelInfer")
            assert call.metrics is versions["1"].metrics
        finally:
            await repo.close(1.0)
            pool.shutdown()

    asyncio.run(scenario())


def test_a_config_json_fixed_after_an_error_is_logged_as_applied_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a broken config.json is an ERROR log line; restoring it (nothing new to load)
    clears the reason and the metric, and the log says so too, naming the model: an operator
    reading the log is not left with an error that never ended."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    config = root / "gen" / "config.json"
    good = config.read_text()

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            config.write_text("{not json")
            with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
                await reloader.rescan()
                assert repo.get("gen").reason
                errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
                assert any("model gen" in m for m in errors), errors
                caplog.clear()
                config.write_text(good)
                report = await reloader.rescan()
            assert repo.get("gen").reason == "" and not report.config_errors
            applied = [r.getMessage() for r in caplog.records if "model gen" in r.getMessage()]
            assert any("apply again" in m and "invalid JSON" in m for m in applied), applied
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_broken_config_json_on_a_serving_model_is_one_error_saying_it_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: config.json of a serving model is broken, and two rescans follow (a SIGHUP, the
    watch seeing another model change). The model keeps serving, so the log says so once: no ERROR
    line calling the model 'unavailable' at each rescan while its version serves."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            (root / "gen" / "config.json").write_text("{not json")
            with caplog.at_level(logging.INFO):
                await reloader.rescan()
                await reloader.rescan()
            assert version_states(repo) == {"1": "READY"}
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "still serving version 1 as loaded" in errors[0], errors
    assert not any("unavailable" in m for m in errors), errors


def test_a_model_directory_removed_during_a_rescan_is_no_error_about_its_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a model's directory is removed (to take it out of service) while a rescan runs,
    after the rescan read it. The file check that ends the rescan logged an ERROR 'model.onnx is
    gone from disk ... a restart would find no file ...: restore it' for a model the operator
    removed on purpose; the next rescan (the watch's) removes the model, and nothing is an error."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "other", version="1", seed=1)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        rescan_model = reloader._rescan_model

        async def then_remove(model_dir: Path, report: Any) -> None:
            await rescan_model(model_dir, report)
            if model_dir.name == "gen":  # read by this rescan, then removed
                shutil.rmtree(model_dir)

        try:
            reloader._rescan_model = then_remove  # type: ignore[method-assign]
            with caplog.at_level(logging.INFO):
                await reloader.rescan()
                reloader._rescan_model = rescan_model  # type: ignore[method-assign]
                await reloader.rescan()
            assert "gen" not in repo.models and version_states(repo, "other") == {"1": "READY"}
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def test_a_model_directory_removed_as_a_rescan_reads_it_is_removed_without_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a model's directory is removed (to take it out of service) after the rescan
    listed the repository, before it read that model (its config.json, then its version
    directories). That logged an ERROR 'cannot read config.json ...; not applied: still serving
    version 1 as loaded' for a model the operator removed on purpose; the next rescan removes the
    model, and nothing is an error."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "other", version="1", seed=1)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        read_model = repo.read_model
        available_versions = repo.available_versions

        def removed_first(model_dir: Path) -> Any:
            if model_dir.name == "gen" and model_dir.exists():  # listed by this rescan, then removed
                shutil.rmtree(model_dir)
            return read_model(model_dir)

        def removed_after_config(model: Any) -> list[str]:
            if model.name == "gen" and model.path.exists():  # its config.json read, then removed
                shutil.rmtree(model.path)
            return available_versions(model)

        try:
            with caplog.at_level(logging.INFO):
                for name, patched, original in (
                    ("read_model", removed_first, read_model),
                    ("available_versions", removed_after_config, available_versions),
                ):
                    write_gen(root, "gen", version="1", seed=0)
                    await reloader.rescan()
                    assert version_states(repo) == {"1": "READY"}
                    setattr(repo, name, patched)
                    await reloader.rescan()
                    setattr(repo, name, original)
                    await reloader.rescan()
                    assert "gen" not in repo.models and version_states(repo, "other") == {"1": "READY"}
                    assert repo.metrics.registry.get_sample_value(
                        "genserve_model_config_error", {"model": "gen"}
                    ) in (None, 0)
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def test_a_broken_config_json_names_only_the_versions_that_really_serve(tmp_path: Path) -> None:
    """In process: version 1 serves and a new version 2 failed to load (its file fails its sha256);
    then config.json is broken. The model's reason says what still serves: version 1, not version
    2, which never served. A model whose only version failed is said to serve nothing."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "dead", version="1", seed=1)
    with open(root / "dead" / "1" / "model.onnx", "ab") as model_file:
        model_file.write(b"corrupt")  # fails its sha256 at start-up: nothing of it serves
    aside = root / "gen" / ".tmp-2"
    shutil.copytree(root / "gen" / "1", aside)
    with open(aside / "model.onnx", "ab") as model_file:
        model_file.write(b"corrupt")

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            aside.rename(root / "gen" / "2")
            await reloader.rescan()
            assert version_states(repo) == {"1": "READY", "2": "UNAVAILABLE"}
            assert version_states(repo, "dead") == {"1": "UNAVAILABLE"}
            for name in ("gen", "dead"):
                (root / name / "config.json").write_text("{not json")
            await reloader.rescan()
            gen, dead = repo.get("gen").reason, repo.get("dead").reason
            assert "invalid JSON" in gen and "still serving version 1 as loaded" in gen, gen
            assert "invalid JSON" in dead and "still serving nothing" in dead, dead
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_the_rescan_summary_names_new_models_that_failed_and_claims_no_old_versions_for_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a rescan adds two models that cannot serve, one whose only version fails to load
    and one whose config.json is invalid. The summary line listed the first under 'not applied (old
    versions serve)', though it has no old version, and left the second out altogether. Each is
    named, under what nothing serves; only models with loaded versions are said to keep them."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            (write_gen(root, "new-file-missing") / "model.onnx").unlink()
            write_gen(root, "new-config-invalid")
            (root / "new-config-invalid" / "config.json").write_text("{not json")
            with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
                await reloader.rescan()
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rescan in")]
    after_kept = summary.partition("not applied (old versions serve)")[2]
    kept = after_kept.partition("not applied (nothing serves)")[0]
    assert "new-file-missing" not in kept and "new-config-invalid" not in kept, summary
    assert "new-file-missing" in summary and "new-config-invalid" in summary, summary


def test_the_rescan_summary_says_a_specific_policy_with_a_version_not_on_disk_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: version 2 published and config.json's policy set to `specific: ["2", "3"]`, 3 not
    on disk: the rescan loads 2 and retires 1, as docs/model-repository.md says (it serves those it
    picks). Its summary listed the model under 'not applied (old versions serve)', the words of an
    edit that was not applied, beside 'loaded ... version 2' and 'retiring ... version 1'. It is named
    as a policy listing versions not on disk, not as unapplied."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            write_gen(root, "gen", version="2", seed=1, version_policy={"specific": ["2", "3"]})
            with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
                await reloader.rescan()
            states = version_states(repo)
            assert states["2"] == "READY" and states.get("1", "gone") != "READY", states  # 1 drains
            assert "(3)" in repo.get("gen").reason, repo.get("gen").reason
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rescan in")]
    assert "version 2" in summary.partition("loaded")[2].partition("serving again")[0], summary
    unapplied = summary.partition("not applied (old versions serve)")[2].partition("not applied (nothing")[0]
    assert "gen" not in unapplied, summary
    assert "'gen'" in summary.partition("not on disk")[2], summary


def test_a_rescan_that_finds_nothing_to_change_says_it_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a SIGHUP on an unchanged repository logged 'repository rescan requested' and
    nothing after it, so an operator could not tell that the rescan had run and ended. It ends with
    one line saying that it had no change to apply."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
                report = await reloader.rescan()
            assert not report.changed()
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rescan in")]
    assert summary.endswith("no change to apply"), summary


def test_a_rescan_says_a_loaded_versions_config_edit_applies_at_its_next_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md: a valid config.json edit applies to versions loaded from then on. An
    operator who edited a loaded model's batching (a code prior's sampling) and sent SIGHUP was told
    'no change to apply' alone: nothing said that the edit waits for the version's next load. One
    line names the model, what changed and when it applies; an unchanged repository says nothing more."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    config_path = root / "gen" / "config.json"

    async def scenario() -> tuple[list[str], list[str]]:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            loaded = repo.get("gen").versions["1"].config
            edited = json.loads(config_path.read_text())
            edited["batching"]["max_queue_delay_ms"] = 7.0
            config_path.write_text(json.dumps(edited))
            with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
                first = await reloader.rescan()
                assert repo.get("gen").versions["1"].config == loaded  # serves as loaded
                messages = [r.getMessage() for r in caplog.records]
                caplog.clear()
                edited["batching"]["max_queue_delay_ms"] = 2.0  # set back: nothing waits
                config_path.write_text(json.dumps(edited))
                await reloader.rescan()
            assert not first.changed()
            return messages, [r.getMessage() for r in caplog.records]
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    messages, after_set_back = asyncio.run(scenario())
    [line] = [m for m in messages if m.startswith("model gen: config.json")]
    assert "batching" in line and "version 1" in line and "next load" in line and "restart" in line, line
    assert not [m for m in after_set_back if "config.json" in m], after_set_back
    assert [m for m in after_set_back if m.startswith("rescan in")][0].endswith("no change to apply")

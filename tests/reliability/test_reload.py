"""Hot reload under traffic: a new version switches in, the old one drains out, nothing fails.

The tests of this module share one server and run in order (v2 added, a broken v3 refused then
fixed, a model removed).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from reliability_support import (
    as_unprivileged_user,
    copy_version_atomically,
    health_status,
    loaded_repository,
    version_states,
    wait_on_loop,
    write_gen,
    write_slow,
)
from server_support import TINY_LATENT, ServerProcess, externalize_weights, start_server, wait_until

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import health as health_module
from genserve_server import heap, loader
from genserve_server import main as main_module
from genserve_server import reload as reload_module
from genserve_server.batch_keys import LatentRows
from genserve_server.config import ServerConfig
from genserve_server.errors import NotFound, Unavailable
from genserve_server.health import SERVICE_ALIAS as ALIAS
from genserve_server.main import App
from genserve_server.metrics import Metrics
from genserve_server.reload import Reloader, repository_fingerprint
from genserve_server.repository import LoadCancelled, ModelState, ModelVersion, Repository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Outcome:
    started: float
    code: grpc.StatusCode
    version: str = ""
    worker: int = 0


@dataclass
class Traffic:
    """Closed-loop Sample calls from a few threads; every outcome is recorded with its start time."""

    target: str
    model: str
    threads: int = 3
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, seed: int) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = stub.Sample(
                        pb.SampleRequest(model=self.model, count=2, base_seed=seed), timeout=20
                    )
                    version = response.provenance.version
                    self.outcomes.append(Outcome(started, grpc.StatusCode.OK, version, seed))
                except grpc.RpcError as exc:
                    self.outcomes.append(Outcome(started, exc.code(), worker=seed))

    def __enter__(self) -> Traffic:
        self._workers = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def codes(self) -> set[grpc.StatusCode]:
        return {o.code for o in self.outcomes}

    def wait_for_each(self, what: str, *, started_after: float = 0.0, older_than_s: float = 0.0) -> None:
        """Until every worker has the outcome of a call that started after `started_after` and at least
        `older_than_s` ago. A worker calls one at a time: all its later outcomes start later too."""

        def every_worker() -> bool:
            latest = time.monotonic() - older_than_s
            workers = {o.worker for o in list(self.outcomes) if started_after < o.started < latest}
            return len(workers) == self.threads

        wait_until(every_worker, 30, what, interval_s=0.01)


@pytest.fixture(scope="module")
def reload_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reload-models")
    write_gen(root, "gen", version="1", seed=0)
    write_slow(root, "other", iterations=4000, queue=64, batch=4)
    return root


@pytest.fixture(scope="module")
def reload_server(reload_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        reload_repo, tmp_path_factory.mktemp("reload-server"), config={"drain_grace_s": 10.0}
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(reload_server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(reload_server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _states(stub: pb_grpc.GenerationServiceStub, model: str) -> dict[str, int]:
    info = stub.GetModel(pb.GetModelRequest(name=model), timeout=10)
    return {v.version: v.state for v in info.versions}


def _staged_version(tmp_path: Path, version: str, seed: int) -> Path:
    write_gen(tmp_path / "staging", "gen", version=version, seed=seed)
    return tmp_path / "staging" / "gen"


def test_new_version_switches_atomically_under_load_with_zero_errors(
    reload_server: ServerProcess, reload_repo: Path, stub: pb_grpc.GenerationServiceStub, tmp_path: Path
) -> None:
    staged = _staged_version(tmp_path, "2", seed=1)
    with Traffic(reload_server.target, "gen") as traffic:
        traffic.wait_for_each("a call of every worker served by v1")
        copy_version_atomically(reload_repo / "gen", "2", "2", staged)
        reload_server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _states(stub, "gen").get("2") == pb.MODEL_STATE_READY, 60, "v2 READY")
        v2_ready_at = time.monotonic()
        wait_until(lambda: "1" not in _states(stub, "gen"), 30, "v1 to drain and unload")
        v1_gone_at = time.monotonic()
        traffic.wait_for_each("a call of every worker after v1 left", started_after=v1_gone_at)
    assert traffic.codes() == {grpc.StatusCode.OK}, [
        o for o in traffic.outcomes if o.code != grpc.StatusCode.OK
    ][:5]
    versions = [o.version for o in traffic.outcomes]
    assert "1" in versions and "2" in versions, set(versions)
    # Atomic switch: no request that started after v2 was READY was served by v1.
    assert {o.version for o in traffic.outcomes if o.started > v2_ready_at} == {"2"}
    assert stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=10).provenance.version == "2"
    assert reload_server.metric("genserve_model_ready", model="gen", version="2") == 1
    assert 'version="1"' not in "\n".join(
        line
        for line in reload_server.metrics_text().splitlines()
        if line.startswith('genserve_model_ready{model="gen"')
    )


def test_a_broken_new_version_leaves_the_old_serving_and_a_fixed_one_loads(
    reload_server: ServerProcess, reload_repo: Path, stub: pb_grpc.GenerationServiceStub, tmp_path: Path
) -> None:
    staged = _staged_version(tmp_path, "3", seed=2)
    good = (staged / "3" / "model.onnx").read_bytes()
    (staged / "3" / "model.onnx").write_bytes(good[:100])  # truncated: sha256 mismatch
    copy_version_atomically(reload_repo / "gen", "3", "3", staged)
    reload_server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _states(stub, "gen").get("3") == pb.MODEL_STATE_UNAVAILABLE, 60, "v3 UNAVAILABLE")
    info = stub.GetModel(pb.GetModelRequest(name="gen", version="3"), timeout=10)
    assert "sha256 mismatch" in info.versions[0].reason
    assert _states(stub, "gen")["2"] == pb.MODEL_STATE_READY
    assert stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=10).provenance.version == "2"
    # Fix it (aside + rename again) and reload: v3 serves, v2 drains away.
    shutil.rmtree(reload_repo / "gen" / "3")
    (staged / "3" / "model.onnx").write_bytes(good)
    copy_version_atomically(reload_repo / "gen", "3", "3", staged)
    reload_server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _states(stub, "gen") == {"3": pb.MODEL_STATE_READY}, 60, "v3 alone READY")
    assert stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=10).provenance.version == "3"


def test_a_sample_stream_open_across_a_reload_finishes_on_its_version(
    reload_server: ServerProcess, reload_repo: Path, stub: pb_grpc.GenerationServiceStub, tmp_path: Path
) -> None:
    # The stream resolves the current version once; version 4 replaces it while the client is still
    # reading (it reads one chunk, then stops: flow control holds the server back). The drain waits
    # for the stream (within drain_grace_s): every image arrives, all from the version the stream
    # started on, and only then does that version unload.
    current = max(_states(stub, "gen"), key=int)
    staged = _staged_version(tmp_path, "4", seed=3)
    f32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)  # large chunks: the window fills sooner
    sample = pb.SampleRequest(model="gen", count=20000, output=f32)
    request = pb.SampleStreamRequest(sample=sample, chunk_size=256)
    chunks = stub.SampleStream(request, timeout=60)
    first = next(chunks)
    copy_version_atomically(reload_repo / "gen", "4", "4", staged)
    reload_server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _states(stub, "gen").get("4") == pb.MODEL_STATE_READY, 60, "v4 READY")
    time.sleep(0.5)  # well past the moment the old version began to drain
    assert _states(stub, "gen").get(current) == pb.MODEL_STATE_DRAINING  # held by the open stream
    rest = list(chunks)
    images = [g.index for c in [first, *rest] for g in c.images]
    assert images == list(range(20000))
    assert {c.provenance.version for c in [first, *rest]} == {current}
    wait_until(lambda: current not in _states(stub, "gen"), 30, f"v{current} to unload after the stream")
    assert stub.Sample(pb.SampleRequest(model="gen", count=1), timeout=10).provenance.version == "4"


def test_removed_model_drains_in_flight_work_then_answers_not_found(
    reload_server: ServerProcess, reload_repo: Path, stub: pb_grpc.GenerationServiceStub
) -> None:
    with grpc.insecure_channel(reload_server.target) as channel:
        assert health_status(channel, "other") == health_pb2.HealthCheckResponse.SERVING
        with Traffic(reload_server.target, "other", threads=4) as traffic:
            # Calls that started well (0.3 s) before the removal and have finished: surely accepted.
            traffic.wait_for_each("a call of every worker 0.3 s old", older_than_s=0.3)
            shutil.rmtree(reload_repo / "other")
            sighup_at = time.monotonic()
            reload_server.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: (
                    "other"
                    not in [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
                ),
                30,
                "the model to leave ListModels",
            )
            left_at = time.monotonic()
            # Every worker's calls from here on started after the removal: the last outcome is one.
            traffic.wait_for_each("a call of every worker after the model left", started_after=left_at)
        assert health_status(channel, "other") == health_pb2.HealthCheckResponse.NOT_SERVING
    # Accepted requests all finish; a request that arrives after the removal is NOT_FOUND (it was
    # never accepted). Requests started well before the signal had certainly been accepted.
    assert {o.code for o in traffic.outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}
    early = [o for o in traffic.outcomes if o.started < sighup_at - 0.3]
    assert early and all(o.code == grpc.StatusCode.OK for o in early)
    assert traffic.outcomes[-1].code == grpc.StatusCode.NOT_FOUND
    assert "gen" in [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
    assert reload_server.proc.poll() is None


def test_watch_interval_picks_up_a_new_version_without_a_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: the poll-based watch (`watch_interval_s`) triggers the same rescan as SIGHUP."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)
    # A gate on the watch's first listing (its baseline): the new version must come after it.
    listed = threading.Event()

    def fingerprint(path: Path) -> tuple[tuple[str, int, int, int, int], ...]:
        try:
            return repository_fingerprint(path)
        finally:
            listed.set()

    monkeypatch.setattr(reload_module, "repository_fingerprint", fingerprint)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=2.0, watch_interval_s=0.1)
        reloader.start()
        try:
            assert await asyncio.to_thread(listed.wait, 10), "the watch never listed the repository"
            copy_version_atomically(root / "gen", "2", "2", staged)
            for _ in range(200):
                versions = repo.models["gen"].versions
                if list(versions) == ["2"] and versions["2"].state == ModelState.READY:
                    break
                await asyncio.sleep(0.05)
            assert list(repo.models["gen"].versions) == ["2"]
            assert repo.get("gen").resolve("").version == "2"
        finally:
            await reloader.close(2.0)
            await repo.close(2.0)

    asyncio.run(scenario())


def test_the_watch_rescans_when_a_files_permissions_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: a chmod that makes an unreadable config.json or model.onnx readable again changes
    no name, size or mtime, so the watch never rescanned (the model kept its error until a SIGHUP):
    the watch sees a file's permissions too."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    listed = threading.Event()

    def fingerprint(path: Path) -> tuple[tuple[str, int, int, int, int], ...]:
        try:
            return repository_fingerprint(path)
        finally:
            listed.set()

    monkeypatch.setattr(reload_module, "repository_fingerprint", fingerprint)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=2.0, watch_interval_s=0.05)
        reloader.start()
        try:
            assert await asyncio.to_thread(listed.wait, 10), "the watch never listed the repository"
            for path in (root / "gen" / "config.json", root / "gen" / "1" / "model.onnx"):
                caplog.clear()
                path.chmod(0o600)
                for _ in range(100):
                    if "repository rescan requested" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
                assert "repository rescan requested" in caplog.text, path
        finally:
            await reloader.close(2.0)
            await repo.close(2.0)

    with caplog.at_level(logging.INFO, logger="genserve_server.reload"):
        asyncio.run(scenario())


def test_a_config_edit_of_the_same_size_within_the_listings_mtime_tick_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: on a file system whose mtimes are coarse (1 s on NFS or ext3, 2 s on FAT), a
    config.json rewritten with the same size within the tick of the watch's last listing has the
    same name, size, mtime and mode: the watch never rescanned and the edit was never applied (until
    a SIGHUP or another change). The watch compares the bytes of a small file modified within a tick
    of its listing (the tick is made long here, as the mtime is set back to the first write's; the
    listing's ctimes are made as coarse as its mtimes, as such a file system's are)."""
    monkeypatch.setattr(reload_module, "MTIME_TICK_NS", 3600 * 10**9, raising=False)
    listing = reload_module.repository_fingerprint

    def coarse_listing(root: Path) -> tuple[reload_module.Listed, ...]:
        return tuple((name, size, mtime, mode, mtime) for name, size, mtime, mode, _ in listing(root))

    monkeypatch.setattr(reload_module, "repository_fingerprint", coarse_listing)
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    config = root / "gen" / "config.json"
    tick = config.stat().st_mtime_ns // 10**9 * 10**9
    os.utime(config, ns=(tick, tick))
    text = config.read_text()
    edited = text.replace('"max_batch_size": 16', '"max_batch_size": 15')
    assert len(edited) == len(text) and edited != text

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=1.0, watch_interval_s=0.05)
        reloader.start()
        try:
            await asyncio.sleep(0.3)  # the watch has listed the repository, config.json at `tick`
            config.write_text(edited)  # in place, same size
            os.utime(config, ns=(tick, tick))  # the same tick on a coarse file system
            model = repo.models["gen"]
            await wait_on_loop(
                lambda: model.config is not None and model.config.batching.max_batch_size == 15, "edit"
            )
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_the_watch_looks_only_at_the_files_a_version_is_loaded_from(tmp_path: Path) -> None:
    """A version directory may be a link to a directory holding much else (a checkpoint folder, a
    shared volume): the watch listed and stat-ed every entry of it at every poll (~0.6 s of CPU a poll
    at 50k entries). In a version directory it looks at model.onnx, model.fp16.onnx and card.json
    alone, and still sees each of them change."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    target = tmp_path / "checkpoints"
    shutil.copytree(root / "gen" / "1", target)
    for i in range(2000):
        (target / f"step-{i}.bin").touch()
    (target / "logs").mkdir()
    (root / "gen" / "2").symlink_to(target, target_is_directory=True)
    listed = [name for name, *_ in repository_fingerprint(root)]
    assert sorted(listed) == [
        "gen",
        "gen/1",
        "gen/1/card.json",
        "gen/1/model.onnx",
        "gen/2",
        "gen/2/card.json",
        "gen/2/model.onnx",
        "gen/config.json",
    ]
    before = repository_fingerprint(root)
    (target / "model.fp16.onnx").write_bytes(b"onnx")
    with_fp16 = repository_fingerprint(root)
    assert "gen/2/model.fp16.onnx" in [name for name, *_ in with_fp16]
    (target / "card.json").write_text((target / "card.json").read_text() + " ")
    assert before != with_fp16 != repository_fingerprint(root)


def test_the_watch_sees_a_model_file_rewritten_in_place_with_its_size_and_mtime_kept(tmp_path: Path) -> None:
    """`cp -p` onto a loaded model.onnx writes it in place and sets its mtime back: its name, size,
    mtime and mode list as before, so the watch never rescanned, and with a watch set no other file
    check runs: the changed file was never reported. The watch sees its ctime, which nothing sets back."""
    root = tmp_path / "models"
    served = write_gen(root, "gen", version="1", seed=0) / "model.onnx"
    other = write_gen(tmp_path / "other", "gen", version="1", seed=5) / "model.onnx"
    before = served.stat()
    listed = repository_fingerprint(root)
    time.sleep(0.05)  # a tick of the kernel's file time stamps apart from the first write
    shutil.copyfile(other, served)
    os.utime(served, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = served.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert after.st_ctime_ns != before.st_ctime_ns
    assert repository_fingerprint(root) != listed


def test_the_watch_follows_a_card_rewritten_in_place_to_list_other_data_files(tmp_path: Path) -> None:
    """The external data files card.json lists were read once per (size, mtime, inode) of the card:
    a card written in place with its mtime set back (`cp -p` onto it) to list another data file of
    a name as long kept the old list, so the watch never looked at the new file and missed its
    changes. The card's ctime, which nothing sets back, is part of that key too."""
    root = tmp_path / "models"
    version_dir = write_gen(root, "gen", version="1", seed=0)
    card = version_dir / "card.json"
    card.write_text(json.dumps({"sha256": {"model.onnx": "0" * 64, "weights-a.data": "1" * 64}}))
    (version_dir / "weights-a.data").write_bytes(b"a")
    (version_dir / "weights-b.data").write_bytes(b"b")
    before = card.stat()
    assert "gen/1/weights-a.data" in [name for name, *_ in repository_fingerprint(root)]
    time.sleep(0.05)  # a tick of the kernel's file time stamps apart from the first write
    card.write_text(json.dumps({"sha256": {"model.onnx": "0" * 64, "weights-b.data": "1" * 64}}))
    os.utime(card, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = card.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    listed = [name for name, *_ in repository_fingerprint(root)]
    assert "gen/1/weights-b.data" in listed
    assert "gen/1/weights-a.data" not in listed


def test_the_watch_stats_each_listed_file_of_a_model_once_a_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator with hundreds of models: the watch's listing stat-ed each model directory and each
    entry of it twice (its stat, then again to ask whether it is a directory), ~9 file system calls a
    one-version model at every poll (~34 ms of CPU a poll at 300 models). Each file or directory it
    lists is stat-ed once (and model.fp16.onnx looked for once); the listing is the same."""
    root = tmp_path / "models"
    models = 20
    for i in range(models):
        write_gen(root, f"m{i:03d}", version="1", seed=0)
    expected = sorted(
        [f"m{i:03d}{part}" for i in range(models) for part in ("", "/1", "/1/card.json", "/1/model.onnx")]
        + [f"m{i:03d}/config.json" for i in range(models)]
    )
    stats = 0
    stat = os.stat

    def counting(*args: object, **kwargs: object) -> os.stat_result:
        nonlocal stats
        stats += 1
        return stat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting)
    listed = repository_fingerprint(root)
    monkeypatch.undo()
    assert [name for name, *_ in listed] == expected
    assert stats <= 6 * models, f"{stats} stat calls to list {models} one-version models"


# The watch's listing, printed as JSON by a process of its own (run without root's capabilities).
_PRINT_FINGERPRINT = (
    "import json, sys; from pathlib import Path; from genserve_server.reload import repository_fingerprint; "
    "print(json.dumps(repository_fingerprint(Path(sys.argv[1]))))"
)


def test_the_watch_lists_the_versions_beside_one_it_cannot_list(tmp_path: Path) -> None:
    """A version directory the server cannot list (mode 0000) ended the listing of its model's
    directory: the versions listed after it were not looked at, so a file changed or added in one
    of them (a failed version fixed in place, a loaded model file overwritten) never set off a rescan."""
    prefix = as_unprivileged_user()
    model = tmp_path / "models" / "gen"
    for version in range(1, 9):
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.onnx").write_bytes(b"onnx")
    locked = model / os.listdir(model)[0]  # listed first: every other version comes after it
    locked.chmod(0)
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", _PRINT_FINGERPRINT, str(model.parent)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    listed = {entry[0] for entry in json.loads(proc.stdout)}
    files = {f"gen/{version}/model.onnx" for version in range(1, 9)}
    assert files - listed == {f"gen/{locked.name}/model.onnx"}
    assert f"gen/{locked.name}" in listed


def test_the_watch_logs_a_version_directory_it_cannot_list_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In process (root looks inside a mode-0000 directory: a stat of its files is made to refuse):
    the watch names the directory it cannot look inside, once, not at every poll."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    locked = root / "gen" / "2"
    locked.mkdir()
    stat = Path.stat

    def refusing(path: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if path.parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", refusing)

    async def scenario() -> None:
        reloader = Reloader(
            Repository(root, ServerConfig(), Metrics(enabled=False)), drain_grace_s=1.0, watch_interval_s=0.02
        )
        reloader.start()
        try:
            await asyncio.sleep(0.5)
        finally:
            await reloader.close(1.0)

    with caplog.at_level(logging.WARNING, logger="genserve_server.reload"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if str(locked) in r.getMessage()]
    assert len(lines) == 1, lines
    assert "Permission denied" in lines[0]


def test_a_version_whose_external_weights_were_still_being_written_loads_once_they_are_whole(
    tmp_path: Path,
) -> None:
    """In process: a version written in place whose model.onnx.data (its graph's external weights)
    was half written when the watch saw the version failed to load (sha256 mismatch), as it should,
    but the watch looked at model.onnx, model.fp16.onnx and card.json alone, so the rest of the
    weights written later set off no rescan and the version stayed UNAVAILABLE until a SIGHUP. The
    watch sees the external data files a card lists too: the whole file loads."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = write_gen(tmp_path / "staging", "gen", version="2", seed=1)
    weights = externalize_weights(staged).read_bytes()

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=1.0, watch_interval_s=0.05)
        reloader.start()
        try:
            version_dir = root / "gen" / "2"
            version_dir.mkdir()
            (version_dir / "model.onnx.data").write_bytes(weights[: len(weights) // 2])
            shutil.copy(staged / "model.onnx", version_dir / "model.onnx")
            shutil.copy(staged / "card.json", version_dir / "card.json")
            await wait_on_loop(lambda: version_states(repo).get("2") == "UNAVAILABLE", "v2 failed (half)")
            assert "model.onnx.data" in repo.models["gen"].versions["2"].reason
            await asyncio.sleep(0.3)  # the watch's listings since hold the half-written file
            with (version_dir / "model.onnx.data").open("ab") as handle:
                handle.write(weights[len(weights) // 2 :])
            await wait_on_loop(lambda: version_states(repo) == {"2": "READY"}, "v2 READY once whole")
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_version_whose_files_are_swapped_while_it_loads_never_serves_a_graph_it_did_not_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: a version directory laid out as Kubernetes mounts a ConfigMap or projected volume
    (model.onnx and card.json links through `..data`, a link the kubelet swaps to a new timestamped
    directory in one rename). A swap after the load had checked model.onnx against card.json, before
    ONNX Runtime opened it, served the new graph under the old one's sha256: the file check then
    reported the file 'changed on disk since this version loaded', and the graph served had never
    been checked. The load refuses a file that changed while it loaded; the next rescan (the
    watch's, which sees the swap) loads the new files, checked."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    version_dir = root / "gen" / "2"
    version_dir.mkdir()
    for stamp, seed in (("..2026_12_07_a", 1), ("..2026_12_07_b", 2)):
        staged = write_gen(tmp_path / f"staging-{seed}", "gen", version="2", seed=seed)
        shutil.copytree(staged, version_dir / stamp)
    (version_dir / "..data").symlink_to("..2026_12_07_a")
    for name in ("model.onnx", "card.json"):
        (version_dir / name).symlink_to(f"..data/{name}")
    new_sha = hashlib.sha256((version_dir / "..2026_12_07_b" / "model.onnx").read_bytes()).hexdigest()
    sha256_file = loader.sha256_file

    def swapped_after_hashing(path: Path) -> str:
        digest = sha256_file(path)
        if path == version_dir / "model.onnx" and (version_dir / "..data").readlink().name.endswith("a"):
            (version_dir / "..data_tmp").symlink_to("..2026_12_07_b")
            os.replace(version_dir / "..data_tmp", version_dir / "..data")  # the kubelet's atomic swap
        return digest

    monkeypatch.setattr(loader, "sha256_file", swapped_after_hashing)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=1.0, file_check_interval_s=None)
        try:
            for _ in range(2):  # the rescan of the version's arrival, then the one of the swap
                await reloader.rescan()
            mv = repo.models["gen"].versions["2"]
            assert mv.state == ModelState.READY, mv.reason
            assert mv.sha256 == new_sha
            assert mv.file_changed == ""
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_version_whose_file_is_rewritten_in_place_while_it_loads_keeping_its_mtime_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: model.onnx rewritten in place (same inode, same size: another seed of the same
    graph) after the load had checked it against card.json, its mtime set back (`cp -p`, `rsync -t`),
    before ONNX Runtime opened it. The load compared (device, inode, size, mtime) alone, so it served
    the new graph under the old one's sha256; it compares the ctime too, as the reload's file check
    does, and refuses a file that changed while it loaded."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = write_gen(tmp_path / "staging", "gen", version="2", seed=1)
    other = write_gen(tmp_path / "other", "gen", version="2", seed=2)
    shutil.copytree(staged, root / "gen" / "2")
    model = root / "gen" / "2" / "model.onnx"
    new_bytes = (other / "model.onnx").read_bytes()
    assert len(new_bytes) == model.stat().st_size and new_bytes != model.read_bytes()
    sha256_file = loader.sha256_file
    rewritten = []

    def rewritten_after_hashing(path: Path) -> str:
        digest = sha256_file(path)
        if path == model and not rewritten:
            before = path.stat()
            time.sleep(0.01)  # a ctime that moves on a coarse clock too
            with path.open("r+b") as handle:
                handle.write(new_bytes)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            after = path.stat()
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
                before.st_ino,
                before.st_size,
                before.st_mtime_ns,
            )
            rewritten.append(path)
        return digest

    monkeypatch.setattr(loader, "sha256_file", rewritten_after_hashing)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            assert rewritten
            mv = repo.models["gen"].versions["2"]
            assert mv.state == ModelState.UNAVAILABLE, (mv.state, mv.sha256)
            assert "model.onnx: changed on disk while this version loaded" in mv.reason
        finally:
            await repo.close(1.0)

    asyncio.run(scenario())


def test_the_watch_sees_a_version_published_while_start_up_loads(tmp_path: Path) -> None:
    """In process: a version renamed into place after start-up's scan, while its models load, is
    picked up by the watch's first listing once serving (its baseline is the repository as scanned,
    not as it is once loading has ended)."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)

    async def scenario() -> None:
        app = App(root, ServerConfig(watch_interval_s=0.02), port=0, metrics_port=None)
        load_all = app.repository.load_all

        async def publish_then_load() -> None:
            assert list(app.repository.models["gen"].versions) == ["1"]  # scanned already
            copy_version_atomically(root / "gen", "2", "2", staged)
            await load_all()

        app.repository.load_all = publish_then_load  # type: ignore[method-assign]
        await app.start()
        try:
            await wait_on_loop(lambda: version_states(app.repository) == {"2": "READY"}, "v2 alone READY")
            assert app.repository.get("gen").resolve("").version == "2"
        finally:
            app.request_stop()
            await app.stop()

    asyncio.run(scenario())


def test_a_removed_version_is_freed_although_the_start_up_heap_was_frozen(tmp_path: Path) -> None:
    """`serve` freezes the heap after the initial load (heap.py), and a loaded version is a cycle
    (runner, batcher, sessions): without the reloader's refreeze its sessions would never be freed."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "other", version="1", seed=1)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        reloader = Reloader(repo, drain_grace_s=2.0)
        heap.freeze_startup_heap()
        try:
            mv = repo.models["gen"].versions["1"]
            assert mv.runner is not None
            session = weakref.ref(mv.runner.session_runners[0].session)
            version = weakref.ref(mv)
            del mv
            shutil.rmtree(root / "gen")
            await reloader.rescan()
            for _ in range(100):
                if "gen" not in repo.models and version() is None:
                    break
                await asyncio.sleep(0.05)
            assert "gen" not in repo.models
            assert version() is None, "the removed version is still alive"
            assert session() is None, "the removed version's ONNX Runtime session is still alive"
            assert repo.get("other").resolve("").state == ModelState.READY
        finally:
            gc.unfreeze()  # the test process's heap goes back to the collector
            await reloader.close(2.0)
            await repo.close(2.0)

    asyncio.run(scenario())


def _series(metrics: Metrics, family: str, model: str = "gen", version: str = "1") -> list[str]:
    """The exposition lines of `family` for one (model, version)."""
    text = generate_latest(metrics.registry).decode()
    labels = (f'model="{model}"', f'version="{version}"')
    return [x for x in text.splitlines() if x.startswith(family + "{") and all(a in x for a in labels)]


def test_the_end_of_an_old_copys_drain_leaves_the_new_copys_series(tmp_path: Path) -> None:
    """In process: a model directory moved away and back while an RPC holds its version 1. The new
    copy of version 1 serves; when the old copy's drain ends, the series they share by their labels
    (ready, load duration, runtime info, batch cap) stay the new copy's. They go with the last copy."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "other", version="1", seed=1)
    families = (
        "genserve_model_ready",
        "genserve_model_load_duration_seconds",
        "genserve_model_runtime_info",
        "genserve_batch_max_rows",
    )

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=30.0, file_check_interval_s=None)
        try:
            old = repo.models["gen"].versions["1"]
            assert old.batcher is not None
            old.batcher.hold()  # an RPC still running on the old copy
            shutil.move(root / "gen", tmp_path / "gen-aside")
            await reloader.rescan()  # removed: the old copy drains, held
            shutil.move(tmp_path / "gen-aside", root / "gen")
            await reloader.rescan()  # added back: a new copy of version 1 loads
            new = repo.get("gen").resolve("")
            assert new is not old and new.state == ModelState.READY
            assert reloader.draining == 1
            old.batcher.release()  # the RPC ends: the old copy's drain ends
            await wait_on_loop(lambda: reloader.draining == 0, "the old copy's drain to end")
            assert repo.get("gen").resolve("") is new
            assert _series(metrics, "genserve_model_ready") == [
                'genserve_model_ready{model="gen",version="1"} 1.0'
            ]
            for family in families:
                assert len(_series(metrics, family)) == 1, family
            # The last copy's drain removes them.
            shutil.rmtree(root / "gen")
            await reloader.rescan()
            await wait_on_loop(lambda: reloader.draining == 0, "the new copy's drain to end")
            for family in families:
                assert _series(metrics, family) == [], family
            assert len(_series(metrics, "genserve_model_ready", model="other")) == 1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


async def _computes(mv: ModelVersion) -> bool:
    """Whether `mv`'s batcher still computes a row (a drained version refuses it)."""
    assert mv.batcher is not None
    z = np.zeros((1, TINY_LATENT), np.float32)
    result = await mv.batcher.submit(LatentRows(), {"z": z}, 1)
    return bool(result.outputs["image"].shape[0] == 1)


def test_a_rollback_while_the_old_version_drains_serves_it_again_at_once(tmp_path: Path) -> None:
    """In process: a SampleStream holds version 1 while version 2 replaces it; then directory 2 is
    removed (a rollback). Version 1, still draining, serves again (the same copy, its stream goes on)
    and version 2, whose files are gone, drains out; the model reports no problem."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=30.0, file_check_interval_s=None)
        try:
            v1 = repo.models["gen"].versions["1"]
            assert v1.batcher is not None
            v1.batcher.hold(stream=True)  # a SampleStream on version 1
            copy_version_atomically(root / "gen", "2", "2", staged)
            await reloader.rescan()
            assert version_states(repo) == {"1": "DRAINING", "2": "READY"}
            shutil.rmtree(root / "gen" / "2")  # roll back
            report = await reloader.rescan()
            assert repo.get("gen").resolve("") is v1
            assert report.revived == ["model gen version 1"] and report.retired == ["model gen version 2"]
            await wait_on_loop(lambda: version_states(repo) == {"1": "READY"}, "version 2 to unload")
            assert repo.models["gen"].reason == ""
            assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "gen"}) == 0
            ready = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_ready", ready) == 1
            assert (
                metrics.registry.get_sample_value("genserve_model_ready", {**ready, "version": "2"}) is None
            )
            # The stream ends: version 1 is not drained after all, and computes.
            v1.batcher.release(stream=True)
            assert reloader.draining == 0
            assert await _computes(v1)
            assert repo.get("gen").resolve("") is v1
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_request_naming_a_draining_version_is_unavailable_then_not_found_once_it_is_unloaded(
    tmp_path: Path,
) -> None:
    """In process (docs/operations.md, "Old versions drain"): while version 1 drains behind a
    SampleStream, a new request naming it gets UNAVAILABLE 'model gen version 1 is DRAINING: not
    ready', never the retired version; once it is unloaded, NOT_FOUND naming the versions loaded."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=30.0, file_check_interval_s=None)
        try:
            v1 = repo.models["gen"].versions["1"]
            assert v1.batcher is not None
            v1.batcher.hold(stream=True)  # a SampleStream on version 1
            copy_version_atomically(root / "gen", "2", "2", staged)
            await reloader.rescan()
            assert version_states(repo) == {"1": "DRAINING", "2": "READY"}
            with pytest.raises(Unavailable, match=r"^model gen version 1 is DRAINING: not ready$"):
                repo.get("gen").resolve("1")
            assert repo.get("gen").resolve("") is repo.models["gen"].versions["2"]
            v1.batcher.release(stream=True)
            await wait_on_loop(lambda: version_states(repo) == {"2": "READY"}, "version 1 to unload")
            with pytest.raises(NotFound, match=r"^model gen has no version '1'; versions: 2$"):
                repo.get("gen").resolve("1")
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_rollback_while_the_old_version_is_closing_loads_it_again_from_disk(tmp_path: Path) -> None:
    """In process: version 1's drain is already closing its batcher (its holders are gone) when
    directory 2 is removed: version 1 cannot serve again, so it loads again from disk; version 2
    serves until it is READY, then drains. The old copy's end leaves the new copy serving."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=30.0, file_check_interval_s=None)
        old = repo.models["gen"].versions["1"]
        assert old.batcher is not None
        closing, finish = asyncio.Event(), asyncio.Event()
        close = old.batcher.close

        async def gated_close(timeout_s: float) -> None:  # a batch still finishing, say
            closing.set()
            await finish.wait()
            await close(timeout_s)

        old.batcher.close = gated_close  # type: ignore[method-assign]
        try:
            copy_version_atomically(root / "gen", "2", "2", staged)
            await reloader.rescan()
            await asyncio.wait_for(closing.wait(), 5.0)
            shutil.rmtree(root / "gen" / "2")  # roll back
            report = await reloader.rescan()
            assert report.loaded == ["model gen version 1"] and report.retired == ["model gen version 2"]
            new = repo.get("gen").resolve("")
            assert new is not old and new.version == "1"
            finish.set()
            await wait_on_loop(lambda: reloader.draining == 0, "both drains to end")
            assert version_states(repo) == {"1": "READY"} and repo.models["gen"].versions["1"] is new
            assert repo.models["gen"].reason == ""
            ready = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_ready", ready) == 1
            assert await _computes(new)
        finally:
            finish.set()
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_rollback_while_the_new_version_loads_never_retires_the_version_that_serves(
    tmp_path: Path,
) -> None:
    """In process: version 2's directory is removed (a rollback) while version 2 still loads (a
    TensorRT build takes minutes). Version 2's load ends, but the version the policy picks now is
    version 1, which serves: version 1 keeps serving, the same copy, and version 2 drains out. Before,
    version 2 took the traffic and version 1 was unloaded, then loaded again from disk by the rescan
    the rollback queued, version 2 (its files gone) serving meanwhile."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=30.0, file_check_interval_s=None)
        v1 = repo.models["gen"].versions["1"]
        load = repo._load_version  # on the load's worker thread, before the version turns READY

        def rolled_back_while_loading(mv: ModelVersion) -> None:
            load(mv)
            shutil.rmtree(root / "gen" / "2")  # the rollback, once version 2's files are read

        repo._load_version = rolled_back_while_loading  # type: ignore[method-assign]
        try:
            copy_version_atomically(root / "gen", "2", "2", staged)
            await reloader.rescan()
            assert repo.get("gen").resolve("") is v1
            assert v1.state == ModelState.READY
            await wait_on_loop(lambda: version_states(repo) == {"1": "READY"}, "version 2 to unload")
            assert repo.models["gen"].versions["1"] is v1 and repo.models["gen"].reason == ""
            ready = {"model": "gen", "version": "1"}
            assert metrics.registry.get_sample_value("genserve_model_ready", ready) == 1
            assert await _computes(v1)
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_policy_pointed_back_while_the_new_version_loads_never_retires_the_version_that_serves(
    tmp_path: Path,
) -> None:
    """In process: config.json's version_policy is pointed back to version 1 (a rollback) while the
    version 2 it picked still loads. Version 1 keeps serving, the same copy, and version 2 drains
    out once its load ends, instead of taking the traffic while version 1 was unloaded and loaded
    again by the next rescan."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)
    config_path = root / "gen" / "config.json"

    async def scenario() -> None:
        repo, _ = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=30.0, file_check_interval_s=None)
        v1 = repo.models["gen"].versions["1"]
        load = repo._load_version

        def rolled_back_while_loading(mv: ModelVersion) -> None:
            load(mv)
            config = json.loads(config_path.read_text())
            config["version_policy"] = {"specific": ["1"]}  # the rollback, while version 2 loads
            config_path.write_text(json.dumps(config))

        repo._load_version = rolled_back_while_loading  # type: ignore[method-assign]
        try:
            copy_version_atomically(root / "gen", "2", "2", staged)
            await reloader.rescan()
            assert repo.get("gen").resolve("") is v1
            await wait_on_loop(lambda: version_states(repo) == {"1": "READY"}, "version 2 to unload")
            repo._load_version = load  # type: ignore[method-assign]
            report = await reloader.rescan()  # the rescan the rollback queued: nothing left to do
            assert report.loaded == [] and report.retired == []
            assert repo.models["gen"].versions["1"] is v1 and repo.models["gen"].reason == ""
            assert await _computes(v1)
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_a_stop_during_a_reloads_load_ends_the_load_at_its_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: SIGTERM (App.request_stop) while a reload warms up a new version. The process
    exits only once the load's thread has, so the load ends at its next step, as start-up's loads
    do; the rescan then changes nothing more (version 1 serves to the end, no reload error)."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)
    entered, left, release = threading.Event(), threading.Event(), threading.Event()

    def slow_load(
        mv: ModelVersion,
        sc: ServerConfig,
        check_stopping: Callable[[], None],
        gate: object,
        opened: object = None,
    ) -> None:
        entered.set()
        try:
            while not release.wait(0.005):  # a long warm-up: each step checks for a stop
                check_stopping()
        finally:
            left.set()

    async def scenario() -> None:
        app = App(root, ServerConfig(), port=0, metrics_port=None)
        await app.start()
        try:
            monkeypatch.setattr(loader, "load_files", slow_load)
            copy_version_atomically(root / "gen", "2", "2", staged)
            app.reloader.request()
            assert await asyncio.to_thread(entered.wait, 5.0), "the reload never started loading"
            app.request_stop()
            assert await asyncio.to_thread(left.wait, 2.0), "the reload's load went on after the stop"
            await wait_on_loop(lambda: app.reloader.rescans == 1, "the rescan to end")
            assert app.repository.models["gen"].reason == ""
            assert app.repository.get("gen").resolve("").version == "1"
            assert "cancelled" in app.repository.models["gen"].versions["2"].reason
        finally:
            release.set()
            app.request_stop()
            await app.stop()

    asyncio.run(scenario())


def test_a_model_added_by_a_reload_leaves_readiness_alone_until_it_has_been_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: one rescan publishes gen's version 2 and adds a model zoo, whose load takes long
    (a warm-up). docs/server.md: "a model added by a hot reload counts once it has been tried". While
    zoo loads, gen's version 1 drains out; that readiness change re-evaluated "" with zoo counted as a
    required model not ready, so the whole server went NOT_SERVING (a pod out of its Service) for as
    long as zoo loaded, though every model that had been tried served."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    staged = _staged_version(tmp_path, "2", seed=1)
    write_gen(tmp_path / "zoo-staging", "zoo", version="1", seed=2)
    entered, release = threading.Event(), threading.Event()
    load_files = loader.load_files

    def slow_zoo(
        mv: ModelVersion,
        sc: ServerConfig,
        check_stopping: Callable[[], None],
        gate: object,
        opened: object = None,
    ) -> None:
        if mv.name == "zoo":
            entered.set()
            while not release.wait(0.005):
                check_stopping()
        load_files(mv, sc, check_stopping, gate, opened)  # type: ignore[arg-type]

    async def scenario() -> None:
        app = App(root, ServerConfig(drain_grace_s=5.0), port=0, metrics_port=None)
        await app.start()
        try:
            assert app.health.serving
            monkeypatch.setattr(loader, "load_files", slow_zoo)
            copy_version_atomically(root / "gen", "2", "2", staged)
            shutil.move(tmp_path / "zoo-staging" / "zoo", root / "zoo")
            app.reloader.request()
            assert await asyncio.to_thread(entered.wait, 10.0), "zoo never started loading"
            await wait_on_loop(lambda: "1" not in app.repository.models["gen"].versions, "gen v1 to drain")
            await app.health.flush()
            assert app.health.serving, f"NOT_SERVING while zoo loads: {app.health.reason}"
            release.set()
            await wait_on_loop(lambda: app.reloader.rescans == 1, "the rescan to end")
            await app.health.flush()
            assert app.health.serving and app.repository.get("zoo").resolve("").version == "1"
        finally:
            release.set()
            app.request_stop()
            await app.stop()

    asyncio.run(scenario())


def test_models_removed_one_after_another_leave_a_bounded_number_of_health_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: models added and removed one after another (a name per deploy). A removed model's
    health key turns NOT_SERVING (docs/operations.md), and it stayed so for ever, in the servicer's
    statuses and App._model_keys: each name ever removed added a key, so past MAX_LISTED_SERVICES
    names health List answered RESOURCE_EXHAUSTED for good, the repository holding one model. Only
    the REMOVED_MODEL_KEYS names removed last keep their key (NOT_SERVING); an older one is dropped:
    Check answers NOT_FOUND, as for a name never served, and a Watch of it is sent SERVICE_UNKNOWN."""
    monkeypatch.setattr(health_module, "MAX_LISTED_SERVICES", 8)
    monkeypatch.setattr(main_module, "REMOVED_MODEL_KEYS", 2, raising=False)
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(tmp_path / "staging", "m", version="1", seed=1)

    async def add_and_remove(app: App, name: str) -> None:
        shutil.copytree(tmp_path / "staging" / "m", root / name)
        await app.reloader.rescan()
        assert app.repository.get(name).resolve("").state == ModelState.READY
        shutil.rmtree(root / name)
        await app.reloader.rescan()
        await app.health.flush()

    async def scenario() -> None:
        app = App(root, ServerConfig(drain_grace_s=2.0), port=0, metrics_port=None)
        await app.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await add_and_remove(app, "m0")
                watch = health.Watch(health_pb2.HealthCheckRequest(service="m0"))
                assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
                for i in range(1, 12):
                    await add_and_remove(app, f"m{i}")
                listed = await health.List(health_pb2.HealthListRequest())
                assert {key: answer.status for key, answer in listed.statuses.items()} == {
                    **dict.fromkeys(("", ALIAS, "liveness", "gen"), SERVING),
                    **dict.fromkeys(("m10", "m11"), NOT_SERVING),
                }
                assert set(app._model_keys) == {"gen", "m10", "m11"}
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health.Check(health_pb2.HealthCheckRequest(service="m0"))
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
                # The watcher of a dropped key is told: the name is unknown now (grpc.health.v1's
                # answer for one, its call left open for a model of that name added later).
                unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                assert (await asyncio.wait_for(watch.read(), 5)).status == unknown
                watch.cancel()
        finally:
            app.request_stop()
            await app.stop()

    asyncio.run(scenario())


def test_adding_and_removing_many_models_reevaluates_only_the_models_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: an operator with hundreds of models. Each model's state change re-evaluated the
    whole server's state by visiting every model of the repository, on the event loop, so a reload
    adding (or removing) n models visited n models n times over (quadratic: seconds of a blocked
    loop at 1,000 models). Each change visits the models it changed (and the ones whose calls go
    through them); "" still turns SERVING once they serve, and says which ones do not."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(tmp_path / "staging", "m", version="1", seed=1)
    models = 24
    visits = 0
    counts_serving = App._counts_serving

    def counting(app: App, model: object) -> bool:
        nonlocal visits
        visits += 1
        return counts_serving(app, model)  # type: ignore[arg-type]

    def iterating(repo: Repository) -> Iterator[object]:
        nonlocal visits
        for model in repo.models.values():
            visits += 1
            yield model

    async def scenario() -> None:
        nonlocal visits
        app = App(root, ServerConfig(drain_grace_s=0.5), port=0, metrics_port=None)
        await app.start()
        try:
            monkeypatch.setattr(App, "_counts_serving", counting)
            monkeypatch.setattr(Repository, "__iter__", iterating)
            for i in range(models):
                shutil.copytree(tmp_path / "staging" / "m", root / f"m{i:03d}")
            (root / "broken").mkdir()
            (root / "broken" / "config.json").write_text("{")
            visits = 0
            await app.reloader.rescan()
            await app.health.flush()
            assert visits <= 4 * models, f"{visits} model visits to add {models} models"
            assert app.repository.get(f"m{models - 1:03d}").resolve("").state == ModelState.READY
            assert (app.health.serving, app.health.reason) == (False, "required models not ready: broken")
            shutil.rmtree(root / "broken")
            for i in range(models):
                shutil.rmtree(root / f"m{i:03d}")
            visits = 0
            await app.reloader.rescan()
            await app.health.flush()
            assert visits <= 4 * models, f"{visits} model visits to remove {models} models"
            assert app.health.serving, app.health.reason
            shutil.rmtree(root / "gen")
            await app.reloader.rescan()
            await app.health.flush()
            assert (app.health.serving, app.health.reason) == (False, "no models in the repository")
        finally:
            monkeypatch.undo()
            app.request_stop()
            await app.stop()

    asyncio.run(scenario())


def test_a_sample_stream_outlasting_the_drain_grace_ends_naming_where_to_resume(tmp_path: Path) -> None:
    """A stream held open past drain_grace_s on a version a reload replaced ends UNAVAILABLE (as
    documented); it said the batcher's "... is draining; retry on another replica": no index to
    resume from (what the shutdown path names), and another replica is no answer when this server
    serves the new version. It names start_index, and a resumed stream gets the rest."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    server = start_server(root, tmp_path / "server", config={"drain_grace_s": 0.5})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            f32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)  # flow control holds it back
            request = pb.SampleStreamRequest(
                sample=pb.SampleRequest(model="gen", count=20000, output=f32), chunk_size=256
            )
            chunks = stub.SampleStream(request, timeout=60)
            got = [g.index for g in next(chunks).images]
            copy_version_atomically(root / "gen", "2", "2", _staged_version(tmp_path, "2", seed=1))
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "1" not in _states(stub, "gen"), 30, "v1 to unload past the grace")
            with pytest.raises(grpc.RpcError) as excinfo:
                for chunk in chunks:
                    got += [g.index for g in chunk.images]
            err = excinfo.value
            assert isinstance(err, grpc.Call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert f"start_index={len(got)}" in err.details(), err.details()
            assert "another replica" not in err.details(), err.details()
            assert got == list(range(len(got)))
            resumed = stub.SampleStream(
                pb.SampleStreamRequest(sample=request.sample, chunk_size=256, start_index=len(got)),
                timeout=60,
            )
            first = next(resumed)
            assert first.images[0].index == len(got) and first.provenance.version == "2"
            resumed.cancel()
    finally:
        server.stop()


def test_a_version_that_failed_to_load_once_leaves_no_series_after_its_unload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: version 1's file is broken at start-up (UNAVAILABLE), then fixed; a rescan loads
    a new copy of it. Once the model is removed and its drain ends, every series of (gen, 1) goes,
    its counters and histograms SERIES_GRACE_S later: the copy that failed to load and was replaced
    is no live copy that keeps them for ever."""
    from genserve_server import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "SERIES_GRACE_S", 0.05)
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    write_gen(root, "other", version="1", seed=1)
    (root / "gen" / "1" / "model.onnx").write_bytes(b"not an onnx graph")  # sha256 no longer matches

    async def scenario() -> None:
        repo, metrics = await loaded_repository(root)
        reloader = Reloader(repo, drain_grace_s=2.0, file_check_interval_s=None)
        try:
            assert version_states(repo) == {"1": "UNAVAILABLE"}
            write_gen(root, "gen", version="1", seed=0)  # fixed
            await reloader.rescan()
            assert version_states(repo) == {"1": "READY"}
            repo.get("gen").resolve("").metrics.request_done("Sample", "OK", 0.01)
            assert _series(metrics, "genserve_requests_total")
            shutil.rmtree(root / "gen")
            await reloader.rescan()
            await wait_on_loop(lambda: reloader.draining == 0, "gen's drain to end")
            await asyncio.sleep(0.3)  # past SERIES_GRACE_S
            for family in ("genserve_requests_total", "genserve_batch_size_count", "genserve_model_ready"):
                assert _series(metrics, family) == [], family
        finally:
            await reloader.close(1.0)
            await repo.close(1.0)

    asyncio.run(scenario())


def test_sigterm_ends_the_file_checks_sha256_of_a_large_model_file_at_its_next_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic check of the loaded model files hashes a file (a multi-GB one: tens of seconds)
    on a worker thread. SIGTERM cancelled the check's task, but not its thread: the process's exit
    waited for the hash (asyncio.run joins its default executor's threads), past drain_grace_s.
    begin_shutdown must end a hash in progress at its next block. A file read slowly without end
    stands for a large one here."""
    from genserve_contract import repository as contract_repository

    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    reading = threading.Event()
    release = threading.Event()  # ends the endless file: the test never leaves a thread reading

    class EndlessFile:
        def __enter__(self) -> EndlessFile:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read(self, size: int = -1) -> bytes:
            reading.set()
            if release.wait(0.01):
                return b""
            return b"\0" * 1024

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        monkeypatch.setattr(contract_repository, "open_regular", lambda path: EndlessFile())
        if hasattr(reload_module, "open_regular"):
            monkeypatch.setattr(reload_module, "open_regular", lambda path: EndlessFile())
        reloader = Reloader(repo, drain_grace_s=2.0, file_check_interval_s=None)
        mv = repo.models["gen"].versions["1"]
        status: list[str | None] = []
        checking = threading.Thread(
            target=lambda: status.append(reloader._file_status(mv, mv.config.precision)), daemon=True
        )
        try:
            checking.start()
            assert await asyncio.to_thread(reading.wait, 30), "the check must be hashing the file"
            reloader.begin_shutdown()
            await asyncio.to_thread(checking.join, 5.0)
            assert not checking.is_alive(), "the hash went on after SIGTERM"
            assert status == [None]  # nothing said about a file it did not finish reading
        finally:
            release.set()
            checking.join(5.0)
            await reloader.close(2.0)
            await repo.close(2.0)

    asyncio.run(scenario())


def test_a_load_failing_as_the_server_stops_is_cancelled_naming_how_its_call_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load whose model call fails once the server is stopping is taken as aborted by the
    shutdown (cancel_loading) and logged as "loading cancelled" at info: a failure with another
    cause in that instant (a corrupt file read, a provider error) left no trace of itself. The
    cancellation names how the call ended."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    repo = Repository(root, ServerConfig(), Metrics(enabled=False))
    repo.scan()
    mv = repo.models["gen"].versions["1"]

    class Aborted:
        def abort(self) -> None:
            pass

    def failing_load(
        mv: ModelVersion, sc: ServerConfig, check_stopping: Callable[[], None], gate: object, opened: object
    ) -> None:
        opened(Aborted())  # type: ignore[operator]
        repo.cancel_loading()
        raise OSError(5, "Input/output error reading model.onnx")

    monkeypatch.setattr(loader, "load_files", failing_load)
    with pytest.raises(LoadCancelled) as excinfo:
        repo._load_version(mv)
    assert "OSError: [Errno 5] Input/output error reading model.onnx" in str(excinfo.value), excinfo.value


def test_the_fp16_parity_checks_sessions_are_released_before_the_versions_own_sessions_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp16 parity check (loader.fp16_on_provider) runs the fp32 and the fp16 graph on sessions
    of its own, which it dropped on return. Since they are told to `opened` (so that cancel_loading
    can abort their calls), Repository._load_version kept both in its lists until the whole load
    ended: two extra copies of the model (its device arenas on a GPU) stayed alive through the
    version's own sessions, graph check, probe and warm-up, the load's peak memory. The repository
    keeps them only while they can run."""
    root = tmp_path / "models"
    version_dir = write_gen(root, "gen", version="1", seed=0, precision="fp16")
    data = (version_dir / "model.onnx").read_bytes()
    (version_dir / "model.fp16.onnx").write_bytes(data)  # a twin within any parity
    card_path = version_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
    card_path.write_text(json.dumps(card))
    repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
    repo.scan()
    mv = repo.models["gen"].versions["1"]
    made: list[weakref.ref[object]] = []

    class Recorded(loader.SessionRunner):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(weakref.ref(self))

    alive: list[int] = []
    check_graph = loader.check_graph

    def counting_check_graph(*args: object) -> None:
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        check_graph(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "SessionRunner", Recorded)
    monkeypatch.setattr(loader, "check_graph", counting_check_graph)
    repo._load_version(mv)
    try:
        assert mv.precision == "fp16" and len(made) == 2, (mv.precision, made)
        assert alive == [0], f"the parity check's {alive} session runner(s) still alive at the graph check"
    finally:
        assert mv.runner is not None
        mv.runner.close()


def test_a_load_cancelled_at_its_next_step_is_named_once_not_as_its_calls_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load whose runner exists, stopped by the shutdown at its next step (check_stopping raises
    LoadCancelled, no model call failed), was wrapped in a second LoadCancelled naming the first as
    "the load's call ended with LoadCancelled: ... loading cancelled ...": its reason and log line
    said the cancellation twice, and that a call ended, which none did."""
    root = tmp_path / "models"
    write_gen(root, "gen", version="1", seed=0)
    repo = Repository(root, ServerConfig(), Metrics(enabled=False))
    repo.scan()
    mv = repo.models["gen"].versions["1"]

    class Aborted:
        def abort(self) -> None:
            pass

    def cancelled_load(
        mv: ModelVersion, sc: ServerConfig, check_stopping: Callable[[], None], gate: object, opened: object
    ) -> None:
        opened(Aborted())  # type: ignore[operator]
        repo.cancel_loading()
        check_stopping()

    monkeypatch.setattr(loader, "load_files", cancelled_load)
    with pytest.raises(LoadCancelled) as excinfo:
        repo._load_version(mv)
    assert str(excinfo.value) == "model gen version 1: loading cancelled: the server is shutting down", (
        excinfo.value
    )

"""Reproducibility: a row's output must not depend on its batch nor on which ORT session (the
all-cores solo session or an instance's narrow one) ran it -- or the server says where it does.

docs/server.md, "Two-way translators", and README.md, "Seeds". The bundled cyclegan-digits
generator has 16-channel 3x3 convolutions at 14x14 whose ONNX Runtime CPU kernel (MLAS) gives other
float bits for a batch of one when the session has 4 or more intra-op threads (2 or more at some
image shapes other than the warm-up's 32x32, which shapes depending on the threads). With `instances: 2`
(what the default models and genserve-export write) a host of C >= 4 cores runs a lone batch on the
solo session (C threads) and overlapping ones on the narrow sessions (C // 2 threads). The loader
checks both at load (loader.check_rows, at several shapes): a solo session that computes rows
differently is dropped, and a row that differs alone and inside a batch is a warning in the log and
in GetModel. This 2-core
machine shows them by loading as on a 4-core host, and with `intra_op_threads: 4`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from server_support import REPO_ROOT, ServerProcess, start_server, tensor_of

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import loader, runner
from genserve_server.config import ServerConfig
from genserve_server.load_gate import LoadGate
from genserve_server.metrics import Metrics
from genserve_server.repository import ModelVersion, Repository

MODEL = "cyclegan-digits"
F32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)
BATCH_WARNING = "a row's output depends on what shares its batch"


def _digits(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return ((rng.uniform(0, 1, (n, 28, 28, 1)) > 0.7) * 255).astype(np.uint8)


def _raw(pixels: np.ndarray) -> tpb.Image:
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=pixels.tobytes(), shape=list(pixels.shape))


def _load_as_on_4_cores(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    runtime: dict[str, object] | None = None,
    cores: int = 4,
) -> ModelVersion:
    """`name` from models/ loaded as the loader does on a 4-core host (or `cores`): instances 2,
    narrow session of 2 threads, solo session of 4 (warm-up off: only the load-time check runs).
    `runtime`: the config's runtime settings instead of its own (the bundled cyclegan-digits ships
    `solo_session: false`, which these tests turn back on by default to see the check at work)."""
    for module in (loader, runner):
        monkeypatch.setattr(module, "cpu_count", lambda: cores)
    shutil.copytree(REPO_ROOT / "models" / name, tmp_path / name)
    config = tmp_path / name / "config.json"
    runtime = {"solo_session": True} if runtime is None else runtime
    config.write_text(json.dumps({**json.loads(config.read_text()), "runtime": runtime}))
    repo = Repository(tmp_path, ServerConfig(warmup=False), Metrics(enabled=False))
    repo.scan()
    mv = repo.get(name).versions["1"]
    loader.load_files(mv, repo.server_config, lambda: None, LoadGate(1))
    assert mv.runner is not None
    assert mv.runner.session.get_session_options().intra_op_num_threads == cores // 2
    return mv


def _unchecked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: int) -> ModelVersion:
    """cyclegan-digits loaded as on a host of `cores` cores without the load-time check: its solo
    session kept, its batch dependence not looked at (the test calls loader.check_rows itself)."""
    monkeypatch.setattr(loader, "check_rows", lambda *args: None)
    mv = _load_as_on_4_cores(monkeypatch, tmp_path, MODEL, cores=cores)
    monkeypatch.undo()
    assert mv.runner is not None and mv.runner.solo_intra_op_threads == cores
    return mv


def _row(card: Any, h: int, w: int, direction: int, rows: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.uniform(0.0, 1.0, (rows, 1, h, w)).astype(np.float32)
    return {"image": image, "direction": np.full(rows, direction, np.int64)}


# Shapes other than the warm-up's 32x32 that cyclegan-digits takes (multiples of 2, >= 8).
OTHER_SHAPES = ((16, 28), (28, 16), (28, 48), (48, 28), (24, 40), (40, 40))


def _solo_vs_narrow(mv: ModelVersion) -> list[tuple[int, float]]:
    assert mv.runner is not None
    images = _digits(8).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    differing = []
    for i in range(len(images)):
        feeds = {"image": images[i : i + 1], "direction": np.zeros(1, np.int64)}
        narrow = mv.runner.run_sync(feeds)["output_image"]
        solo = mv.runner.run_sync(feeds, solo=True)["output_image"]
        if not np.array_equal(narrow, solo):
            differing.append((i, float(np.abs(narrow - solo).max())))
    return differing


def test_a_solo_session_that_computes_rows_differently_is_dropped_at_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a 4-core host cyclegan-digits' 4-thread solo session gives other float bits for a row than
    its 2-thread narrow session: the loader drops it (one warning naming the version, the difference
    and how to silence it), so a lone request gives the same row as one beside others."""
    with caplog.at_level(logging.WARNING, logger="genserve_server.loader"):
        mv = _load_as_on_4_cores(monkeypatch, tmp_path, MODEL)
    try:
        assert mv.runner is not None and mv.runner.solo_session is None
        assert not _solo_vs_narrow(mv)
        warnings = [r.getMessage() for r in caplog.records if "solo session" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert f"model {MODEL} version 1" in warnings[0]
        assert "max |difference| " in warnings[0] and "runtime.solo_session: false" in warnings[0]
        # 2 threads: a row alone is the row inside a batch at 32x32, not at 16x28 (checked too)
        assert BATCH_WARNING in mv.batch_dependence
    finally:
        assert mv.runner is not None
        mv.runner.close()


def test_a_solo_session_that_differs_only_at_another_shape_than_the_warm_ups_is_dropped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On an 8-core host cyclegan-digits' 8-thread solo session computes a row at the warm-up's 32x32
    in the same bits as its 4-thread narrow session, but not at 16x28, 28x48, 48x28...: a lone
    request of such an image gave other bytes on an idle server (solo) than on a busy one (narrow).
    The load-time check looks at other shapes too, and drops the solo session."""
    mv = _unchecked(monkeypatch, tmp_path, cores=8)
    assert mv.runner is not None and mv.card is not None
    try:
        warm = loader.check_inputs(mv.card, 1)
        assert np.array_equal(
            mv.runner.run_sync(warm)["output_image"], mv.runner.run_sync(warm, solo=True)["output_image"]
        )
        differing = [
            (h, w)
            for h, w in OTHER_SHAPES
            if not np.array_equal(
                mv.runner.run_sync(_row(mv.card, h, w, 0))["output_image"],
                mv.runner.run_sync(_row(mv.card, h, w, 0), solo=True)["output_image"],
            )
        ]
        assert differing, "ONNX Runtime computes these rows the same now: the check has nothing to show"
        loader.check_rows(mv, mv.card, mv.runner)
        assert mv.runner.solo_session is None
    finally:
        mv.runner.close()


def test_a_row_that_differs_from_its_batch_only_at_another_shape_than_the_warm_ups_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a 4-core host (2 intra-op threads) a cyclegan-digits row at 32x32 is the same alone and
    batched, but not at 16x28: the load-time check finds it at its other shapes and says so."""
    mv = _unchecked(monkeypatch, tmp_path, cores=4)
    assert mv.runner is not None and mv.card is not None
    try:

        def batch_diff(h: int, w: int) -> float:
            assert mv.runner is not None
            two = _row(mv.card, h, w, 0, rows=2)
            alone = mv.runner.run_sync({name: value[:1] for name, value in two.items()})["output_image"]
            return float(np.abs(alone - mv.runner.run_sync(two)["output_image"][:1]).max())

        assert batch_diff(32, 32) == 0.0
        assert [shape for shape in OTHER_SHAPES if batch_diff(*shape)], "nothing to show"
        loader.check_rows(mv, mv.card, mv.runner)
        assert BATCH_WARNING in mv.batch_dependence
    finally:
        mv.runner.close()


def test_a_two_way_translators_b_to_a_rows_are_checked_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A two-way translator has two generators: where only B -> A's rows came out in other bits on
    the solo session, checking A -> B alone kept it. Simulated: the solo session computes A -> B
    rows as the narrow one does, and B -> A rows one ulp off."""
    mv = _unchecked(monkeypatch, tmp_path, cores=4)
    assert mv.runner is not None and mv.card is not None
    real = mv.runner.run_sync

    def solo_b_to_a_differs(inputs: Any, solo: bool = False) -> dict[str, np.ndarray]:
        out = real(inputs)
        if solo and int(inputs["direction"][0]) == 1:
            out = {**out, "output_image": np.nextafter(out["output_image"], np.float32(2.0))}
        return out

    monkeypatch.setattr(mv.runner, "run_sync", solo_b_to_a_differs)
    try:
        loader.check_rows(mv, mv.card, mv.runner)
        assert mv.runner.solo_session is None
    finally:
        mv.runner.close()


def test_solo_session_false_builds_no_solo_session_and_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="genserve_server.loader"):
        mv = _load_as_on_4_cores(monkeypatch, tmp_path, MODEL, runtime={"solo_session": False})
    try:
        assert mv.runner is not None and mv.runner.solo_session is None
        assert not [r for r in caplog.records if "solo session" in r.getMessage()]
    finally:
        assert mv.runner is not None
        mv.runner.close()


def test_a_solo_session_that_agrees_is_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dcgan-digits computes a row bit for bit the same at 2 and 4 threads, alone or batched: it keeps
    its all-cores solo session and no warning is logged."""
    with caplog.at_level(logging.WARNING, logger="genserve_server.loader"):
        mv = _load_as_on_4_cores(monkeypatch, tmp_path, "dcgan-digits")
    try:
        assert mv.runner is not None and mv.runner.solo_session is not None
        assert mv.runner.solo_intra_op_threads == 4
        assert not mv.batch_dependence
        assert not [r for r in caplog.records if r.name == "genserve_server.loader"]
        assert mv.card is not None
        for seed in range(4):
            inputs = loader.check_inputs(mv.card, 1, seed=seed)
            narrow, solo = mv.runner.run_sync(inputs), mv.runner.run_sync(inputs, solo=True)
            assert np.array_equal(narrow["image"], solo["image"])
    finally:
        assert mv.runner is not None
        mv.runner.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("det-models")
    shutil.copytree(REPO_ROOT / "models" / MODEL, root / MODEL)
    server = start_server(root, tmp_path_factory.mktemp("det-server"), config={"intra_op_threads": 4})
    yield server
    server.stop()


def test_a_row_that_differs_alone_and_inside_a_batch_is_reported(server: ServerProcess) -> None:
    """With 4 intra-op threads a cyclegan-digits row alone gives other float bits than the same row
    beside another image. The server cannot change the kernel; it says so at load, in its log and
    in GetModel's reason of the READY version, with the thread count and the largest difference."""
    digits = _digits(8)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        together = stub.Translate(pb.ImageRequest(model=MODEL, images=[_raw(d) for d in digits], output=F32))
        differing = []
        for i, digit in enumerate(digits):
            alone = stub.Translate(pb.ImageRequest(model=MODEL, images=[_raw(digit)], output=F32))
            a, b = tensor_of(alone.images[0]), tensor_of(together.images[i])
            if not np.array_equal(a, b):
                differing.append((i, float(np.abs(a - b).max())))
        info = stub.GetModel(pb.GetModelRequest(name=MODEL))
    (version,) = info.versions
    assert version.state == pb.MODEL_STATE_READY
    # What the server says holds: a warning exactly where a row alone differs from the row batched
    # (this ONNX Runtime: every row, by 2e-7..8e-7).
    assert (BATCH_WARNING in version.reason) == bool(differing), (version.reason, differing)
    assert differing, "ONNX Runtime computes these rows the same now: the check has nothing to show"
    assert "4 intra-op threads" in version.reason
    lines = [line for line in server.log().splitlines() if BATCH_WARNING in line]
    assert len(lines) == 1 and f"model {MODEL} version 1" in lines[0], lines

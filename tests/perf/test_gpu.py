"""GPU-only checks of the performance path (skipped unless a session really runs on CUDA).

`get_available_providers()` lists CUDA and TensorRT on machines without a GPU, so the probe
(conftest `cuda_really_used`) builds a real session and reads `session.get_providers()`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from genserve_server.latents import latents_for_seeds
from genserve_server.ort_session import (
    CPU,
    CUDA,
    TENSORRT,
    ProfileShapes,
    RuntimeConfig,
    create_session,
)
from genserve_server.runner import Runner
from genserve_server.session_runner import (
    SessionRunner,
    check_fp16_parity,
)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]
# cuDNN may pick different algorithms per batch size: compare within a tolerance on a GPU.
GPU_ATOL = 1e-4


def _z(n: int, first_seed: int = 0) -> dict[str, np.ndarray]:
    return {"z": latents_for_seeds(list(range(first_seed, first_seed + n)), 16)}


def _runner(path: Path, config: RuntimeConfig, providers: list[str]) -> SessionRunner:
    return SessionRunner(create_session(path, providers, config, cores=2), config)


def test_cuda_provider_really_used(tiny_version: Path) -> None:
    info = create_session(tiny_version / "model.onnx", [CUDA, CPU], RuntimeConfig(), cores=2)
    assert info.providers[0] == CUDA
    assert info.on_gpu and not info.fallbacks


def test_tensorrt_or_clean_fallback(tiny_version: Path, tmp_path: Path) -> None:
    config = replace(RuntimeConfig(), trt_engine_cache_dir=str(tmp_path / "trt"))
    info = create_session(tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=2)
    assert info.providers[0] in (TENSORRT, CUDA)
    if info.providers[0] == TENSORRT:
        SessionRunner(info, config).run(_z(4))
        assert any((tmp_path / "trt").iterdir()), "TensorRT engine cache was not written"
    else:
        assert info.fallbacks


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_io_binding_parity_on_cuda(tiny_version: Path, batch: int) -> None:
    path = tiny_version / "model.onnx"
    cpu = _runner(path, RuntimeConfig(), [CPU]).run(_z(batch))[0]
    bound = _runner(path, replace(RuntimeConfig(), io_binding=True), [CUDA, CPU])
    assert bound.info.provider == CUDA
    np.testing.assert_allclose(bound.run(_z(batch))[0], cpu, atol=GPU_ATOL)


def test_cuda_graph_parity_and_padding(tiny_version: Path) -> None:
    path = tiny_version / "model.onnx"
    config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=(1, 8, 64))
    graph = _runner(path, config, [CUDA, CPU])
    assert graph.mode == "cuda_graph"
    cpu = _runner(path, RuntimeConfig(), [CPU])
    for batch in (1, 5, 8, 64, 70):  # 5 pads to 8; 70 runs as 64 + 6 (padded to 8)
        np.testing.assert_allclose(graph.run(_z(batch))[0], cpu.run(_z(batch))[0], atol=GPU_ATOL)


def test_cuda_options_survive_the_tensorrt_fallback(tiny_version: Path) -> None:
    config = replace(RuntimeConfig(), cuda_graph=True)
    profile = ProfileShapes({"z": [1, 16]}, {"z": [8, 16]}, {"z": [64, 16]})
    info = create_session(
        tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=2, profile=profile
    )
    if info.provider == TENSORRT:
        pytest.skip("TensorRT is installed here: no fallback to check")
    effective = info.provider_options[CUDA]
    assert (effective["enable_cuda_graph"], effective["use_tf32"]) == ("1", "0")
    assert info.cuda_graph and not info.tf32


def test_graphs_of_every_instance_are_captured_at_warm_up_and_replayed(tiny_version: Path) -> None:
    config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=(1, 8))
    runner = Runner(
        tiny_version / "model.onnx",
        label="g",
        providers=[CUDA, CPU],
        instances=2,
        intra_op_threads=1,
        runtime=config,
    )
    try:
        assert runner.mode == "cuda_graph"
        runner.warm(_z(8))
        assert all(r.sealed and len(r.captured_shapes) == 2 for r in runner.session_runners)
        cpu = _runner(tiny_version / "model.onnx", RuntimeConfig(), [CPU])
        for batch in (1, 3, 8, 11):
            got = runner.run_sync(_z(batch, first_seed=batch))["image"]
            np.testing.assert_allclose(got, cpu.run(_z(batch, first_seed=batch))[0], atol=GPU_ATOL)
        assert all(len(r.captured_shapes) == 2 for r in runner.session_runners)  # no capture while serving
    finally:
        runner.close()


def test_fp16_parity_on_cuda(tiny_version: Path) -> None:
    fp32 = _runner(tiny_version / "model.onnx", RuntimeConfig(), [CUDA, CPU])
    fp16 = _runner(tiny_version / "model.fp16.onnx", RuntimeConfig(), [CUDA, CPU])
    assert fp16.info.provider == CUDA
    ok, diff = check_fp16_parity(fp32, fp16, _z(64))
    assert ok, f"fp16 max abs diff on CUDA {diff}"


def test_seed_invariance_across_batch_sizes_on_cuda(tiny_version: Path) -> None:
    runner = _runner(tiny_version / "model.onnx", replace(RuntimeConfig(), io_binding=True), [CUDA, CPU])
    batch = runner.run(_z(64))[0]
    for size in (1, 4, 16):
        part = runner.run(_z(size, first_seed=8))[0]
        np.testing.assert_allclose(part, batch[8 : 8 + size], atol=GPU_ATOL)

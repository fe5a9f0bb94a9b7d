"""Fixtures of the performance-path tests: a tiny fp32/fp16 generator and the GPU probe."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from perf_support import write_tiny_version

ort.set_default_logger_severity(3)


@pytest.fixture(scope="session")
def tiny_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_version(tmp_path_factory.mktemp("perf-models") / "tiny" / "1")


@pytest.fixture(scope="session")
def cuda_really_used(tiny_version: Path) -> bool:
    """True only when a real session runs on CUDA (get_available_providers() lists CUDA without a GPU)."""
    try:
        session = ort.InferenceSession(
            str(tiny_version / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    except Exception:  # any failure to build a CUDA session means "no usable GPU"
        return False
    return bool(session.get_providers()[0] == "CUDAExecutionProvider")


@pytest.fixture
def gpu(cuda_really_used: bool) -> None:
    if not cuda_really_used:
        pytest.skip("no GPU: the session does not run on CUDAExecutionProvider")

"""Review of the GPU path: ONNX Runtime faked where no GPU is (this host), asserting on what genserve
asks ONNX Runtime for and what it concludes from the answers."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

import onnxruntime as ort
import pytest

from genserve_server import ort_session, providers
from genserve_server.ort_session import CPU, CUDA, TENSORRT
from genserve_server.runner import select_providers


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process that has not probed the GPU providers nor preloaded CUDA yet."""
    monkeypatch.setattr(providers, "_probed", {})
    ort_session.preload_cuda_libraries.cache_clear()
    yield
    ort_session.preload_cuda_libraries.cache_clear()


def test_gpu_providers_are_probed_after_pip_cuda_libraries_are_preloaded(
    monkeypatch: pytest.MonkeyPatch, fresh_probe: None
) -> None:
    """CUDA from pip's nvidia-* packages loads only after onnxruntime.preload_dlls() (FACTS.md): the
    once-per-process probe must come after it, or CUDA is remembered as unusable and every model of
    a GPU host runs on the CPU."""
    preloaded: list[bool] = []
    nvidia = types.ModuleType("nvidia")
    nvidia.__spec__ = importlib.machinery.ModuleSpec("nvidia", None, is_package=True)
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloaded.append(True), raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])

    class CudaAfterPreload:
        """CUDA works once the libraries are preloaded; TensorRT never (no libnvinfer)."""

        def __init__(self, model: Any, options: Any = None, providers: Sequence[Any] = (), **kw: Any) -> None:
            names = [p if isinstance(p, str) else p[0] for p in providers]
            self._providers = [p for p in names if p == CPU or (p == CUDA and preloaded)]

        def get_providers(self) -> list[str]:
            return self._providers

    monkeypatch.setattr(ort, "InferenceSession", CudaAfterPreload)

    assert select_providers([TENSORRT, CUDA, CPU]) == [CUDA, CPU]
    assert preloaded, "onnxruntime.preload_dlls() was never called"
    assert providers.gpu_probe_result() == {TENSORRT: False, CUDA: True}

"""The GPU path with ONNX Runtime faked where no GPU is (this host), asserting on what genserve
asks ONNX Runtime for and what it concludes from the answers."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.machinery
import json
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from server_support import TINY_LATENT, generator_graph, write_tiny_generator

from genserve_server import loader, ort_session, providers
from genserve_server.config import ServerConfig
from genserve_server.metrics import Metrics
from genserve_server.ort_session import CPU, CUDA, TENSORRT
from genserve_server.repository import ModelState, Repository
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


def test_fp16_parity_check_runs_on_the_versions_gpu_and_memory_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/deploy.md: fp16 is served only when fp16 and fp32 agree "on the provider the version runs
    on". A version pinned to GPU 1 (runtime.device_id) with a memory cap must be checked there, under
    its cap: not on GPU 0, whose context (and uncapped arena) the check would create."""
    root = tmp_path / "models"
    runtime = {"device_id": 1, "gpu_mem_limit_bytes": 1 << 28, "cuda_graph": True}
    version = write_tiny_generator(root, config={"precision": "fp16", "runtime": runtime})
    data = generator_graph(TINY_LATENT, 1, 8, 8, seed=0).SerializeToString()
    (version / "model.fp16.onnx").write_bytes(data)
    card = json.loads((version / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.001, "fp16_atol": 0.01}
    (version / "card.json").write_text(json.dumps(card))

    real = ort.InferenceSession
    asked: list[dict[str, str]] = []

    def on_fake_gpu(model: Any, options: Any = None, providers: Sequence[str] = (), **kw: Any) -> Any:
        """Records the CUDA options asked for; the session itself runs on this host's CPU."""
        chosen = dict(zip(providers, kw.pop("provider_options", None) or [], strict=False))
        if CUDA in chosen:
            asked.append(chosen[CUDA])
        return real(model, options, providers=[CPU], **kw)

    monkeypatch.setattr(ort, "InferenceSession", on_fake_gpu)
    monkeypatch.setattr(loader, "select_providers", lambda requested: [CUDA, CPU])

    async def body() -> None:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        assert repo.get("gen").resolve("").state == ModelState.READY
        await repo.close(1)

    asyncio.run(body())
    assert len(asked) >= 3  # the parity check's fp32 and fp16 sessions, then the serving session(s)
    assert [o["device_id"] for o in asked] == ["1"] * len(asked)
    assert [o.get("gpu_mem_limit") for o in asked] == [str(1 << 28)] * len(asked)

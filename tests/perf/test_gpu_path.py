"""The GPU path's CPU-checkable parts (issue 21): provider fallback that keeps its options, the
serving mode taken from the session's effective options, CUDA graph threads and shape keys (with a
fake graph), TensorRT engine cache keys, TF32 and memory options, the size-free-kind refusal and
sticky CUDA errors (with a fake failure)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from server_support import TINY_LATENT, externalize_weights, generator_graph, write_tiny_generator

from genserve_server import gpu_gate, loader, ort_session, session_runner
from genserve_server.config import ConfigError, ServerConfig, load_model_config
from genserve_server.gpu_errors import sticky_cuda_error
from genserve_server.gpu_gate import (
    CAPTURE_GATE,
)
from genserve_server.metrics import Metrics
from genserve_server.ort_session import (
    CPU,
    CUDA,
    TENSORRT,
    ProfileShapes,
    RuntimeConfig,
    RuntimeConfigError,
    SessionInfo,
    create_session,
    engine_cache_key,
    parse_runtime_config,
    provider_chain,
)
from genserve_server.repository import ModelState, Repository
from genserve_server.session_runner import (
    NO_GRAPH,
    SessionRunner,
)

# ONNX Runtime's own InferenceSession, before a test puts _FakeOrt in its place.
_REAL_INFERENCE_SESSION = ort_session.ort.InferenceSession
PROFILE = ProfileShapes({"z": [1, 16]}, {"z": [8, 16]}, {"z": [64, 16]})
SHA_V1 = "1" * 64
SHA_V2 = "2" * 64


class _FakeSession:
    """What create_session reads from an InferenceSession: providers, options, inputs, outputs."""

    def __init__(self, providers: list[str], options: list[dict[str, str]]) -> None:
        self.providers = providers
        self.options = {p: dict(o) for p, o in zip(providers, options, strict=True)}
        self.fallback_disabled = False

    def get_providers(self) -> list[str]:
        return self.providers

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return self.options

    def disable_fallback(self) -> None:
        self.fallback_disabled = True

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="z", type="tensor(float)")]

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name="image", type="tensor(float)")]

    def get_provider_graph_assignment_info(self) -> list[Any]:
        """Shape ops on the CPU beside the compute on the first provider, as ORT places them."""

        def subgraph(ep: str, *ops: str) -> Any:
            nodes = [SimpleNamespace(op_type=op, name=op.lower(), domain="") for op in ops]
            return SimpleNamespace(ep_name=ep, get_nodes=lambda: nodes)

        return [
            subgraph(self.providers[0], "MatMul", "ConvTranspose", "Tanh"),
            subgraph(CPU, "Shape", "Gather"),
        ]


class _FakeOrt:
    """InferenceSession stand-in: TensorRT fails to build, CUDA works and keeps its options (a GPU
    host without TensorRT), optionally reporting `cuda_overrides` as its effective options."""

    def __init__(self, cuda_overrides: Mapping[str, str] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.cuda_overrides = dict(cuda_overrides or {})
        self.sessions: list[_FakeSession] = []

    def __call__(self, source: Any, options: Any, **kwargs: Any) -> _FakeSession:
        self.calls.append(kwargs)
        providers, provider_options = kwargs["providers"], kwargs["provider_options"]
        if providers[0] == TENSORRT:
            raise RuntimeError("TensorRT EP failed to create engine from network")
        session = _FakeSession(providers, provider_options)
        if CUDA in session.options:
            session.options[CUDA] |= self.cuda_overrides
        self.sessions.append(session)
        return session


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> _FakeOrt:
    fake = _FakeOrt()
    monkeypatch.setattr(ort_session.ort, "InferenceSession", fake)
    monkeypatch.setattr(ort_session, "tensorrt_loadable", lambda: "")
    return fake


# --------------------------------------------------------------------------- 1: fallback, options


def test_options_survive_a_failed_first_provider(tiny_version: Path, fake_ort: _FakeOrt) -> None:
    config = replace(RuntimeConfig(), cuda_graph=True, device_id=1, gpu_mem_limit_bytes=1 << 30)
    info = create_session(
        tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=2, profile=PROFILE
    )
    # Every attempt has ORT's own fallback off; the second one is genserve's, with CUDA's options.
    assert [c["enable_fallback"] for c in fake_ort.calls] == [0, 0]
    assert fake_ort.calls[1]["providers"] == [CUDA, CPU]
    assert fake_ort.calls[1]["provider_options"][0]["enable_cuda_graph"] == "1"
    assert fake_ort.sessions[0].fallback_disabled  # no provider switch at run time either
    assert info.providers == [CUDA, CPU]
    assert any("TensorrtExecutionProvider unavailable" in f for f in info.fallbacks)
    # The effective options are reported, and the serving mode comes from them.
    cuda = info.provider_options[CUDA]
    assert (cuda["enable_cuda_graph"], cuda["device_id"], cuda["gpu_mem_limit"]) == ("1", "1", str(1 << 30))
    assert info.cuda_graph and info.device_id == 1 and not info.tf32
    assert "cuda graphs" in info.describe() and "tf32 off" in info.describe()


def test_nodes_left_on_the_cpu_of_a_gpu_session_are_reported(
    tiny_version: Path, fake_ort: _FakeOrt, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="genserve_server.ort_session"):
        info = create_session(tiny_version / "model.onnx", [CUDA, CPU], RuntimeConfig(), cores=2)
    assert info.placement == {CUDA: ["MatMul", "ConvTranspose", "Tanh"], CPU: ["Shape", "Gather"]}
    assert info.cpu_nodes == ["Shape", "Gather"] and "2 nodes on CPU" in info.describe()
    assert "2 of 5 nodes run on the CPU provider (Gather, Shape)" in caplog.text
    # On this host's real CPU session every node is on the CPU provider, which is no warning.
    real = create_session(tiny_version / "model.onnx", [CPU], RuntimeConfig(), cores=1)
    assert list(real.placement) == [CPU] and len(real.placement[CPU]) >= 3 and real.cpu_nodes == []


def test_serving_mode_follows_the_effective_options_not_the_config(
    tiny_version: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session reports CUDA graphs off (and ORT's default TF32) although the config asked for them.
    fake = _FakeOrt(cuda_overrides={"enable_cuda_graph": "0", "use_tf32": "1"})
    monkeypatch.setattr(ort_session.ort, "InferenceSession", fake)
    config = replace(RuntimeConfig(), cuda_graph=True)
    info = create_session(tiny_version / "model.onnx", [CUDA, CPU], config, cores=2)
    assert not info.cuda_graph and info.tf32
    assert any("CUDA graphs" in f for f in info.fallbacks)
    runner = SessionRunner(info, config)
    assert runner.mode == "io_binding"  # cuda_graph implies IO binding; the graph itself is not there


def test_tensorrt_is_skipped_without_its_libraries_or_a_profile(
    tiny_version: Path, fake_ort: _FakeOrt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_session, "tensorrt_loadable", lambda: "TensorRT libraries not loadable (x)")
    info = create_session(tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], RuntimeConfig(), cores=2)
    assert [c["providers"] for c in fake_ort.calls] == [[CUDA, CPU]]  # never attempted
    assert info.fallbacks[0].startswith("TensorrtExecutionProvider skipped: TensorRT libraries")
    monkeypatch.setattr(ort_session, "tensorrt_loadable", lambda: "")
    fake_ort.calls.clear()
    info = create_session(tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], RuntimeConfig(), cores=2)
    assert [c["providers"] for c in fake_ort.calls] == [[CUDA, CPU]]
    assert "no shape profile" in info.fallbacks[0]


def test_real_session_on_this_host_never_uses_ort_fallback(
    tiny_version: Path, cuda_really_used: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if cuda_really_used:
        pytest.skip("a GPU is present: the CPU fallback path is not taken")
    config = replace(RuntimeConfig(), cuda_graph=True, io_binding=True)
    info = create_session(
        tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=2, profile=PROFILE
    )
    assert info.providers == [CPU]
    assert "Falling back" not in capsys.readouterr().out
    assert not info.session._enable_fallback  # ORT's run-time provider switch is off
    assert info.provider_options == {CPU: info.provider_options[CPU]}  # what the session reports
    assert not info.cuda_graph and not info.tf32 and info.describe().startswith("CPUExecutionProvider, fp32")
    assert ort_session.tensorrt_loadable() is ort_session.tensorrt_loadable()  # probed once, cached


# --------------------------------------------------------------------------- 4 + 6 + 8: options


def test_engine_cache_key_differs_for_weights_precision_profile_and_gpu() -> None:
    base = engine_cache_key(SHA_V1, "fp32", PROFILE, "NVIDIA-H200-sm90")
    assert base == engine_cache_key(SHA_V1, "fp32", PROFILE, "NVIDIA-H200-sm90")  # stable across starts
    other_profile = ProfileShapes({"z": [1, 16]}, {"z": [4, 16]}, {"z": [8, 16]})
    variants = {
        engine_cache_key(SHA_V2, "fp32", PROFILE, "NVIDIA-H200-sm90"),
        engine_cache_key(SHA_V1, "fp16", PROFILE, "NVIDIA-H200-sm90"),
        engine_cache_key(SHA_V1, "fp32", other_profile, "NVIDIA-H200-sm90"),
        engine_cache_key(SHA_V1, "fp32", PROFILE, "NVIDIA-A100-SXM4-40GB-sm80"),
    }
    assert len(variants) == 4 and base not in variants


def test_two_versions_get_different_engine_cache_paths(tmp_path: Path) -> None:
    config = replace(RuntimeConfig(), trt_engine_cache_dir=str(tmp_path / "trt"))

    def trt_options(sha: str) -> dict[str, str]:
        return dict(provider_chain([TENSORRT, CUDA], config, profile=PROFILE, model_sha256=sha))[TENSORRT]

    v1, v2 = trt_options(SHA_V1), trt_options(SHA_V2)
    assert v1["trt_engine_cache_path"] != v2["trt_engine_cache_path"]
    assert v1["trt_engine_cache_prefix"] != v2["trt_engine_cache_prefix"]
    assert Path(v1["trt_engine_cache_path"]).parent == tmp_path / "trt"
    assert v1["trt_timing_cache_path"] == str(tmp_path / "trt")  # per GPU, shared by models
    # Without the model's hash there is no safe key: no cache rather than a shared one.
    assert "trt_engine_cache_enable" not in dict(provider_chain([TENSORRT], config))[TENSORRT]


def test_an_engine_cache_in_a_non_ascii_folder_reaches_onnx_runtime_under_a_c_locale(
    tiny_version: Path, fake_ort: _FakeOrt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a locale that is not UTF-8 (LANG=C without Python's UTF-8 mode) a non-ASCII path's bytes
    are lone surrogates ('mod\\udcc3\\udca8les'), which ONNX Runtime's binding refuses: TensorRT's
    engine and timing cache paths under such a trt_engine_cache_dir made every TensorRT session fail
    with a TypeError, and the model fell back to CUDA. They reach ONNX Runtime as their bytes decoded
    as UTF-8, and the cache directory is made where the setting names it."""
    monkeypatch.setattr(ort_session, "gpu_identity", lambda device_id: "NVIDIA-H200-sm90")
    base = tiny_version.parent.parent
    config = replace(RuntimeConfig(), trt_engine_cache_dir=str(base / "mod\udcc3\udca8les" / "trt"))
    create_session(tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=1, profile=PROFILE)
    trt = next(c for c in fake_ort.calls if c["providers"][0] == TENSORRT)["provider_options"][0]
    # ONNX Runtime's own binding takes these options (on the CPU provider, which does not read them).
    session = _REAL_INFERENCE_SESSION(
        str(tiny_version / "model.onnx"), providers=[CPU], provider_options=[trt]
    )
    assert session.get_providers() == [CPU]
    assert trt["trt_timing_cache_path"] == str(base / "mod\u00e8les" / "trt")
    assert trt["trt_engine_cache_path"].startswith(str(base / "mod\u00e8les" / "trt") + "/")
    assert (base / "mod\u00e8les" / "trt").is_dir()  # the same bytes, as this test's locale writes them


def test_external_weights_republished_beside_the_same_graph_miss_the_engine_cache(
    tmp_path: Path, fake_ort: _FakeOrt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine holds the weights it was built from, and a graph exported with external data
    (model.onnx.data) keeps them there: weights republished beside an unchanged graph must get
    another engine cache path, never the engine built from the old weights."""
    monkeypatch.setattr(ort_session, "gpu_identity", lambda device_id: "NVIDIA-H200-sm90")
    version_dir = write_tiny_generator(tmp_path / "models")
    external = externalize_weights(version_dir)
    graph = (version_dir / "model.onnx").read_bytes()
    config = replace(RuntimeConfig(), trt_engine_cache_dir=str(tmp_path / "trt"))

    def engine_cache_path() -> str:
        fake_ort.calls.clear()
        create_session(version_dir / "model.onnx", [TENSORRT, CPU], config, cores=1, profile=PROFILE)
        trt = next(c for c in fake_ort.calls if c["providers"][0] == TENSORRT)
        return str(trt["provider_options"][0]["trt_engine_cache_path"])

    before = engine_cache_path()
    assert before == engine_cache_path()  # the same files: the same engine
    weights = np.frombuffer(external.read_bytes(), np.float32)
    external.write_bytes((weights * 0.5).astype(np.float32).tobytes())  # republished, same size
    assert (version_dir / "model.onnx").read_bytes() == graph
    assert engine_cache_path() != before


def test_a_load_keys_its_engine_cache_by_the_digests_it_verified_without_hashing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load has hashed the graph and its external data file against card.json: the TensorRT
    session's engine cache key is made of those digests, never of the files read and hashed again
    at each session's creation (seconds a session for a big model)."""
    monkeypatch.setattr(ort_session, "gpu_identity", lambda device_id: "NVIDIA-H200-sm90")
    monkeypatch.setattr(ort_session, "tensorrt_loadable", lambda: "")
    monkeypatch.setattr(loader, "select_providers", lambda requested: [TENSORRT, CPU])
    root = tmp_path / "models"
    version_dir = write_tiny_generator(root)
    externalize_weights(version_dir)
    card = json.loads((version_dir / "card.json").read_text())
    real_session = ort_session.ort.InferenceSession
    trt_options: list[dict[str, str]] = []

    def trt_fails(source: Any, options: Any, **kwargs: Any) -> Any:
        if kwargs["providers"][0] == TENSORRT:
            trt_options.append(kwargs["provider_options"][0])
            raise RuntimeError("TensorRT EP failed to create engine from network")
        return real_session(source, options, **kwargs)

    monkeypatch.setattr(ort_session.ort, "InferenceSession", trt_fails)
    hashed: list[Path] = []
    real_model_sha256, real_external_sha256 = ort_session._model_sha256, ort_session._external_sha256

    def model_sha256(model: Path | bytes) -> str:
        hashed.append(Path(str(model)))
        return real_model_sha256(model)

    def external_sha256(model: Path) -> dict[str, str] | None:
        hashed.append(model)
        return real_external_sha256(model)

    monkeypatch.setattr(ort_session, "_model_sha256", model_sha256)
    monkeypatch.setattr(ort_session, "_external_sha256", external_sha256)

    async def body() -> None:
        sc = ServerConfig(trt_engine_cache_dir=str(tmp_path / "trt"))
        repo = Repository(root, sc, Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        mv = repo.get("gen").resolve("")
        assert mv.state == ModelState.READY
        assert mv.card is not None
        profile = loader.profile_shapes(mv.card, mv.config.batching.max_batch_size)
        await repo.close(1)
        expected = engine_cache_key(
            card["sha256"]["model.onnx"],
            "fp32",
            profile,
            "NVIDIA-H200-sm90",
            {"model.onnx.data": card["sha256"]["model.onnx.data"]},
        )
        assert trt_options and {o["trt_engine_cache_prefix"] for o in trt_options} == {expected}

    asyncio.run(body())
    assert hashed == []


class _FakeNVMLError(Exception):
    pass


class _FakeNvml:
    """The slice of pynvml that gpu_identity reads: devices (uuid, name, compute capability) in
    NVML's (PCI bus) order, and a MIG slice that only its UUID finds, as NVML's indices are GPUs'."""

    NVMLError = _FakeNVMLError

    def __init__(self, devices: list[tuple[str, str, tuple[int, int]]]) -> None:
        self.devices = devices

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, str, tuple[int, int]]:
        if not 0 <= index < len(self.devices):
            raise _FakeNVMLError("Invalid Argument")
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> tuple[str, str, tuple[int, int]]:
        for device in [*self.devices, _MIG_SLICE]:
            if device[0] == uuid:  # NVML wants the whole UUID; CUDA also takes a unique prefix
                return device
        raise _FakeNVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle: tuple[str, str, tuple[int, int]]) -> str:
        return handle[0]

    def nvmlDeviceGetName(self, handle: tuple[str, str, tuple[int, int]]) -> bytes:
        return handle[1].encode()

    def nvmlDeviceGetCudaComputeCapability(self, handle: tuple[str, str, tuple[int, int]]) -> tuple[int, int]:
        return handle[2]


_T4 = ("NVIDIA Tesla T4", (7, 5))
_A10 = ("NVIDIA A10", (8, 6))
_MIXED_HOST = [
    ("GPU-0000aaaa-0000-0000-0000-000000000000", *_T4),
    ("GPU-1111bbbb-0000-0000-0000-000000000000", *_T4),
    ("GPU-2222cccc-0000-0000-0000-000000000000", *_A10),
    ("GPU-3333dddd-0000-0000-0000-000000000000", *_A10),
]
_MIG_SLICE = ("MIG-9999eeee-0000-0000-0000-000000000000", "NVIDIA A100 MIG 1g.5gb", (8, 0))


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Installs a fake pynvml and the CUDA environment; gpu_identity's per-process cache is reset."""

    def install(devices: list[tuple[str, str, tuple[int, int]]], env: Mapping[str, str]) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(devices))
        for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        ort_session.gpu_identity.cache_clear()

    yield install
    ort_session.gpu_identity.cache_clear()


def test_gpu_identity_maps_the_cuda_ordinal_through_cuda_visible_devices(
    fake_nvml: Callable[..., None],
) -> None:
    """ORT's device_id is the CUDA ordinal among CUDA_VISIBLE_DEVICES, not the NVML index: with
    CUDA_VISIBLE_DEVICES=2,3 ordinal 0 is NVML's GPU 2 (an A10 here), not GPU 0 (a T4), whose
    identity keyed the engine cache, so an engine built for one GPU model was loaded on another."""
    pci = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    cases: list[tuple[dict[str, str], int, str]] = [
        ({**pci, "CUDA_VISIBLE_DEVICES": "2,3"}, 0, "NVIDIA-A10-sm86"),
        ({**pci, "CUDA_VISIBLE_DEVICES": "2,0"}, 1, "NVIDIA-Tesla-T4-sm75"),
        (pci, 2, "NVIDIA-A10-sm86"),  # no list: the ordinal is the PCI-ordered index, as in NVML
        # UUIDs name one device whatever the order: whole, a unique prefix (CUDA accepts one), MIG.
        ({"CUDA_VISIBLE_DEVICES": "GPU-3333dddd-0000-0000-0000-000000000000"}, 0, "NVIDIA-A10-sm86"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-2222cccc,GPU-1111bbbb"}, 1, "NVIDIA-Tesla-T4-sm75"),
        ({"CUDA_VISIBLE_DEVICES": " GPU-2222cccc , GPU-1111bbbb"}, 0, "NVIDIA-A10-sm86"),
        ({"CUDA_VISIBLE_DEVICES": f"{_MIG_SLICE[0]},0"}, 0, "NVIDIA-A100-MIG-1g.5gb-sm80"),
    ]
    for env, ordinal, identity in cases:
        fake_nvml(_MIXED_HOST, env)
        assert ort_session.gpu_identity(ordinal) == identity, (env, ordinal)


def test_an_ambiguous_cuda_ordinal_turns_the_engine_cache_off(
    fake_nvml: Callable[..., None], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA numbers GPUs fastest first, not in NVML's order: on
    a host of different GPU models the ordinal names no NVML device for sure, so no engine is cached
    under a guess (engines are built in memory) and the log says why and what to set."""
    config = replace(RuntimeConfig(), trt_engine_cache_dir=str(tmp_path / "trt"))

    def trt_options() -> dict[str, str]:
        return dict(provider_chain([TENSORRT, CUDA], config, profile=PROFILE, model_sha256=SHA_V1))[TENSORRT]

    for env in ({}, {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}):
        fake_nvml(_MIXED_HOST, env)
        with caplog.at_level(logging.WARNING, logger="genserve_server.ort_session"):
            assert ort_session.gpu_identity(0) is None, env
            options = trt_options()
        assert "trt_engine_cache_enable" not in options and "trt_timing_cache_path" not in options
        assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text
        caplog.clear()
    # Same-model GPUs are the same identity in any order; an ordinal that CUDA_VISIBLE_DEVICES does
    # not list is no device (ORT fails it): the device id, as without NVML.
    fake_nvml(_MIXED_HOST[:2], {})
    assert ort_session.gpu_identity(1) == "NVIDIA-Tesla-T4-sm75"
    assert trt_options()["trt_engine_cache_enable"] == "True"
    fake_nvml(_MIXED_HOST, {"CUDA_VISIBLE_DEVICES": "GPU-2222cccc"})
    assert ort_session.gpu_identity(1) == "cuda1"


def test_cuda_options_tf32_memory_cap_and_device() -> None:
    cuda = dict(provider_chain([CUDA], RuntimeConfig()))[CUDA]
    assert cuda["use_tf32"] == "0"  # fp32 means fp32 unless asked
    assert cuda["device_id"] == "0" and "gpu_mem_limit" not in cuda
    assert (cuda["arena_extend_strategy"], cuda["cudnn_conv_use_max_workspace"]) == ("kNextPowerOfTwo", "1")
    config = parse_runtime_config(
        {
            "use_tf32": True,
            "gpu_mem_limit_bytes": 8 << 30,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_use_max_workspace": False,
            "device_id": 3,
        }
    )
    cuda = dict(provider_chain([TENSORRT, CUDA], config, profile=PROFILE))[CUDA]
    assert cuda["use_tf32"] == "1" and cuda["gpu_mem_limit"] == str(8 << 30)
    assert (cuda["arena_extend_strategy"], cuda["cudnn_conv_use_max_workspace"]) == ("kSameAsRequested", "0")
    assert cuda["device_id"] == "3"
    assert dict(provider_chain([TENSORRT], config, profile=PROFILE))[TENSORRT]["device_id"] == "3"
    with pytest.raises(
        RuntimeConfigError, match="runtime.arena_extend_strategy must be one of kNextPowerOfTwo"
    ):
        parse_runtime_config({"arena_extend_strategy": "grow"})
    with pytest.raises(RuntimeConfigError, match="runtime.use_tf32 must be true or false"):
        parse_runtime_config({"use_tf32": 1})


def test_preload_cuda_libraries_never_fails() -> None:
    assert ort_session.preload_cuda_libraries() in (True, False)


# --------------------------------------------------------------------------- 2 + 3: CUDA graphs


def test_cuda_graph_is_refused_for_size_free_kinds_at_config_load(tmp_path: Path) -> None:
    for kind in ("super_resolution", "image_to_image"):
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps({"kind": kind, "runtime": {"cuda_graph": True}}))
        with pytest.raises(
            ConfigError, match=rf"runtime.cuda_graph is not supported for kind {kind}: its input"
        ):
            load_model_config(path)
    path = tmp_path / "gen.json"
    path.write_text(json.dumps({"kind": "generator", "runtime": {"cuda_graph": True}}))
    assert load_model_config(path).runtime.cuda_graph


class _FakeGraph:
    """Stands in for session_runner._CapturedGraph (CUDA buffers) and records where it was captured."""

    captured: list[tuple[int, tuple[int, ...], int]] = []

    def __init__(
        self,
        session: Any,
        input_names: list[str],
        output_names: list[str],
        feeds: Mapping[str, np.ndarray],
        graph_id: int,
        device_id: int = 0,
    ) -> None:
        assert CAPTURE_GATE.capturing  # captures hold the process-wide gate
        self.graph_id = graph_id
        self.captured.append((graph_id, feeds["z"].shape, threading.get_ident()))

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [feeds["z"] * 2]


def _graph_runner(tiny_version: Path, monkeypatch: pytest.MonkeyPatch) -> SessionRunner:
    monkeypatch.setattr(session_runner, "_CapturedGraph", _FakeGraph)
    _FakeGraph.captured = []
    real = create_session(tiny_version / "model.onnx", [CPU], RuntimeConfig(), cores=1)
    info = SessionInfo(
        real.session, [CUDA, CPU], real.model_path, "fp32", [], {CUDA: {"enable_cuda_graph": "1"}}
    )
    return SessionRunner(info, replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=(1, 8)))


def test_graphs_are_captured_at_load_on_one_thread_and_keyed_by_full_shape(
    tiny_version: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _graph_runner(tiny_version, monkeypatch)
    assert runner.mode == "cuda_graph"
    runner.capture_all({"z": np.ones((3, 16), np.float32)})
    assert runner.sealed and sorted(s[0][0] for s in runner.captured_shapes) == [1, 8]
    # Calls from several threads all run on the runner's one graph thread (ORT keeps graphs per thread).
    results: list[np.ndarray] = []
    callers = [
        threading.Thread(target=lambda: results.append(runner.run({"z": np.ones((5, 16), np.float32)})[0]))
    ]
    callers += [
        threading.Thread(target=lambda: results.append(runner.run({"z": np.ones((1, 16), np.float32)})[0]))
    ]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert sorted(r.shape[0] for r in results) == [1, 5] and all((r == 2).all() for r in results)
    threads = {tid for _, _, tid in _FakeGraph.captured}
    assert len(threads) == 1 and threading.get_ident() not in threads
    # A new shape at a captured batch size is never replayed on another shape's graph: once sealed it
    # runs without a graph (gpu_graph_id -1), and graph ids are never reused.
    seen: list[str] = []

    def no_graph(feeds: Mapping[str, np.ndarray], options: Any = None) -> list[np.ndarray]:
        seen.append(options.get_run_config_entry("gpu_graph_id"))
        return [np.zeros((feeds["z"].shape[0], 1), np.float32)]

    monkeypatch.setattr(runner, "_run_io_binding", no_graph)
    out = runner.run({"z": np.ones((5, 32), np.float32)})[0]
    assert out.shape == (5, 1) and seen == [NO_GRAPH] and len(_FakeGraph.captured) == 2
    runner.sealed = False  # before capture_all (no warm-up): captured, with a fresh id
    runner.run({"z": np.ones((5, 32), np.float32)})
    ids = [gid for gid, _, _ in _FakeGraph.captured]
    assert len(ids) == 3 == len(set(ids)) and _FakeGraph.captured[-1][1] == (8, 32)
    runner.close()


def test_every_instance_captures_its_graphs_at_warm_up_on_its_own_thread(
    tiny_version: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Runner's structure with CUDA graphs (faked on this CPU): one graph thread per instance,
    every size captured by the first warm-up, nothing inline before that."""
    from genserve_server import runner as runner_module

    monkeypatch.setattr(session_runner, "_CapturedGraph", _FakeGraph)
    _FakeGraph.captured = []

    def on_fake_cuda(path: Path, providers: list[str], config: RuntimeConfig, **kwargs: Any) -> SessionInfo:
        real = create_session(path, [CPU], RuntimeConfig(), cores=1)
        return SessionInfo(real.session, [CUDA, CPU], path, "fp32", [], {CUDA: {"enable_cuda_graph": "1"}})

    monkeypatch.setattr(runner_module, "create_session", on_fake_cuda)
    config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=(1, 8))
    runner = runner_module.Runner(
        tiny_version / "model.onnx",
        label="g",
        providers=[CUDA, CPU],
        instances=2,
        intra_op_threads=1,
        runtime=config,
        inline_max_s=1.0,  # any measured batch would run inline
    )
    try:
        assert runner.mode == "cuda_graph" and runner.description.endswith("cuda graphs")
        z8 = {"z": np.ones((8, 16), np.float32)}
        signature = runner._signature(None, z8)
        cost = runner._cost(signature)
        cost.average_s = cost.fastest_s = cost.fastest_with_outputs_s = 1e-6  # measured as tiny
        assert not runner._runs_inline(None, signature, z8)  # graphs not captured yet: never on the loop
        runner.warm(z8)
        assert all(r.sealed for r in runner.session_runners)
        by_thread: dict[int, list[int]] = {}
        for _, shape, thread in _FakeGraph.captured:
            by_thread.setdefault(thread, []).append(shape[0])
        assert sorted(sorted(sizes) for sizes in by_thread.values()) == [[1, 8], [1, 8]]  # 2 threads
        assert runner._runs_inline(None, signature, z8)
        assert (runner.run_sync(z8)["image"] == 2).all()
        assert len(_FakeGraph.captured) == 4  # serving captured nothing more
    finally:
        runner.close()


def test_capture_gate_excludes_gpu_calls_during_a_capture() -> None:
    gate = gpu_gate._CaptureGate()
    events: list[str] = []
    started = threading.Event()

    def call() -> None:
        with gate.gpu_call():
            events.append("call")

    with gate.capture():
        worker = threading.Thread(target=lambda: (started.set(), call()))
        worker.start()
        started.wait()
        worker.join(0.1)
        events.append("capture done")
    worker.join()
    assert events == ["capture done", "call"]


def test_a_waiting_capture_goes_before_new_gpu_calls() -> None:
    gate = gpu_gate._CaptureGate()
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def first_call() -> None:
        with gate.gpu_call():
            holding.set()
            release.wait()
            order.append("first call")

    def capture() -> None:
        with gate.capture():
            order.append("capture")

    def later_call() -> None:
        with gate.gpu_call():
            order.append("later call")

    threads = [threading.Thread(target=first_call)]
    threads[0].start()
    holding.wait()
    threads.append(threading.Thread(target=capture))
    threads[1].start()
    while not gate._waiting:  # the capture waits for the running call
        threading.Event().wait(0.001)
    threads.append(threading.Thread(target=later_call))
    threads[2].start()
    threading.Event().wait(0.05)
    release.set()
    for t in threads:
        t.join()
    assert order == ["first call", "capture", "later call"]


# --------------------------------------------------------------------------- sticky CUDA errors


@pytest.mark.parametrize(
    ("message", "sticky"),
    [
        (
            "CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; expr=cudaStreamSynchronize",
            True,
        ),
        ("CUDA error cudaErrorLaunchFailure:unspecified launch failure", True),
        ("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 719: unspecified launch failure", True),
        ("CUDA error 214: uncorrectable ECC error encountered", True),
        ("CUDA failure 2: out of memory", False),  # OOM: a smaller batch works, not sticky
        ("Failed to allocate memory for requested buffer of size 123", False),
        ("CUDA failure 701: too many resources requested for launch", False),
        ("Got invalid dimensions for input: z", False),
    ],
)
def test_sticky_cuda_error_classification(message: str, sticky: bool) -> None:
    assert bool(sticky_cuda_error(RuntimeError(message))) is sticky


async def loop_turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_sticky_cuda_error_marks_the_version_broken_and_stops_the_server(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_tiny_generator(root)
    health: list[tuple[str, bool]] = []
    fatal: list[str] = []

    async def body() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.add_listener(lambda name, serving: health.append((name, serving)))
        repo.on_fatal = fatal.append
        repo.scan()
        await repo.load_all()
        mv = repo.get("gen").resolve("")
        runner = mv.runner
        assert runner is not None
        z = {"z": np.zeros((2, TINY_LATENT), np.float32)}
        runner.info.providers = [CUDA, CPU]  # pretend the session runs on CUDA

        def ordinary(feeds: Any, solo: bool) -> list[Any]:
            raise RuntimeError("CUDA failure 2: out of memory")

        runner._model_call = ordinary  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="out of memory"):
            await runner.run("k", z)
        # A device loss is handed to the loop (call_soon_threadsafe) before the error returns: a few
        # turns of the loop are enough for it to act, were it going to.
        await loop_turns()
        assert mv.state == ModelState.READY and not fatal  # not sticky: keeps serving

        def broken(feeds: Any, solo: bool) -> list[Any]:
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered ; GPU=0")

        runner._model_call = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await runner.run("k", z)
        deadline = time.monotonic() + 10
        while mv.state != ModelState.UNAVAILABLE and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert mv.state == ModelState.UNAVAILABLE and "CUDA error 700" in mv.reason
        assert health[-1] == ("gen", False)
        assert len(fatal) == 1 and "model gen version 1" in fatal[0]
        with pytest.raises(RuntimeError):  # a second failure does not stop it twice
            await runner.run("k", z)
        await loop_turns()
        assert len(fatal) == 1
        await repo.close(1)

    asyncio.run(body())


def test_the_default_fatal_action_sends_sigterm_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    from genserve_server import repository

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(repository.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    repository._terminate_process("test")
    assert sent == [(os.getpid(), signal.SIGTERM)]


# --------------------------------------------------------------------------- deployment, acceptance


def test_server_wide_engine_cache_dir_from_config_and_cli(tmp_path: Path) -> None:
    from genserve_server.config import load_server_config
    from genserve_server.main import build_parser

    path = tmp_path / "server.json"
    path.write_text(json.dumps({"trt_engine_cache_dir": "/var/cache/genserve/trt"}))
    assert load_server_config(path).trt_engine_cache_dir == "/var/cache/genserve/trt"
    path.write_text(json.dumps({"trt_engine_cache_dir": ""}))
    with pytest.raises(ConfigError, match="trt_engine_cache_dir must be a directory path or null"):
        load_server_config(path)
    args = build_parser().parse_args(["serve", "--models", "m", "--trt-engine-cache-dir", "/c"])
    assert args.trt_engine_cache_dir == "/c"


def test_gpu_acceptance_skips_gpu_checks_dry_and_fails_a_run_that_checked_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_acceptance.sh"), "--dry"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    checks = report["checks"]
    for name in (
        "fallback_keeps_options",
        "graph_replay_equals_plain",
        "replay_really_happens",
        "multi_instance_capture",
        "shape_change_same_batch",
        "oom_split_and_retry",
        "bundled_models_through_repository",
        "fp16_parity_on_device",
        "tf32_off_by_default",
    ):
        assert checks[name]["status"] == "skipped", (name, checks[name])
    assert report["environment"]["cuda_session"] is False and "finished" in report
    # Without --dry, a host where no session runs on CUDA checked nothing on a GPU: exit 3, so that a
    # device run whose wheel install failed does not read as a pass.
    real = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_acceptance.sh")],
        env={**env, "OUT": str(tmp_path / "real")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert real.returncode == 3, real.stdout + real.stderr
    assert "nothing was checked on a GPU" in real.stdout


def test_a_sticky_cuda_error_at_load_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    root = tmp_path / "models"
    write_tiny_generator(root)

    def broken_runner(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA failure 719: unspecified launch failure ; GPU=0")

    monkeypatch.setattr(loader, "Runner", broken_runner)
    fatal: list[str] = []

    async def body() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.on_fatal = fatal.append
        repo.scan()
        await repo.load_all()
        assert repo.get("gen").versions["1"].state == ModelState.UNAVAILABLE
        await repo.close(1)

    asyncio.run(body())
    assert len(fatal) == 1 and "CUDA error 719" in fatal[0]


def test_gpu_acceptance_names_a_staged_wheel_as_pip_wants(tmp_path: Path) -> None:
    """The wheel is staged in parts under any name; pip installs only a correctly named file."""
    import subprocess
    import sys
    import zipfile

    staged = tmp_path / "wheel.zip"
    with zipfile.ZipFile(staged, "w") as wheel:
        wheel.writestr("onnxruntime/__init__.py", "")
        wheel.writestr(
            "onnxruntime_gpu-1.31.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp312-cp312-manylinux_2_27_x86_64\n"
            "Tag: cp312-cp312-manylinux_2_28_x86_64\n",
        )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "wheel_name.py"), str(staged)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == (
        "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    )


def test_gpu_payload_parts_rejoin_into_the_unpacked_wheel_and_protobuf(tmp_path: Path) -> None:
    """scripts/gpu_payload.sh splits one xz tar into parts; joined in order (as gpu_acceptance.sh
    joins them), they match the recorded sha256 and unpack to site/ (the wheel) and pb/."""
    import hashlib
    import lzma
    import os
    import subprocess
    import tarfile
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    blob = os.urandom(3 * 1024 * 1024)  # incompressible: three 1 MiB parts at least
    with zipfile.ZipFile(wheels / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", "w") as w:
        w.writestr("onnxruntime/capi/libfake.so", blob)
    with zipfile.ZipFile(wheels / "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl", "w") as w:
        w.writestr("google/protobuf/__init__.py", "__version__ = '7.36.2'\n")
    dest = tmp_path / "staged"
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        ["bash", str(root / "scripts" / "gpu_payload.sh"), str(wheels), "1", str(dest)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    parts = sorted(dest.glob("p*/part"), key=lambda f: int(f.parent.name[1:]))
    assert len(parts) >= 3
    joined = b"".join(part.read_bytes() for part in parts)
    assert hashlib.sha256(joined).hexdigest() == (dest / "SHA256").read_text().strip()
    out = tmp_path / "site"
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(joined))) as tar:
        tar.extractall(out, filter="data")
    assert (out / "site/onnxruntime/capi/libfake.so").read_bytes() == blob
    assert (out / "pb/google/protobuf/__init__.py").exists()


@pytest.mark.parametrize(("fp16_seed", "served"), [(0, "fp16"), (1, "fp32")])
def test_fp16_is_served_only_within_parity_on_the_provider_in_use(
    tmp_path: Path, fp16_seed: int, served: str
) -> None:
    """The card's fp16 parity was measured at export; the load checks it again where it will run.
    A "fp16" file with other weights (seed 1) claims parity in its card and is refused."""
    import hashlib

    root = tmp_path / "models"
    version = write_tiny_generator(root, config={"precision": "fp16"})
    data = generator_graph(TINY_LATENT, 1, 8, 8, seed=fp16_seed).SerializeToString()
    (version / "model.fp16.onnx").write_bytes(data)
    card = json.loads((version / "card.json").read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.001, "fp16_atol": 0.01}
    (version / "card.json").write_text(json.dumps(card))

    async def body() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        mv = repo.get("gen").resolve("")
        assert (mv.state, mv.precision) == (ModelState.READY, served)
        assert mv.sha256 == card["sha256"]["model.fp16.onnx" if served == "fp16" else "model.onnx"]
        await repo.close(1)

    asyncio.run(body())

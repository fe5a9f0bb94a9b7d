"""The performance path on the CPU provider: session options, IO binding parity, fp16 selection and
parity, provider fallback and the CUDA-graph padding helper (what runs without a GPU, in CI)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from genserve_server.latents import latents_for_seeds
from genserve_server.ort_session import (
    CPU,
    CUDA,
    FP16_ATOL,
    TENSORRT,
    ProfileShapes,
    RuntimeConfig,
    RuntimeConfigError,
    choose_model_file,
    create_session,
    max_abs_diff,
    parse_runtime_config,
    provider_chain,
    session_options,
)
from genserve_server.session_runner import (
    SessionRunner,
    _pad_batch,
    check_fp16_parity,
)

CPU_ONLY = [CPU]


def _runner(path: Path, config: RuntimeConfig, providers: list[str] | None = None) -> SessionRunner:
    info = create_session(path, providers or CPU_ONLY, config, cores=2)
    return SessionRunner(info, config)


def _z(n: int, first_seed: int = 0) -> dict[str, np.ndarray]:
    return {"z": latents_for_seeds(list(range(first_seed, first_seed + n)), 16)}


def test_session_options_size_threads_to_cores_and_instances() -> None:
    options = session_options(RuntimeConfig(), cores=8, instances=2)
    assert options.intra_op_num_threads == 4
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    tuned = session_options(
        replace(
            RuntimeConfig(),
            intra_op_threads=3,
            allow_spinning=True,
            graph_optimization="basic",
            cpu_mem_arena=False,
        ),
        cores=8,
    )
    assert tuned.intra_op_num_threads == 3
    assert tuned.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert tuned.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert tuned.enable_cpu_mem_arena is False


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_io_binding_matches_plain_run_bit_for_bit(tiny_version: Path, batch: int) -> None:
    path = tiny_version / "model.onnx"
    plain = _runner(path, RuntimeConfig())
    bound = _runner(path, replace(RuntimeConfig(), io_binding=True))
    assert (plain.mode, bound.mode) == ("run", "io_binding")
    feeds = _z(batch)
    expected = plain.run(feeds)
    first = bound.run(feeds)  # ORT allocates the outputs and the runner learns their shapes
    second = bound.run(feeds)  # outputs bound to preallocated numpy arrays
    for got in (first, second):
        assert [a.shape for a in got] == [(batch, 3, 8, 8)]
        np.testing.assert_array_equal(got[0], expected[0])
    # Preallocated outputs are fresh arrays per call: an earlier result is never overwritten.
    third = bound.run(_z(batch, first_seed=1000))
    np.testing.assert_array_equal(second[0], expected[0])
    assert not np.array_equal(third[0], expected[0])


def test_batch_invariance_on_cpu(tiny_version: Path) -> None:
    """A seed's image is the same alone and inside a batch of 64 (bit for bit on this CPU)."""
    runner = _runner(tiny_version / "model.onnx", replace(RuntimeConfig(), io_binding=True))
    batch = runner.run(_z(64))[0]
    for i in (0, 17, 63):
        alone = runner.run(_z(1, first_seed=i))[0]
        np.testing.assert_array_equal(alone[0], batch[i])


def test_fp16_model_within_parity(tiny_version: Path) -> None:
    fp32 = _runner(tiny_version / "model.onnx", RuntimeConfig())
    fp16 = _runner(tiny_version / "model.fp16.onnx", RuntimeConfig())
    ok, diff = check_fp16_parity(fp32, fp16, _z(32), atol=FP16_ATOL)
    assert ok, f"fp16 max abs diff {diff} > {FP16_ATOL}"
    assert 0.0 < diff <= FP16_ATOL  # really computed in fp16, and close
    assert fp16.run(_z(2))[0].dtype == np.float32  # fp32 I/O like the exporter's fp16 files


def test_choose_model_file_prefers_fp16_only_when_asked_and_within_parity(tmp_path: Path) -> None:
    import perf_support

    good = perf_support.write_tiny_version(tmp_path / "good" / "1", fp16_parity=0.003)
    assert choose_model_file(good, "fp32").path.name == "model.onnx"
    choice = choose_model_file(good, "fp16")
    assert (choice.path.name, choice.precision, choice.reason) == ("model.fp16.onnx", "fp16", "")

    bad = perf_support.write_tiny_version(tmp_path / "bad" / "1", fp16_parity=0.05)
    choice = choose_model_file(bad, "fp16")
    assert choice.precision == "fp32" and "0.05" in choice.reason

    unknown = perf_support.write_tiny_version(tmp_path / "unknown" / "1", fp16_parity=None)
    assert choose_model_file(unknown, "fp16").precision == "fp32"

    (good / "model.fp16.onnx").unlink()
    choice = choose_model_file(good, "fp16")
    assert choice.precision == "fp32" and "absent" in choice.reason
    card = json.loads((bad / "card.json").read_text())
    assert choose_model_file(bad, "fp16", card).precision == "fp32"

    # A parity record of the wrong type cannot vouch for fp16: fp32 serves, the reason says why.
    good = perf_support.write_tiny_version(tmp_path / "typed" / "1", fp16_parity=0.003)
    card = json.loads((good / "card.json").read_text())
    for parity, reason in (
        ("n/a", "card.json parity must be an object, got 'n/a'"),
        ([0.003], "card.json parity must be an object, got [0.003]"),
        ({"fp16_atol": "x"}, "card.json parity.fp16_atol must be a number, got 'x'"),
        ({"fp16_atol": [1]}, "card.json parity.fp16_atol must be a number, got [1]"),
    ):
        choice = choose_model_file(good, "fp16", {**card, "parity": parity})
        assert (choice.path.name, choice.precision, choice.reason) == ("model.onnx", "fp32", reason)


def test_gpu_providers_fall_back_cleanly_to_cpu(tiny_version: Path, cuda_really_used: bool) -> None:
    if cuda_really_used:
        pytest.skip("a GPU is present: the fallback path is not taken")
    config = replace(RuntimeConfig(), cuda_graph=True, io_binding=True)
    info = create_session(tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=2)
    assert info.providers == [CPU]
    assert info.fallbacks, "a requested GPU provider that is not used must be reported"
    runner = SessionRunner(info, config)
    assert runner.mode == "io_binding"  # CUDA graphs need CUDA: not used, IO binding still is
    expected = _runner(tiny_version / "model.onnx", RuntimeConfig()).run(_z(5))
    np.testing.assert_array_equal(runner.run(_z(5))[0], expected[0])


def test_a_provider_that_fails_at_creation_falls_back_to_the_next_one_in_the_chain(
    tiny_version: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT refused at creation: the session is built again on CUDA with its own options (CPU
    last), not straight on the CPU provider."""
    from genserve_server import ort_session

    attempts: list[list[str]] = []
    real_session = ort.InferenceSession

    def session(source, options, providers, provider_options, enable_fallback):  # type: ignore[no-untyped-def]
        attempts.append(list(providers))
        if providers[0] == TENSORRT:
            raise RuntimeError("TensorRT cannot build this graph")
        return real_session(source, options, providers=[CPU])

    monkeypatch.setattr(ort_session, "tensorrt_loadable", lambda: "")
    monkeypatch.setattr(ort_session.ort, "InferenceSession", session)
    profile = ProfileShapes({"z": [1, 16]}, {"z": [8, 16]}, {"z": [64, 16]})
    config = replace(RuntimeConfig(), cuda_graph=False)
    info = create_session(
        tiny_version / "model.onnx", [TENSORRT, CUDA, CPU], config, cores=2, profile=profile
    )
    assert attempts == [[TENSORRT, CUDA, CPU], [CUDA, CPU]]
    assert info.fallbacks[0] == f"{TENSORRT} unavailable: TensorRT cannot build this graph"


def test_gpu_providers_the_probe_found_unusable_are_not_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the one-time probe found only CUDA working, TensorRT is left out of every later
    request (its library-load errors would otherwise be printed by each model's session)."""
    from genserve_server import providers

    monkeypatch.setattr(providers, "_probed", {})
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(providers, "preload_cuda_libraries", lambda: False)
    monkeypatch.setattr(providers, "_probe", lambda candidates: [CUDA])
    assert providers.usable_providers([TENSORRT, CUDA, CPU]) == [CUDA, CPU]
    assert providers.usable_providers([TENSORRT, CPU]) == [CPU]
    assert providers.gpu_probe_result() == {TENSORRT: False, CUDA: True}


def test_sessions_get_the_inter_op_threads_and_memory_pattern_configured(tiny_version: Path) -> None:
    config = replace(RuntimeConfig(), inter_op_threads=3, mem_pattern=False)
    assert session_options(RuntimeConfig(), cores=2).enable_mem_pattern is True
    options = create_session(
        tiny_version / "model.onnx", CPU_ONLY, config, cores=2
    ).session.get_session_options()
    assert options.inter_op_num_threads == 3
    assert options.enable_mem_pattern is False


def test_a_capture_waits_for_running_gpu_calls_and_new_calls_wait_behind_it() -> None:
    """The capture gate (gpu_gate.py), a readers-writer lock: a CUDA graph capture starts only once
    every GPU call in flight has ended, and a call that comes while it waits goes after it."""
    from genserve_server.gpu_gate import _CaptureGate

    gate = _CaptureGate()
    order: list[str] = []
    call_in = threading.Event()
    release_call = threading.Event()

    def running_call() -> None:
        with gate.gpu_call():
            call_in.set()
            release_call.wait(10)
            order.append("call ended")

    def capture() -> None:
        with gate.capture():
            order.append("capture")

    def later_call() -> None:
        with gate.gpu_call():
            order.append("later call")

    first = threading.Thread(target=running_call)
    first.start()
    assert call_in.wait(10)
    capturing = threading.Thread(target=capture)
    capturing.start()
    deadline = time.monotonic() + 10
    while gate._waiting == 0 and not order:  # queued behind the call (or, wrongly, through)
        assert time.monotonic() < deadline, "the capture never queued"
        time.sleep(0.001)
    later = threading.Thread(target=later_call)
    later.start()
    release_call.set()
    for thread in (first, capturing, later):
        thread.join(10)
    assert order == ["call ended", "capture", "later call"]


def test_a_graph_too_new_for_onnx_runtime_is_not_blamed_on_a_gpu_provider(
    tiny_version: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model.onnx of an IR version newer than ONNX Runtime supports, GPU providers requested: the
    first attempt's refusal was logged as a WARNING 'CUDAExecutionProvider unavailable: <ONNX
    Runtime's raw text>' before the CPU attempt refused the same file, blaming the provider for the
    model. It is refused at once, short and naming the file; no provider is said to be unavailable."""
    import onnx

    from genserve_server.errors import Unavailable

    model = onnx.load(tiny_version / "model.onnx")
    model.ir_version = 99
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    with caplog.at_level(logging.DEBUG, logger="genserve_server"):
        with pytest.raises(Unavailable) as refused:
            create_session(path, [CUDA, CPU], RuntimeConfig(), cores=1)
    assert str(path) in str(refused.value) and "IR version 99" in str(refused.value), refused.value
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("unavailable" in m or "onnxruntime_src" in m for m in loud), loud


def test_provider_chain_options() -> None:
    config = replace(RuntimeConfig(), cuda_graph=True, trt_engine_cache_dir="/var/cache/genserve/trt")
    profile = ProfileShapes({"z": [1, 16]}, {"z": [8, 16]}, {"z": [64, 16]})
    chain = dict(provider_chain([TENSORRT, CUDA], config, fp16=True, profile=profile, model_sha256="ab" * 32))
    assert list(chain) == [TENSORRT, CUDA, CPU]  # CPU is always the last resort
    trt = chain[TENSORRT]
    assert trt["trt_engine_cache_enable"] == "True"
    # One engine directory per model file, precision, profile and GPU (test_gpu_path.py).
    assert trt["trt_engine_cache_path"].startswith("/var/cache/genserve/trt/abababababababab-fp16-")
    assert trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_profile_min_shapes"] == "z:1x16"
    assert trt["trt_profile_max_shapes"] == "z:64x16"
    assert chain[CUDA]["enable_cuda_graph"] == "1"
    plain = dict(provider_chain([CUDA, CPU], RuntimeConfig()))
    assert "enable_cuda_graph" not in plain[CUDA]
    with pytest.raises(RuntimeConfigError, match="unknown execution provider"):
        provider_chain(["OpenVINOExecutionProvider"], RuntimeConfig())


def test_parse_runtime_config() -> None:
    config = parse_runtime_config(
        {
            "io_binding": True,
            "cuda_graph_batch_sizes": [64, 1, 8, 8],
            "trt_engine_cache_dir": "/tmp/trt",
            "graph_optimization": "extended",
            "intra_op_threads": 2,
            "fp16_atol": 0.005,
        },
        "models/x/config.json",
    )
    assert config.io_binding and config.uses_io_binding
    assert config.cuda_graph_batch_sizes == (1, 8, 64)
    assert config.trt_engine_cache_dir == "/tmp/trt"
    assert config.fp16_atol == 0.005
    assert parse_runtime_config(None) == RuntimeConfig()
    assert replace(RuntimeConfig(), cuda_graph=True).uses_io_binding
    for bad, message in [
        ({"io_bindings": True}, "runtime.io_bindings is not a known field"),
        ({"io_binding": "yes"}, "runtime.io_binding must be true or false, got 'yes'"),
        ({"intra_op_threads": -1}, "runtime.intra_op_threads must be an integer >= 0, got -1"),
        ({"graph_optimization": "max"}, "runtime.graph_optimization must be one of"),
        ({"cuda_graph_batch_sizes": []}, "runtime.cuda_graph_batch_sizes must be a non-empty list"),
        ({"trt_engine_cache_dir": ""}, "runtime.trt_engine_cache_dir must be a directory path or null"),
        ([], "runtime must be a JSON object"),
    ]:
        with pytest.raises(RuntimeConfigError, match=message.replace("(", r"\(")):
            parse_runtime_config(bad, "models/x/config.json")


def test_pad_batch_repeats_the_last_row() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = _pad_batch(rows, 8)
    assert padded.shape == (8, 2)
    np.testing.assert_array_equal(padded[:3], rows)
    np.testing.assert_array_equal(padded[3:], np.repeat(rows[-1:], 5, axis=0))
    assert _pad_batch(rows, 3) is rows


def test_max_abs_diff() -> None:
    a = [np.zeros((2, 3), np.float32)]
    assert max_abs_diff(a, [np.full((2, 3), 0.25, np.float32)]) == 0.25
    assert max_abs_diff(a, [np.zeros((3, 2), np.float32)]) == float("inf")
    assert max_abs_diff(a, [np.full((2, 3), np.nan, np.float32)]) == float("inf")


def test_sessions_built_at_once_leave_stdout_as_it_was(
    tiny_version: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Versions load on several threads at once, and each session is built with ORT's Python prints
    kept off stdout. contextlib.redirect_stdout swaps the process-wide sys.stdout: two builds that
    overlapped (a starts, b starts, a ends, b ends) left sys.stdout on a's buffer for the rest of the
    process. The server's 'genserve listening on ...' line went there (one start in three of the
    tiny repository), and so did everything printed after, held in memory for ever."""
    real_session = ort.InferenceSession
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()

    def session(*args: object, **kwargs: object) -> ort.InferenceSession:
        if threading.current_thread().name == "a":
            sys.stdout.write("a said\n")  # as ORT's Python layer prints
            a_in.set()
            assert b_in.wait(10)  # b's build starts inside a's
        else:
            assert a_in.wait(10)
            b_in.set()
            sys.stdout.write("b said\n")
            assert a_done.wait(10)  # and ends after it
        return real_session(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    stdout = sys.stdout
    errors: list[BaseException] = []

    def build() -> None:
        try:
            create_session(tiny_version / "model.onnx", CPU_ONLY, RuntimeConfig(), cores=1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            if threading.current_thread().name == "a":
                a_done.set()

    threads = [threading.Thread(target=build, name=name) for name in ("a", "b")]
    with caplog.at_level(logging.INFO, logger="genserve_server.ort_session"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    restored = sys.stdout
    sys.stdout = stdout  # whatever the outcome, the rest of the session prints where it did
    assert not errors
    assert restored is stdout
    said = [r.getMessage() for r in caplog.records if "onnxruntime said" in r.getMessage()]
    assert sorted(message.rsplit(": ", 1)[1] for message in said) == ["a said", "b said"]

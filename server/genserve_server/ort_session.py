"""ONNX Runtime sessions as genserve tunes them: options, providers, IO binding, fp16, CUDA graphs.

One place decides how a model file becomes a session, so that the server's runner, the benchmark's
raw-limit measurement (bench/raw_limit.py) and the tests all run the same configuration:

* `session_options()`: threads sized to the cores (intra-op = cores // instances, one inter-op
  thread, sequential execution), full graph optimisation, the CPU memory arena, and intra-op
  spinning off by default: spinning workers burn a core while the event loop and the encode pool
  want it (2-core machines), for no gain once a batch is a few ms of work.
* `provider_chain()`: the configured execution providers with their options: TensorRT with an
  engine cache (and timing cache) under `trt_engine_cache_dir`, keyed by the model's sha256 (and
  its external data files'), precision, profile and GPU (`engine_cache_key`), fp16 when the
  precision is fp16, explicit min/opt/max profile shapes; CUDA with the device, TF32 (off unless
  `use_tf32`), the memory cap and arena strategy, the cuDNN workspace, and `enable_cuda_graph` when
  CUDA graphs are on.
* `create_session()`: builds the session with ONNX Runtime's own fallback off and falls back
  itself, with each provider's options: a provider that cannot be created is dropped and the next
  one tried, ending on the CPU provider; TensorRT is skipped when its libraries do not load or
  there is no shape profile. What the session really uses is `session.get_providers()` and
  `get_provider_options()` (`get_available_providers()` lists CUDA on machines with no GPU): the
  serving mode (CUDA graphs, TF32, device) is derived from those, not from the config.
* `SessionRunner` (session_runner.py; the capture gate is gpu_gate.py): runs a batch, plainly or
  with IO binding (which works on the CPU provider too:
  outputs land in preallocated numpy arrays, no copy); with CUDA graphs, on one dedicated thread
  per session, one captured graph per full input shape (ids never reused), captured at load under
  a process-wide gate (`CAPTURE_GATE`), inputs padded up to the nearest captured batch size and
  outputs cropped back.
* `choose_model_file()` (and session_runner's `check_fp16_parity()`): fp16 only where the card's
  export parity and a check on the provider really in use are within `fp16_atol` (1e-2); fp32
  otherwise, with a reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

# config.json's `runtime` object is part of the model-repository contract (validated there, shared
# with export/); re-exported here for the modules that build sessions from it.
from genserve_contract.repository import FP16_ATOL as FP16_ATOL
from genserve_contract.repository import external_data_locations, sha256_file
from genserve_contract.runtime import GRAPH_OPTIMIZATION_LEVELS, ort_path
from genserve_contract.runtime import RuntimeConfig as RuntimeConfig
from genserve_contract.runtime import RuntimeConfigError as RuntimeConfigError
from genserve_contract.runtime import parse_runtime_config as parse_runtime_config
from genserve_server.errors import Unavailable, too_new_for_runtime
from genserve_server.gpu_gate import CAPTURE_GATE

logger = logging.getLogger(__name__)

CPU: Final = "CPUExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"
TENSORRT: Final = "TensorrtExecutionProvider"
GPU_PROVIDERS: Final = (TENSORRT, CUDA)

_OPT_LEVELS: Final = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Every ONNX Runtime tensor type numpy holds: a CUDA graph's outputs are allocated in these, and one
# allocated float32 for a float64 output failed every replay ("Unexpected output data type").
_NP_DTYPES: Final[dict[str, type[np.generic]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

Array = NDArray[Any]
assert set(_OPT_LEVELS) == set(GRAPH_OPTIMIZATION_LEVELS), "a graph_optimization level without its ORT level"


def session_options(config: RuntimeConfig, *, cores: int, instances: int = 1) -> ort.SessionOptions:
    """SessionOptions for one session of a model served by `instances` sessions on `cores` cores."""
    options = ort.SessionOptions()
    intra = config.intra_op_threads or max(1, cores // max(1, instances))
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = max(1, config.inter_op_threads)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPT_LEVELS[config.graph_optimization]
    options.enable_cpu_mem_arena = config.cpu_mem_arena
    options.enable_mem_pattern = config.mem_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if config.allow_spinning else "0")
    # 4 = FATAL only: ORT's log lines bypass logging (providers.py); its errors raise.
    options.log_severity_level = 4
    # Which provider runs each node (node_placement): ORT's own warning about nodes left on the CPU
    # is below the log level above.
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options


def node_placement(session: Any) -> dict[str, list[str]]:
    """{provider: op types of the nodes it runs} ({} where ORT cannot tell)."""
    get_info = getattr(session, "get_provider_graph_assignment_info", None)
    if get_info is None:
        return {}
    try:
        subgraphs = get_info()
    except Exception:  # recording off, or an ORT without it
        return {}
    placement: dict[str, list[str]] = {}
    for subgraph in subgraphs:
        placement.setdefault(str(subgraph.ep_name), []).extend(str(n.op_type) for n in subgraph.get_nodes())
    return placement


@dataclass(frozen=True, slots=True)
class ProfileShapes:
    """TensorRT optimisation profile: min/opt/max shape of each dynamic input."""

    min_shapes: Mapping[str, Sequence[int]]
    opt_shapes: Mapping[str, Sequence[int]]
    max_shapes: Mapping[str, Sequence[int]]


def _shape_string(shapes: Mapping[str, Sequence[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def engine_cache_key(
    model_sha256: str,
    precision: str,
    profile: ProfileShapes | None,
    gpu: str,
    external_sha256: Mapping[str, str] | None = None,
) -> str:
    """The TensorRT engine cache subdirectory of one model file (and the external data files its
    weights are in: {location: sha256}), precision, profile and GPU.

    An engine holds the weights it was built from, for one GPU model and one set of profile shapes:
    any of these changing must miss the cache, never load a stale engine.
    """
    profile_text = (
        "none"
        if profile is None
        else "|".join(_shape_string(s) for s in (profile.min_shapes, profile.opt_shapes, profile.max_shapes))
    )
    # Nothing added for a graph without external data: its engines' keys stay those it had.
    external = "".join(f"\nexternal {loc}={sha}" for loc, sha in sorted((external_sha256 or {}).items()))
    digest = hashlib.sha256(
        f"{model_sha256}\n{precision}\n{profile_text}\n{gpu}\nort-{ort.__version__}{external}".encode()
    ).hexdigest()
    return f"{model_sha256[:16]}-{precision}-{digest[:16]}"


def _cuda_visible_devices() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it (None when unset): indices or GPU-/MIG- UUIDs (or
    prefixes), up to the first entry that is neither, which hides it and every later one."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries


def _nvml_candidates(nvml: Any, device_id: int) -> list[Any]:
    """The NVML devices that CUDA device `device_id` (ORT's device_id) may be: one where
    CUDA_VISIBLE_DEVICES names it by UUID, or by index with CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's
    order); else every device (CUDA's default order is fastest first); none where CUDA has none."""
    visible = _cuda_visible_devices()
    if visible is None:
        entry = str(device_id)
    elif device_id < len(visible):
        entry = visible[device_id]
    else:
        return []
    if entry.isdigit() and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return [nvml.nvmlDeviceGetHandleByIndex(int(entry))]
    every = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    if entry.isdigit():
        return every
    try:
        return [nvml.nvmlDeviceGetHandleByUUID(entry)]
    except nvml.NVMLError:  # a UUID prefix, which CUDA accepts and NVML does not
        return [h for h in every if str(nvml.nvmlDeviceGetUUID(h)).startswith(entry)] or every


def _nvml_identity(nvml: Any, handle: Any) -> str:
    name = nvml.nvmlDeviceGetName(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    text = name.decode() if isinstance(name, bytes) else str(name)
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', text).strip('-')}-sm{major}{minor}"


@functools.cache
def gpu_identity(device_id: int) -> str | None:
    """The GPU's model and compute capability, e.g. "NVIDIA-H200-sm90", via NVML when installed
    (the gpu-metrics extra); "cuda<id>" otherwise (ORT's engine file names add the compute capability).

    `device_id` is a CUDA ordinal, mapped to NVML through CUDA_VISIBLE_DEVICES (_nvml_candidates).
    None when it may be GPUs of different models (no TensorRT engine may be cached under a guess).
    """
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]

        pynvml.nvmlInit()
        try:
            identities = sorted({_nvml_identity(pynvml, h) for h in _nvml_candidates(pynvml, device_id)})
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, no such device: the device id is all we know
        return f"cuda{device_id}"
    if not identities:
        return f"cuda{device_id}"
    if len(identities) > 1:
        logger.warning(
            "TensorRT engine cache off for CUDA device %d: it may be any of %s (CUDA numbers GPUs fastest"
            " first); set CUDA_DEVICE_ORDER=PCI_BUS_ID or name the GPU by UUID in CUDA_VISIBLE_DEVICES",
            device_id,
            ", ".join(identities),
        )
        return None
    return identities[0]


# Library ORT 1.31's TensorRT provider links against (TensorRT 10).
TENSORRT_LIBRARIES: Final = ("libnvinfer.so.10",)


@functools.cache
def tensorrt_loadable() -> str:
    """ "" when TensorRT's libraries load in this process, else why not (probed once per process).

    Asking ORT for TensorRT without them costs a failed session per model and, with ORT's own
    fallback, loses every CUDA option: genserve skips TensorRT instead.
    """
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            return f"TensorRT libraries not loadable ({exc})"
    return ""


class _ThreadStdout(io.TextIOBase):
    """sys.stdout while some thread captures its prints (captured_stdout): what a capturing thread
    writes goes to its own buffer, what any other thread writes to the stream it replaced."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self.buffers = threading.local()

    def _target(self) -> Any:
        buffer = getattr(self.buffers, "buffer", None)
        return self.stream if buffer is None else buffer

    def write(self, text: str) -> int:
        written: int = self._target().write(text)
        return written

    def flush(self) -> None:
        self._target().flush()

    def writable(self) -> bool:
        return True


_CAPTURE_LOCK = threading.Lock()
_capture: _ThreadStdout | None = None
_capturing = 0


@contextlib.contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    """What this thread prints to sys.stdout meanwhile (ORT's Python layer prints some errors and
    warnings instead of raising), kept off stdout. Unlike contextlib.redirect_stdout, which swaps
    the process-wide sys.stdout and restores what it saw at entry, safe on several threads at once:
    versions load side by side, and two overlapping redirects left sys.stdout on the first one's
    buffer for the rest of the process (the 'listening' line and everything printed after went
    there). Other threads' prints go to stdout as before."""
    global _capture, _capturing
    buffer = io.StringIO()
    with _CAPTURE_LOCK:
        if _capturing == 0:
            _capture = _ThreadStdout(sys.stdout)
            sys.stdout = _capture
        _capturing += 1
        capture = _capture
    assert capture is not None
    previous = getattr(capture.buffers, "buffer", None)
    capture.buffers.buffer = buffer
    try:
        yield buffer
    finally:
        capture.buffers.buffer = previous
        with _CAPTURE_LOCK:
            _capturing -= 1
            if _capturing == 0:
                if sys.stdout is capture:  # else someone replaced it meanwhile: theirs stays
                    sys.stdout = capture.stream
                _capture = None


@functools.cache
def preload_cuda_libraries() -> bool:
    """Let ORT load CUDA/cuDNN from pip's `nvidia-*` packages (onnxruntime.preload_dlls), once per
    process, when they are installed; a no-op elsewhere (CPU hosts, system CUDA). Never raises."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or importlib.util.find_spec("nvidia") is None:
        return False
    try:
        with captured_stdout():  # it prints warnings instead of raising
            preload()
    except Exception as exc:  # a missing or mismatched library: the CUDA provider reports it later
        logger.info("onnxruntime.preload_dlls() failed: %s", exc)
        return False
    return True


def provider_chain(
    requested: Sequence[str],
    config: RuntimeConfig,
    *,
    fp16: bool = False,
    profile: ProfileShapes | None = None,
    device_id: int | None = None,
    model_sha256: str | None = None,
    external_sha256: Mapping[str, str] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) pairs in preference order, always ending with the CPU provider.

    `model_sha256` (with `external_sha256`, the model's external data files') keys the TensorRT
    engine cache (engine_cache_key); without it, or where the GPU model is not known for sure
    (gpu_identity is None), the cache is off.
    """
    device = config.device_id if device_id is None else device_id
    precision = "fp16" if fp16 else "fp32"
    chain: list[tuple[str, dict[str, str]]] = []
    for name in requested:
        if name == TENSORRT:
            trt: dict[str, str] = {
                "device_id": str(device),
                "trt_max_workspace_size": str(config.trt_max_workspace_bytes),
                "trt_fp16_enable": "True" if fp16 else "False",
            }
            if config.trt_engine_cache_dir and model_sha256 and (gpu := gpu_identity(device)) is not None:
                base = Path(config.trt_engine_cache_dir)
                key = engine_cache_key(model_sha256, precision, profile, gpu, external_sha256)
                trt |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(base / key),
                    "trt_engine_cache_prefix": key,
                    # Timing results depend on the GPU only: one cache shared by every model.
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(base),
                }
            if profile is not None:
                trt |= {
                    "trt_profile_min_shapes": _shape_string(profile.min_shapes),
                    "trt_profile_opt_shapes": _shape_string(profile.opt_shapes),
                    "trt_profile_max_shapes": _shape_string(profile.max_shapes),
                }
            chain.append((TENSORRT, trt))
        elif name == CUDA:
            cuda = {
                "device_id": str(device),
                "cudnn_conv_algo_search": "HEURISTIC",
                "use_tf32": "1" if config.use_tf32 else "0",
                "arena_extend_strategy": config.arena_extend_strategy,
                "cudnn_conv_use_max_workspace": "1" if config.cudnn_conv_use_max_workspace else "0",
            }
            if config.gpu_mem_limit_bytes:
                cuda["gpu_mem_limit"] = str(config.gpu_mem_limit_bytes)
            if config.cuda_graph:
                cuda["enable_cuda_graph"] = "1"
            chain.append((CUDA, cuda))
        elif name == CPU:
            chain.append((CPU, {}))
        else:
            raise RuntimeConfigError(f"unknown execution provider {name!r}")
    if not chain or chain[-1][0] != CPU:
        chain = [p for p in chain if p[0] != CPU] + [(CPU, {})]
    return chain


def _is_on(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true")


@dataclass(slots=True)
class SessionInfo:
    """A created session and what it really runs on."""

    session: ort.InferenceSession
    providers: list[str]
    model_path: Path
    precision: str
    # Why a requested provider or feature is not in use (empty when everything requested is).
    fallbacks: list[str] = field(default_factory=list)
    # The options of each provider as the session reports them (get_provider_options()): what the
    # serving mode is derived from, not what the config asked for.
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    # {provider: op types of its nodes} (node_placement): on a GPU, CPU nodes cost copies each call.
    placement: dict[str, list[str]] = field(default_factory=dict)

    @property
    def cpu_nodes(self) -> list[str]:
        """Op types of the nodes that run on the CPU provider although the session is on a GPU."""
        return list(self.placement.get(CPU, [])) if self.on_gpu else []

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    @property
    def cuda_graph(self) -> bool:
        """CUDA graphs really on: the session runs on CUDA with `enable_cuda_graph` in effect."""
        return self.provider == CUDA and _is_on(self.provider_options.get(CUDA, {}).get("enable_cuda_graph"))

    @property
    def tf32(self) -> bool:
        """TF32 math really allowed for fp32 on the provider in use (ORT's default is on)."""
        if self.provider == CUDA:
            return _is_on(self.provider_options.get(CUDA, {}).get("use_tf32", "1"))
        return self.provider == TENSORRT  # TensorRT builds with TF32 allowed; ORT has no option for it

    @property
    def device_id(self) -> int:
        value = self.provider_options.get(self.provider, {}).get("device_id", "0")
        return int(value) if value.isdigit() else 0

    def describe(self) -> str:
        """One line for logs and model info: provider, precision and the math/graph modes in effect."""
        parts = [self.provider, self.precision]
        if self.on_gpu:
            parts.append(f"device {self.device_id}")
            parts.append("tf32 on" if self.tf32 else "tf32 off")
        if self.cuda_graph:
            parts.append("cuda graphs")
        if self.cpu_nodes:
            parts.append(f"{len(self.cpu_nodes)} nodes on CPU")
        return ", ".join(parts)


def _model_sha256(model: Path | bytes) -> str:
    digest = hashlib.sha256()
    if isinstance(model, bytes):
        digest.update(model)
        return digest.hexdigest()
    with model.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _external_sha256(model: Path) -> dict[str, str] | None:
    """{location: sha256} of each external data file the graph at `model` loads its weights from
    ({} for none); None where one cannot be read (ONNX Runtime's load names what is wrong)."""
    try:
        return {loc: sha256_file(model.parent / loc) for loc in external_data_locations(model)}
    except (OSError, ValueError):
        return None


# Provider options naming a path, handed to ONNX Runtime as ort_path does.
_PATH_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")


def _ort_options(options: Mapping[str, str]) -> dict[str, str]:
    """`options` with each path (TensorRT's caches) as ONNX Runtime's binding takes it (ort_path)."""
    return {k: ort_path(Path(v)) if k in _PATH_OPTIONS else v for k, v in options.items()}


def _refuse_if_too_new(exc: Exception, path: Path) -> None:
    """Unavailable, short and naming `path`, where `exc` is ONNX Runtime refusing a graph of an IR
    version or opset newer than it supports: its own text (its C++ source path and function
    signature) goes to the log at DEBUG."""
    too_new = too_new_for_runtime(exc, ort.__version__)
    if too_new:
        logger.debug("%s: onnxruntime said: %s", path, str(exc).strip())
        raise Unavailable(f"{path}: {too_new}") from exc


def create_session(
    model: Path | bytes,
    requested: Sequence[str],
    config: RuntimeConfig,
    *,
    cores: int,
    instances: int = 1,
    fp16: bool = False,
    profile: ProfileShapes | None = None,
    model_path: Path | None = None,
    model_sha256: str | None = None,
    external_sha256: Mapping[str, str] | None = None,
) -> SessionInfo:
    """Create a session on the first provider of `requested` that works, falling back down the chain.

    ONNX Runtime's own fallback is off (enable_fallback=0, at creation and at run time): it would
    rebuild the session on CUDA with *no* provider options (no CUDA graphs, exhaustive cuDNN search,
    device 0) and switch providers silently at run time. Instead a GPU provider that raises at creation
    (no driver, an op TensorRT cannot build, CUDA graphs with a node on the CPU) is dropped here and
    the session built again with the next provider's own options; the CPU provider is always last.
    TensorRT is skipped without an attempt when its libraries cannot load, or without a shape profile
    (it would build engines per input shape while serving).

    `model_sha256` and `external_sha256` (the load's verified digests of the graph and of its
    external data files, {location: sha256}) key the TensorRT engine cache; a digest not given is
    read from the file.
    """
    source = ort_path(model) if isinstance(model, Path) else model
    path = model if isinstance(model, Path) else (model_path or Path("<bytes>"))
    fallbacks: list[str] = []
    wanted = _without_unusable_tensorrt(requested, profile, path, fallbacks)
    if any(p in GPU_PROVIDERS for p in wanted):
        preload_cuda_libraries()
    external: Mapping[str, str] | None = {}
    if TENSORRT in wanted and config.trt_engine_cache_dir:
        if model_sha256 is None:
            model_sha256 = _model_sha256(model)
        # An engine holds the weights, and a graph's external data file holds them (model.onnx.data):
        # weights republished beside the same graph must miss the cache. Unreadable: no cache.
        if external_sha256 is not None:
            external = external_sha256
        elif isinstance(model, Path) and (external := _external_sha256(model)) is None:
            model_sha256 = None

    def chain_for(providers: Sequence[str], run_config: RuntimeConfig) -> list[tuple[str, dict[str, str]]]:
        return provider_chain(
            providers,
            run_config,
            fp16=fp16,
            profile=profile,
            model_sha256=model_sha256,
            external_sha256=external,
        )

    chain = chain_for(wanted, config)
    run_config = config
    while True:
        options = session_options(run_config, cores=cores, instances=instances)
        _make_cache_dirs(chain, path)
        printed = io.StringIO()
        # Creating a GPU session allocates device memory: never during another session's capture.
        gate = CAPTURE_GATE.gpu_call() if chain[0][0] in GPU_PROVIDERS else contextlib.nullcontext()
        try:
            # ORT's Python layer may still *print* provider errors to stdout: keep stdout clean.
            with gate, captured_stdout() as printed:
                session = ort.InferenceSession(
                    source,
                    options,
                    providers=[p for p, _ in chain],
                    provider_options=[_ort_options(o) for _, o in chain],
                    enable_fallback=0,
                )
        except Exception as exc:  # ORT raises its own untyped errors (Fail, RuntimeException, ...)
            # A graph too new for ONNX Runtime is the file's fault, whatever the provider: refused now.
            _refuse_if_too_new(exc, path)
            if len(chain) == 1:
                raise
            if run_config.cuda_graph and chain[0][0] == CUDA:
                # CUDA graphs need every node on CUDA: retry CUDA without them before giving CUDA up.
                reason = f"CUDA graphs disabled: {str(exc)[:200]}"
                run_config = replace(run_config, cuda_graph=False)
                chain = chain_for([p for p, _ in chain], run_config)
            else:
                reason = f"{chain[0][0]} unavailable: {str(exc)[:200]}"
                chain = chain[1:]
            logger.warning("%s: %s", path, reason)
            fallbacks.append(reason)
            continue
        break
    # Run-time fallback too: an EP failure must surface as an error, not a silent provider switch.
    disable = getattr(session, "disable_fallback", None)
    if disable is not None:
        disable()
    if printed.getvalue().strip():
        logger.info("%s: onnxruntime said: %s", path, " ".join(printed.getvalue().split())[:500])
    used = list(session.get_providers())
    effective = {
        str(k): {str(a): str(b) for a, b in v.items()} for k, v in session.get_provider_options().items()
    }
    requested_first = chain[0][0]
    if used[0] != requested_first:
        reason = f"{requested_first} requested, session runs on {used[0]}"
        # INFO: the server logs ONE warning for a whole CPU-only host (runner.py), not one per model.
        logger.info("%s: %s", path, reason)
        fallbacks.append(reason)
    info = SessionInfo(
        session, used, path, "fp16" if fp16 else "fp32", fallbacks, effective, node_placement(session)
    )
    if config.cuda_graph and not info.cuda_graph:
        fallbacks.append(
            f"CUDA graphs need the CUDA provider with enable_cuda_graph; running on {used[0]} without them"
        )
    _log_gpu_session(info)
    return info


def _without_unusable_tensorrt(
    requested: Sequence[str], profile: ProfileShapes | None, path: Path, fallbacks: list[str]
) -> list[str]:
    """`requested` without TensorRT where its libraries do not load or there is no shape profile."""
    wanted = list(requested)
    if TENSORRT in wanted:
        why_not = tensorrt_loadable() or (
            "" if profile is not None else "no shape profile (TensorRT would build engines while serving)"
        )
        if why_not:
            wanted.remove(TENSORRT)
            fallbacks.append(f"{TENSORRT} skipped: {why_not}")
            logger.info("%s: %s skipped: %s", path, TENSORRT, why_not)
    return wanted


def _log_gpu_session(info: SessionInfo) -> None:
    """What a GPU session really runs with, and the nodes it leaves on the CPU."""
    if not info.on_gpu:
        return
    if info.cpu_nodes:
        logger.warning(
            "%s: %d of %d nodes run on the CPU provider (%s): each costs device-host copies per call",
            info.model_path,
            len(info.cpu_nodes),
            sum(len(ops) for ops in info.placement.values()),
            ", ".join(sorted(set(info.cpu_nodes))),
        )
    logger.info(
        "%s: %s; provider options %s",
        info.model_path,
        info.describe(),
        info.provider_options.get(info.provider, {}),
    )


def _make_cache_dirs(chain: Sequence[tuple[str, dict[str, str]]], path: Path) -> None:
    """Create TensorRT's cache directories; an unwritable one turns the cache off, not the model."""
    for name, options in chain:
        if name != TENSORRT or "trt_engine_cache_path" not in options:
            continue
        cache = options["trt_engine_cache_path"]
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # A read-only volume is a deployment choice: name where the cache was and how to move it.
            logger.warning(
                "%s: TensorRT engine cache %s unusable (%s): engines are built at every start; point "
                "trt_engine_cache_dir (--trt-engine-cache-dir, or runtime.trt_engine_cache_dir in the "
                "model's config.json) at a writable directory",
                path,
                cache,
                exc,
            )
            for key in [k for k in options if k.startswith(("trt_engine_cache", "trt_timing_cache"))]:
                del options[key]


@dataclass(frozen=True, slots=True)
class ModelChoice:
    path: Path
    precision: str
    reason: str = ""


def choose_model_file(
    version_dir: Path, precision: str, card_json: Mapping[str, Any] | None = None
) -> ModelChoice:
    """model.fp16.onnx when fp16 is asked for, present and within the card's fp16 parity; else fp32.
    Present is anything by that name (a link to one): a FIFO, a directory or a link to nothing there
    is chosen, for the load's sha256 check to refuse naming it, as a twin it cannot read; only no
    name serves fp32 (lexists: Path.exists follows a link, and reads a dangling one as absent)."""
    fp32 = ModelChoice(version_dir / "model.onnx", "fp32")
    if precision != "fp16":
        return fp32
    fp16_path = version_dir / "model.fp16.onnx"
    if not os.path.lexists(fp16_path):
        return replace(fp32, reason=f"precision fp16 requested but {fp16_path.name} is absent")
    if card_json is None:
        card_path = version_dir / "card.json"
        card_json = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    parity = card_json.get("parity") or {}
    if not isinstance(parity, Mapping):  # a record of the wrong type cannot vouch for fp16
        return replace(fp32, reason=f"card.json parity must be an object, got {parity!r}")
    diff = parity.get("fp16_max_abs_diff")
    atol = parity.get("fp16_atol") or FP16_ATOL
    if not isinstance(atol, int | float) or isinstance(atol, bool):
        return replace(fp32, reason=f"card.json parity.fp16_atol must be a number, got {atol!r}")
    if not isinstance(diff, int | float) or not diff <= atol:
        return replace(fp32, reason=f"fp16 export parity {diff!r} not within {atol:g} in card.json")
    return ModelChoice(fp16_path, "fp16")


def max_abs_diff(reference: Sequence[Array], candidate: Sequence[Array]) -> float:
    """Largest |a - b| over all outputs (float64); inf when shapes differ or anything is non-finite."""
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        if a.shape != b.shape:
            return float("inf")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if diff.size:
            value = float(diff.max())
            if not np.isfinite(value):
                return float("inf")
            worst = max(worst, value)
    return worst

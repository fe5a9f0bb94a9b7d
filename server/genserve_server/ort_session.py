"""ONNX Runtime sessions as genserve tunes them: options, providers, IO binding, fp16, CUDA graphs.

One place decides how a model file becomes a session, so that the server's runner, the benchmark's
raw-limit measurement (bench/raw_limit.py) and the tests all run the same configuration:

* `session_options()`: threads sized to the cores (intra-op = cores // instances, one inter-op
  thread, sequential execution), full graph optimisation, the CPU memory arena, and intra-op
  spinning off by default: spinning workers burn a core while the event loop and the encode pool
  want it (2-core machines), for no gain once a batch is a few ms of work.
* `provider_chain()`: the configured execution providers with their options: TensorRT with an
  engine cache (and timing cache) under `trt_engine_cache_dir`, fp16 when the precision is fp16,
  explicit min/opt/max profile shapes; CUDA with `enable_cuda_graph` when CUDA graphs are on.
* `create_session()`: builds the session and falls back cleanly: a provider that cannot be created
  is dropped and the next one tried, ending on the CPU provider. What the session really uses is
  `session.get_providers()` (`get_available_providers()` lists CUDA on machines with no GPU).
* `SessionRunner`: runs a batch, plainly or with IO binding (which works on the CPU provider too:
  outputs land in preallocated numpy arrays, no copy); with CUDA graphs, one captured graph per
  batch size, inputs padded up to the nearest captured size and outputs cropped back.
* `choose_model_file()` and `check_fp16_parity()`: fp16 only where the card's export parity and a
  check on the provider really in use are within `fp16_atol` (1e-2); fp32 otherwise, with a reason.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

# config.json's `runtime` object is part of the model-repository contract (validated there, shared
# with export/); re-exported here for the modules that build sessions from it.
from genserve_contract.repository import FP16_ATOL as FP16_ATOL
from genserve_contract.runtime import GRAPH_OPTIMIZATION_LEVELS
from genserve_contract.runtime import RuntimeConfig as RuntimeConfig
from genserve_contract.runtime import RuntimeConfigError as RuntimeConfigError
from genserve_contract.runtime import parse_runtime_config as parse_runtime_config

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
_NP_DTYPES: Final[dict[str, type[np.generic]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
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
    options.log_severity_level = 4  # ORT's lines bypass logging (providers.py); errors raise
    return options


@dataclass(frozen=True, slots=True)
class ProfileShapes:
    """TensorRT optimisation profile: min/opt/max shape of each dynamic input."""

    min_shapes: Mapping[str, Sequence[int]]
    opt_shapes: Mapping[str, Sequence[int]]
    max_shapes: Mapping[str, Sequence[int]]


def _shape_string(shapes: Mapping[str, Sequence[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def provider_chain(
    requested: Sequence[str],
    config: RuntimeConfig,
    *,
    fp16: bool = False,
    profile: ProfileShapes | None = None,
    device_id: int = 0,
) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) pairs in preference order, always ending with the CPU provider."""
    chain: list[tuple[str, dict[str, str]]] = []
    for name in requested:
        if name == TENSORRT:
            trt: dict[str, str] = {
                "device_id": str(device_id),
                "trt_max_workspace_size": str(config.trt_max_workspace_bytes),
                "trt_fp16_enable": "True" if fp16 else "False",
            }
            if config.trt_engine_cache_dir:
                cache = str(Path(config.trt_engine_cache_dir))
                trt |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": cache,
                }
            if profile is not None:
                trt |= {
                    "trt_profile_min_shapes": _shape_string(profile.min_shapes),
                    "trt_profile_opt_shapes": _shape_string(profile.opt_shapes),
                    "trt_profile_max_shapes": _shape_string(profile.max_shapes),
                }
            chain.append((TENSORRT, trt))
        elif name == CUDA:
            cuda = {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC"}
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


@dataclass(slots=True)
class SessionInfo:
    """A created session and what it really runs on."""

    session: ort.InferenceSession
    providers: list[str]
    model_path: Path
    precision: str
    # Why a requested provider or feature is not in use (empty when everything requested is).
    fallbacks: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS


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
) -> SessionInfo:
    """Create a session on the first provider of `requested` that works, falling back down the chain.

    A GPU provider that raises at creation (no driver, an op TensorRT cannot build, CUDA graphs with
    a node on the CPU) is dropped and the session built again; the CPU provider is always last.
    """
    source = str(model) if isinstance(model, Path) else model
    path = model if isinstance(model, Path) else (model_path or Path("<bytes>"))
    chain = provider_chain(requested, config, fp16=fp16, profile=profile)
    fallbacks: list[str] = []
    run_config = config
    while True:
        options = session_options(run_config, cores=cores, instances=instances)
        printed = io.StringIO()
        try:
            # ORT's Python layer *prints* "EP Error ... Falling back" to stdout when a provider fails
            # to load (e.g. TensorRT without its libraries): keep stdout clean, log it instead.
            with contextlib.redirect_stdout(printed):
                session = ort.InferenceSession(
                    source, options, providers=[p for p, _ in chain], provider_options=[o for _, o in chain]
                )
        except Exception as exc:  # ORT raises its own untyped errors (Fail, RuntimeException, ...)
            if len(chain) == 1:
                raise
            if run_config.cuda_graph and chain[0][0] == CUDA:
                # CUDA graphs need every node on CUDA: retry CUDA without them before giving CUDA up.
                reason = f"CUDA graphs disabled: {str(exc)[:200]}"
                run_config = replace(run_config, cuda_graph=False)
                chain = provider_chain([p for p, _ in chain], run_config, fp16=fp16, profile=profile)
            else:
                reason = f"{chain[0][0]} unavailable: {str(exc)[:200]}"
                chain = chain[1:]
            logger.warning("%s: %s", path, reason)
            fallbacks.append(reason)
            continue
        break
    if printed.getvalue().strip():
        logger.info("%s: onnxruntime said: %s", path, " ".join(printed.getvalue().split())[:500])
    used = list(session.get_providers())
    requested_first = chain[0][0]
    if used[0] != requested_first:
        reason = f"{requested_first} requested, session runs on {used[0]}"
        # INFO: the server logs ONE warning for a whole CPU-only host (runner.py), not one per model.
        logger.info("%s: %s", path, reason)
        fallbacks.append(reason)
    if config.cuda_graph and used[0] != CUDA:
        fallbacks.append(f"CUDA graphs need the CUDA provider; running on {used[0]} without them")
    return SessionInfo(session, used, path, "fp16" if fp16 else "fp32", fallbacks)


# --------------------------------------------------------------------------- running


class SessionRunner:
    """Runs batches on one session: plain `run`, IO binding, or CUDA graphs (per batch size).

    Not thread-safe for IO binding / CUDA graphs (one binding and one set of buffers per runner):
    use one runner per executor thread, as the server does with one session per instance.
    """

    def __init__(self, info: SessionInfo, config: RuntimeConfig) -> None:
        self.info = info
        self.session = info.session
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = [_NP_DTYPES.get(o.type, np.float32) for o in self.session.get_outputs()]
        self.use_cuda_graph = config.cuda_graph and info.provider == CUDA
        self.use_io_binding = config.uses_io_binding
        self.graph_sizes = sorted(config.cuda_graph_batch_sizes)
        self.device = "cuda" if info.on_gpu else "cpu"
        # Output shapes seen for each input shape signature, so outputs can be preallocated.
        self._output_shapes: dict[tuple[tuple[int, ...], ...], list[tuple[int, ...]]] = {}
        self._graphs: dict[int, _CapturedGraph] = {}

    @property
    def mode(self) -> str:
        if self.use_cuda_graph:
            return "cuda_graph"
        return "io_binding" if self.use_io_binding else "run"

    def run(self, feeds: Mapping[str, Array]) -> list[Array]:
        """Outputs in graph order, each with the batch size of the inputs."""
        if self.use_cuda_graph:
            return self._run_cuda_graph(feeds)
        if self.use_io_binding:
            return self._run_io_binding(feeds)
        return list(self.session.run(self.output_names, dict(feeds)))

    def _run_io_binding(self, feeds: Mapping[str, Array]) -> list[Array]:
        binding = self.session.io_binding()
        key = tuple(tuple(feeds[name].shape) for name in self.input_names)
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        shapes = self._output_shapes.get(key)
        if self.device == "cpu" and shapes is not None:
            # Bind preallocated numpy outputs: ORT writes into them, nothing is copied afterwards.
            outputs = [np.empty(s, dtype=d) for s, d in zip(shapes, self.output_dtypes, strict=True)]
            for name, array in zip(self.output_names, outputs, strict=True):
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            self.session.run_with_iobinding(binding)
            return outputs
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        result: list[Array] = binding.copy_outputs_to_cpu()
        self._output_shapes[key] = [tuple(r.shape) for r in result]
        return result

    def _run_cuda_graph(self, feeds: Mapping[str, Array]) -> list[Array]:
        n = int(feeds[self.input_names[0]].shape[0])
        index = bisect.bisect_left(self.graph_sizes, n)
        if index == len(self.graph_sizes):
            # Larger than every captured size: run in captured-size chunks.
            step = self.graph_sizes[-1]
            parts = [
                self._run_cuda_graph({k: v[i : i + step] for k, v in feeds.items()})
                for i in range(0, n, step)
            ]
            return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]
        size = self.graph_sizes[index]
        padded = {name: _pad_batch(np.ascontiguousarray(feeds[name]), size) for name in self.input_names}
        graph = self._graphs.get(size)
        if graph is None or not graph.fits(padded):
            graph = _CapturedGraph(self.session, self.input_names, self.output_names, padded, graph_id=size)
            self._graphs[size] = graph
        return [out[:n] for out in graph.run(padded)]


def _pad_batch(array: Array, size: int) -> Array:
    """Pad the batch axis up to `size` by repeating the last row (valid inputs, results cropped off)."""
    n = array.shape[0]
    if n == size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - n, axis=0)])


class _CapturedGraph:
    """Device buffers with fixed addresses for one input shape, replayed as a CUDA graph."""

    def __init__(
        self,
        session: ort.InferenceSession,
        input_names: list[str],
        output_names: list[str],
        feeds: Mapping[str, Array],
        graph_id: int,
    ) -> None:
        self.session = session
        self.shapes = {name: tuple(feeds[name].shape) for name in input_names}
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(feeds[name], "cuda", 0) for name in input_names}
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name in output_names:
            self.binding.bind_output(name, "cuda")
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        # The first run captures the graph; later runs replay it on the same buffers.
        session.run_with_iobinding(self.binding, self.run_options)

    def fits(self, feeds: Mapping[str, Array]) -> bool:
        return all(tuple(feeds[name].shape) == shape for name, shape in self.shapes.items())

    def run(self, feeds: Mapping[str, Array]) -> list[Array]:
        for name, value in self.inputs.items():
            value.update_inplace(feeds[name])
        self.session.run_with_iobinding(self.binding, self.run_options)
        result: list[Array] = self.binding.copy_outputs_to_cpu()
        return result


# --------------------------------------------------------------------------- fp16


@dataclass(frozen=True, slots=True)
class ModelChoice:
    path: Path
    precision: str
    reason: str = ""


def choose_model_file(
    version_dir: Path, precision: str, card_json: Mapping[str, Any] | None = None
) -> ModelChoice:
    """model.fp16.onnx when fp16 is asked for, present and within the card's fp16 parity; else fp32."""
    fp32 = ModelChoice(version_dir / "model.onnx", "fp32")
    if precision != "fp16":
        return fp32
    fp16_path = version_dir / "model.fp16.onnx"
    if not fp16_path.is_file():
        return replace(fp32, reason=f"precision fp16 requested but {fp16_path.name} is absent")
    if card_json is None:
        card_path = version_dir / "card.json"
        card_json = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    parity = card_json.get("parity") or {}
    diff = parity.get("fp16_max_abs_diff")
    atol = float(parity.get("fp16_atol") or FP16_ATOL)
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


def check_fp16_parity(
    fp32: SessionRunner, fp16: SessionRunner, feeds: Mapping[str, Array], atol: float = FP16_ATOL
) -> tuple[bool, float]:
    """Run both on `feeds` (on the provider really in use); (within atol?, max abs diff)."""
    diff = max_abs_diff(fp32.run(feeds), fp16.run(feeds))
    return diff <= atol, diff

"""config.json's optional `runtime` object: how the server builds a model's ONNX Runtime sessions.

Pure data and validation; server/genserve_server/ort_session.py turns it into sessions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from genserve_contract.repository import FP16_ATOL

GRAPH_OPTIMIZATION_LEVELS: Final = ("disable", "basic", "extended", "all")


def ort_path(path: Path) -> str:
    """`path` as ONNX Runtime's binding takes it: a str it encodes to UTF-8 for the file system. Under
    a locale that is not UTF-8 (LANG=C without Python's UTF-8 mode) Python holds a non-ASCII name's
    bytes as lone surrogates, which the binding refuses (TypeError); the bytes decode as UTF-8 here.
    Bytes that are not UTF-8 keep their surrogates. Shared by the server's sessions and export's."""
    return os.fsencode(path).decode("utf-8", "surrogateescape")


class RuntimeConfigError(ValueError):
    """A `runtime` setting is invalid; the message names the field and the value."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """How a model's sessions are built: config.json's optional `runtime` object (every field optional).

    Times and sizes carry their unit in the name; `None` means "not set", never a magic number.
    """

    # ONNX Runtime intra-op threads per session; 0 = cores // instances (at least 1).
    intra_op_threads: int = 0
    # Inter-op threads (only used by the parallel executor, which genserve does not enable).
    inter_op_threads: int = 1
    # "disable", "basic", "extended" or "all" (ORT_ENABLE_ALL: layout and CPU kernel fusions).
    graph_optimization: str = "all"
    # Intra-op worker threads busy-wait for work; off by default (ort_session's module docstring).
    allow_spinning: bool = False
    # ORT's CPU arena keeps freed buffers for the next batch (fewer page faults on big tensors).
    cpu_mem_arena: bool = True
    # Plan buffer reuse from the first run of each shape.
    mem_pattern: bool = True
    # With several instances on the CPU provider (and threads not pinned), a batch that runs while
    # no other is running goes to a second session with intra-op threads = cores: one call on all
    # cores when alone (latency at low load), one single-threaded call per core when busy (throughput:
    # small convolutions parallelise badly inside one call, ~1.5-2x on 2 cores). Costs a second
    # session's memory.
    solo_session: bool = True
    # Run through IO binding: preallocated outputs (CPU and GPU), device-resident tensors (GPU).
    io_binding: bool = False
    # CUDA graphs (CUDA provider only, needs fixed shapes): capture one graph per batch size in
    # `cuda_graph_batch_sizes`, pad each batch up to the nearest one. Implies io_binding.
    cuda_graph: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 8, 64)
    # TensorRT engine and timing cache directory; None = TensorRT builds engines in memory only.
    # Engines go to a subdirectory per model sha256, precision, profile and GPU (engine_cache_key):
    # ORT's own cache id hashes file and tensor names, not weights, so version 2 would load v1's engine.
    trt_engine_cache_dir: str | None = None
    # TensorRT max workspace, bytes.
    trt_max_workspace_bytes: int = 2 * 1024**3
    # Max |fp16 - fp32| accepted by the fp16 parity check before fp16 is refused.
    fp16_atol: float = FP16_ATOL
    # The GPU the CUDA and TensorRT providers run on.
    device_id: int = 0
    # TF32 tensor-core math for fp32 MatMul/Conv on Ampere and newer (CUDA provider `use_tf32`, which
    # ORT turns on by default): off, so that "fp32" means fp32; on trades ~1e-3 relative error for speed.
    use_tf32: bool = False
    # CUDA provider memory arena cap in bytes (`gpu_mem_limit`); 0 = no cap (ORT's default: all of it).
    gpu_mem_limit_bytes: int = 0
    # How the CUDA arena grows: "kNextPowerOfTwo" (ORT's default) or "kSameAsRequested" (tighter).
    arena_extend_strategy: str = "kNextPowerOfTwo"
    # cuDNN may use the largest workspace a convolution asks for (faster algorithms, more memory).
    cudnn_conv_use_max_workspace: bool = True

    @property
    def uses_io_binding(self) -> bool:
        return self.io_binding or self.cuda_graph


RUNTIME_FIELDS: Final = frozenset(RuntimeConfig.__dataclass_fields__)
# ONNX Runtime starts a session's threads when it is built: far more than any machine's cores kept a
# load building them (20000: 1.7 GB, SIGTERM unanswered for minutes), and past a C int pybind refused
# the value naming no field. The server config's intra_op_threads has the same bound.
MAX_THREADS: Final = 1024
INT_MAXIMA: Final = {"intra_op_threads": MAX_THREADS, "inter_op_threads": MAX_THREADS}
# The string fields with a fixed set of values (ort_session maps graph_optimization to ORT's levels).
STRING_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "graph_optimization": GRAPH_OPTIMIZATION_LEVELS,
    "arena_extend_strategy": ("kNextPowerOfTwo", "kSameAsRequested"),
}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_runtime_value(name: str, value: Any, default: Any, key: str) -> Any:
    """The validated value of one `runtime` field (its type is that of the field's default)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RuntimeConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        most = INT_MAXIMA.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RuntimeConfigError(f"{key} must be an integer >= 0, got {value!r}")
        if most is not None and value > most:
            raise RuntimeConfigError(f"{key} must be an integer >= 0 and <= {most}, got {value}")
        return value
    if isinstance(default, float):
        # Python's json reads Infinity and NaN: fp16_atol Infinity passed any fp16 parity check.
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
            raise RuntimeConfigError(f"{key} must be a finite number > 0, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not value or not all(_is_positive_int(v) for v in value):
            raise RuntimeConfigError(f"{key} must be a non-empty list of integers >= 1, got {value!r}")
        return tuple(sorted(set(value)))
    choices = STRING_CHOICES.get(name)
    if choices is not None:
        if value not in choices:
            raise RuntimeConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        return value
    # trt_engine_cache_dir
    if value is not None and (not isinstance(value, str) or not value):
        raise RuntimeConfigError(f"{key} must be a directory path or null, got {value!r}")
    return value


def parse_runtime_config(data: Any, where: str = "config.json") -> RuntimeConfig:
    """Read config.json's `runtime` object (None = all defaults); errors name file, field and value."""
    if data is None:
        return RuntimeConfig()
    if not isinstance(data, Mapping):
        raise RuntimeConfigError(f"{where}: runtime must be a JSON object, got {data!r}")
    unknown = sorted(set(data) - RUNTIME_FIELDS)
    if unknown:
        known = ", ".join(sorted(RUNTIME_FIELDS))
        raise RuntimeConfigError(f"{where}: runtime.{unknown[0]} is not a known field (known: {known})")
    defaults = RuntimeConfig()
    values = {
        name: _check_runtime_value(name, value, getattr(defaults, name), f"{where}: runtime.{name}")
        for name, value in data.items()
    }
    return replace(defaults, **values)

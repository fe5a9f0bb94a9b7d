"""Which GPU execution providers really work in this process: probed once, remembered, logged once.

`onnxruntime-gpu` lists TensorRT and CUDA in `get_available_providers()` on any machine, GPU or not;
only a session tells what it really runs on. Asking for them in every model's sessions on a CPU
machine made ONNX Runtime print its library-load failures (`[E:onnxruntime ... Failed to load
library`) once per session, straight to stderr, past `--log-level` and through `--log-json`. So the
first time GPU providers are asked for, one session of a one-node graph is built with them (ONNX
Runtime's logging off, its stdout prints captured; after `onnxruntime.preload_dlls()` where CUDA comes
from pip's `nvidia-*` packages, as for model sessions), the providers it really uses are remembered for
the life of the process, and one line says what was found. Model sessions then ask only for what
works.

ONNX Runtime writes its own log lines to stderr, unformatted; `quiet_onnxruntime()` turns them off
(severity 4 = FATAL only: FACTS.md, severity 3 still lets the provider-library load errors through).
What goes wrong in a session surfaces as an exception, which genserve logs in its own format.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Sequence

import onnxruntime as ort

from genserve_server.ort_session import captured_stdout, preload_cuda_libraries

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# ONNX Runtime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
ORT_SEVERITY_FATAL = 4

_lock = threading.Lock()
_probed: dict[str, bool] = {}


def quiet_onnxruntime() -> None:
    """Keep ONNX Runtime's own (unformatted) log lines off stderr for the whole process."""
    ort.set_default_logger_severity(ORT_SEVERITY_FATAL)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: varint (int) or length-delimited (bytes)."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def probe_model() -> bytes:
    """An ONNX model, `y = Identity(x)` on a float tensor, encoded by hand: the server has no `onnx`."""
    tensor_type = _field(1, _field(1, 1))  # TypeProto.tensor_type.elem_type = FLOAT
    x = _field(1, b"x") + _field(2, tensor_type)  # ValueInfoProto name, type
    y = _field(1, b"y") + _field(2, tensor_type)
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")  # NodeProto input, output, op_type
    graph = _field(1, node) + _field(2, b"probe") + _field(11, x) + _field(12, y)
    opset = _field(1, b"") + _field(2, 17)  # OperatorSetIdProto domain "", version 17
    return _field(1, 8) + _field(7, graph) + _field(8, opset)  # ir_version 8, graph, opset_import


def _probe(candidates: Sequence[str]) -> list[str]:
    """Build one session asking for `candidates` (+ CPU); the GPU providers it really uses."""
    options = ort.SessionOptions()
    options.log_severity_level = ORT_SEVERITY_FATAL
    printed = io.StringIO()
    try:
        with captured_stdout() as printed, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(probe_model(), options, providers=[*candidates, CPU])
    except Exception as exc:  # ORT's own untyped errors: nothing GPU works here
        logger.debug("GPU provider probe failed: %r", exc)
        return []
    if printed.getvalue().strip():
        logger.debug("onnxruntime said: %s", " ".join(printed.getvalue().split())[:500])
    return [p for p in session.get_providers() if p in GPU_PROVIDERS]


def usable_providers(requested: Sequence[str]) -> list[str]:
    """`requested` without the GPU providers that do not work in this process; CPU always last.

    The first call that asks for a GPU provider probes all of them (quietly) and logs one line;
    later calls reuse the answer.
    """
    available = set(ort.get_available_providers())
    wanted = [p for p in requested if p in available and p != CPU]
    gpu_wanted = [p for p in wanted if p in GPU_PROVIDERS]
    if gpu_wanted:
        with _lock:
            if not _probed:
                quiet_onnxruntime()
                # CUDA from pip's nvidia-* packages loads only after preload_dlls(): probing before
                # it would remember CUDA as unusable for the life of the process.
                preload_cuda_libraries()
                offered = [p for p in GPU_PROVIDERS if p in available]
                works = set(_probe(offered))
                _probed.update({p: p in works for p in GPU_PROVIDERS})
                if works:
                    logger.info(
                        "execution providers: %s usable here (probed once; %s not)",
                        ", ".join(p for p in GPU_PROVIDERS if p in works),
                        ", ".join(p for p in GPU_PROVIDERS if p not in works) or "none",
                    )
                else:
                    logger.warning(
                        "execution providers: no GPU provider works here (%s offered by onnxruntime %s, "
                        "none could run a session: no GPU, driver or CUDA libraries); models that ask "
                        "for them run on %s",
                        ", ".join(offered) or "none",
                        ort.__version__,
                        CPU,
                    )
    return [p for p in wanted if _probed.get(p, True)] + [CPU]


def gpu_probe_result() -> dict[str, bool]:
    """What the probe found ({} before any GPU provider was asked for)."""
    with _lock:
        return dict(_probed)

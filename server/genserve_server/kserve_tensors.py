"""KServe v2 tensors <-> numpy: datatypes, protocol shapes, request parameters and inputs.

The wire side of kserve.py's ModelInfer; values leave here as numpy arrays for the serving core.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import model_config_pb2 as mc
from genserve_server.config import Card, TensorSpec
from genserve_server.errors import invalid

# card dtype -> (protocol datatype, config DataType, numpy little-endian dtype)
DTYPES: dict[str, tuple[str, int, str]] = {
    "float32": ("FP32", mc.TYPE_FP32, "<f4"),
    "float16": ("FP16", mc.TYPE_FP16, "<f2"),
    "int64": ("INT64", mc.TYPE_INT64, "<i8"),
}
# InferTensorContents field per protocol datatype, for clients that send typed contents.
CONTENTS_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents"}
# Triton's system and CUDA shared-memory extensions (a tensor's parameter naming a registered
# region) are not served: ServerMetadata does not list them and their Register RPCs are UNIMPLEMENTED.
SHARED_MEMORY_REGION = "shared_memory_region"
NO_SHARED_MEMORY = "not supported (the shared-memory extensions are not served)"


def protocol_datatype(spec: TensorSpec) -> str:
    return DTYPES.get(spec.dtype, ("FP32", mc.TYPE_FP32, "<f4"))[0]


def protocol_shape(spec: TensorSpec) -> list[int]:
    """The protocol shape of a card tensor, batch axis first. A batch-only tensor (card shape [-1],
    e.g. `label`) is [-1, 1]: Triton's config needs non-empty dims after the batch axis, and
    perf_analyzer cannot set a shape from empty dims."""
    return list(spec.shape) if len(spec.shape) > 1 else [*spec.shape[:1], 1]


def _param(params: Any, name: str, accepted: tuple[str, ...], what: str) -> Any:
    """The value of request parameter `name` when it is one of the `accepted` choices; None when absent."""
    if name not in params:
        return None
    param = params[name]
    choice = param.WhichOneof("parameter_choice")
    if choice not in accepted:
        raise invalid(f"parameters[{name}]", f"must be {what} parameter, got {choice or 'nothing'}")
    return getattr(param, choice)


def param_int(params: Any, name: str) -> int | None:
    """An integer request parameter (int64_param or uint64_param), or None when absent."""
    value = _param(params, name, ("int64_param", "uint64_param"), "an int64")
    return None if value is None else int(value)


def param_float(params: Any, name: str) -> float | None:
    """A floating-point request parameter (double_param, or an integer one), or None when absent."""
    value = _param(params, name, ("double_param", "int64_param", "uint64_param"), "a double")
    return None if value is None else float(value)


def read_inputs(request: kpb.ModelInferRequest, card: Card) -> dict[str, np.ndarray]:
    """Every input tensor as a numpy array of the card's dtype and the request's shape."""
    specs = {s.name: s for s in card.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            "raw_input_contents",
            f"must have one entry per input ({len(request.inputs)}), got {len(raw)}",
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        spec = specs.get(tensor.name)
        if spec is None:
            raise invalid(
                f"{where}.name",
                f"{card.name} has inputs {sorted(specs)}, got {tensor.name!r}",
                verbatim=repr(tensor.name),
            )
        if tensor.name in arrays:
            raise invalid(f"{where}.name", f"input {tensor.name!r} given twice")
        datatype, _, np_dtype = DTYPES[spec.dtype]
        if tensor.datatype != datatype:
            raise invalid(
                f"{where}.datatype",
                f"{tensor.name} must be {datatype}, got {tensor.datatype!r}",
                verbatim=repr(tensor.datatype),
            )
        shape = tuple(int(d) for d in tensor.shape)
        # The model's rank (or the protocol's, [N, 1] for a batch-only tensor) before numpy sees
        # the shape: numpy refuses over 64 dims, or zero-size shapes whose other dims overflow.
        ranks = sorted({len(spec.shape), len(protocol_shape(spec))})
        if len(shape) not in ranks:
            forms = " or ".join(f"{n} dims" for n in ranks)
            raise invalid(
                f"{where}.shape",
                f"{tensor.name} must have {forms} ({protocol_shape(spec)}), got {len(shape)}",
            )
        if any(d < 0 for d in shape):
            raise invalid(f"{where}.shape", f"must be non-negative, got {list(shape)}")
        itemsize = np.dtype(np_dtype).itemsize
        if math.prod(d for d in shape if d) * itemsize > np.iinfo(np.intp).max:
            raise invalid(
                f"{where}.shape",
                f"{list(shape)} is too large: {itemsize}-byte values, over {np.iinfo(np.intp).max} bytes",
            )
        n_values = math.prod(shape)
        if SHARED_MEMORY_REGION in tensor.parameters:
            raise invalid(
                f"{where}.parameters[{SHARED_MEMORY_REGION}]",
                f"{NO_SHARED_MEMORY}: send {tensor.name} in raw_input_contents or contents",
            )
        if raw and tensor.contents.ListFields():
            raise invalid(f"{where}.contents", "must not be set when raw_input_contents is used")
        if raw:
            data = raw[i]
            if len(data) != n_values * itemsize:
                raise invalid(
                    f"raw_input_contents[{i}]",
                    f"{tensor.name} of shape {list(shape)} needs {n_values * itemsize} bytes, "
                    f"got {len(data)}",
                )
            array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
        else:
            field = CONTENTS_FIELD.get(datatype)
            if field is None:  # the protocol: FP16 (and BF16) travel as raw bytes only
                raise invalid(
                    f"{where}.contents",
                    f"{datatype} has no typed contents: send {tensor.name} in raw_input_contents",
                )
            values = getattr(tensor.contents, field)
            if len(values) != n_values:
                # Values in a field this datatype does not use: say so, not that none were sent.
                elsewhere = [
                    f"{len(v)} values in {f.name}" for f, v in tensor.contents.ListFields() if f.name != field
                ]
                unused = f" ({', '.join(elsewhere)}, which {datatype} does not use)" if elsewhere else ""
                raise invalid(
                    f"{where}.contents",
                    f"{tensor.name} of shape {list(shape)} needs {n_values} values in {field}, "
                    f"got {len(values)}{unused}",
                )
            array = np.asarray(values, dtype=np_dtype).reshape(shape)
        arrays[tensor.name] = array
    return arrays


def requested_outputs(request: kpb.ModelInferRequest, card: Card) -> list[TensorSpec]:
    if not request.outputs:
        return list(card.outputs)
    by_name = {s.name: s for s in card.outputs}
    chosen = []
    for i, output in enumerate(request.outputs):
        spec = by_name.get(output.name)
        if spec is None:
            raise invalid(
                f"outputs[{i}].name",
                f"{card.name} has outputs {sorted(by_name)}, got {output.name!r}",
                verbatim=repr(output.name),
            )
        if spec in chosen:
            raise invalid(f"outputs[{i}].name", f"output {output.name!r} requested twice")
        if "classification" in output.parameters:  # Triton's extension: top-k as BYTES, not served
            raise invalid(
                f"outputs[{i}].parameters[classification]",
                "not supported (the classification extension is not served): outputs are raw tensors",
            )
        if SHARED_MEMORY_REGION in output.parameters:  # the region would never be written
            raise invalid(
                f"outputs[{i}].parameters[{SHARED_MEMORY_REGION}]",
                f"{NO_SHARED_MEMORY}: outputs come in raw_output_contents",
            )
        chosen.append(spec)
    return chosen


def output_bytes(spec: TensorSpec, card: Card, n: int, image_shape: tuple[int, ...] | None) -> int:
    """Bytes of one output for n rows; dynamic H/W follow the input image (times the SR scale)."""
    dims = list(spec.shape[1:])
    if any(d < 0 for d in dims) and image_shape is not None and len(dims) == 3:
        _, _, h, w = image_shape
        scale = max(1, card.scale_factor)
        dims = [dims[0] if dims[0] > 0 else card.channels, h * scale, w * scale]
    return n * math.prod(max(d, 1) for d in dims) * np.dtype(DTYPES[spec.dtype][2]).itemsize

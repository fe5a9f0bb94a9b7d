"""torch → ONNX export, offline graph optimisation, and ONNX Runtime helpers."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from genserve_contract.runtime import ort_path

logger = logging.getLogger(__name__)

OPSET = 18
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}

# ONNX Runtime on a machine without CUDA still lists the CUDA provider and logs an error per
# session; export and verify only ever run on CPU, so keep the log to real errors.
ort.set_default_logger_severity(3)


class NamedOutputs(nn.Module):
    """Calls ``module`` positionally and returns its outputs as a tuple in the kind's order.

    Accepts a tensor, a tuple/list (taken in order) or a dict (taken by output name).
    ``half`` runs the module in float16 while keeping float32 inputs and outputs.
    """

    def __init__(self, module: nn.Module, output_names: Sequence[str], half: bool = False) -> None:
        super().__init__()
        self.module = module
        self.output_names = tuple(output_names)
        self.run_in_half = half

    def run(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.run_in_half:
            args = tuple(a.half() if a.is_floating_point() else a for a in args)
        result = self.module(*args)
        if isinstance(result, torch.Tensor):
            outputs: tuple[Any, ...] = (result,)
        elif isinstance(result, Mapping):
            outputs = tuple(result[name] for name in self.output_names)
        else:
            outputs = tuple(result)
        if self.run_in_half:
            outputs = tuple(o.float() for o in outputs)
        return outputs


class _ZInput(NamedOutputs):
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(z)


class _ZLabelInput(NamedOutputs):
    def forward(self, z: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(z, label)


class _ImageInput(NamedOutputs):
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(image)


class _ImageDirectionInput(NamedOutputs):
    """A two-way translator: images and their direction [N] (0 = A->B, 1 = B->A)."""

    def forward(self, image: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(image, direction)


class _WsInput(NamedOutputs):
    """A style generator's synthesis network: per-layer styles [N, num_layers, w_dim]."""

    def forward(self, ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(ws)


class _CodesInput(NamedOutputs):
    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(codes)


class _CodesLabelInput(NamedOutputs):
    def forward(self, codes: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(codes, label)


class _CodesTopInput(NamedOutputs):
    def forward(self, codes: torch.Tensor, top_codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(codes, top_codes)


class _CodesLabelTopInput(NamedOutputs):
    def forward(
        self, codes: torch.Tensor, label: torch.Tensor, top_codes: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self.run(codes, label, top_codes)


# forward() argument names are the ONNX input names, so each input combination has its own adapter.
_ADAPTERS: dict[tuple[str, ...], type[NamedOutputs]] = {
    ("z",): _ZInput,
    ("z", "label"): _ZLabelInput,
    ("image",): _ImageInput,
    ("image", "direction"): _ImageDirectionInput,
    ("codes",): _CodesInput,
    ("codes", "label"): _CodesLabelInput,
    ("codes", "top_codes"): _CodesTopInput,
    ("codes", "label", "top_codes"): _CodesLabelTopInput,
    ("ws",): _WsInput,
}


def adapt(
    module: nn.Module, input_names: Sequence[str], output_names: Sequence[str], half: bool = False
) -> NamedOutputs:
    """Wrap ``module`` so that forward() argument names are the ONNX input names."""
    return _ADAPTERS[tuple(input_names)](module, output_names, half=half).eval()


def dynamic_shapes_for(
    input_names: Sequence[str], fully_convolutional: bool, size_multiple: int
) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for torch.onnx.export: batch always, H/W for fully convolutional kinds."""
    batch = Dim("batch", min=1, max=1 << 16)
    shapes: dict[str, dict[int, Any]] = {}
    for name in input_names:
        axes: dict[int, Any] = {0: batch}
        if name == "image" and fully_convolutional:
            if size_multiple > 1:
                # A plain dynamic H exports but fails at run time in Concat for sizes that are not
                # multiples of the net's stride (shared FACTS); declare the multiple instead.
                axes[2] = Dim("h_m", min=1, max=4096) * size_multiple
                axes[3] = Dim("w_m", min=1, max=4096) * size_multiple
            else:
                axes[2] = Dim("height", min=2, max=8192)
                axes[3] = Dim("width", min=2, max=8192)
        shapes[name] = axes
    return shapes


def torch_export(
    module: nn.Module,
    example: Mapping[str, torch.Tensor],
    dynamic_shapes: Mapping[str, Any],
    output_names: Sequence[str],
    opset: int = OPSET,
) -> onnx.ModelProto:
    """torch.onnx.export with the recipe that works on torch 2.13 (shared FACTS)."""
    # The dynamo exporter prints progress lines to stdout even when verbose=False.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module,
            tuple(example.values()),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            dynamic_shapes=dict(dynamic_shapes),
            input_names=list(example),
            output_names=list(output_names),
            verbose=False,
            # Its onnxscript optimizer removes an Add of a constant within 1e-8 of 0 as an Add of 0:
            # a norm's eps (StyleGAN's pixel norm, + 1e-8) vanished, NaN at z = 0. optimize_offline
            # runs ONNX Runtime's own constant folding and redundant-node elimination instead.
            optimize=False,
        )
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def optimize_offline(model: onnx.ModelProto, out_path: Path) -> onnx.ModelProto:
    """Run ONNX Runtime's basic graph optimisations once and save the optimised graph.

    Only the *basic* level is applied offline: it is provider independent (constant folding,
    redundant-node elimination); the extended/layout levels fuse into CPU-specific kernels that the
    CUDA and TensorRT providers could not run, so those stay online at session creation.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = ort_path(out_path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(out_path))
    onnx.checker.check_model(optimized)
    return optimized


def session(path_or_bytes: Path | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session (export and verify check the graph itself, not a provider's speed)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = ort_path(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``sess`` and return its outputs by name."""
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, dict(feeds))
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def graph_signature(sess: ort.InferenceSession) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs as card entries: ``{name, dtype, shape}`` with -1 for symbolic axes."""

    def entry(arg: Any) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        return {"name": arg.name, "dtype": ORT_DTYPES.get(arg.type, arg.type), "shape": shape}

    return [entry(a) for a in sess.get_inputs()], [entry(a) for a in sess.get_outputs()]


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def store_weights_fp16(model: onnx.ModelProto, min_elements: int = 16) -> tuple[onnx.ModelProto, int]:
    """Store the large float32 initializers as float16, each read through a Cast back to float32.

    The graph still computes in float32 (ONNX Runtime folds the Casts into float32 constants when
    it loads the graph), but the file is about half the size. Lossless only for weights already
    rounded to float16 (:func:`round_weights_fp16`); export's parity check against the module
    catches anything else. Returns the rewritten model and how many initializers were stored so.
    """
    from onnx import numpy_helper

    graph = model.graph
    casts: list[onnx.NodeProto] = []
    kept: list[onnx.TensorProto] = []
    converted = 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims, dtype=np.int64)) < min_elements:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
        kept.append(half)
        casts.append(
            onnx.helper.make_node(
                "Cast", [half.name], [init.name], name=init.name + "__to_fp32", to=onnx.TensorProto.FLOAT
            )
        )
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model, converted


def round_weights_fp16(module: nn.Module) -> nn.Module:
    """Round every floating parameter and buffer of ``module`` to the nearest float16 value, in place
    (kept as float32): the module then equals a graph stored by :func:`store_weights_fp16`."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return module

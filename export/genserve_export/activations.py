"""card.json's ``activation_bytes_per_output_value``: a graph's intermediate tensors at their peak.

The server sizes a SuperResolve/Translate/ModelInfer call's working set from a model's output size
(tiling.working_set_bytes); what the call holds besides is the graph's intermediates, which vary by
model (a U-Net's wide skip connections hold tens of output-sized copies, an SR net's a few). They are
counted here from the graph, once, at export: ONNX shape inference at a probe size, then the nodes
run in their (topological) order, each value live from the node that makes it to the last node that
reads it (graph outputs to the end). The peak of the live bytes, divided by the output's values, is
the field; for a fully convolutional graph it does not depend on the probe size.

Not counted: the graph's inputs (the server counts those), its initializers and what is computed from
them alone (constants, which ONNX Runtime folds into weights). Only onnx and numpy: no session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, shape_inference

from genserve_contract.repository import ACTIVATION_BYTES_FIELD, activation_bytes_problem
from genserve_contract.staging import create_beside
from genserve_export.errors import ExportError

# The probe's spatial size before it is raised to the card's min_size and size_multiple.
PROBE_SIZE = 64


class ActivationCountError(ExportError):
    """The graph's intermediates cannot be counted (a value without a static shape at the probe)."""


def probe_size(size_multiple: int = 1, min_size: int = 1, base: int = PROBE_SIZE) -> int:
    """The probe's H and W: `base`, at least `min_size`, rounded up to `size_multiple`."""
    size = max(base, min_size)
    return -(-size // size_multiple) * size_multiple


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """A node's subgraphs (If's branches, Loop's and Scan's bodies)."""
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _subgraph_inputs(node: onnx.NodeProto) -> Iterable[str]:
    """The names a node's subgraphs read: outer values they use are read while the node runs."""
    for graph in _subgraphs(node):
        for inner in graph.node:
            yield from inner.input
            yield from _subgraph_inputs(inner)


def _fix_inputs(model: onnx.ModelProto, size: int) -> None:
    """Every input's dynamic axes fixed: the batch axis (0) to 1, the others (H, W) to `size`."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1 if axis == 0 else size


def _itemsize(value: onnx.ValueInfoProto) -> int:
    return int(np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).itemsize)


def _nbytes(value: onnx.ValueInfoProto) -> int | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or not tensor.elem_type:
        return None
    count = 1
    for dim in tensor.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        count *= dim.dim_value
    return count * _itemsize(value)


def _value_sizes(graph: onnx.GraphProto, sizes: dict[str, int | None]) -> None:
    """Bytes of every value of `graph` and its subgraphs (None: no static shape)."""
    for value in (*graph.value_info, *graph.output):
        sizes[value.name] = _nbytes(value)
    for node in graph.node:
        for inner in _subgraphs(node):
            _value_sizes(inner, sizes)


def _graph_peak(graph: onnx.GraphProto, sizes: dict[str, int | None], constant: set[str], where: str) -> int:
    """Peak bytes of `graph`'s live values, its nodes run in order; while a node with subgraphs runs
    (If, Loop), the largest of their own peaks on top. Its outputs stay live to the end. An If's
    output that shape inference left unknown is sized from its branches' outputs."""
    constant = constant | {t.name for t in graph.initializer} | {""}
    outputs = {v.name for v in graph.output}
    last_read: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in (*node.input, *_subgraph_inputs(node)):
            last_read[name] = index
    live: dict[str, int] = {}
    peak = 0
    for index, node in enumerate(graph.node):
        branches = _subgraphs(node)
        if not branches and all(name in constant for name in node.input):
            constant.update(node.output)  # Constant, or computed from weights alone: folded
            continue
        inner = max((_graph_peak(g, sizes, constant, where) for g in branches), default=0)
        for position, name in enumerate(node.output):
            if not name:
                continue
            nbytes = sizes.get(name)
            if nbytes is None and node.op_type == "If":
                given = [sizes.get(g.output[position].name) for g in branches]
                nbytes = max(given) if None not in given else None  # type: ignore[type-var]
                sizes[name] = nbytes
            if nbytes is None:
                raise ActivationCountError(
                    f"value {name!r} of node {node.name or node.op_type!r} has no static shape at {where}"
                )
            live[name] = nbytes
        peak = max(peak, sum(live.values()) + inner)
        for name in list(live):
            if name not in outputs and last_read.get(name, -1) <= index:
                del live[name]
    return peak


def _inline_ifs(model: onnx.ModelProto) -> list[onnx.ModelProto]:
    """`model` once per way through its top-level If nodes, each If replaced by one of its branches'
    nodes (outputs renamed to the If's): shape inference does not reach inside a branch that resizes
    or reshapes (a two_way_translator's generators), the inlined graph it does."""
    graph = model.graph
    for index, node in enumerate(graph.node):
        if node.op_type != "If":
            continue
        variants = []
        for branch in _subgraphs(node):
            rename = {out.name: name for out, name in zip(branch.output, node.output, strict=True)}
            inlined = []
            for inner in branch.node:
                copy = onnx.NodeProto()
                copy.CopyFrom(inner)
                copy.input[:] = [rename.get(n, n) for n in inner.input]
                copy.output[:] = [rename.get(n, n) for n in inner.output]
                inlined.append(copy)
            variant = onnx.ModelProto()
            variant.CopyFrom(model)
            del variant.graph.node[:]
            variant.graph.node.extend([*graph.node[:index], *inlined, *graph.node[index + 1 :]])
            variant.graph.initializer.extend(branch.initializer)
            variants += _inline_ifs(variant)
        return variants
    return [model]


def _peak_and_values(model: onnx.ModelProto, where: str) -> tuple[int, int]:
    """(peak live bytes, output values) of a graph whose inputs are fixed."""
    try:
        graph = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True).graph
    except Exception as exc:  # onnx raises its own InferenceError, and ValueErrors
        raise ActivationCountError(f"shape inference at {where} failed: {exc}") from exc
    sizes: dict[str, int | None] = {}
    _value_sizes(graph, sizes)
    peak = _graph_peak(graph, sizes, set(), where)
    values = 0
    for output in graph.output:
        nbytes = sizes.get(output.name)
        if nbytes is None:
            raise ActivationCountError(f"output {output.name!r} has no static shape at {where}")
        values += nbytes // _itemsize(output)
    return peak, values


def activation_bytes(model: onnx.ModelProto | str | os.PathLike[str], size: int = PROBE_SIZE) -> float:
    """The peak bytes of a graph's live intermediates in one call on one image of `size` x `size`,
    per value of its outputs (see the module docstring); a graph that branches (If) counts its
    largest way through. Raises ActivationCountError where a value computed per call has no static
    shape at the probe."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        try:
            proto = onnx.load(str(model))
        except DecodeError as exc:  # not an ONNX protobuf (a truncated file): this version's problem
            raise ActivationCountError(f"{model} is not a readable ONNX model: {exc}") from exc
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    _fix_inputs(fixed, size)
    where = f"{size}x{size}"
    counts = [_peak_and_values(variant, where) for variant in _inline_ifs(fixed)]
    peak, values = max(p for p, _ in counts), max(v for _, v in counts)
    if values == 0 or peak == 0:
        raise ActivationCountError(f"the graph computes nothing per call at {where}")
    return round(peak / values, 3)


def card_activation_bytes(card: dict[str, Any], model: onnx.ModelProto | str | os.PathLike[str]) -> float:
    """activation_bytes of `model` at the probe size its card allows (size_multiple, min_size)."""
    size = probe_size(int(card.get("size_multiple") or 1), int(card.get("min_size") or 1))
    return activation_bytes(model, size)


def annotate_version(version_dir: Path) -> tuple[float, float | None]:
    """Write the field into an existing version's card.json (in place, by a rename; model files and
    their sha256 are untouched: the card's sha256 covers them, not the card). Returns (new, old)."""
    card_path = version_dir / "card.json"
    card = json.loads(card_path.read_text())
    if not isinstance(card, dict):
        raise ActivationCountError(f"{card_path}: not a JSON object")
    old = card.get(ACTIVATION_BYTES_FIELD)
    value = card_activation_bytes(card, version_dir / "model.onnx")
    problem = activation_bytes_problem(value)
    if problem:  # pragma: no cover - activation_bytes returns a positive finite number
        raise ActivationCountError(f"{card_path}: {ACTIVATION_BYTES_FIELD} {problem}")
    card[ACTIVATION_BYTES_FIELD] = value
    text = json.dumps(card, indent=2, allow_nan=False) + "\n"
    # A staging file of this call (two runs at once each rename a whole card: a fixed name let the
    # second truncate and take the file the first was about to rename), removed if it is not renamed.
    handle, staging = create_beside(card_path, suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, card_path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return value, old

"""Rebuild a TensorFlow.js *layers* model (``model.json`` + ``group1-shard*.bin``) in PyTorch.

A TF.js layers model is a Keras functional graph serialised as JSON (``modelTopology``) plus a
``weightsManifest`` naming each weight, its shape and dtype, stored back to back as raw little-endian
values across the shard files in manifest order. This module reads both and builds an
``nn.Module`` that runs the layer graph in NCHW, generically from the layer list: it supports the
layer classes single-image super-resolution models use (Conv2D, Activation, ReLU, LeakyReLU, Add,
Multiply, Concatenate, UpSampling2D, and upscalerjs' custom ``MultiplyBeta`` and
``PixelShuffle<N>x``). Anything else is refused by name, never silently skipped.

Layout. Keras tensors are NHWC and conv kernels HWIO; PyTorch's are NCHW and OIHW, so kernels are
permuted (3, 2, 0, 1) and a channel axis of 3 (or -1) becomes 1. TensorFlow's depth-to-space takes
channel ``(i * r + j) * C + c`` to output pixel offset (i, j), channel c ("DCR" order), which is not
PyTorch's PixelShuffle order (``c * r * r + i * r + j``); :func:`depth_to_space` implements TF's.
``genserve_export.tfjs_reference`` runs the same graph in plain numpy, NHWC, as an independent check.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genserve_export.errors import ExportError

_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}
_QUANT_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2")}
_PIXEL_SHUFFLE = re.compile(r"^PixelShuffle(\d+)x$")
# NHWC axis -> NCHW axis
_AXIS = {-1: 1, 3: 1, 1: 2, 2: 3, 0: 0}


class TfjsModelError(ExportError):
    """A model.json that cannot be read or holds a layer this importer does not support."""


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of the functional graph: its class, config and the layers it reads from."""

    name: str
    class_name: str
    config: dict[str, Any]
    inbound: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LayersModel:
    """A parsed ``model.json``: layers in topological order, the graph's input/output, weights."""

    layers: tuple[Layer, ...]
    input_name: str
    output_name: str
    weights: dict[str, np.ndarray]  # "layer/kernel", "layer/bias" -> array in the stored layout
    meta: dict[str, Any]  # format, generatedBy, convertedBy

    def layer_weights(self, layer: str) -> dict[str, np.ndarray]:
        """The weights of ``layer`` keyed by their last name part (``kernel``, ``bias``)."""
        prefix = layer + "/"
        return {k[len(prefix) :].split(":")[0]: v for k, v in self.weights.items() if k.startswith(prefix)}


# --- reading ---------------------------------------------------------------------------------


class _Files:
    """model.json and shards, from a directory or from an npm tarball (read without extracting)."""

    def __init__(self, source: Path, model_json: str) -> None:
        self.source = source
        self.model_json = model_json
        self._tar = tarfile.open(source) if source.is_file() else None  # noqa: SIM115 (closed in close())

    def read(self, relative: str) -> bytes:
        if self._tar is None:
            path = self.source / relative
            if not path.is_file():
                raise TfjsModelError(f"{path} not found")
            return path.read_bytes()
        try:
            member = self._tar.extractfile(relative)
        except KeyError:
            member = None
        if member is None:
            raise TfjsModelError(f"{relative} not found in {self.source}")
        return member.read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _parse_layers(topology: Mapping[str, Any], where: str) -> tuple[tuple[Layer, ...], str, str]:
    config = topology.get("model_config", topology)
    if config.get("class_name") not in ("Functional", "Model"):
        raise TfjsModelError(f"{where}: modelTopology is a {config.get('class_name')!r}, expected Functional")
    body = config["config"]
    layers = []
    for entry in body["layers"]:
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise TfjsModelError(f"{where}: layer {entry['name']!r} is called more than once (shared layer)")
        inbound = tuple(str(ref[0]) for ref in nodes[0]) if nodes else ()
        layers.append(Layer(str(entry["name"]), str(entry["class_name"]), dict(entry["config"]), inbound))
    if len(body["input_layers"]) != 1 or len(body["output_layers"]) != 1:
        raise TfjsModelError(f"{where}: only single-input, single-output models are supported")
    return tuple(layers), str(body["input_layers"][0][0]), str(body["output_layers"][0][0])


def _parse_weights(manifest: list[Mapping[str, Any]], files: _Files, base: str) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        blob = b"".join(files.read(f"{base}{p}") for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            quant = spec.get("quantization")
            stored = quant["dtype"] if quant else spec["dtype"]
            dtype = (_QUANT_DTYPES if quant else _DTYPES).get(stored)
            if dtype is None or (quant and spec["dtype"] != "float32"):
                raise TfjsModelError(
                    f"weight {spec['name']!r} has dtype {spec['dtype']!r} stored as {stored!r}; supported: "
                    "float32, or float32 quantized to uint8/uint16 (affine: min + scale * q)"
                )
            shape = tuple(int(d) for d in spec["shape"])
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if offset + size > len(blob):
                raise TfjsModelError(
                    f"weight {spec['name']!r} runs past the end of the shards ({len(blob)} B)"
                )
            raw = np.frombuffer(blob, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
            if quant:
                # TF.js affine dequantisation, in float64 then rounded once to float32 as TF.js keeps it
                raw = raw.astype(np.float64) * float(quant["scale"]) + float(quant["min"])
            weights[str(spec["name"])] = raw.astype(np.float32)
            offset += size
        if offset != len(blob):
            raise TfjsModelError(f"the shards hold {len(blob)} B, the manifest describes {offset} B")
    return weights


def read_layers_model(source: str | Path, model_json: str = "model.json") -> LayersModel:
    """Parse ``model_json`` (a path relative to ``source``: a directory or an npm ``.tgz``)."""
    source = Path(source)
    files = _Files(source, model_json)
    try:
        try:
            document = json.load(io.BytesIO(files.read(model_json)))
        except ValueError as exc:  # not UTF-8, or not JSON
            raise TfjsModelError(f"{model_json} is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise TfjsModelError(f"{model_json} must be a JSON object, got {type(document).__name__}")
        if document.get("format") != "layers-model":
            raise TfjsModelError(
                f"{model_json}: format is {document.get('format')!r}; only TF.js 'layers-model' is supported"
            )
        for key in ("modelTopology", "weightsManifest"):
            if key not in document:
                raise TfjsModelError(f"{model_json}: missing field {key!r} of a TF.js layers model")
        layers, input_name, output_name = _parse_layers(document["modelTopology"], model_json)
        base = model_json.rpartition("/")[0]
        weights = _parse_weights(document["weightsManifest"], files, base + "/" if base else "")
    finally:
        files.close()
    meta = {k: document.get(k) for k in ("format", "generatedBy", "convertedBy")}
    return LayersModel(layers, input_name, output_name, weights, meta)


# --- layers ----------------------------------------------------------------------------------


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """TensorFlow's depth_to_space on an NCHW tensor: channel (i * r + j) * C + c -> offset (i, j)."""
    c = x.shape[1] // (block * block)
    y: torch.Tensor = x.unflatten(1, (block, block, c))  # type: ignore[no-untyped-call]  # [N, i, j, C, H, W]
    y = y.permute(0, 3, 4, 1, 5, 2)  # [N, C, H, i, W, j]
    out: torch.Tensor = y.flatten(4, 5).flatten(2, 3)
    return out


def _activation(name: str, where: str) -> nn.Module:
    table: dict[str, nn.Module] = {
        "linear": nn.Identity(),
        "relu": nn.ReLU(),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        "elu": nn.ELU(),
        "swish": nn.SiLU(),
    }
    if name not in table:
        raise TfjsModelError(f"{where}: activation {name!r} is not supported ({', '.join(table)})")
    return table[name]


class _Conv(nn.Module):
    def __init__(self, layer: Layer, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        cfg, where = layer.config, f"Conv2D {layer.name!r}"
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise TfjsModelError(f"{where}: data_format {cfg['data_format']!r}, expected channels_last")
        kernel = weights.get("kernel")
        if kernel is None or kernel.ndim != 4:
            raise TfjsModelError(f"{where}: no 4-d kernel in the weights manifest")
        kh, kw, cin_per_group, cout = kernel.shape
        stride = tuple(cfg.get("strides", (1, 1)))
        dilation = tuple(cfg.get("dilation_rate", (1, 1)))
        groups = int(cfg.get("groups", 1))
        padding = cfg.get("padding", "valid")
        if int(cfg["filters"]) != cout or tuple(cfg["kernel_size"]) != (kh, kw):
            raise TfjsModelError(f"{where}: kernel shape {list(kernel.shape)} disagrees with its config")
        if padding == "same":
            extent = ((kh - 1) * dilation[0], (kw - 1) * dilation[1])
            if stride != (1, 1) or extent[0] % 2 or extent[1] % 2:
                # TF pads such layers asymmetrically; none of the supported models need it.
                raise TfjsModelError(f"{where}: 'same' padding needs stride 1 and an odd kernel extent")
            pad: tuple[int, int] = (extent[0] // 2, extent[1] // 2)
        elif padding == "valid":
            pad = (0, 0)
        else:
            raise TfjsModelError(f"{where}: padding {padding!r} is not supported")
        self.conv = nn.Conv2d(
            cin_per_group * groups,
            cout,
            (kh, kw),
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
            bias=bool(cfg.get("use_bias", True)),
        )
        with torch.no_grad():
            # HWIO -> OIHW
            self.conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
            if self.conv.bias is not None:
                bias = weights.get("bias")
                if bias is None or bias.shape != (cout,):
                    raise TfjsModelError(f"{where}: use_bias is set but there is no bias of shape [{cout}]")
                self.conv.bias.copy_(torch.from_numpy(bias))
        self.act = _activation(str(cfg.get("activation", "linear")), where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.conv(x))
        return out


class _Fn(nn.Module):
    """A weightless layer: a function of its inputs."""

    def __init__(self, kind: str, **params: Any) -> None:
        super().__init__()
        self.kind = kind
        self.params = params

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.kind == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        if self.kind == "multiply":
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out
        if self.kind == "concat":
            return torch.cat(xs, dim=p["dim"])
        if self.kind == "scale":
            scaled: torch.Tensor = xs[0] * p["factor"]
            return scaled
        if self.kind == "leaky_relu":
            return F.leaky_relu(xs[0], p["slope"])
        if self.kind == "relu":
            y = F.relu(xs[0])
            return y if p["max_value"] is None else y.clamp(max=p["max_value"])
        if self.kind == "depth_to_space":
            return depth_to_space(xs[0], p["block"])
        if self.kind == "upsample":
            out = F.interpolate(xs[0], scale_factor=p["size"], mode=p["mode"])
            return out
        raise AssertionError(self.kind)


def _module_for(layer: Layer, model: LayersModel) -> nn.Module | None:
    cfg, cls, where = layer.config, layer.class_name, f"{layer.class_name} {layer.name!r}"
    if cls == "InputLayer":
        return None
    if cls == "Conv2D":
        return _Conv(layer, model.layer_weights(layer.name))
    if cls == "Activation":
        return _activation(str(cfg["activation"]), where)
    if cls == "ReLU":
        if float(cfg.get("negative_slope") or 0.0) or float(cfg.get("threshold") or 0.0):
            raise TfjsModelError(f"{where}: negative_slope/threshold are not supported")
        max_value = cfg.get("max_value")
        return _Fn("relu", max_value=None if max_value is None else float(max_value))
    if cls == "LeakyReLU":
        return _Fn("leaky_relu", slope=float(cfg.get("alpha", cfg.get("negative_slope", 0.3))))
    if cls == "Add":
        return _Fn("add")
    if cls == "Multiply":
        return _Fn("multiply")
    if cls == "Concatenate":
        axis = int(cfg.get("axis", -1))
        if axis not in _AXIS:
            raise TfjsModelError(f"{where}: axis {axis} is not an NHWC axis")
        return _Fn("concat", dim=_AXIS[axis])
    if cls == "MultiplyBeta":  # upscalerjs' residual scaling: x * beta (0.2 in ESRGAN)
        return _Fn("scale", factor=float(cfg.get("beta", 0.2)))
    if cls == "UpSampling2D":
        mode = str(cfg.get("interpolation", "nearest"))
        if mode != "nearest" or cfg.get("data_format", "channels_last") != "channels_last":
            raise TfjsModelError(f"{where}: only nearest, channels_last upsampling is supported")
        size = tuple(float(s) for s in cfg.get("size", (2, 2)))
        return _Fn("upsample", size=size, mode="nearest")
    match = _PIXEL_SHUFFLE.match(cls)
    if match:  # upscalerjs' PixelShuffle<N>x: tf.depthToSpace(x, scale, 'NHWC')
        block = int(cfg.get("scale") or match.group(1))
        return _Fn("depth_to_space", block=block)
    raise TfjsModelError(f"{where}: layer class {cls!r} is not supported")


class TfjsGraph(nn.Module):
    """The layer graph of a :class:`LayersModel` as a PyTorch module: NCHW in, NCHW out."""

    def __init__(self, model: LayersModel) -> None:
        super().__init__()
        self.order: list[tuple[str, str, tuple[str, ...]]] = []  # (layer, module key, inputs)
        self.layers = nn.ModuleDict()
        self.input_name, self.output_name = model.input_name, model.output_name
        known = {model.input_name}
        used_weights: set[str] = set()
        for layer in model.layers:
            missing = [i for i in layer.inbound if i not in known]
            if missing:
                raise TfjsModelError(f"layer {layer.name!r} reads {missing} before they are computed")
            module = _module_for(layer, model)
            known.add(layer.name)
            if module is None:
                continue
            key = f"l{len(self.order)}"  # layer names may hold characters ModuleDict refuses
            self.layers[key] = module
            self.order.append((layer.name, key, layer.inbound))
            if layer.class_name == "Conv2D":
                used_weights.update(f"{layer.name}/{k}" for k in ("kernel", "bias"))
        unused = sorted(k for k in model.weights if k.split(":")[0] not in used_weights)
        if unused:
            raise TfjsModelError(f"weights not used by any supported layer: {unused[:5]}")
        if model.output_name not in known:
            raise TfjsModelError(f"output layer {model.output_name!r} is not in the graph")
        # Free each intermediate after its last reader: a deep dense graph otherwise holds them all.
        last_use: dict[str, int] = {}
        for i, (_, _, inbound) in enumerate(self.order):
            for name in inbound:
                last_use[name] = i
        self.release = [
            tuple(n for n in set(inbound) if last_use[n] == i and n != self.output_name)
            for i, (_, _, inbound) in enumerate(self.order)
        ]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: image}
        for (name, key, inbound), done in zip(self.order, self.release, strict=True):
            values[name] = self.layers[key](*(values[i] for i in inbound))
            for finished in done:
                del values[finished]
        return values[self.output_name]

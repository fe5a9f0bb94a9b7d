"""A plain-numpy run of a TF.js layers model in TensorFlow's own layout (NHWC, HWIO kernels).

It shares nothing with the PyTorch rebuild (``tfjs_graph``) but the parsed layer list: convolution
is a sum over kernel offsets of ``x[shifted] @ kernel[dy, dx]`` on the HWIO kernel as stored, and
depth-to-space follows TensorFlow's definition
``out[b, y * r + i, x * r + j, c] = in[b, y, x, (i * r + j) * C + c]``. It is slow (float64, no
BLAS tricks) and meant for small inputs: the importer checks the rebuilt network against it, and
the tests check the rebuild's layout conversions against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genserve_export.tfjs_graph import _PIXEL_SHUFFLE, Layer, LayersModel, TfjsModelError


def conv2d_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, padding: str) -> np.ndarray:
    """Stride-1, dilation-1, ungrouped Conv2D: x [N, H, W, Cin], kernel [kh, kw, Cin, Cout] (HWIO)."""
    kh, kw, _, cout = kernel.shape
    if padding == "same":
        x = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    n, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    out = np.zeros((n, oh, ow, cout), np.float64)
    for dy in range(kh):
        for dx in range(kw):
            out += x[:, dy : dy + oh, dx : dx + ow, :] @ kernel[dy, dx]
    return out + bias if bias is not None else out


def depth_to_space_nhwc(x: np.ndarray, block: int) -> np.ndarray:
    """TensorFlow's tf.nn.depth_to_space, NHWC."""
    n, h, w, ch = x.shape
    c = ch // (block * block)
    y = x.reshape(n, h, w, block, block, c).transpose(0, 1, 3, 2, 4, 5)  # [N, H, i, W, j, C]
    return y.reshape(n, h * block, w * block, c)


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(_activation_any(x, name), np.float64)


def _activation_any(x: np.ndarray, name: str) -> Any:
    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    raise TfjsModelError(f"reference: activation {name!r} not implemented")


def _layer(layer: Layer, model: LayersModel, xs: list[np.ndarray]) -> np.ndarray:
    return np.asarray(_layer_any(layer, model, xs), np.float64)


def _layer_any(layer: Layer, model: LayersModel, xs: list[np.ndarray]) -> Any:
    cfg, cls = layer.config, layer.class_name
    if cls == "Conv2D":
        if tuple(cfg.get("strides", (1, 1))) != (1, 1) or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
            raise TfjsModelError(f"reference: Conv2D {layer.name!r} has strides/dilation")
        if int(cfg.get("groups", 1)) != 1:
            raise TfjsModelError(f"reference: Conv2D {layer.name!r} is grouped")
        w = model.layer_weights(layer.name)
        out = conv2d_nhwc(xs[0], w["kernel"].astype(np.float64), w.get("bias"), cfg["padding"])
        return _activation(out, cfg.get("activation", "linear"))
    if cls == "Activation":
        return _activation(xs[0], cfg["activation"])
    if cls == "ReLU":
        out = np.maximum(xs[0], 0.0)
        return out if cfg.get("max_value") is None else np.minimum(out, float(cfg["max_value"]))
    if cls == "LeakyReLU":
        slope = float(cfg.get("alpha", cfg.get("negative_slope", 0.3)))
        return np.where(xs[0] >= 0, xs[0], slope * xs[0])
    if cls == "Add":
        return np.sum(xs, axis=0)
    if cls == "Multiply":
        return np.prod(xs, axis=0)
    if cls == "Concatenate":
        return np.concatenate(xs, axis=int(cfg.get("axis", -1)))
    if cls == "MultiplyBeta":
        return xs[0] * float(cfg.get("beta", 0.2))
    if cls == "UpSampling2D":
        sy, sx = (int(s) for s in cfg.get("size", (2, 2)))
        return xs[0].repeat(sy, axis=1).repeat(sx, axis=2)
    match = _PIXEL_SHUFFLE.match(cls)
    if match:
        return depth_to_space_nhwc(xs[0], int(cfg.get("scale") or match.group(1)))
    raise TfjsModelError(f"reference: layer class {cls!r} not implemented")


def run_reference(model: LayersModel, image_nhwc: np.ndarray) -> np.ndarray:
    """The model's output for ``image_nhwc`` [N, H, W, C], float64, NHWC."""
    values: dict[str, np.ndarray] = {model.input_name: np.asarray(image_nhwc, np.float64)}
    for layer in model.layers:
        if layer.class_name == "InputLayer":
            continue
        values[layer.name] = _layer(layer, model, [values[i] for i in layer.inbound])
    return values[model.output_name]

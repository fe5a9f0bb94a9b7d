"""Test support for the server: tiny ONNX models of every kind, a repository writer, a server
subprocess handle and a few client helpers. Small graphs built with the `onnx` helper API, so the
integration tests are fast and independent of training.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import signal
import time
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from genserve.v1 import types_pb2 as tpb
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import ResourceExhausted
from genserve_server.launcher import ServerSubprocess, genserve_command
from genserve_server.main import App
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.response_budget import ByteBudget, Reservation
from genserve_server.step_sampler import StepScheduler

OPSET = 17
REPO_ROOT = Path(__file__).resolve().parents[2]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _z(dim: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", dim])


def _image(name: str, c: int, h: int | str, w: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", c, h, w])


def generator_graph(latent_dim: int, c: int, h: int, w: int, seed: int = 0) -> onnx.ModelProto:
    """z [N, Z] -> MatMul -> Tanh -> Reshape [N, C, H, W]."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.5, (latent_dim, c * h * w)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["z", "W"], ["hidden"]),
        helper.make_node("Tanh", ["hidden"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "generator",
        [_z(latent_dim)],
        [_image("image", c, h, w)],
        [_init("W", weights), _init("shape", np.array([-1, c, h, w], np.int64))],
    )
    return _model(graph)


def conditional_graph(latent_dim: int, n_classes: int, c: int, h: int, w: int) -> onnx.ModelProto:
    """z + Gather(embedding, label) -> MatMul -> Tanh -> Reshape."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gather", ["E", "label"], ["emb"], axis=0),
        helper.make_node("Add", ["z", "emb"], ["zc"]),
        helper.make_node("MatMul", ["zc", "W"], ["hidden"]),
        helper.make_node("Tanh", ["hidden"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conditional",
        [_z(latent_dim), helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [_image("image", c, h, w)],
        [
            _init("E", (rng.normal(0, 3, (n_classes, latent_dim))).astype(np.float32)),
            _init("W", rng.normal(0, 0.5, (latent_dim, c * h * w)).astype(np.float32)),
            _init("shape", np.array([-1, c, h, w], np.int64)),
        ],
    )
    return _model(graph)


def vae_decoder_graph(latent_dim: int, h: int, w: int) -> onnx.ModelProto:
    """z -> MatMul -> Sigmoid -> Reshape [N, 1, H, W] in [0, 1]."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["z", "W"], ["hidden"]),
        helper.make_node("Sigmoid", ["hidden"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vae_decoder",
        [_z(latent_dim)],
        [_image("image", 1, h, w)],
        [
            _init("W", rng.normal(0, 0.5, (latent_dim, h * w)).astype(np.float32)),
            _init("shape", np.array([-1, 1, h, w], np.int64)),
        ],
    )
    return _model(graph)


def vae_encoder_graph(latent_dim: int, h: int, w: int) -> onnx.ModelProto:
    """image [N, 1, H, W] -> Flatten -> MatMul -> mu, logvar."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "Wmu"], ["mu"]),
        helper.make_node("MatMul", ["flat", "Wlv"], ["lv_raw"]),
        helper.make_node("Tanh", ["lv_raw"], ["logvar"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vae_encoder",
        [_image("image", 1, h, w)],
        [
            helper.make_tensor_value_info("mu", TensorProto.FLOAT, ["batch", latent_dim]),
            helper.make_tensor_value_info("logvar", TensorProto.FLOAT, ["batch", latent_dim]),
        ],
        [
            _init("Wmu", rng.normal(0, 0.1, (h * w, latent_dim)).astype(np.float32)),
            _init("Wlv", rng.normal(0, 0.1, (h * w, latent_dim)).astype(np.float32)),
        ],
    )
    return _model(graph)


def super_resolution_graph(scale: int) -> onnx.ModelProto:
    """Fully convolutional: Conv 3x3 (pad 1) -> Resize nearest x scale -> Tanh. Receptive field 1 px."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["image", "K"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["conv", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Tanh", ["up"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr",
        [_image("image", 3, "h", "w")],
        [_image("output_image", 3, "H", "W")],
        [
            _init("K", rng.normal(0, 0.3, (3, 3, 3, 3)).astype(np.float32)),
            _init("scales", np.array([1, 1, scale, scale], np.float32)),
        ],
    )
    return _model(graph)


def overflowing_super_resolution_graph(scale: int) -> onnx.ModelProto:
    """Conv 3x3 of ones (pad 1, receptive field 1 px) -> Resize nearest x scale -> Mul by +Inf: every
    output of an input in (0, 1] is +Inf, a model that overflows."""
    nodes = [
        helper.make_node("Conv", ["image", "K"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["conv", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Mul", ["up", "inf"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr_inf",
        [_image("image", 3, "h", "w")],
        [_image("output_image", 3, "H", "W")],
        [
            _init("K", np.ones((3, 3, 3, 3), np.float32)),
            _init("scales", np.array([1, 1, scale, scale], np.float32)),
            _init("inf", np.array(np.inf, np.float32)),
        ],
    )
    return _model(graph)


def wide_super_resolution_graph(scale: int) -> onnx.ModelProto:
    """Two 5x5 convs (radius 4) -> Resize: needs wider tile margins than a small card overlap gives."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["image", "K1"], ["c1"], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "K2"], ["c2"], pads=[2, 2, 2, 2]),
        helper.make_node("Resize", ["c2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Tanh", ["up"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr_wide",
        [_image("image", 3, "h", "w")],
        [_image("output_image", 3, "H", "W")],
        [
            _init("K1", rng.normal(0, 0.2, (4, 3, 5, 5)).astype(np.float32)),
            _init("K2", rng.normal(0, 0.2, (3, 4, 5, 5)).astype(np.float32)),
            _init("scales", np.array([1, 1, scale, scale], np.float32)),
        ],
    )
    return _model(graph)


def feature_super_resolution_graph(scale: int, width: int) -> onnx.ModelProto:
    """Conv 3->width -> Resize x scale -> Conv width->width -> Relu -> Conv width->3 -> Tanh: a real
    SR model's shape, `width` channels of intermediates at output resolution (radius 2 px)."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["image", "K1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c1", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "K2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "K3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["c3"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr_features",
        [_image("image", 3, "h", "w")],
        [_image("output_image", 3, "H", "W")],
        [
            _init("K1", rng.normal(0, 0.3, (width, 3, 3, 3)).astype(np.float32)),
            _init("K2", rng.normal(0, 0.1, (width, width, 3, 3)).astype(np.float32)),
            _init("K3", rng.normal(0, 0.1, (3, width, 3, 3)).astype(np.float32)),
            _init("scales", np.array([1, 1, scale, scale], np.float32)),
        ],
    )
    return _model(graph)


def image_to_image_graph(multiple: int) -> onnx.ModelProto:
    """Conv 3x3 (pad 1) -> Tanh; H and W must be multiples of `multiple` (checked by the server)."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["image", "K"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["conv"], ["output_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "i2i",
        [_image("image", 3, "h", "w")],
        [_image("output_image", 3, "h", "w")],
        [_init("K", rng.normal(0, 0.3, (3, 3, 3, 3)).astype(np.float32))],
    )
    del multiple
    return _model(graph)


LARGE_LATENT = 128
LARGE_CHANNELS = (384, 192, 96, 48, 24, 12)


def large_generator_graph(seed: int = 0) -> onnx.ModelProto:
    """A DCGAN-sized generator with random weights: z [N, 128] -> MatMul -> [N, 384, 4, 4] -> six
    ConvTranspose 4x4 stride 2 (ReLU between) -> Tanh -> [N, 3, 256, 256]; ~2.4 M parameters and
    ~10^8 multiply-adds an image (the compute and payload of a real 256x256 generator)."""
    rng = np.random.default_rng(seed)
    first = LARGE_CHANNELS[0]
    inits = [
        _init("W0", rng.normal(0, 1 / np.sqrt(LARGE_LATENT), (LARGE_LATENT, first * 16)).astype(np.float32)),
        _init("shape", np.array([-1, first, 4, 4], np.int64)),
    ]
    nodes = [
        helper.make_node("MatMul", ["z", "W0"], ["h0"]),
        helper.make_node("Reshape", ["h0", "shape"], ["x0"]),
        helper.make_node("Relu", ["x0"], ["a0"]),
    ]
    chans = [*LARGE_CHANNELS, 3]
    for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True), start=1):
        weight = rng.normal(0, np.sqrt(2 / (c_in * 4)), (c_in, c_out, 4, 4)).astype(np.float32)
        inits.append(_init(f"K{i}", weight))
        out = f"x{i}"
        nodes.append(
            helper.make_node(
                "ConvTranspose", [f"a{i - 1}", f"K{i}"], [out], strides=[2, 2], pads=[1, 1, 1, 1]
            )
        )
        nodes.append(
            helper.make_node("Tanh" if c_out == 3 else "Relu", [out], ["image" if c_out == 3 else f"a{i}"])
        )
    graph = helper.make_graph(
        nodes, "large_generator", [_z(LARGE_LATENT)], [_image("image", 3, 256, 256)], inits
    )
    return _model(graph)


def slow_generator_graph(latent_dim: int, iterations: int) -> onnx.ModelProto:
    """A generator that takes tens of ms per batch (a Loop of MatMuls): for queue/deadline/drain tests."""
    rng = np.random.default_rng(6)
    width = 256
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["y_in", "Wloop"], ["y_mm"]),
            helper.make_node("Tanh", ["y_mm"], ["y_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, ["batch", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_out", TensorProto.FLOAT, ["batch", width]),
        ],
    )
    nodes = [
        helper.make_node("MatMul", ["z", "Win"], ["y0"]),
        helper.make_node("Loop", ["trip", "cond", "y0"], ["y_final"], body=body),
        helper.make_node("MatMul", ["y_final", "Wout"], ["hidden"]),
        helper.make_node("Tanh", ["hidden"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [_z(latent_dim)],
        [_image("image", 1, 8, 8)],
        [
            _init("Win", rng.normal(0, 0.2, (latent_dim, width)).astype(np.float32)),
            # Gain 2: tanh(W y) settles near +-1. At gain 1 it decays towards 0 and after a few
            # thousand iterations every value is a subnormal float, which x86 computes 10-100x slower
            # depending on the CPU (10,000 iterations: 2 s for one row instead of 0.12 on this
            # project's 2-core VM): a cost that differed from machine to machine.
            _init("Wloop", (rng.normal(0, 1, (width, width)) * 2.0 / np.sqrt(width)).astype(np.float32)),
            _init("Wout", rng.normal(0, 0.2, (width, 64)).astype(np.float32)),
            _init("trip", np.array(iterations, np.int64)),
            _init("cond", np.array(True)),
            _init("shape", np.array([-1, 1, 8, 8], np.int64)),
        ],
    )
    return _model(graph)


# ---------------------------------------------------------------------------- repository writer

TINY_LATENT = 16
DIGITS = [str(i) for i in range(10)]


def write_model(
    root: Path,
    name: str,
    kind: str,
    model: onnx.ModelProto,
    card: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    version: str = "1",
) -> Path:
    """Write <root>/<name>/config.json and <version>/{model.onnx, card.json} as export/ does."""
    version_dir = root / name / version
    version_dir.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    (version_dir / "model.onnx").write_bytes(data)
    full_card: dict[str, Any] = {
        "format_version": 1,
        "name": name,
        "version": version,
        "kind": kind,
        "description": f"tiny {kind}",
        "latent_dim": None,
        "class_names": None,
        "channels": 3,
        "input_channels": None,
        "image_size": None,
        "output_range": [-1.0, 1.0],
        "input_range": None,
        "scale_factor": None,
        "size_multiple": None,
        "tile_size": None,
        "tile_overlap": None,
        "min_size": None,
        "opset": OPSET,
        "sha256": {"model.onnx": hashlib.sha256(data).hexdigest()},
    }
    full_card.update(card)
    full_card["inputs"] = [
        {
            "name": i.name,
            "dtype": "int64" if i.type.tensor_type.elem_type == TensorProto.INT64 else "float32",
            "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim],
        }
        for i in model.graph.input
    ]
    full_card["outputs"] = [
        {
            "name": o.name,
            "dtype": "float32",
            "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in o.type.tensor_type.shape.dim],
        }
        for o in model.graph.output
    ]
    (version_dir / "card.json").write_text(json.dumps(full_card, indent=2))
    cfg: dict[str, Any] = {"kind": kind, "execution_providers": ["CPUExecutionProvider"]}
    cfg.update(config or {})
    (root / name / "config.json").write_text(json.dumps(cfg, indent=2))
    return version_dir


def write_tiny_generator(
    root: Path, name: str = "gen", *, channels: int = 1, config: Mapping[str, Any] | None = None
) -> Path:
    """A tiny 8x8 generator model (version 1) under `root`, as many tests need one."""
    card = {"latent_dim": TINY_LATENT, "channels": channels, "image_size": [8, 8]}
    return write_model(
        root, name, "generator", generator_graph(TINY_LATENT, channels, 8, 8), card, config=config
    )


def write_large_generator(
    root: Path, name: str = "large-gen", *, config: Mapping[str, Any] | None = None
) -> Path:
    """The 256x256 random-weight generator (version 1) under `root`: tests and checks that need a
    heavy model build it here instead of relying on a trained one in models/."""
    card = {"latent_dim": LARGE_LATENT, "channels": 3, "image_size": [256, 256]}
    return write_model(root, name, "generator", large_generator_graph(), card, config=config)


def healthy_models(root: Path, broken: tuple[str, ...] = ("tiny-broken",)) -> tuple[str, ...]:
    """`--require-models` naming every model of `root` but the ones broken on purpose."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in broken)
    return ("--require-models", ",".join(names))


def write_vae_encoder(
    root: Path,
    name: str,
    *,
    latent_dim: int = 8,
    side: int = 8,
    config: dict[str, Any] | None = None,
    version: str = "1",
) -> None:
    """A gray side x side vae_encoder (vae_encoder_graph) of `latent_dim`, inputs in [0, 1]."""
    write_model(
        root,
        name,
        "vae_encoder",
        vae_encoder_graph(latent_dim, side, side),
        {
            "latent_dim": latent_dim,
            "channels": None,
            "input_channels": 1,
            "image_size": [side, side],
            "output_range": None,
            "input_range": [0.0, 1.0],
        },
        config=config,
        version=version,
    )


def build_tiny_repo(root: Path, *, with_slow: bool = True, with_broken: bool = True) -> Path:
    """One tiny model of every kind (+ a slow generator and a corrupt model for failure tests)."""
    root.mkdir(parents=True, exist_ok=True)
    # Under 64 closed-loop clients a batch holds about (arrival rate x window) rows; the client
    # processes share 2 cores with the server, and a loaded CI machine halves their rate, so the
    # window leaves the batching bar (mean > 4) a margin. Idle requests never wait it.
    batching = {"max_batch_size": 64, "max_queue_delay_ms": 10.0, "max_queue_size": 1024}
    write_tiny_generator(root, "tiny-gen", channels=3, config={"batching": batching})
    write_model(
        root,
        "tiny-cond",
        "conditional_generator",
        conditional_graph(TINY_LATENT, 10, 1, 8, 8),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8], "class_names": DIGITS},
        config={"batching": batching},
    )
    write_model(
        root,
        "tiny-vae-dec",
        "vae_decoder",
        vae_decoder_graph(8, 8, 8),
        {"latent_dim": 8, "channels": 1, "image_size": [8, 8], "output_range": [0.0, 1.0]},
    )
    write_vae_encoder(root, "tiny-vae-enc")
    write_model(
        root,
        "tiny-sr",
        "super_resolution",
        super_resolution_graph(2),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "size_multiple": 1,
            "tile_size": 96,
            "tile_overlap": 8,
            "min_size": 4,
        },
        config={"batching": {"max_batch_size": 16, "max_queue_delay_ms": 20.0, "max_queue_size": 256}},
    )
    # Card overlap 2 is too small for radius 4: the server widens it from the radius it measures.
    write_model(
        root,
        "tiny-sr-wide",
        "super_resolution",
        wide_super_resolution_graph(2),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "size_multiple": 1,
            "tile_size": 32,
            "tile_overlap": 2,
            "min_size": 4,
        },
        config={"batching": {"max_batch_size": 16, "max_queue_delay_ms": 5.0, "max_queue_size": 256}},
    )
    write_model(
        root,
        "tiny-i2i",
        "image_to_image",
        image_to_image_graph(4),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [-1.0, 1.0],
            "scale_factor": 1,
            "size_multiple": 4,
            "min_size": 4,
        },
        config={"batching": {"max_batch_size": 8, "max_queue_delay_ms": 5.0, "max_queue_size": 64}},
    )
    if with_slow:
        write_model(
            root,
            "tiny-slow",
            "generator",
            slow_generator_graph(TINY_LATENT, 10000),
            {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
            config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 8}},
        )
    if with_broken:
        broken = write_tiny_generator(root, "tiny-broken")
        (broken / "model.onnx").write_bytes(b"not an onnx graph")  # sha256 no longer matches
    return root


# ---------------------------------------------------------------------------- gates


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll `predicate` until it holds: a gate on an observable state (a metric, a queue depth, a log
    line) instead of a sleep that a loaded machine can outlast. Fails naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@contextlib.contextmanager
def fails_within(seconds: int) -> Iterator[None]:
    """The block (on the main thread) fails after `seconds` instead of hanging the test run (a read of
    a FIFO no one writes to waits forever): an AssertionError, which no OSError handler takes."""

    def expire(signum: int, frame: object) -> None:
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------- server subprocess


def metric_in(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in one /metrics scrape (0 when
    absent); several reads of one scrape see one moment of the server."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


class ServerProcess(ServerSubprocess):
    """A genserve-server subprocess (genserve_server.launcher, shared with bench/) plus /metrics reads."""

    __slots__ = ()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            body: bytes = response.read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        return metric_in(self.metrics_text(), name, **labels)


def sample_calls(server: ServerProcess, model: str) -> float:
    """Sample calls for `model` that have entered the server: in flight now, or finished. A seeded
    Sample reaches its model's batcher without an await in between, so in flight means queued or
    computing. One scrape: a call is never counted twice; one leaving in flight may briefly count in
    neither. (The in-flight gauge has no model label: only one model's Samples may run meanwhile.)"""
    text = server.metrics_text()
    finished = metric_in(text, "genserve_requests_total", model=model, method="Sample")
    return metric_in(text, "genserve_requests_in_flight", method="Sample") + finished


def start_server(
    models: Path,
    work: Path,
    *,
    config: Mapping[str, Any] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 60.0,
) -> ServerProcess:
    """Start `genserve-server serve` on 127.0.0.1:0 and wait for its ready-file; fail fast if it dies."""
    args = list(extra_args)
    if config is not None:
        work.mkdir(parents=True, exist_ok=True)
        config_path = work / "server-config.json"
        config_path.write_text(json.dumps(config))
        args += ["--config", str(config_path)]
    return ServerProcess.start(genserve_command(models, *args), work, timeout_s=timeout_s)


@contextlib.contextmanager
def running_server(models: Path, work: Path, **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(models, work, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------- load from several processes


def concurrent_samples(
    target: str,
    model: str,
    seeds: list[int],
    clients: int,
    *,
    processes: int = 4,
    labels: tuple[int, ...] = (),
) -> dict[int, tuple[bytes, int]]:
    """Sample one image per seed from `clients` concurrent closed-loop clients in `processes`
    processes: TENSOR_F32 bytes and the size of the batch that computed it, by seed. Several
    processes keep a busy machine's client side from being the bottleneck, so the server sees the
    concurrency the test asks for. The processes run sample_worker, which imports grpc and the
    stubs alone (~0.3 s; this module's onnx, onnxruntime and server imports took ~5 s a process)."""
    import multiprocessing

    import sample_worker

    shares = [seeds[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(processes) as pool:
        barrier = manager.Barrier(processes)
        jobs = [(target, model, share, clients // processes, list(labels), barrier) for share in shares]
        parts = pool.map(sample_worker.sample_seeds, jobs)
    return {seed: data for part in parts for seed, data in part.items()}


def tensor_of(image: Any) -> np.ndarray:
    """A TENSOR_F32 response image as float32 [C, H, W]."""
    assert image.format == tpb.IMAGE_FORMAT_TENSOR_F32, image.format
    return np.frombuffer(image.data, "<f4").reshape(tuple(image.shape))


def pixels_of(image: Any) -> np.ndarray:
    """Any uint8 response image (RAW_UINT8 or an encoded format) as [H, W, C]."""
    if image.format == tpb.IMAGE_FORMAT_RAW_UINT8:
        return np.frombuffer(image.data, np.uint8).reshape(tuple(image.shape))
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as im:
        arr = np.asarray(im)
    return arr[:, :, np.newaxis] if arr.ndim == 2 else arr


# Every response image format, and the one that returns the model's floats as they are.
FORMATS = [
    tpb.IMAGE_FORMAT_PNG,
    tpb.IMAGE_FORMAT_JPEG,
    tpb.IMAGE_FORMAT_WEBP,
    tpb.IMAGE_FORMAT_RAW_UINT8,
    tpb.IMAGE_FORMAT_TENSOR_F32,
]
F32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)


# ---------------------------------------------------------------------- an in-process core, held by hand

Body = Callable[[Repository, GenerationCore], Awaitable[None]]


def run_with_core(
    root: Path, body: Body, metrics: Metrics | None = None, config: ServerConfig | None = None
) -> None:
    """`body` against a GenerationCore over the repository at `root` (every model loaded), 30 s at most."""

    async def main() -> None:
        nonlocal metrics, config
        config = config or ServerConfig()
        metrics = metrics or Metrics(enabled=False)
        repo = Repository(root, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        try:
            await asyncio.wait_for(body(repo, GenerationCore(repo, config, metrics, pool)), 30)
        finally:
            await repo.close(1)
            pool.shutdown()

    asyncio.run(main())


class UnaryContext:
    """The parts of grpc.aio.ServicerContext the boundary uses for a unary call."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def add_done_callback(self, callback: Any) -> None:
        pass

    def done(self) -> bool:
        return False


def reserving_handler(
    budget: ByteBudget, predicted: int, response: Any
) -> Callable[[object, Call], Awaitable[Any]]:
    """A Boundary.unary handler that reserves `predicted` response bytes of `budget` for its call (as
    core does) and answers `response`."""

    async def handler(request: object, call: Call) -> Any:
        call.response = Reservation(budget)
        await call.response.reserve(predicted, None, "Sample")
        return response

    return handler


def gate(scheduler: StepScheduler, at_step: int) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the scheduler's `at_step`-th step until `go` is set; `reached` is set when it gets there."""
    reached, go = asyncio.Event(), asyncio.Event()
    run = scheduler._run
    steps = 0

    async def gated(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        nonlocal steps
        steps += 1
        if steps == at_step:
            reached.set()
            await go.wait()
        return await run(inputs)

    scheduler._run = gated
    return reached, go


def hold_runs(batcher: Any) -> asyncio.Event:
    """Hold every batch `batcher` runs until the returned event is set (its queue fills meanwhile)."""
    free = asyncio.Event()
    run = batcher._run_batch

    async def held_run(key: Any, inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        await free.wait()
        return await run(key, inputs)

    batcher._run_batch = held_run
    return free


@dataclass
class HeldBatch:
    """An in-process server whose model's batches are held (see held_batch_app)."""

    app: App
    batcher: Any
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the first batch holds the model
    free: asyncio.Event = field(default_factory=asyncio.Event)  # set: every batch runs
    rows_run: list[int] = field(default_factory=list)  # the rows of each batch run, in order


@contextlib.asynccontextmanager
async def held_batch_app(models: Path, model: str) -> AsyncIterator[HeldBatch]:
    """An App (no warm-up) on 127.0.0.1 over `models`, every batch of `model` held until `free` is set,
    so that calls sent meanwhile queue behind the first one (no timing race). `free` is set and the
    App stopped on the way out."""
    app = App(models, ServerConfig(warmup=False), port=0, metrics_port=0)
    await app.start()
    try:
        batcher = app.repository.get(model).resolve("").batcher
        assert batcher is not None
        held = HeldBatch(app, batcher)
        run = batcher._run_batch

        async def held_run(key: Any, inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            held.rows_run.append(len(next(iter(inputs.values()))))
            held.started.set()
            await held.free.wait()
            return await run(key, inputs)

        batcher._run_batch = held_run
        try:
            yield held
        finally:
            held.free.set()
    finally:
        await app.stop()


async def fill_queue(batcher: Any, key: Any, one: dict[str, np.ndarray]) -> list[asyncio.Future[Any]]:
    """One-row requests (`one` under `key`) queued into a held batcher until one is refused 'queue full'
    (that refusal is a request of its own, not one of the calls under test)."""
    queued: list[asyncio.Future[Any]] = []
    while True:
        request = asyncio.ensure_future(batcher.submit(key, one, 1, caller=None))
        for _ in range(3):
            await asyncio.sleep(0)  # queued (pending), or refused at once (done)
        if request.done():
            with pytest.raises(ResourceExhausted, match="queue full"):
                request.result()
            return queued
        queued.append(request)


async def queued_behind_a_budget(
    budget: Any, calls: Sequence[Callable[[], Awaitable[Any]]]
) -> tuple[int, int, list[Any]]:
    """Start `calls` while the test holds all of `budget` (a response_budget.ByteBudget), so that
    each waits for it, then free it: (bytes tracemalloc traced once every call waited, the most it
    traced from the first call's start to the last one's end, the calls' results). Both counts are
    above what was traced before the calls started (the requests themselves are not counted)."""
    blocker = await budget.acquire(budget.limit, None, "the test")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(call()) for call in calls]
        try:
            while len(budget._waiters) < len(tasks):
                done = [task for task in tasks if task.done()]
                if done:
                    done[0].result()  # a call that failed: its error
                    raise AssertionError("a call ran although the test held the whole budget")
                await asyncio.sleep(0.005)
            waiting = tracemalloc.get_traced_memory()[0] - base
        finally:
            budget.release(blocker)
        results = list(await asyncio.gather(*tasks))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return waiting, peak, results


async def working_set_of(budget: Any, call: Callable[[], Awaitable[Any]]) -> int:
    """The bytes `call` (run alone) holds against `budget` (a response_budget.ByteBudget)."""
    asked: list[int] = []
    acquire = budget.acquire

    async def recording(n_bytes: int, deadline: float | None, what: str) -> int:
        asked.append(n_bytes)
        return int(await acquire(n_bytes, deadline, what))

    budget.acquire = recording
    try:
        await call()
    finally:
        del budget.acquire
    assert len(asked) == 1 and budget.held == 0, (asked, budget.held)
    return asked[0]


def externalize_weights(version_dir: Path, *, listed: bool = True, location: str = "model.onnx.data") -> Path:
    """Rewrite `version_dir`'s model.onnx with its weights in the external file `location` beside it,
    as torch.onnx.export's default (external_data=True) writes them, and card.json's sha256 for the
    new graph and, where `listed`, for the external file. Returns the external file."""
    model_path = version_dir / "model.onnx"
    model = onnx.load(str(model_path))
    onnx.save(
        model,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=128,  # the weights; a Reshape's shape stays in the graph (ONNX Runtime reads it there)
    )
    external = version_dir / location
    card = json.loads((version_dir / "card.json").read_text())
    card["sha256"]["model.onnx"] = hashlib.sha256(model_path.read_bytes()).hexdigest()
    if listed:
        card["sha256"][location] = hashlib.sha256(external.read_bytes()).hexdigest()
    (version_dir / "card.json").write_text(json.dumps(card, indent=2))
    return external

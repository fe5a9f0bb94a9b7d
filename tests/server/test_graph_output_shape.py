"""A version whose graph's image output is not what its card says ([N, channels, H, W]) is refused
at load, naming the output, its shape and the card's fields: a user's own ONNX file (made outside
`genserve-export`, card.json written by hand as docs/model-repository.md describes) with an NHWC
output, or a card whose `channels` is wrong, would otherwise load READY and then scramble every
raw image (H, W, C read as C, H, W), fail every PNG with INTERNAL, or describe the model wrongly
(GetModel output_shape)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from server_support import TINY_LATENT, generator_graph, running_server, write_model

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

OPSET = 17


def _generator(out_dims: list[int | str], reshape: list[int], opaque: bool = False) -> onnx.ModelProto:
    """z [N, Z] -> MatMul -> Tanh -> Reshape(`reshape`), output declared with `out_dims`. ONNX
    Runtime infers a constant `reshape` into the output's shape; `opaque`: the shape plus a 0 computed
    from z's values, which no inference sees through (the session declares `out_dims`)."""
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.5, (TINY_LATENT, int(np.prod(reshape[1:])))).astype(np.float32)
    shape_nodes = [
        helper.make_node("ReduceMin", ["z"], ["z_min"], keepdims=0),
        helper.make_node("Mul", ["z_min", "zero"], ["z_zero"]),
        helper.make_node("Cast", ["z_zero"], ["z_zero_int"], to=TensorProto.INT64),
        helper.make_node("Add", ["shape", "z_zero_int"], ["opaque_shape"]),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["z", "W"], ["hidden"]),
            helper.make_node("Tanh", ["hidden"], ["act"]),
            *(shape_nodes if opaque else []),
            helper.make_node("Reshape", ["act", "opaque_shape" if opaque else "shape"], ["image"]),
        ],
        "user_generator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", TINY_LATENT])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, out_dims)],
        [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array(reshape, np.int64), "shape"),
            *([numpy_helper.from_array(np.array(0.0, np.float32), "zero")] if opaque else []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_image_output_that_is_not_the_cards_nchw_is_refused_at_load(tmp_path: Path) -> None:
    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    # NHWC, declared so in the graph
    write_model(root, "nhwc", "generator", _generator(["batch", 8, 8, 3], [-1, 8, 8, 3]), card)
    # NHWC with symbolic dims: only a call shows the shape
    write_model(root, "nhwc-symbolic", "generator", _generator(["batch", "a", "b", "c"], [-1, 8, 8, 3]), card)
    # a gray graph under a card that says RGB
    write_model(root, "gray-card-rgb", "generator", generator_graph(TINY_LATENT, 1, 8, 8), card)
    # the card's image_size differs from the graph's
    write_model(root, "wrong-size", "generator", generator_graph(TINY_LATENT, 3, 16, 16), card)
    write_model(root, "good", "generator", generator_graph(TINY_LATENT, 3, 8, 8), card)

    with running_server(root, tmp_path / "work") as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        states = {
            m.name: (pb.ModelState.Name(m.versions[0].state), m.versions[0].reason)
            for m in stub.ListModels(pb.ListModelsRequest()).models
        }
        assert states["good"][0] == "MODEL_STATE_READY", states["good"]
        for name in ("nhwc", "nhwc-symbolic", "gray-card-rgb", "wrong-size"):
            state, reason = states[name]
            assert state == "MODEL_STATE_UNAVAILABLE", (name, state)
            assert "'image'" in reason and "channels" in reason and "image_size" in reason, (name, reason)
        assert "[N, 8, 8, 3]" in states["nhwc"][1], states["nhwc"][1]
        assert "[N, 8, 8, 3]" in states["nhwc-symbolic"][1], states["nhwc-symbolic"][1]
        assert "[N, 1, 8, 8]" in states["gray-card-rgb"][1], states["gray-card-rgb"][1]


def _fixed_batch_generator(batch: int) -> onnx.ModelProto:
    """A user's ONNX exported without a dynamic batch axis: z [batch, Z] fixed."""
    model = _generator([batch, 3, 8, 8], [batch, 3, 8, 8])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    onnx.checker.check_model(model)
    return model


def test_a_graph_with_a_fixed_batch_axis_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """A graph exported with a fixed batch (1 or 64) failed the load with ONNX Runtime's own text
    ('Got invalid dimensions for input: z ... Got: 64 Expected: 1'), naming neither the cause nor the
    fix. It names the input, its fixed batch and the fix; a fixed batch of 1 under max_batch_size 1
    serves."""
    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    write_model(root, "batch-1", "generator", _fixed_batch_generator(1), card)
    write_model(root, "batch-64", "generator", _fixed_batch_generator(64), card)
    one = {"batching": {"max_batch_size": 1, "max_queue_size": 16}}
    write_model(root, "batch-1-served-alone", "generator", _fixed_batch_generator(1), card, config=one)

    with running_server(root, tmp_path / "work") as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        states = {
            m.name: (pb.ModelState.Name(m.versions[0].state), m.versions[0].reason)
            for m in stub.ListModels(pb.ListModelsRequest()).models
        }
        for name, fixed in (("batch-1", 1), ("batch-64", 64)):
            state, reason = states[name]
            assert state == "MODEL_STATE_UNAVAILABLE", (name, state)
            assert "'z'" in reason and f"fixed batch dimension {fixed}" in reason, reason
            assert "dynamic batch axis" in reason, reason
        assert "max_batch_size to 1" in states["batch-1"][1], states["batch-1"][1]
        assert states["batch-1-served-alone"][0] == "MODEL_STATE_READY", states["batch-1-served-alone"]
        images = stub.Sample(pb.SampleRequest(model="batch-1-served-alone", count=3), timeout=30).images
        assert len(images) == 3


def test_a_super_resolution_graph_with_a_fixed_batch_of_1_serves_under_max_batch_size_1(
    tmp_path: Path,
) -> None:
    """The refusal of a fixed batch axis says 'or set batching.max_batch_size to 1', after which a
    fixed batch of 1 serves. A super_resolution graph exported so (dynamic H and W, batch fixed at
    1: torch.onnx.export with dynamic_axes for H and W only) still failed its load with ONNX
    Runtime's own text, since the tile-radius measurement ran its 10 probe rows in one call."""
    import asyncio

    from server_support import super_resolution_graph

    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    graph = super_resolution_graph(2)
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.checker.check_model(graph)
    card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [0.0, 1.0],
        "scale_factor": 2,
        "size_multiple": 1,
        "tile_size": 32,
        "tile_overlap": 8,
        "min_size": 4,
    }
    root = tmp_path / "models"
    one = {"batching": {"max_batch_size": 1, "max_queue_size": 16}}
    write_model(root, "sr-batch-1", "super_resolution", graph, card, config=one)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            mv = repo.models["sr-batch-1"].versions["1"]
            assert mv.state == ModelState.READY, mv.reason
            assert mv.tile_radius == 1
        finally:
            await repo.close(2.0)

    asyncio.run(scenario())


def _with_fp16_twin(version_dir: Path) -> None:
    """A model.fp16.onnx beside model.onnx (here the same graph), in the card's sha256 and parity,
    and the version asking for fp16: the server checks fp16 against fp32 before serving it."""
    import hashlib
    import json

    data = (version_dir / "model.onnx").read_bytes()
    (version_dir / "model.fp16.onnx").write_bytes(data)
    card_path = version_dir / "card.json"
    card = json.loads(card_path.read_text())
    card["sha256"]["model.fp16.onnx"] = hashlib.sha256(data).hexdigest()
    card["parity"] = {"fp16_max_abs_diff": 0.0, "fp16_atol": 0.01}
    card_path.write_text(json.dumps(card))
    config_path = version_dir.parent / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "precision": "fp16"}))


def test_a_fixed_batch_graph_with_an_fp16_twin_is_refused_naming_the_fix_and_batch_1_alone_serves(
    tmp_path: Path,
) -> None:
    """With a model.fp16.onnx beside model.onnx, the fp16 parity check ran both graphs on a batch of
    8 before the batch axes were checked: a fixed-batch graph failed its load with ONNX Runtime's own
    text ('Got invalid dimensions for input: z ...') instead of the refusal naming the fix, and a
    fixed batch of 1 under max_batch_size 1, which serves without the twin, did not load at all."""
    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    one = {"batching": {"max_batch_size": 1, "max_queue_size": 16}}
    for name, batch, config in (("batch-1", 1, None), ("batch-64", 64, None), ("batch-1-alone", 1, one)):
        _with_fp16_twin(
            write_model(root, name, "generator", _fixed_batch_generator(batch), card, config=config)
        )

    with running_server(root, tmp_path / "work") as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        states = {
            m.name: (pb.ModelState.Name(m.versions[0].state), m.versions[0].reason)
            for m in stub.ListModels(pb.ListModelsRequest()).models
        }
        for name, fixed in (("batch-1", 1), ("batch-64", 64)):
            state, reason = states[name]
            assert state == "MODEL_STATE_UNAVAILABLE", (name, state)
            assert "'z'" in reason and f"fixed batch dimension {fixed}" in reason, reason
            assert "dynamic batch axis" in reason and "invalid dimensions" not in reason, reason
        assert states["batch-1-alone"][0] == "MODEL_STATE_READY", states["batch-1-alone"]
        images = stub.Sample(pb.SampleRequest(model="batch-1-alone", count=3), timeout=30).images
        assert len(images) == 3
        served = stub.ListModels(pb.ListModelsRequest()).models
        assert [m.versions[0].precision for m in served if m.name == "batch-1-alone"] == ["fp16"]


def test_a_graph_whose_inputs_are_not_its_kinds_is_refused_naming_them_also_with_an_fp16_twin(
    tmp_path: Path,
) -> None:
    """A generator graph whose input is not named `z` is refused naming the graph's inputs and the
    kind's (check_graph). With a model.fp16.onnx beside it the fp16 parity check ran both graphs
    before that check, so the version was refused with ONNX Runtime's own text ('ValueError:
    Required inputs (['latent']) are missing from input feed (['z'])'), naming neither the version,
    the file nor the kind's input, and a traceback in the log."""
    import asyncio

    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    def renamed() -> onnx.ModelProto:
        graph = generator_graph(TINY_LATENT, 3, 8, 8)
        graph.graph.input[0].name = "latent"
        graph.graph.node[0].input[0] = "latent"
        onnx.checker.check_model(graph)
        return graph

    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    write_model(root, "renamed", "generator", renamed(), card)
    _with_fp16_twin(write_model(root, "renamed-twin", "generator", renamed(), card))

    async def scenario() -> dict[str, tuple[ModelState, str]]:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            return {
                name: (repo.models[name].versions["1"].state, repo.models[name].versions["1"].reason)
                for name in ("renamed", "renamed-twin")
            }
        finally:
            await repo.close(2.0)

    states = asyncio.run(scenario())
    for name in ("renamed", "renamed-twin"):
        state, reason = states[name]
        assert state == ModelState.UNAVAILABLE, (name, state)
        assert f"model {name} version 1" in reason, reason
        assert "graph inputs ['latent'] differ from kind generator's ['z']" in reason, reason
        assert "missing from input feed" not in reason, reason


def _graph_with_input(
    model: onnx.ModelProto, name: str, elem_type: int, dims: list[int | str], op: onnx.NodeProto | None = None
) -> onnx.ModelProto:
    """`model` with its input `name` declared as `elem_type` of `dims`, as a user's own export
    declares it; `op` (input `name`, output `name` + "_in") first turns it into what the graph's
    nodes took before (a Flatten, a Cast)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    spec = next(i for i in model.graph.input if i.name == name)
    spec.CopyFrom(helper.make_tensor_value_info(name, elem_type, dims))
    if op is not None:
        for node in model.graph.node:
            node.input[:] = [f"{name}_in" if i == name else i for i in node.input]
        model.graph.node.insert(0, op)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_graph_input_whose_shape_or_type_is_not_what_the_kind_feeds_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """A user's own export whose input is not what the server feeds (a DCGAN's latent [N, Z, 1, 1]
    where the kind feeds [N, latent_dim], a card whose latent_dim is not the graph's, a label taken as
    int32 or one-hot float, a super-resolution net exported with a fixed image size) was refused by
    the load's first call with ONNX Runtime's own text ('Invalid rank for input: z Got: 2 Expected:
    4', 'Unexpected input data type. Actual: (tensor(float)) , expected: (tensor(int32))', naming no
    input), the model version not named, and a traceback in the log. Each is refused naming the
    version, the input, the graph's type and shape, and what the kind feeds (card fields). A graph
    taking float16 inputs (a module exported after .half()) is fed float16 and serves."""
    import asyncio

    from server_support import conditional_graph, super_resolution_graph

    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    gen = generator_graph(TINY_LATENT, 3, 8, 8)
    write_model(
        root,
        "z-4d",
        "generator",
        _graph_with_input(
            gen,
            "z",
            TensorProto.FLOAT,
            ["batch", TINY_LATENT, 1, 1],
            helper.make_node("Flatten", ["z"], ["z_in"], axis=1),
        ),
        card,
    )
    write_model(root, "z-wider", "generator", gen, {**card, "latent_dim": 2 * TINY_LATENT})
    cond_card = {**card, "class_names": ["a", "b"]}
    cond = conditional_graph(TINY_LATENT, 2, 3, 8, 8)
    write_model(
        root,
        "label-int32",
        "conditional_generator",
        _graph_with_input(cond, "label", TensorProto.INT32, ["batch"]),
        cond_card,
    )
    write_model(
        root,
        "label-onehot",
        "conditional_generator",
        _graph_with_input(
            cond,
            "label",
            TensorProto.FLOAT,
            ["batch", 2],
            helper.make_node("ArgMax", ["label"], ["label_in"], axis=1, keepdims=0),
        ),
        cond_card,
    )
    sr_card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [-1.0, 1.0],
        "scale_factor": 2,
        "tile_size": 16,
        "tile_overlap": 2,
    }
    sr = _graph_with_input(super_resolution_graph(2), "image", TensorProto.FLOAT, ["batch", 3, 32, 32])
    write_model(root, "sr-fixed-size", "super_resolution", sr, sr_card)
    half = _graph_with_input(
        gen,
        "z",
        TensorProto.FLOAT16,
        ["batch", TINY_LATENT],
        helper.make_node("Cast", ["z"], ["z_in"], to=TensorProto.FLOAT),
    )
    write_model(root, "z-float16", "generator", half, card)
    names = ("z-4d", "z-wider", "label-int32", "label-onehot", "sr-fixed-size", "z-float16")

    async def scenario() -> dict[str, tuple[ModelState, str]]:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            return {
                n: (repo.models[n].versions["1"].state, repo.models[n].versions["1"].reason) for n in names
            }
        finally:
            await repo.close(2.0)

    states = asyncio.run(scenario())
    assert states["z-float16"][0] == ModelState.READY, states["z-float16"]
    expected = {
        "z-4d": ("graph input 'z' is float32 [N, 16, 1, 1]", "float32 [N, 16]", "latent_dim"),
        "z-wider": ("graph input 'z' is float32 [N, 16]", "float32 [N, 32]", "latent_dim"),
        "label-int32": ("graph input 'label' is int32 [N]", "int64 [N]"),
        "label-onehot": ("graph input 'label' is float32 [N, 2]", "int64 [N]"),
        "sr-fixed-size": ("graph input 'image' is float32 [N, 3, 32, 32]", "float32 [N, 3, H, W]"),
    }
    for name, parts in expected.items():
        state, reason = states[name]
        assert state == ModelState.UNAVAILABLE, (name, state)
        assert f"model {name} version 1" in reason, reason
        for part in parts:
            assert part in reason, (name, part, reason)
        assert "ONNXRuntimeError" not in reason, reason


def test_a_card_whose_inputs_or_outputs_are_not_its_kinds_is_refused_naming_the_field(tmp_path: Path) -> None:
    """card.json's `inputs` and `outputs` restate the graph's tensors (docs/model-repository.md), and
    KServe's ModelMetadata, ModelConfig and ModelInfer serve by them. A hand-written card that named
    an input other than the kind's (`latent` for `z`) loaded READY, refused a ModelInfer of `z` and
    answered one of `latent` with one image for two rows; one declaring `z` [N, Z, 1, 1] refused
    every ModelInfer (4 dims wanted, then [N, Z]); one naming an output the graph lacks failed every
    ModelInfer with INTERNAL. Each is refused at load naming card.json, the field and the kind's
    tensors; a card that also lists an extra output the graph has (a feature map beside the image)
    serves."""
    import asyncio

    from server_support import conditional_graph

    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    gen = generator_graph(TINY_LATENT, 3, 8, 8)
    z = {"name": "z", "dtype": "float32", "shape": [-1, TINY_LATENT]}
    image = {"name": "image", "dtype": "float32", "shape": [-1, 3, 8, 8]}

    def with_card(name: str, model: onnx.ModelProto, **fields: object) -> None:
        version_dir = write_model(root, name, "generator", model, card)
        path = version_dir / "card.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    with_card("input-renamed", gen, inputs=[{**z, "name": "latent"}])
    with_card("input-4d", gen, inputs=[{**z, "shape": [-1, TINY_LATENT, 1, 1]}])
    with_card("input-narrower", gen, inputs=[{**z, "shape": [-1, TINY_LATENT // 2]}])
    with_card("output-renamed", gen, outputs=[{**image, "name": "output"}])
    with_card("output-missing", gen, outputs=[{**image, "name": "features", "shape": [-1, 8]}])
    extra = onnx.ModelProto.FromString(gen.SerializeToString())
    extra.graph.node.append(helper.make_node("Identity", ["hidden"], ["features"]))
    extra.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 192]))
    onnx.checker.check_model(extra)
    with_card(
        "extra-output", extra, outputs=[image, {"name": "features", "dtype": "float32", "shape": [-1, 192]}]
    )
    cond_card = {**card, "class_names": ["a", "b"]}
    write_model(
        root, "label-left-out", "conditional_generator", conditional_graph(TINY_LATENT, 2, 3, 8, 8), cond_card
    )
    label_path = root / "label-left-out" / "1" / "card.json"
    label_path.write_text(json.dumps({**json.loads(label_path.read_text()), "inputs": [z]}))
    names = (
        "input-renamed",
        "input-4d",
        "input-narrower",
        "output-renamed",
        "output-missing",
        "extra-output",
        "label-left-out",
    )

    async def scenario() -> dict[str, tuple[ModelState, str]]:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            return {
                n: (repo.models[n].versions["1"].state, repo.models[n].versions["1"].reason) for n in names
            }
        finally:
            await repo.close(2.0)

    states = asyncio.run(scenario())
    assert states["extra-output"][0] == ModelState.READY, states["extra-output"]
    expected = {
        "input-renamed": ("card.json: inputs ['latent']", "kind generator's ['z']"),
        "input-4d": ("card.json: inputs[0] 'z' has shape [-1, 16, 1, 1]", "[N, 16]"),
        "input-narrower": ("card.json: inputs[0] 'z' has shape [-1, 8]", "[N, 16]"),
        "output-renamed": ("card.json: outputs ['output']", "'image'"),
        "output-missing": ("card.json: outputs ['features']", "'image'"),
        "label-left-out": ("card.json: inputs ['z']", "kind conditional_generator's ['z', 'label']"),
    }
    for name, parts in expected.items():
        state, reason = states[name]
        assert state == ModelState.UNAVAILABLE, (name, state)
        assert str(root / name / "1" / "card.json") in reason, reason
        for part in parts:
            assert part in reason, (name, part, reason)


def test_a_conditional_card_listing_more_classes_than_the_graph_takes_is_refused_naming_class_names(
    tmp_path: Path,
) -> None:
    """A conditional generator whose card.json lists more class_names than its graph's embedding has
    rows (a hand-written card for a user's own cGAN) loaded READY, and every request for one of the
    classes past the graph's failed with INTERNAL ('model call failed'). The load runs a row of the
    card's last class and refuses the version naming class_names."""
    import asyncio

    from server_support import conditional_graph

    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository

    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    graph = conditional_graph(TINY_LATENT, 10, 3, 8, 8)
    write_model(
        root, "twelve", "conditional_generator", graph, {**card, "class_names": [str(i) for i in range(12)]}
    )
    write_model(
        root, "ten", "conditional_generator", graph, {**card, "class_names": [str(i) for i in range(10)]}
    )

    async def scenario() -> dict[str, tuple[ModelState, str]]:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            return {
                n: (repo.models[n].versions["1"].state, repo.models[n].versions["1"].reason)
                for n in ("twelve", "ten")
            }
        finally:
            await repo.close(2.0)

    states = asyncio.run(scenario())
    assert states["ten"][0] == ModelState.READY, states["ten"]
    state, reason = states["twelve"]
    assert state == ModelState.UNAVAILABLE, state
    assert "model twelve version 1" in reason and "class_names" in reason and "label 11" in reason, reason


def test_a_version_out_of_memory_in_its_last_class_check_says_so_not_class_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime running out of memory in the load's run of the card's last class (its arena's
    'Failed to allocate memory') refused the version blaming card.json's class_names ('does the
    graph take fewer than the card's 10 classes?'), with ORT's raw text and its C++ source path. The
    reason says memory ran out, as for any other model call of the load."""
    import asyncio

    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    from server_support import conditional_graph

    from genserve_server import loader
    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository
    from genserve_server.runner import Runner

    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    graph = conditional_graph(TINY_LATENT, 10, 3, 8, 8)
    write_model(
        root, "cond", "conditional_generator", graph, {**card, "class_names": [str(i) for i in range(10)]}
    )
    arena_failure = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Gemm node. "
        "Name:'fc' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 "
        "void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to "
        "allocate memory for requested buffer of size 536870912"
    )
    checking = []
    check_last_class = loader.check_last_class
    model_call = Runner._model_call

    def checked(*args: Any) -> None:
        checking.append(True)
        try:
            check_last_class(*args)
        finally:
            checking.clear()

    def no_memory_while_checking(self: Runner, *args: Any) -> Any:
        if checking:
            raise ort_state.Fail(arena_failure)
        return model_call(self, *args)

    monkeypatch.setattr(loader, "check_last_class", checked)
    monkeypatch.setattr(Runner, "_model_call", no_memory_while_checking)

    async def scenario() -> tuple[ModelState, str]:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            mv = repo.models["cond"].versions["1"]
            return mv.state, mv.reason
        finally:
            await repo.close(2.0)

    state, reason = asyncio.run(scenario())
    assert state == ModelState.UNAVAILABLE, state
    assert reason == (
        "out of memory while loading/warming up (ORT: Failed to allocate memory for requested buffer of "
        "size 536870912)"
    ), reason


def test_an_image_output_of_other_than_1_or_3_channels_is_refused_at_load_naming_channels(
    tmp_path: Path,
) -> None:
    """A user's generator with an alpha channel (RGBA, card.json's channels 4, as its graph says) or
    a gray+alpha one (2) loaded READY, though docs/model-repository.md's channels is 1 (gray) or 3
    (RGB): every PNG, JPEG, WebP or raw uint8 request then failed INTERNAL with a traceback in the
    log (encode_image takes 1 or 3 channels). It is refused at load, naming card.json and channels."""
    root = tmp_path / "models"
    for channels in (2, 4):
        card = {"latent_dim": TINY_LATENT, "channels": channels, "image_size": [8, 8]}
        write_model(root, f"ch{channels}", "generator", generator_graph(TINY_LATENT, channels, 8, 8), card)
    card = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]}
    write_model(root, "gray", "generator", generator_graph(TINY_LATENT, 1, 8, 8), card)

    with running_server(root, tmp_path / "work") as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        states = {
            m.name: (pb.ModelState.Name(m.versions[0].state), m.versions[0].reason)
            for m in stub.ListModels(pb.ListModelsRequest()).models
        }
        for channels in (2, 4):
            state, reason = states[f"ch{channels}"]
            assert state == "MODEL_STATE_UNAVAILABLE", (channels, state)
            assert "card.json" in reason and "channels" in reason and f"got {channels}" in reason, reason
        assert states["gray"][0] == "MODEL_STATE_READY", states["gray"]
        png = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG)
        assert len(stub.Sample(pb.SampleRequest(model="gray", count=2, output=png), timeout=30).images) == 2


@pytest.mark.parametrize("mode, warmup", [("run", True), ("cuda_graph", True), ("cuda_graph", False)])
def test_a_version_whose_first_outputs_are_not_the_cards_is_refused_at_load_in_every_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, warmup: bool
) -> None:
    """In CUDA-graph mode the load makes no call before warm-up (a call would capture a graph), so
    only the graph's declared output shape was checked: one whose output dims are symbolic (NHWC, or
    1 channel under a card whose channels is null, loaded as 3) loaded READY on a GPU with CUDA
    graphs and served wrong pixels or failed at its first request, where on CPU the probe's call
    refuses its load. A call's outputs after warm-up (or, without warm-up, at load) are checked
    against the card as the probe's are. (No GPU here: a CPU runner that says it is in CUDA-graph
    mode.)"""
    import asyncio

    from genserve_server.config import ServerConfig
    from genserve_server.metrics import Metrics
    from genserve_server.repository import ModelState, Repository
    from genserve_server.runner import Runner

    original_init = Runner.__init__

    def init_in_mode(self: Runner, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.mode = mode

    monkeypatch.setattr(Runner, "__init__", init_in_mode)
    root = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 3, "image_size": [8, 8]}
    symbolic = ["batch", "a", "b", "c"]
    write_model(root, "nhwc-symbolic", "generator", _generator(symbolic, [-1, 8, 8, 3], opaque=True), card)
    gray = _generator(symbolic, [-1, 1, 8, 8], opaque=True)
    write_model(root, "gray-card-null", "generator", gray, {**card, "channels": None})
    write_model(root, "good", "generator", _generator(symbolic, [-1, 3, 8, 8], opaque=True), card)

    async def scenario() -> None:
        repo = Repository(root, ServerConfig(warmup=warmup), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            versions = {name: repo.models[name].versions["1"] for name in repo.models}
            good = versions["good"]
            assert good.state == ModelState.READY, good.reason
            assert good.runner is not None and good.runner.mode == mode
            for name, shape in (("nhwc-symbolic", "[N, 8, 8, 3]"), ("gray-card-null", "[N, 1, 8, 8]")):
                mv = versions[name]
                assert mv.state == ModelState.UNAVAILABLE, (name, mv.state)
                reason = mv.reason or ""
                assert f"graph output 'image' has shape {shape}" in reason, reason
                assert "channels 3" in reason and "fix card.json's channels / image_size" in reason, reason
        finally:
            await repo.close(2.0)

    asyncio.run(scenario())

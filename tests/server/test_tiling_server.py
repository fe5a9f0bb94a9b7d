"""SuperResolve tiling inside the server: what a request with too many tiles costs before it is refused,
and what the load checks of a tiled model (its scale, its default tiling)."""

from __future__ import annotations

import asyncio
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from server_support import overflowing_super_resolution_graph, super_resolution_graph, write_model

from genserve.v1 import types_pb2 as tpb
from genserve_server import loader, tiling, validate
from genserve_server.config import ServerConfig, load_card
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import DeadlineExceeded, InvalidArgument
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository


@pytest.mark.parametrize("multiple", [1, 2, 4, 8])
def test_count_tiles_is_the_plans_length(multiple: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        h = multiple * int(rng.integers(1, 300 // multiple + 2))
        w = multiple * int(rng.integers(1, 300 // multiple + 2))
        overlap = int(rng.integers(0, 20))
        tile = int(rng.integers(max(2 * overlap + 8, 4 * overlap), 130))
        if tile // multiple <= -(-overlap // multiple):
            continue
        assert tiling.count_tiles(h, w, tile, overlap, multiple) == len(
            tiling.plan_tiles(h, w, tile, overlap, multiple)
        ), (h, w, tile, overlap, multiple)


def test_too_many_tiles_are_refused_before_any_tile_is_planned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 blank 1024x1024 PNGs (~3 KB each) in 8x8 tiles are 262,144 tiles, over the queue's 256.
    The refusal came only after plan_tiles had built every tile on the event loop: ~0.8 s during
    which the server answered nothing (a grpc.health Check waited 0.85 s), for each such request."""
    write_model(
        tmp_path,
        "sr",
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
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 256}},
    )
    planned: list[Any] = []
    real_plan = tiling.plan_tiles

    def counting_plan(*args: Any, **kwargs: Any) -> list[tiling.Tile]:
        plan = real_plan(*args, **kwargs)
        planned.append(len(plan))
        return plan

    monkeypatch.setattr(tiling, "plan_tiles", counting_plan)
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(1024 * 1024 * 3), shape=[1024, 1024, 3])

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        core = GenerationCore(repo, config, metrics, pool)
        out = validate.output_spec(tpb.IMAGE_FORMAT_JPEG, 1, None, False)
        call = Call("SuperResolve", "test", time.monotonic(), metrics.unresolved())
        try:
            mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
            with pytest.raises(InvalidArgument) as excinfo:
                await core.upscale(mv, call, [image] * 4, 8, 0, out)
            assert str(excinfo.value).startswith("tile_size: 4 image(s) cut into 65536 tiles of 8x8")
            assert "max_queue_size=256" in str(excinfo.value)
            assert planned == [], f"planned {sum(planned)} tiles of a request refused for its tile count"
            # Within the queue: planned as before.
            small = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(40 * 60 * 3), shape=[40, 60, 3])
            upscaled = await core.upscale(mv, call, [small], 16, 0, out)
            assert upscaled.tiles == [tiling.count_tiles(40, 60, 16, 0)] and planned == upscaled.tiles
        finally:
            if call.batcher is not None:
                call.batcher.release()
            await repo.close(1)
            pool.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


SR_X2_CARD = {
    "channels": 3,
    "input_channels": 3,
    "input_range": [0.0, 1.0],
    "scale_factor": 2,
    "size_multiple": 1,
    "min_size": 4,
}


def load_sr_x2(root: Path, **card: Any) -> tuple[str, str]:
    """(state, reason) of version 1 of a x2 super-resolution graph loaded under `root` with card.json
    SR_X2_CARD updated by `card`."""
    write_model(root, "sr", "super_resolution", super_resolution_graph(2), {**SR_X2_CARD, **card})

    async def main() -> tuple[str, str]:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        mv = repo.get("sr").versions["1"]
        try:
            return mv.state.name, mv.reason
        finally:
            await repo.close(1)

    return asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("card_scale", [1, 4])
def test_a_card_scale_factor_the_graph_does_not_have_fails_the_load(tmp_path: Path, card_scale: int) -> None:
    """The graph upscales x2. With card.json saying x4 (or x1) the version loaded READY, and then
    SuperResolve answered OK with images of the wrong size (a 20x20 input gave 40x40, not 80x80) or
    with each tile's top-left crop of the real output (x1), and INTERNAL for multi-tile images."""
    state, reason = load_sr_x2(tmp_path, scale_factor=card_scale, tile_size=32, tile_overlap=4)
    assert state == "UNAVAILABLE"
    assert "scale_factor" in reason and f"{card_scale}" in reason and "128x128" in reason, reason


@pytest.mark.parametrize(
    ("tiling_card", "named"),
    [
        ({"tile_size": 4, "tile_overlap": 0}, "tile_size 4"),
        ({"tile_size": 96, "tile_overlap": 300}, "tile_overlap 300"),
        ({"tile_size": 16, "tile_overlap": 0, "min_size": 32}, "min_size 32"),  # every tile below it
    ],
)
def test_a_card_default_tiling_no_request_could_use_fails_the_load(
    tmp_path: Path, tiling_card: dict[str, int], named: str
) -> None:
    """card.json's tile_size / tile_overlap are the defaults of every request that sets none. Ones
    that cannot be planned loaded READY, then every such request was refused with INVALID_ARGUMENT
    blaming a tile_size or tile_overlap the client never sent: the load fails, naming card.json."""
    state, reason = load_sr_x2(tmp_path, **tiling_card)
    assert state == "UNAVAILABLE"
    assert "card.json" in reason and named in reason, reason


@pytest.mark.parametrize(
    ("min_size", "multiple", "probe"), [(4, 1, 64), (96, 1, 96), (4, 5, 70), (100, 8, 112)]
)
def test_the_radius_probe_is_at_least_min_size_with_halves_in_whole_multiples(
    tmp_path: Path, min_size: int, multiple: int, probe: int
) -> None:
    """The load's receptive-field probe ran at 64x64 whatever the card's min_size (a graph that needs
    96 pixels failed its load), and with halves off the size multiple for odd multiples."""
    write_model(
        tmp_path,
        "sr",
        "super_resolution",
        super_resolution_graph(2),
        {**SR_X2_CARD, "size_multiple": multiple, "min_size": min_size},
    )
    card = load_card(tmp_path / "sr" / "1" / "card.json")
    seen: list[tuple[int, ...]] = []

    class NearestX2:
        def run_sync(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append(inputs["image"].shape)
            return {"output_image": inputs["image"].repeat(2, axis=2).repeat(2, axis=3)}

    assert loader.measure_tile_radius(card, NearestX2()) == 0  # type: ignore[arg-type]
    assert {shape[2:] for shape in seen} == {(probe, probe)}


def test_a_super_resolve_whose_tiles_of_two_shapes_expire_in_the_queue_counts_one_drop(
    tmp_path: Path,
) -> None:
    """Images of two sizes are two parts (tiles of two shapes, batched apart, gathered by
    core.gather_or_cancel). When the deadline passed while both waited behind a busy runner, each
    part was counted: genserve_requests_dropped_total{reason="deadline"} rose by 2 for one request
    (the counter counts requests, docs/metrics.md)."""
    write_model(
        tmp_path,
        "sr",
        "super_resolution",
        super_resolution_graph(2),
        SR_X2_CARD,
        config={"instances": 1, "batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0}},
    )

    def raw(h: int, w: int) -> tpb.Image:
        return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(h * w * 3), shape=[h, w, 3])

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=True)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        core = GenerationCore(repo, config, metrics, pool)
        out = validate.output_spec(tpb.IMAGE_FORMAT_RAW_UINT8, 0, None, False)
        busy = Call("SuperResolve", "busy", time.monotonic(), metrics.unresolved())
        call = Call("SuperResolve", "late", time.monotonic(), metrics.unresolved())
        try:
            mv = core.resolve(busy, "sr", "", ("super_resolution",), "SuperResolve")
            core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
            batcher = mv.batcher
            assert batcher is not None
            gate, computing = asyncio.Event(), asyncio.Event()
            run_batch = batcher._run_batch

            async def held_once(key: Any, inputs: Any) -> Any:
                if not computing.is_set():
                    computing.set()
                    await gate.wait()
                return await run_batch(key, inputs)

            batcher._run_batch = held_once
            blocker = asyncio.ensure_future(core.upscale(mv, busy, [raw(16, 16)], 32, 0, out))
            await computing.wait()
            call.deadline = time.monotonic() + 1.0
            late = asyncio.ensure_future(core.upscale(mv, call, [raw(20, 20), raw(24, 24)], 32, 0, out))
            while batcher.queued_rows < 2:  # both parts queued behind the held batch
                await asyncio.sleep(0.001)
            while time.monotonic() < call.deadline:
                await asyncio.sleep(call.deadline - time.monotonic() + 0.001)
            gate.set()
            with pytest.raises(DeadlineExceeded):
                await late
            await blocker
        finally:
            for c in (busy, call):
                if c.batcher is not None:
                    c.batcher.release()
            await repo.close(1)
            pool.shutdown()
        labels = {"model": "sr", "version": "1", "reason": "deadline"}
        assert metrics.registry.get_sample_value("genserve_requests_dropped_total", labels) == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_graph_whose_output_is_not_finite_on_the_radius_probe_loads_with_a_warning_and_no_radius(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The load measures the receptive-field radius by how far a change of content moves the output.
    Where a graph's output was Inf, Inf - Inf = NaN compared as 'not moved' (with numpy's 'invalid
    value encountered in subtract' RuntimeWarning logged): this radius-1 graph measured radius 0 and
    served tiles with no margin. The measurement fails instead: a WARNING naming the version and the
    NaN/Inf outputs, and no radius (card.json's overlap, blended), as for a graph that is not local."""
    write_model(
        tmp_path,
        "sr",
        "super_resolution",
        overflowing_super_resolution_graph(2),
        {**SR_X2_CARD, "tile_overlap": 4},
    )

    async def main() -> tuple[str, int | None]:
        repo = Repository(tmp_path, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        mv = repo.get("sr").versions["1"]
        try:
            return mv.state.name, mv.tile_radius
        finally:
            await repo.close(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        with caplog.at_level("INFO", logger="genserve_server"):
            state, radius = asyncio.run(asyncio.wait_for(main(), 60))
    assert (state, radius) == ("READY", None)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "sr/1" in r.getMessage()]
    assert any("NaN/Inf" in line and "receptive-field radius" in line for line in warned), warned
    assert not [r for r in caplog.records if "tile receptive-field radius" in r.getMessage()]


def fixed_size_sr_graph(scale: int, side: int, out_side: int) -> onnx.ModelProto:
    """super_resolution_graph(scale) exported at one size: input [N, 3, side, side], output declared
    [N, 3, out_side, out_side] (side x scale for a consistent graph)."""
    graph = super_resolution_graph(scale)
    for tensor, size in ((graph.graph.input[0], side), (graph.graph.output[0], out_side)):
        for dim in tensor.type.tensor_type.shape.dim[2:]:
            dim.dim_value = size
    return graph


def load_states(root: Path) -> dict[str, tuple[str, str]]:
    """{name: (state, reason)} of version 1 of each model under `root`, loaded in-process."""

    async def main() -> dict[str, tuple[str, str]]:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            return {m.name: (m.versions["1"].state.name, m.versions["1"].reason) for m in repo}
        finally:
            await repo.close(1)

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_a_fixed_size_super_resolution_card_takes_image_size_as_its_input_size(tmp_path: Path) -> None:
    """A super-resolution card's image_size is its graph's one input size, the output being
    scale_factor x it (docs/model-repository.md). The load checked the image output against
    image_size itself, so a fixed-size x2 model never loaded (its 8x8 input gives 16x16). It loads,
    and a graph whose output is not image_size x scale_factor fails naming both sizes."""
    card = {**SR_X2_CARD, "image_size": [8, 8], "tile_size": 8, "tile_overlap": 0}
    write_model(tmp_path, "sr-fixed", "super_resolution", fixed_size_sr_graph(2, 8, 16), card)
    write_model(tmp_path, "sr-dynamic", "super_resolution", super_resolution_graph(2), card)
    # A x2 card on a x1 graph exported at 8x8: its output is 8x8, not 16x16.
    write_model(tmp_path, "sr-x1", "super_resolution", fixed_size_sr_graph(1, 8, 8), card)
    states = load_states(tmp_path)
    assert states["sr-fixed"][0] == "READY", states["sr-fixed"]
    assert states["sr-dynamic"][0] == "READY", states["sr-dynamic"]
    state, reason = states["sr-x1"]
    assert state == "UNAVAILABLE", reason
    assert "image_size 8x8" in reason and "16x16" in reason and "scale_factor 2" in reason, reason


def test_a_fixed_size_super_resolution_model_takes_each_image_as_one_tile_of_its_size(tmp_path: Path) -> None:
    """An SR model exported at one input size (card.json's image_size) takes each image whole: a
    request's tile_size, or the card's default tile_size, below that size cut tiles the graph cannot
    take (16x16 images in 8x8 tiles: ONNX Runtime's 'Got invalid dimensions', INTERNAL). A request
    that sets no tile_size is one tile of the fixed size; a tile_size below it is refused naming
    tile_size and the fixed size; a larger one (the image fits it) is served as before."""
    card = {**SR_X2_CARD, "image_size": [16, 16], "tile_size": 8, "tile_overlap": 0}
    write_model(tmp_path, "sr", "super_resolution", fixed_size_sr_graph(2, 16, 32), card)
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(16 * 16 * 3), shape=[16, 16, 3])

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        core = GenerationCore(repo, config, metrics, pool)
        out = validate.output_spec(tpb.IMAGE_FORMAT_RAW_UINT8, 0, None, False)
        call = Call("SuperResolve", "test", time.monotonic(), metrics.unresolved())
        try:
            mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
            for tile_size, tile_overlap in ((0, None), (0, 2), (16, None), (64, 4), (1024, None)):
                upscaled = await core.upscale(mv, call, [image, image], tile_size, tile_overlap, out)
                assert upscaled.tiles == [1, 1], (tile_size, tile_overlap)
                assert [list(i.shape) for i in upscaled.images] == [[32, 32, 3]] * 2
            for tile_size in (8, 12, 1025):
                with pytest.raises(InvalidArgument) as excinfo:
                    await core.upscale(mv, call, [image], tile_size, None, out)
                message = str(excinfo.value)
                assert message.startswith("tile_size: ") and message.endswith(f"got {tile_size}"), message
                assert "16x16" in message and "image_size" in message, message
        finally:
            if call.batcher is not None:
                call.batcher.release()
            await repo.close(1)
            pool.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_fixed_size_super_resolution_card_whose_size_is_no_multiple_of_size_multiple_fails_to_load(
    tmp_path: Path,
) -> None:
    """H and W must be multiples of size_multiple (docs/model-repository.md), and SuperResolve pads
    each image to it: a 10x10 image of a graph exported at 10x10 under size_multiple 4 became 12x12,
    cut in 8x8 tiles, neither of which the graph takes (INTERNAL 'model call failed' on every
    request of a model loaded READY). The load refuses the card naming both values."""
    card = {**SR_X2_CARD, "image_size": [10, 10], "size_multiple": 4, "tile_size": 8, "tile_overlap": 0}
    write_model(tmp_path, "sr", "super_resolution", fixed_size_sr_graph(2, 10, 20), card)
    write_model(
        tmp_path,
        "sr-ok",
        "super_resolution",
        fixed_size_sr_graph(2, 12, 24),
        {**card, "image_size": [12, 12]},
    )
    states = load_states(tmp_path)
    assert states["sr-ok"][0] == "READY", states["sr-ok"]
    state, reason = states["sr"]
    assert state == "UNAVAILABLE", reason
    assert "image_size" in reason and "10x10" in reason and "size_multiple 4" in reason, reason


def test_an_image_off_the_size_multiple_is_upscaled_as_the_untiled_padded_run_cropped_back(
    tmp_path: Path,
) -> None:
    """SuperResolve pads an image to the card's size_multiple (bottom/right, reflect), runs it (in
    tiles or as one), and crops the output back to H x W x scale: a 50x70 image cut into tiles and a
    10x14 one within one tile (a request of its own: one-tile requests skip the blend), under
    size_multiple 4, give 100x140 and 20x28, equal to the untiled graph on the padded image with the
    padding's output cut off."""
    ort = pytest.importorskip("onnxruntime")
    card = {**SR_X2_CARD, "size_multiple": 4, "tile_size": 32, "tile_overlap": 8}
    write_model(tmp_path, "sr", "super_resolution", super_resolution_graph(2), card)
    rng = np.random.default_rng(7)
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (10, 14))]
    images = [
        tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=p.tobytes(), shape=list(p.shape)) for p in pixels
    ]

    async def main() -> tuple[list[int], list[np.ndarray]]:
        tiles: list[int] = []
        got: list[np.ndarray] = []
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        core = GenerationCore(repo, config, metrics, pool)
        out = validate.output_spec(tpb.IMAGE_FORMAT_TENSOR_F32, 0, None, False)
        call = Call("SuperResolve", "test", time.monotonic(), metrics.unresolved())
        try:
            mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
            for image in images:
                upscaled = await core.upscale(mv, call, [image], 0, None, out)
                tiles += upscaled.tiles
                got += [np.frombuffer(i.data, dtype="<f4").reshape(i.shape) for i in upscaled.images]
            return tiles, got
        finally:
            if call.batcher is not None:
                call.batcher.release()
            await repo.close(1)
            pool.shutdown()

    tiles, got = asyncio.run(asyncio.wait_for(main(), 60))
    assert tiles[0] >= 4 and tiles[1] == 1, tiles
    session = ort.InferenceSession(
        str(tmp_path / "sr" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for p, image in zip(pixels, got, strict=True):
        h, w = p.shape[:2]
        x = p.transpose(2, 0, 1).astype(np.float32) / 255
        x = np.pad(x, ((0, 0), (0, -h % 4), (0, -w % 4)), mode="reflect")[np.newaxis]
        (untiled,) = session.run(None, {"image": x})
        assert image.shape == (3, 2 * h, 2 * w)
        np.testing.assert_allclose(image, untiled[0, :, : 2 * h, : 2 * w], rtol=0, atol=1e-5)

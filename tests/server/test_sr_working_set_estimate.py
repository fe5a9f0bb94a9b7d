"""SuperResolve's working-set estimate (tiling.working_set_bytes, held against sr_working_set_bytes)
against what the request really allocates: the Python/numpy bytes traced by tracemalloc around
GenerationCore.upscale on a real loaded model, less the encoded response (the response budget holds
those). ONNX Runtime's own buffers are not traced: the estimate must bound the traced bytes alone."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import (
    feature_super_resolution_graph,
    queued_behind_a_budget,
    run_with_core,
    super_resolution_graph,
    working_set_of,
    write_model,
)
from test_translate_working_set import gradient_png

from genserve.v1 import types_pb2 as tpb
from genserve_export.activations import card_activation_bytes
from genserve_server import tiling, validate
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore, Upscaled
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository

RAW, PNG, TENSOR = tpb.IMAGE_FORMAT_RAW_UINT8, tpb.IMAGE_FORMAT_PNG, tpb.IMAGE_FORMAT_TENSOR_F32

# (images, height, width, tile_size, tile_overlap, format)
CASES = [
    (1, 256, 256, 64, 8, RAW),
    (1, 240, 200, 48, 8, PNG),
    (1, 256, 256, 32, 8, RAW),
    (2, 160, 160, 64, 8, RAW),
    (1, 200, 200, 64, 8, TENSOR),
    (3, 120, 120, 1024, 0, RAW),  # one tile an image: no blend
]


@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_the_working_set_estimate_bounds_what_a_super_resolve_allocates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_batch_size: int
) -> None:
    """The estimate counted every tile's input and output, intermediates for one batch of tiles and
    the blend canvases, but not the decoded input nor the encode's copies of the output image (a
    float32 scaled copy and two uint8 ones, each as large as the image): with a small batch the
    allocations measured at the encode were 1.2-1.5x the estimate held against sr_working_set_bytes."""
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
        config={
            "batching": {"max_batch_size": max_batch_size, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}
        },
    )
    estimates: list[int] = []
    real_estimate = tiling.working_set_bytes

    def recording(*args: Any, **kwargs: Any) -> int:
        estimates.append(real_estimate(*args, **kwargs))
        return estimates[-1]

    monkeypatch.setattr(tiling, "working_set_bytes", recording)
    rng = np.random.default_rng(0)

    async def main() -> list[tuple[Any, int, int]]:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(2)
        core = GenerationCore(repo, config, metrics, pool)
        measured = []
        try:
            for case in CASES:
                n, h, w, tile, overlap, fmt = case
                image = tpb.Image(
                    format=RAW,
                    data=rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes(),
                    shape=[h, w, 3],
                )
                out = validate.output_spec(fmt, 0, None, False)
                call = Call("SuperResolve", "test", time.monotonic(), metrics.unresolved())
                mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
                estimates.clear()
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    upscaled = await core.upscale(mv, call, [image] * n, tile, overlap, out)
                    peak = tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()
                    if call.batcher is not None:
                        call.batcher.release()
                response = sum(len(im.data) for im in upscaled.images)
                assert len(estimates) == 1
                measured.append((case, peak - response, estimates[0]))
        finally:
            await repo.close(1)
            pool.shutdown()
        return measured

    measured = asyncio.run(asyncio.wait_for(main(), 120))
    over = [
        (case, real, estimate, round(real / estimate, 2))
        for case, real, estimate in measured
        if real > estimate
    ]
    assert not over, f"allocated more than the working-set estimate: {over}"


def write_sr(root: Path, batching: dict[str, Any]) -> None:
    write_model(
        root,
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
        config={"batching": {"max_queue_delay_ms": 1.0, "max_queue_size": 1024, **batching}},
    )


def test_super_resolves_waiting_for_the_working_set_hold_no_decoded_image(tmp_path: Path) -> None:
    """SuperResolve decoded its images to float32 (and padded them) before it waited for its working
    set, so every call waiting for sr_working_set_bytes kept its decoded images outside the budget:
    memory grew with the callers waiting, which the budget exists to prevent. A call now sizes its
    working set from what its images declare and decodes them once it holds it."""
    write_sr(tmp_path, {"max_batch_size": 4})
    side, waiting_calls = 256, 8
    image = tpb.Image(format=PNG, data=gradient_png(side))
    decoded = 4 * 3 * side * side  # one image as float32
    out = validate.output_spec(PNG, 0, None, False)

    async def body(repo: Repository, core: GenerationCore) -> None:
        calls: list[Call] = []

        def upscale() -> Coroutine[Any, Any, Upscaled]:
            call = Call("SuperResolve", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
            calls.append(call)
            mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
            return core.upscale(mv, call, [image], 64, 8, out)

        budget = core.sr_working_set
        try:
            budget.limit = await working_set_of(budget, upscale)  # one call at a time
            waiting, peak, results = await queued_behind_a_budget(budget, [upscale] * waiting_calls)
        finally:
            for call in calls:
                if call.batcher is not None:
                    call.batcher.release()
                if call.response is not None:
                    call.response.release()
        assert all(r.images[0].shape == (2 * side, 2 * side, 3) for r in results)
        assert waiting < decoded, (
            f"{waiting_calls} waiting calls held {waiting} bytes, one image decoded is {decoded}"
        )
        responses = sum(len(im.data) for r in results for im in r.images)
        assert peak <= budget.limit + responses + (1 << 20), (peak, budget.limit, responses)
        assert budget.held == 0

    run_with_core(tmp_path, body)


def test_the_working_set_counts_the_tiles_a_batch_takes_within_max_batch_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate counted max_batch_size tiles computed at once where max_batch_pixels lets a batch
    of them take fewer (Batcher.most_rows, as Translate's does)."""
    write_sr(tmp_path, {"max_batch_size": 8, "max_batch_pixels": 2 * 64 * 64})
    batch_rows: list[int] = []
    real_estimate = tiling.working_set_bytes

    def recording(*args: Any, **kwargs: Any) -> int:
        batch_rows.append(args[5])
        return real_estimate(*args, **kwargs)

    monkeypatch.setattr(tiling, "working_set_bytes", recording)
    image = tpb.Image(format=PNG, data=gradient_png(160))
    out = validate.output_spec(PNG, 0, None, False)

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("SuperResolve", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
        try:
            upscaled = await core.upscale(mv, call, [image], 64, 8, out)
        finally:
            if call.batcher is not None:
                call.batcher.release()
        assert upscaled.tiles == [9]
        assert max(upscaled.executed_batch_sizes) == 2

    run_with_core(tmp_path, body)
    assert batch_rows == [2]


def test_a_model_with_several_instances_holds_the_intermediates_of_the_tile_batches_they_compute_at_once(
    tmp_path: Path,
) -> None:
    """The estimate counted the intermediates of one batch of tiles, while a model of `instances: 2`
    (the bundled SR cards' config) computes two batches of one call's tiles at once, each holding its
    own: the real server's peak RSS rose 1.4-1.8x the working set held for a tiled 256² sr-photos-x4.
    It now counts min(instances, the batches the call's tiles need) batches computed at once."""
    card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [0.0, 1.0],
        "scale_factor": 2,
        "size_multiple": 1,
        "tile_size": 96,
        "tile_overlap": 8,
        "min_size": 4,
        # Intermediates well above the blend canvas: the computing phase is the larger one.
        "activation_bytes_per_output_value": 400.0,
    }
    for name, instances in (("one", 1), ("two", 2), ("three", 3)):
        batching = {"max_batch_size": 2, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}
        config = {"instances": instances, "batching": batching}
        write_model(tmp_path, name, "super_resolution", super_resolution_graph(2), card, config=config)
    out = validate.output_spec(TENSOR, 0, None, False)
    # (height, width, tile_size): 9 tiles of 64² (5 batches of at most 2); 2 tiles (1 batch); 1 tile.
    cases = {"nine tiles": (160, 160, 64), "two tiles": (64, 72, 64), "one tile": (160, 160, 1024)}
    assert [tiling.count_tiles(h, w, tile, 8) for h, w, tile in cases.values()] == [9, 2, 1]
    held: dict[tuple[str, str], int] = {}

    async def body(repo: Repository, core: GenerationCore) -> None:
        for case, (height, width, tile) in cases.items():
            image = tpb.Image(format=RAW, data=bytes(height * width * 3), shape=[height, width, 3])
            for name in ("one", "two", "three"):
                call = Call("SuperResolve", "test", time.monotonic(), core.metrics.unresolved())
                mv = core.resolve(call, name, "", ("super_resolution",), "SuperResolve")
                assert mv.provider == "CPUExecutionProvider"
                upscale = functools.partial(core.upscale, mv, call, [image], tile, 8, out)
                try:
                    held[name, case] = await working_set_of(core.sr_working_set, upscale)
                finally:
                    if call.batcher is not None:
                        call.batcher.release()
                    if call.response is not None:
                        call.response.release()

    run_with_core(tmp_path, body)
    copies = tiling.computing_copies(400.0, on_cpu=True)
    out_tile = 4 * 3 * 128 * 128  # a 64² tile's float32 output at x2
    # Two instances: two batches of 2 tiles at once, 2 more tiles' intermediates than one instance;
    # three instances: the 3 batches of 2 tiles that run at once, 4 more.
    one = held["one", "nine tiles"]
    assert held["two", "nine tiles"] - one == pytest.approx(copies * 2 * out_tile, abs=2)
    assert held["three", "nine tiles"] - one == pytest.approx(copies * 4 * out_tile, abs=2)
    # A call whose tiles need one batch (or are one tile): no other instance computes any of them.
    for case in ("two tiles", "one tile"):
        assert held["one", case] == held["two", case] == held["three", case], case


# One SuperResolve in a fresh process (its own arena and heap): the rise of its peak RSS (VmHWM after
# clear_refs, less VmRSS before), the working set it held (sr_working_set) and its response's bytes.
# A 16² call first loads what the first encode loads and starts the pool's thread.
PEAK_RSS_OF_ONE_CALL = """
import asyncio, json, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
from genserve.v1 import types_pb2 as tpb
from genserve_server import validate
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

async def main(root, side):
    config, metrics = ServerConfig(), Metrics(enabled=False)
    repo = Repository(Path(root), config, metrics)
    repo.scan()
    await repo.load_all()
    pool = ThreadPoolExecutor(1)
    core = GenerationCore(repo, config, metrics, pool)
    out = validate.output_spec(tpb.IMAGE_FORMAT_PNG, 0, None, False)
    held = []
    acquire = core.sr_working_set.acquire
    async def recording(n_bytes, deadline, what):
        held.append(n_bytes)
        return await acquire(n_bytes, deadline, what)
    core.sr_working_set.acquire = recording
    rng = np.random.default_rng(0)
    result = {}
    for h in (16, side):
        pixels = rng.integers(0, 256, (h, h, 3), dtype=np.uint8)
        image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=pixels.tobytes(), shape=[h, h, 3])
        call = Call("SuperResolve", "test", time.monotonic(), metrics.unresolved(), unary=True)
        mv = core.resolve(call, "sr", "", ("super_resolution",), "SuperResolve")
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        upscaled = await core.upscale(mv, call, [image], 0, None, out)
        result = {
            "rise": status("VmHWM") - before,
            "held": held[-1],
            "response": sum(len(im.data) for im in upscaled.images),
            "tiles": upscaled.tiles,
        }
        call.batcher.release()
        call.response.release()
    await repo.close(1)
    pool.shutdown()
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def peak_rss_rise_of_one_super_resolve(root: Path, side: int) -> dict[str, Any]:
    """PEAK_RSS_OF_ONE_CALL on the model "sr" of `root`, one RAW image of side x side, PNG out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_OF_ONE_CALL, str(root), str(side)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc clear_refs")
def test_a_tiled_super_resolve_on_the_cpu_rises_the_peak_rss_by_no_more_than_it_holds(tmp_path: Path) -> None:
    """The estimate counted the larger of the compute phase (the model's intermediates) and the finish
    (blend canvases, the encode's copies), as if the intermediates' memory served the finish. On the
    CPU provider it does not: ONNX Runtime's arena keeps the blocks the call grew it by, so the
    blend and the encode allocate on top of them, and one tiled SuperResolve rose the process's
    peak RSS 1.2-1.3x what it held (sr-photos-x4, 256², one tile a batch: 88 MiB against 67 MiB).
    On the CPU the two phases now add. The response's bytes are the response budget's."""
    card: dict[str, Any] = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [0.0, 1.0],
        "scale_factor": 2,
        "size_multiple": 1,
        "tile_size": 64,
        "tile_overlap": 16,
        "min_size": 4,
    }
    model = feature_super_resolution_graph(2, 32)
    card["activation_bytes_per_output_value"] = card_activation_bytes(card, model)  # as export counts it
    # One tile a batch: the intermediates are small beside the finish's copies, which the estimate
    # counted in their place.
    config = {"batching": {"max_batch_size": 1, "max_queue_delay_ms": 1.0, "max_queue_size": 1024}}
    write_model(tmp_path, "sr", "super_resolution", model, card, config=config)
    measured = peak_rss_rise_of_one_super_resolve(tmp_path, 256)
    assert measured["tiles"] == [25]
    ratio = measured["rise"] / (measured["held"] + measured["response"])
    assert ratio <= 1.0, f"peak RSS rose {ratio:.2f}x the working set held plus the response: {measured}"

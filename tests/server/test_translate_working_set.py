"""Translate's working set (tiling.working_set_bytes over whole images, held against
translate_working_set_bytes as SuperResolve's is against sr_working_set_bytes) against what the
request really allocates: the Python/numpy bytes traced by tracemalloc around
GenerationCore.translate on a real loaded model, less the encoded response (the response budget
holds those). ONNX Runtime's own buffers are not traced: the estimate must bound the traced bytes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import tracemalloc
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import (
    hold_runs,
    image_to_image_graph,
    queued_behind_a_budget,
    run_with_core,
    working_set_of,
    write_model,
)
from translator_models import write_translator

from genserve.v1 import types_pb2 as tpb
from genserve_server import codecs, validate
from genserve_server.core import Call, GenerationCore, Upscaled
from genserve_server.repository import Repository
from genserve_server.response_budget import ByteBudget

PNG, JPEG, RAW, TENSOR = (
    tpb.IMAGE_FORMAT_PNG,
    tpb.IMAGE_FORMAT_JPEG,
    tpb.IMAGE_FORMAT_RAW_UINT8,
    tpb.IMAGE_FORMAT_TENSOR_F32,
)

# (model, images, height, width, output format, direction)
CASES = [
    ("i2i", 1, 256, 256, PNG, validate.A_TO_B),
    ("i2i", 4, 128, 128, JPEG, validate.A_TO_B),
    ("i2i", 3, 126, 130, RAW, validate.A_TO_B),  # padded to the size multiple: a padded copy each
    ("i2i", 2, 160, 160, TENSOR, validate.A_TO_B),
    ("tiny-cyclegan", 4, 200, 200, PNG, validate.B_TO_A),
]


def test_what_a_translate_allocates_is_held_against_a_working_set_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Translate held only its response's bytes (response_budget_bytes) while it decoded its images
    to float32, padded and stacked them, ran the model and encoded the outputs: 10-14x those bytes,
    so concurrent large Translates took many times the configured budgets. Each call now holds an
    estimate of that working set (SuperResolve's, over whole images) against its own budget."""
    write_model(
        tmp_path,
        "i2i",
        "image_to_image",
        image_to_image_graph(4),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 8},
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0}},
    )
    write_translator(tmp_path)
    held: list[int] = []
    real_acquire = ByteBudget.acquire

    async def recording(self: ByteBudget, n_bytes: int, deadline: float | None, what: str) -> int:
        got = await real_acquire(self, n_bytes, deadline, what)
        if "response_budget_bytes" not in self.name:  # the response's bytes are subtracted below
            held.append(got)
        return got

    monkeypatch.setattr(ByteBudget, "acquire", recording)
    rng = np.random.default_rng(0)
    measured: list[tuple[Any, int, int]] = []

    async def body(repo: Repository, core: GenerationCore) -> None:
        for case in CASES:
            name, n, h, w, fmt, direction = case
            channels = 1 if name == "tiny-cyclegan" else 3
            image = tpb.Image(
                format=RAW,
                data=rng.integers(0, 256, (h, w, channels), dtype=np.uint8).tobytes(),
                shape=[h, w, channels],
            )
            out = validate.output_spec(fmt, 0, None, False)
            call = Call("Translate", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
            mv = core.resolve(call, name, "", ("image_to_image", "two_way_translator"), "Translate")
            held.clear()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                translated = await core.translate(mv, call, [image] * n, out, direction)
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
                if call.batcher is not None:
                    call.batcher.release()
                if call.response is not None:
                    call.response.release()
            response = sum(len(im.data) for im in translated.images)
            measured.append((case, peak - response, sum(held)))
        # Every working set held was given back.
        assert all(b.held == 0 for b in vars(core).values() if isinstance(b, ByteBudget))

    run_with_core(tmp_path, body)
    over = [
        (case, real, estimate, round(real / max(estimate, 1), 2))
        for case, real, estimate in measured
        if real > estimate
    ]
    assert not over, f"allocated more than the working set held (case, bytes, held, ratio): {over}"


def gradient_png(side: int) -> bytes:
    """A smooth RGB image: a few KB of PNG that decodes to side x side pixels."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[None, ::-1]), axis=-1)
    return codecs.encode_image(pixels.astype(np.uint8), PNG)[0]


def test_translates_waiting_for_the_working_set_hold_no_decoded_image(tmp_path: Path) -> None:
    """Translate decoded its images to float32 (and padded them) before it waited for its working
    set, so every call waiting for translate_working_set_bytes kept its decoded images outside the
    budget: memory grew with the callers waiting, which the budget exists to prevent. A call now
    sizes its working set from what its images declare and decodes them once it holds it."""
    write_model(
        tmp_path,
        "i2i",
        "image_to_image",
        image_to_image_graph(4),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 8},
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0}},
    )
    side, waiting_calls = 384, 8
    image = tpb.Image(format=PNG, data=gradient_png(side))
    decoded = 4 * 3 * side * side  # one image as float32
    out = validate.output_spec(JPEG, 0, None, False)

    async def body(repo: Repository, core: GenerationCore) -> None:
        calls: list[Call] = []

        def translate() -> Coroutine[Any, Any, Upscaled]:
            call = Call("Translate", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
            calls.append(call)
            mv = core.resolve(call, "i2i", "", ("image_to_image",), "Translate")
            return core.translate(mv, call, [image], out)

        budget = core.translate_working_set
        try:
            budget.limit = await working_set_of(budget, translate)
            waiting, peak, results = await queued_behind_a_budget(budget, [translate] * waiting_calls)
        finally:
            for call in calls:
                if call.batcher is not None:
                    call.batcher.release()
                if call.response is not None:
                    call.response.release()
        assert all(r.images[0].shape == (side, side, 3) for r in results)
        assert waiting < decoded, (
            f"{waiting_calls} waiting calls held {waiting} bytes, one decoded image is {decoded}"
        )
        responses = sum(len(im.data) for r in results for im in r.images)
        assert peak <= budget.limit + responses + (1 << 20), (peak, budget.limit, responses)
        assert budget.held == 0

    run_with_core(tmp_path, body)


def test_a_translate_on_the_cpu_holds_the_intermediates_its_card_counts(tmp_path: Path) -> None:
    """The working set counted a model call's intermediates as 3 output-sized float32 copies
    (TILE_OUTPUT_COPIES - 1) whatever the graph: ONNX Runtime's CPU peak measured 12x the output for
    sr-photos-x4, 45x for pix2pix-colorize, 87x for unet-denoise, so translate_working_set_bytes
    admitted 10-20x its bytes. A card's activation_bytes_per_output_value (what export counts from
    the graph) now sizes them on the CPU provider: ORT_CPU_FACTOR x the counted bytes a value. A
    card without it keeps the constant."""
    card = {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 8}
    config = {"batching": {"max_batch_size": 1, "max_queue_delay_ms": 1.0}}
    counted = {**card, "activation_bytes_per_output_value": 400.0}
    write_model(tmp_path, "counted", "image_to_image", image_to_image_graph(4), counted, config=config)
    write_model(tmp_path, "uncounted", "image_to_image", image_to_image_graph(4), card, config=config)
    side = 64
    image = tpb.Image(format=RAW, data=bytes(side * side * 3), shape=[side, side, 3])
    out = validate.output_spec(TENSOR, 0, None, False)
    held: dict[str, int] = {}

    async def body(repo: Repository, core: GenerationCore) -> None:
        for name in ("counted", "uncounted"):
            call = Call("Translate", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
            mv = core.resolve(call, name, "", ("image_to_image",), "Translate")
            assert mv.provider == "CPUExecutionProvider"
            try:
                translate = functools.partial(core.translate, mv, call, [image], out)
                held[name] = await working_set_of(core.translate_working_set, translate)
            finally:
                if call.batcher is not None:
                    call.batcher.release()
                if call.response is not None:
                    call.response.release()

    run_with_core(tmp_path, body)
    output = 4 * 3 * side * side  # the output image, float32
    # The decoded input, the model's input and output, and 3 output-sized copies (TENSOR_F32: no encode).
    assert held["uncounted"] == output + 2 * output + 3 * output
    # ORT_CPU_FACTOR (2) x 400 bytes a value = 200 output-sized float32 copies in place of 3.
    assert held["counted"] == held["uncounted"] + (200 - 3) * output


def test_a_card_counting_more_bytes_than_a_float_holds_runs_its_translate_alone(tmp_path: Path) -> None:
    """activation_bytes_per_output_value is valid when finite and > 0, so a card may say 1e308: on
    the CPU provider ORT_CPU_FACTOR x that overflowed to inf and math.ceil raised OverflowError out
    of the working-set estimate, failing every Translate of the model as an internal error. Such a
    working set is more than any budget: the call holds the whole budget and runs alone."""
    card = {
        "channels": 3,
        "input_channels": 3,
        "input_range": [-1.0, 1.0],
        "size_multiple": 4,
        "min_size": 8,
        "activation_bytes_per_output_value": 1e308,
    }
    config = {"batching": {"max_batch_size": 1, "max_queue_delay_ms": 1.0}}
    write_model(tmp_path, "huge", "image_to_image", image_to_image_graph(4), card, config=config)
    side = 16
    image = tpb.Image(format=RAW, data=bytes(side * side * 3), shape=[side, side, 3])
    out = validate.output_spec(TENSOR, 0, None, False)
    held: list[int] = []

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("Translate", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
        mv = core.resolve(call, "huge", "", ("image_to_image",), "Translate")
        assert mv.provider == "CPUExecutionProvider"
        try:
            translate = functools.partial(core.translate, mv, call, [image], out)
            held.append(await working_set_of(core.translate_working_set, translate))
        finally:
            if call.batcher is not None:
                call.batcher.release()
            if call.response is not None:
                call.response.release()
        assert held[0] >= core.translate_working_set.limit

    run_with_core(tmp_path, body)


def test_a_cancelled_translate_holds_its_working_set_until_its_batch_in_flight_is_computed(
    tmp_path: Path,
) -> None:
    """A Translate cancelled (its client gone, its deadline) while its batch computed gave its working
    set back at once, though the batch went on computing its stacked images into the model's
    intermediates and outputs: the budget admitted other calls while the cancelled one's buffers
    were all still alive. The bytes now go back once the batches holding its rows are computed."""
    write_model(
        tmp_path,
        "i2i",
        "image_to_image",
        image_to_image_graph(4),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 8},
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0}},
    )
    image = tpb.Image(format=PNG, data=gradient_png(64))
    out = validate.output_spec(PNG, 0, None, False)

    async def body(repo: Repository, core: GenerationCore) -> None:
        budget = core.translate_working_set
        call = Call("Translate", "test", time.monotonic(), core.metrics.unresolved(), unary=True)
        mv = core.resolve(call, "i2i", "", ("image_to_image",), "Translate")
        assert mv.batcher is not None
        free = hold_runs(mv.batcher)  # its batch runs until `free` is set
        task = asyncio.create_task(core.translate(mv, call, [image, image], out))
        try:
            while mv.batcher._batches_in_flight == 0:
                await asyncio.sleep(0.005)
            held = budget.held
            assert held > 0
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert budget.held == held, "given back while its batch still computes"
            free.set()
            while mv.batcher._batches_in_flight:
                await asyncio.sleep(0.005)
            for _ in range(5):
                await asyncio.sleep(0)
            assert budget.held == 0, "not given back once its batch was computed"
        finally:
            free.set()
            if call.batcher is not None:
                call.batcher.release()
            if call.response is not None:
                call.response.release()

    run_with_core(tmp_path, body)

"""ByteBudget and Reservation (response_budget.py): first come first served, bounded waits, release
exactly once, and the size predictions the budgets are fed with (validate.py, tiling.py)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from genserve_server import codecs, tiling, validate
from genserve_server import core as core_module
from genserve_server.batcher import DEADLINE_SLACK_S
from genserve_server.codecs import ImageFormat
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from genserve_server.metrics import DROP_REASONS, REJECT_REASONS, Metrics
from genserve_server.repository import Repository
from genserve_server.response_budget import ByteBudget, Reservation


class Gauge:
    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value


def test_acquire_waits_in_order_and_release_lets_the_next_in() -> None:
    async def run() -> list[str]:
        gauge = Gauge()
        budget = ByteBudget("test budget", 100, max_wait_s=5.0, gauge=gauge)
        order: list[str] = []
        assert await budget.acquire(60, None, "a") == 60
        assert gauge.value == 60

        async def take(name: str, n: int) -> None:
            await budget.acquire(n, None, name)
            order.append(name)

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # would fit, but waits behind "big"
        await asyncio.sleep(0.05)
        assert order == [] and budget.held == 60
        budget.release(60)
        await asyncio.gather(big, small)
        assert budget.held == 90 and gauge.value == 90
        return order

    assert asyncio.run(run()) == ["big", "small"]


def test_a_wait_past_max_wait_or_the_deadline_is_refused_naming_the_budget() -> None:
    async def run() -> None:
        budget = ByteBudget("response budget (response_budget_bytes)", 100, max_wait_s=0.1)
        await budget.acquire(100, None, "first")
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="response_budget_bytes"):
            await budget.acquire(1, None, "Sample")
        assert time.monotonic() - started < 2
        # The deadline comes first: DEADLINE_EXCEEDED, whatever the clock reads as the loop's timer
        # fires (uvloop's are whole milliseconds and may fire a moment early).
        with pytest.raises(DeadlineExceeded, match="response_budget_bytes.*until its deadline"):
            await budget.acquire(1, time.monotonic() + 0.01, "Sample")
        assert budget.held == 100 and not budget._waiters
        budget.release(100)
        assert budget.held == 0

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_the_queue_and_frees_the_way() -> None:
    async def run() -> None:
        budget = ByteBudget("b", 100, max_wait_s=5.0)
        await budget.acquire(50, None, "held")
        blocked = asyncio.create_task(budget.acquire(80, None, "big"))
        await asyncio.sleep(0.01)
        behind = asyncio.create_task(budget.acquire(40, None, "small"))
        await asyncio.sleep(0.01)
        blocked.cancel()
        assert await behind == 40  # granted once the big waiter left
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert budget.held == 90

    asyncio.run(run())


def test_a_request_larger_than_the_budget_is_clamped_and_runs_alone() -> None:
    async def run() -> None:
        budget = ByteBudget("b", 100, max_wait_s=5.0)
        assert await budget.acquire(10_000, None, "huge") == 100
        budget.release(100)
        assert budget.held == 0

    asyncio.run(run())


def test_a_waiter_is_let_in_once_its_bytes_exactly_fill_the_budget_even_one_clamped_to_all_of_it() -> None:
    """A release that leaves room for exactly a waiter's bytes lets it in; a request larger than the
    whole budget, clamped to it, waits for the budget to empty and then runs alone, never refused."""

    async def run() -> None:
        budget = ByteBudget("b", 100, max_wait_s=2.0)
        assert await budget.acquire(70, None, "first") == 70
        fits_exactly = asyncio.create_task(budget.acquire(40, None, "forty"))
        await asyncio.sleep(0.01)
        assert not fits_exactly.done()
        budget.release(10)  # 60 held: the 40 waiting fill the budget to its limit
        assert await asyncio.wait_for(fits_exactly, 1.0) == 40
        assert budget.held == 100
        huge = asyncio.create_task(budget.acquire(10_000, None, "huge"))
        await asyncio.sleep(0.01)
        assert not huge.done()
        budget.release(100)
        assert await asyncio.wait_for(huge, 1.0) == 100
        assert budget.held == 100 and not budget._waiters

    asyncio.run(run())


def test_a_reservation_settles_to_the_real_size_and_releases_once() -> None:
    async def run() -> None:
        budget = ByteBudget("b", 1000, max_wait_s=1.0)
        reservation = Reservation(budget)
        await reservation.reserve(600, None, "Sample")
        reservation.settle(250)  # the response was smaller than predicted
        assert budget.held == 250
        reservation.settle(300)  # or larger: held without waiting, it exists already
        assert budget.held == 300
        reservation.release()
        reservation.release()  # gRPC's done callback after the boundary's release: no effect
        assert budget.held == 0
        await reservation.reserve(100, None, "late")  # after the end: nothing held
        assert budget.held == 0

    asyncio.run(run())


def test_a_reservation_given_back_while_waiting_for_its_lane_holds_its_bytes_again_when_taken_back() -> None:
    """A BULK request waiting for room in its lane gives its response's bytes back (give_back) and
    holds them again, waiting while the budget is spent, before it is queued (take_back)."""

    async def run() -> None:
        gauge = Gauge()
        budget = ByteBudget("response budget (response_budget_bytes)", 1000, max_wait_s=5.0, gauge=gauge)
        reservation = Reservation(budget)
        await reservation.reserve(600, None, "Sample")
        reservation.give_back()
        assert budget.held == 0 and gauge.value == 0
        other = await budget.acquire(700, None, "interactive")  # the room it left, taken meanwhile
        taking = asyncio.create_task(reservation.take_back(None))
        await asyncio.sleep(0.05)
        assert not taking.done() and budget.held == 700  # waits for its 600 bytes
        budget.release(other)
        await taking
        assert budget.held == 600 and gauge.value == 600
        reservation.release()
        assert budget.held == 0

    asyncio.run(run())


def test_a_call_ending_while_its_bytes_are_given_back_releases_nothing_of_other_calls() -> None:
    """A BULK call that ends (its client gone, its deadline) while it waits for its lane, its bytes
    given back, releases nothing more: the bytes other calls hold stay held."""

    async def run() -> None:
        budget = ByteBudget("response budget (response_budget_bytes)", 1000, max_wait_s=5.0)
        reservation = Reservation(budget)
        await reservation.reserve(600, None, "Sample")
        reservation.give_back()
        other = await budget.acquire(700, None, "interactive")
        reservation.release()
        assert budget.held == other == 700

    asyncio.run(run())


def test_a_call_ending_while_its_reserve_waits_gives_back_the_bytes_granted_after_its_end() -> None:
    """A call released (gRPC's done callback: its client gone) while its reserve waits for room: the
    bytes granted afterwards were added to a reservation already released, held by no one for good."""

    async def run() -> None:
        budget = ByteBudget("response budget (response_budget_bytes)", 1000, max_wait_s=5.0)
        other = await budget.acquire(1000, None, "interactive")
        reservation = Reservation(budget)
        waiting = asyncio.create_task(reservation.reserve(600, None, "Sample"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        reservation.release()  # the call ends while it waits
        budget.release(other)  # room: its 600 bytes are granted
        await waiting
        assert budget.held == 0 and reservation.held == 0
        # and the budget is whole again: a call of all of it gets in without waiting
        assert await budget.acquire(1000, time.monotonic(), "next") == 1000

    asyncio.run(run())


@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_png_bound_holds_for_noise_at_every_level(level: int, channels: int) -> None:
    rng = np.random.default_rng(level)
    h, w = 97, 131
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    data, _ = codecs.encode_image(pixels, ImageFormat.PNG, png_compression=level)  # the server's encoder
    assert len(data) <= validate.png_bound(1, channels, h, w)
    assert validate.png_bound(1, channels, h, w) < 1.01 * h * w * channels + 8192


def test_predicted_send_size_refuses_before_compute_and_returns_what_to_hold() -> None:
    limit = 1024 * 1024
    png = validate.output_spec(ImageFormat.PNG, 0, None, False)
    raw = validate.output_spec(ImageFormat.RAW_UINT8, 0, None, False)
    jpeg = validate.output_spec(ImageFormat.JPEG, 0, None, False)
    assert validate.predicted_send_size(raw, 2, 3, 64, 64, limit) == 2 * 3 * 64 * 64
    with pytest.raises(InvalidArgument, match="could be up to .* worst case"):
        validate.predicted_images_send_size(png, 3, [(800, 800)], limit)
    with pytest.raises(InvalidArgument, match="would be 1920128 bytes"):  # its pixels and one image's framing
        validate.predicted_images_send_size(raw, 3, [(800, 800)], limit)
    # JPEG has no useful bound: not refused here (checked after encoding); held at its raw size and
    # its headers (validate.lossy_reservation), twice the pixels at quality 95 and above.
    header = validate.LOSSY_HEADER_BYTES
    assert validate.predicted_images_send_size(jpeg, 3, [(800, 800), (10, 10)], limit) == (
        3 * (640000 + 100) + 2 * header
    )
    jpeg_100 = validate.output_spec(ImageFormat.JPEG, 100, None, False)
    assert validate.predicted_send_size(jpeg_100, 4, 1, 28, 28, limit) == 4 * (2 * 28 * 28 + header)


def test_a_response_of_exactly_the_send_limit_is_admitted_and_a_byte_more_is_refused() -> None:
    """max_send_message_bytes less 64 KiB and 128 bytes an image (docs/server.md) is the most a
    response may hold: a raw image of exactly that many bytes is served, one byte wider is refused
    naming output; images_that_fit names the count that predicted_send_size admits."""
    limit = 1024 * 1024
    raw = validate.output_spec(ImageFormat.RAW_UINT8, 0, None, False)
    width = limit - validate.SEND_OVERHEAD_BYTES - validate.ITEM_FRAMING_BYTES
    assert validate.predicted_send_size(raw, 1, 1, 1, width, limit) == width
    with pytest.raises(InvalidArgument, match=f"^output: the response would be {width + 129} bytes"):
        validate.predicted_send_size(raw, 1, 1, 1, width + 1, limit)
    side = 64
    fit = validate.images_that_fit(raw, 3, side, side, 0, limit)
    assert fit is not None and validate.predicted_send_size(raw, fit, 3, side, side, limit) > 0
    with pytest.raises(InvalidArgument, match="^output: "):
        validate.predicted_send_size(raw, fit + 1, 3, side, side, limit)


@pytest.mark.parametrize("fmt", [ImageFormat.JPEG, ImageFormat.WEBP])
def test_an_output_side_at_the_formats_limit_is_admitted_and_one_more_is_refused(fmt: ImageFormat) -> None:
    out = validate.output_spec(fmt, 0, None, False)
    side = codecs.MAX_SIDE[fmt]
    validate.encodable(out, [(8, 8), (1, side), (side, 1)])
    refusal = f"^output.format: .* at most {side} pixels a side; output image 1 "
    with pytest.raises(InvalidArgument, match=refusal):
        validate.encodable(out, [(8, 8), (1, side + 1)])


def test_working_set_counts_every_tile_the_batch_intermediates_and_the_blend_canvas() -> None:
    one = tiling.plan_tiles(64, 64, 96, 8)
    many = tiling.plan_tiles(400, 400, 96, 8)
    assert len(one) == 1 and len(many) > 4
    copies = tiling.TILE_OUTPUT_COPIES
    encode = tiling.ENCODE_BYTES_PER_VALUE
    single = tiling.working_set_bytes([one], [(64, 64)], 3, 3, 2, 16)
    # One tile: no canvas; the model's intermediates outweigh the encode's copies of the image.
    assert single == 4 * (3 * 64 * 64 + copies * 3 * 64 * 64 * 4)
    out_tile = 4 * 3 * 96 * 96 * 4
    tiles = len(many) * (4 * 3 * 96 * 96 + out_tile)
    canvas = 4 * 4 * 800 * 800
    # Intermediates only for the tiles of one batch (4 here), not for every tile of the request;
    # they are gone by the blend, whose canvas and the encode's copies weigh more here.
    computing = (copies - 1) * 4 * out_tile
    encoding = canvas + encode * 3 * 800 * 800
    assert encoding > computing
    assert tiling.working_set_bytes([many], [(400, 400)], 3, 3, 2, 4) == tiles + encoding
    assert (
        tiling.working_set_bytes([many], [(400, 400)], 3, 3, 2, 64)
        == tiles + (copies - 1) * len(many) * out_tile
    )
    # The decoded inputs are held throughout; TENSOR_F32 has no encode copies (its bytes are the
    # response's).
    assert tiling.working_set_bytes(
        [many], [(400, 400)], 3, 3, 2, 4, input_bytes=1000, encode_bytes_per_value=0
    ) == 1000 + tiles + max(computing, canvas)


@pytest.mark.parametrize(
    ("before_deadline_s", "rejected", "dropped"),
    [(5.0, "budget", None), (DEADLINE_SLACK_S / 2, "budget", None), (-0.001, None, "deadline")],
)
def test_a_budget_wait_that_runs_out_is_counted_as_its_client_is_answered(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    before_deadline_s: float,
    rejected: str | None,
    dropped: str | None,
) -> None:
    """GenerationCore.wait_for_budget: a call whose budget wait runs out (budget_max_wait_s) before its
    deadline is answered RESOURCE_EXHAUSTED naming the budget: counted once in
    genserve_requests_rejected_total{reason="budget"} (it was in no reason), never as a drop, also
    within DEADLINE_SLACK_S of the deadline (it was a deadline drop there): the call is marked
    `refused` and the boundary counts it as it answers
    (test_a_budget_refusal_is_counted_under_the_status_its_client_gets). Past the deadline its
    client gets DEADLINE_EXCEEDED (the boundary sends no refusal then): a deadline drop, counted here."""
    now = 1000.0
    monkeypatch.setattr(core_module, "time", SimpleNamespace(monotonic=lambda: now))
    config = ServerConfig()
    metrics = Metrics()
    pool = ThreadPoolExecutor(1)

    async def main() -> None:
        core = GenerationCore(Repository(tmp_path, config, metrics), config, metrics, pool)
        call = Call("Sample", "test", now, metrics.for_model("m", "1", 4), deadline=now + before_deadline_s)

        async def refused() -> None:
            raise ResourceExhausted("Sample needs 40 bytes of the response budget (response_budget_bytes)")

        for _ in range(2):  # counted once for its RPC
            with pytest.raises(ResourceExhausted, match="response_budget_bytes"):
                await core.wait_for_budget(call, refused())
        assert (call.refused is not None) == (rejected is not None)  # the boundary counts it as it answers

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()

    def counted(family: str, reasons: tuple[str, ...]) -> dict[str, float]:
        labels = {"model": "m", "version": "1"}
        values = {r: metrics.registry.get_sample_value(family, {**labels, "reason": r}) for r in reasons}
        return {r: n for r, n in values.items() if n}

    expected_dropped = {dropped: 1.0} if dropped else {}
    assert counted("genserve_requests_rejected_total", REJECT_REASONS) == {}
    assert counted("genserve_requests_dropped_total", DROP_REASONS) == expected_dropped


@pytest.mark.parametrize(
    ("answered_after_s", "rejected", "dropped"), [(0.0, "budget", None), (1.0, None, "deadline")]
)
def test_a_budget_refusal_is_counted_under_the_status_its_client_gets(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    answered_after_s: float,
    rejected: str | None,
    dropped: str | None,
) -> None:
    """A budget wait that runs out before the deadline, whose refusal reaches the boundary only after
    it (the event loop busy, a handler's cleanup awaiting): its client gets DEADLINE_EXCEEDED (the
    boundary sends nothing past the deadline), so it is a deadline drop, not also rejected `budget`
    (wait_for_budget and the boundary each read the clock: it was counted `budget` and
    DEADLINE_EXCEEDED). Answered in time: rejected `budget`, RESOURCE_EXHAUSTED sent."""
    import grpc

    from genserve_server import boundary as boundary_module
    from genserve_server.boundary import Boundary

    clock = [1000.0]
    fake_time = SimpleNamespace(monotonic=lambda: clock[0])
    monkeypatch.setattr(core_module, "time", fake_time)
    monkeypatch.setattr(boundary_module, "time", fake_time)
    config = ServerConfig()
    metrics = Metrics()
    pool = ThreadPoolExecutor(1)
    aborted: list[grpc.StatusCode] = []

    class Context:
        def time_remaining(self) -> float:
            return 0.5

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return ()

        def set_trailing_metadata(self, metadata: object) -> None:
            pass

        async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()) -> None:
            aborted.append(code)
            raise RuntimeError(details)

    async def main() -> None:
        core = GenerationCore(Repository(tmp_path, config, metrics), config, metrics, pool)
        model_metrics = metrics.for_model("m", "1", 4)

        async def refused() -> None:
            raise ResourceExhausted("Sample needs 40 bytes of the response budget (response_budget_bytes)")

        async def handler(request: object, call: Call) -> None:
            call.metrics = model_metrics
            try:
                await core.wait_for_budget(call, refused())
            finally:
                clock[0] += answered_after_s

        with pytest.raises((RuntimeError, asyncio.CancelledError)):
            await Boundary(metrics).unary("Sample", object(), Context(), handler)  # type: ignore[arg-type]

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()

    def counted(family: str, reasons: tuple[str, ...]) -> dict[str, float]:
        labels = {"model": "m", "version": "1"}
        values = {r: metrics.registry.get_sample_value(family, {**labels, "reason": r}) for r in reasons}
        return {r: n for r, n in values.items() if n}

    assert counted("genserve_requests_rejected_total", REJECT_REASONS) == (
        {rejected: 1.0} if rejected else {}
    )
    assert counted("genserve_requests_dropped_total", DROP_REASONS) == ({dropped: 1.0} if dropped else {})
    assert aborted == ([grpc.StatusCode.RESOURCE_EXHAUSTED] if rejected else [])


def test_a_wait_cancelled_as_its_bytes_are_granted_raises_the_cancel_and_gives_them_back() -> None:
    """The caller (an RPC's handler task) cancelled just as release() granted its bytes: the cancel
    is raised and the bytes go back, whichever turn of the loop the cancel comes in (Python 3.11's
    asyncio.wait_for returned the grant and dropped a cancel that crossed it: the handler of a
    client gone went on to compute, holding the bytes)."""

    async def scenario(turns: int) -> tuple[bool, int]:
        budget = ByteBudget("test budget", 100, max_wait_s=30.0)
        held = await budget.acquire(100, None, "Sample")
        waiting = asyncio.ensure_future(budget.acquire(60, None, "Sample"))
        await asyncio.sleep(0)
        assert not waiting.done()
        budget.release(held)  # grants the waiter's 60 bytes
        for _ in range(turns):
            await asyncio.sleep(0)
        if waiting.done():  # it got them before the cancel: as any holder, it gives them back itself
            budget.release(waiting.result())
            return True, budget.held
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return waiting.cancelled(), budget.held

    for turns in range(6):
        cancelled, held = asyncio.run(scenario(turns))
        assert cancelled, f"cancelled {turns} turn(s) after the grant: the cancel was dropped"
        assert held == 0, turns


def test_bytes_granted_as_the_wait_runs_out_are_kept_by_the_waiter_not_lost_to_the_budget() -> None:
    """A release that grants a waiter's bytes in the loop turn its wait runs out: the waiter keeps
    them (and gives them back as any holder); refused, they stayed held by no one."""

    async def run() -> None:
        budget = ByteBudget("test budget", 100, max_wait_s=30.0)
        held = await budget.acquire(100, None, "first")
        asyncio.get_running_loop().call_soon(budget.release, held)  # before the wait's own timer
        got = await budget.acquire(60, time.monotonic() - 1.0, "Sample")  # a deadline already past
        assert got == 60 and budget.held == 60
        budget.release(got)
        assert budget.held == 0

    asyncio.run(run())

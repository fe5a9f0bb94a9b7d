"""Fair shares in the batcher, counted in batches (no timing): admission order across batches, a small
request behind big ones, tiles of the first SuperResolve among later ones. A fake async model
records every batch; a test may act when a given batch starts (`on_batch`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any

import numpy as np
import pytest

from genserve_server.batch_keys import TileRows
from genserve_server.batch_parts import fair_shares
from genserve_server.batcher import Batcher, Lane


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


class CountingModel:
    """out = 10 * x; every batch's rows are recorded. The first batch waits on `gate` (so that
    everything submitted meanwhile is queued at once); `on_batch(i)` runs as batch i starts."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.on_batch: Callable[[int], None] | None = None

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        x = np.asarray(inputs["x"])
        self.batches.append(x.copy())
        self.started.set()
        if self.on_batch is not None:
            self.on_batch(len(self.batches) - 1)
        if len(self.batches) == 1:
            await self.gate.wait()
        await asyncio.sleep(0)
        return {"y": 10 * x}

    def batch_of(self, value: float) -> int:
        """Index of the batch that computed the row `value`."""
        return next(i for i, b in enumerate(self.batches) if np.any(b == value))


class TickingClock:
    """Batcher(clock=...) that moves one microsecond per reading: the batcher's order of events (the
    longest-waiting sub-queue) is kept, but a batch's compute reads as a few microseconds however long
    it held the runner. On the real clock the blocker's batch, stretched by a loaded machine's stall
    past 0.5 ms a row, cut the next bulk batch to its 2 ms bulk budget (2 rows, not 4)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


def batcher_for(model: CountingModel, max_batch_size: int) -> Batcher:
    batcher = Batcher(
        model,
        name="model m version 1",
        max_batch_size=max_batch_size,
        max_queue_delay_s=0.0,
        max_queue_size=4096,
        clock=TickingClock(),
    )
    batcher.start()
    return batcher


def values(first: int, n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(first, first + n, dtype=np.float32)}


async def blocked(batcher: Batcher, model: CountingModel) -> asyncio.Future[Any]:
    """A one-row request (value -1) whose batch holds the runner until model.gate is set."""
    blocker = asyncio.ensure_future(batcher.submit("k", values(-1, 1), 1))
    await model.started.wait()
    return blocker


def completion_order(futures: list[asyncio.Future[Any]]) -> list[int]:
    order: list[int] = []
    for i, future in enumerate(futures):
        future.add_done_callback(lambda _, i=i: order.append(i))
    return order


@pytest.mark.parametrize(
    ("remaining", "limit", "expected"),
    [
        ([256] * 8 + [1], 64, [8, 8, 8, 8, 8, 8, 8, 7, 1]),  # the small one goes whole, at once
        ([2, 3, 1], 4, [2, 1, 1]),  # the spare row goes to the earliest
        ([5, 5, 3], 8, [3, 3, 2]),  # spare rows go to the earliest, not to the fewest rows left
        ([1] * 6, 4, [1, 1, 1, 1, 0, 0]),  # more requests than rows: admission order
        ([5, 1, 100], 64, [5, 1, 58]),
        ([3, 4], 64, [3, 4]),  # everything fits
    ],
)
def test_fair_shares_are_max_min_fair_in_admission_order(
    remaining: list[int], limit: int, expected: list[int]
) -> None:
    assert fair_shares(remaining, limit) == expected


def test_fair_shares_fill_the_batch_and_no_request_short_of_its_rows_gets_less_than_another_minus_one() -> (
    None
):
    rng = np.random.default_rng(3)
    for _ in range(500):
        remaining = [int(v) for v in rng.integers(1, 100, size=int(rng.integers(1, 40)))]
        limit = int(rng.integers(1, 80))
        shares = fair_shares(remaining, limit)
        assert sum(shares) == min(limit, sum(remaining))
        assert all(0 <= s <= r for s, r in zip(shares, remaining, strict=True))
        for s, r in zip(shares, remaining, strict=True):
            if s < r:
                assert max(shares) <= s + 1, (remaining, limit, shares)


def test_one_row_requests_run_in_admission_order_across_batches() -> None:
    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 4)
        blocker = await blocked(batcher, model)
        futures = [asyncio.ensure_future(batcher.submit("k", values(i, 1), 1)) for i in range(10)]
        order = completion_order(futures)
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(blocker, *futures)
        assert [list(b) for b in model.batches[1:]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert order == list(range(10))
        await batcher.close(1)

    run(body())


def test_one_row_requests_keep_admission_order_while_a_big_request_is_sliced_among_them() -> None:
    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 4)
        blocker = await blocked(batcher, model)
        big = asyncio.ensure_future(batcher.submit("k", values(1000, 40), 40))
        small = [asyncio.ensure_future(batcher.submit("k", values(i, 1), 1)) for i in range(9)]
        order = completion_order(small)
        await asyncio.sleep(0)
        model.gate.set()
        result, *_ = await asyncio.gather(big, blocker, *small)
        assert order == list(range(9))
        # Round-robin by request: the big one takes a row of batch 1 with the first three small ones,
        # then waits its turn while four small ones that had none go; never do they wait behind its
        # later slices.
        assert [model.batch_of(i) for i in range(9)] == [1, 1, 1, 2, 2, 2, 2, 3, 3]
        assert [model.batch_of(v) for v in (1000, 1001)] == [1, 3]
        np.testing.assert_array_equal(result.outputs["y"], 10 * np.arange(1000, 1040, dtype=np.float32))
        await batcher.close(1)

    run(body())


@pytest.mark.parametrize("big_requests", [1, 8, 32])
def test_a_one_row_request_behind_any_number_of_big_ones_runs_in_the_next_batch(big_requests: int) -> None:
    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 8)
        submitted_during: list[int] = []
        small: list[asyncio.Future[Any]] = []

        def submit_small(batch: int) -> None:
            if batch == 3:  # the big requests are being sliced: submit while batch 3 computes
                submitted_during.append(batch)
                small.append(asyncio.ensure_future(batcher.submit("k", values(-7, 1), 1)))

        model.on_batch = submit_small
        blocker = await blocked(batcher, model)
        bigs = [
            asyncio.ensure_future(batcher.submit("k", values(1000 * (b + 1), 64), 64))
            for b in range(big_requests)
        ]
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(blocker, *bigs, *small)
        assert submitted_during == [3]
        assert model.batch_of(-7) == 4  # the very next batch, however many big rows wait
        np.testing.assert_array_equal(small[0].result().outputs["y"], [-70])
        # The big requests were still running: far more batches came after it.
        assert len(model.batches) - 1 - 4 >= (big_requests * 64 - 4 * 8) // 8 - 1
        for b, big in enumerate(bigs):
            first = 1000 * (b + 1)
            np.testing.assert_array_equal(big.result().outputs["y"], 10 * np.arange(first, first + 64))
        await batcher.close(1)

    run(body())


def test_the_first_super_resolve_keeps_its_share_of_tiles_and_finishes_first() -> None:
    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 8)
        key = TileRows((3, 32, 32))
        later: list[asyncio.Future[Any]] = []

        def more_requests(batch: int) -> None:
            if batch == 2:  # the first request's tiles are running; three more arrive
                for r in range(1, 4):
                    later.append(asyncio.ensure_future(batcher.submit(key, values(1000 * r, 32), 32)))

        model.on_batch = more_requests
        first = asyncio.ensure_future(batcher.submit(key, values(0, 32), 32))
        await model.started.wait()
        model.gate.set()
        await first
        assert all(not f.done() for f in later)  # it finished before any later request
        for batch in model.batches:
            mine = int(np.sum(batch < 1000))
            theirs = [int(np.sum((batch >= 1000 * r) & (batch < 1000 * (r + 1)))) for r in range(1, 4)]
            if mine:
                assert mine >= max(theirs), model.batches  # never dominated by later tiles
        await asyncio.gather(*later)
        for r, f in enumerate(later, start=1):
            np.testing.assert_array_equal(f.result().outputs["y"], 10 * np.arange(1000 * r, 1000 * r + 32))
        await batcher.close(1)

    run(body())


def test_bulk_rows_are_shared_fairly_too_and_interactive_still_goes_first() -> None:
    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 4)
        blocker = await blocked(batcher, model)
        bulk = [
            asyncio.ensure_future(batcher.submit("k", values(1000 * (b + 1), 8), 8, lane=Lane.BULK))
            for b in range(2)
        ]
        interactive = asyncio.ensure_future(batcher.submit("k", values(5, 1), 1))
        await asyncio.sleep(0)
        # A loaded machine's stall while the blocker's batch holds the runner (the CI run's): the
        # shares must not depend on how long a batch took on the real clock.
        time.sleep(0.005)
        model.gate.set()
        await asyncio.gather(blocker, interactive, *bulk)
        assert list(model.batches[1]) == [5]
        assert [list(b) for b in model.batches[2:4]] == [[1000, 1001, 2000, 2001], [1002, 1003, 2002, 2003]]
        await batcher.close(1)

    run(body())


def test_a_big_request_is_not_starved_by_a_flood_of_one_row_requests() -> None:
    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 4)
        flood: list[asyncio.Future[Any]] = []

        def more_small_ones(batch: int) -> None:
            if batch < 40:  # three new one-row requests while every batch (of 4 rows) computes
                flood.extend(
                    asyncio.ensure_future(batcher.submit("k", values(100 * batch + i, 1), 1))
                    for i in range(3)
                )

        model.on_batch = more_small_ones
        blocker = await blocked(batcher, model)
        big = asyncio.ensure_future(batcher.submit("k", values(10_000, 10), 10))
        await asyncio.sleep(0)
        model.gate.set()
        await big
        # One-row requests go first, but the longest-waiting request keeps a place in every batch:
        # the big one gets the row the flood leaves, 10 rows in about 10 batches.
        assert model.batch_of(10_009) <= 12
        assert not all(f.done() for f in flood)  # while the flood still went on
        model.on_batch = None  # no more: every request submitted is awaited below
        await asyncio.gather(blocker, *flood)
        await batcher.close(1)

    run(body())


def test_a_rare_shape_waits_no_longer_than_the_rows_ahead_while_a_busy_shape_shares_a_big_request() -> None:
    """Sub-queues are served oldest first, which bounds a row's wait by the rows queued ahead of it
    (docs/server.md). A busy shape whose batches share a big request's rows with one-row requests
    admitted later must not hold a rare shape's request until the big one is done: it was held
    there while every later request of the busy shape overtook it (batch 41 here, 120 later rows)."""

    async def body() -> None:
        model = CountingModel()
        batcher = batcher_for(model, 4)
        busy, rare_key = TileRows((3, 32, 32)), TileRows((3, 20, 12))
        flood: list[asyncio.Future[Any]] = []

        def more_small_ones(batch: int) -> None:
            if batch < 60:  # three new one-row requests of the busy shape while every batch computes
                flood.extend(
                    asyncio.ensure_future(batcher.submit(busy, values(100 * batch + i, 1), 1))
                    for i in range(3)
                )

        model.on_batch = more_small_ones
        blocker = await blocked(batcher, model)
        big = asyncio.ensure_future(batcher.submit(busy, values(10_000, 40), 40))
        await asyncio.sleep(0)
        rare = asyncio.ensure_future(batcher.submit(rare_key, values(-5, 1), 1))
        await asyncio.sleep(0)
        model.gate.set()
        await rare
        # 41 rows were queued ahead of it (the blocker and the big request): 11 batches of 4 at most.
        assert model.batch_of(-5) <= 1 + 40 // 4, [list(b) for b in model.batches]
        model.on_batch = None  # no more: every request submitted is awaited below
        await asyncio.gather(blocker, big, *flood)
        np.testing.assert_array_equal(big.result().outputs["y"], 10 * np.arange(10_000, 10_040))
        await batcher.close(1)

    run(body())

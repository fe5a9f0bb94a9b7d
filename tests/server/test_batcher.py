"""Unit tests of the batcher with a plain fake async run-batch function (no mocks, no ONNX)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
import weakref
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any

import grpc
import numpy as np
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from genserve_server.arrivals import (
    CALLERS_PEAK_MEMORY_S,
    OVERLAP_MEMORY_S,
    SPARSE_HORIZON_MIN_S,
    SPARSE_HORIZON_WINDOWS,
    Arrivals,
    closes_at_preferred,
)
from genserve_server.batcher import DEADLINE_SLACK_S, WITHDRAWN, Batcher, BatchResult, Lane
from genserve_server.core import Call
from genserve_server.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from genserve_server.response_budget import ByteBudget, Reservation


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


class FakeModel:
    """out = 10 * x; records every batch; can be held on a gate or made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[Hashable, np.ndarray]] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail_if_contains: float | None = None
        self.fail_above_rows: int | None = None  # e.g. the device's memory
        self.drop_a_row = False

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        x = np.asarray(inputs["x"])
        self.batches.append((key, x.copy()))
        self.started.set()
        if self.gate is not None:
            gate, self.gate = self.gate, None  # only the first batch waits
            await gate.wait()
        await asyncio.sleep(0)
        if self.fail_if_contains is not None and np.any(x == self.fail_if_contains):
            raise RuntimeError("boom")
        if self.fail_above_rows is not None and len(x) > self.fail_above_rows:
            raise RuntimeError("out of memory")
        out = 10 * x
        return {"y": out[:-1] if self.drop_a_row else out}


class SlowModel(FakeModel):
    """A FakeModel whose every batch takes `compute_s`."""

    def __init__(self, compute_s: float) -> None:
        super().__init__()
        self.compute_s = compute_s

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        await asyncio.sleep(self.compute_s)
        return await super().__call__(key, inputs)


class FakeClock:
    """A monotonic clock the test moves (Batcher(clock=...)): a memory of the batcher (the last
    overlap, a deadline) ends when the test says, not when a loaded machine's stall outlasts it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ClockedModel(FakeModel):
    """A FakeModel whose every batch takes `compute_s` on `clock` (and no time on the real one)."""

    def __init__(self, clock: FakeClock, compute_s: float) -> None:
        super().__init__()
        self.clock = clock
        self.compute_s = compute_s

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        self.clock.now += self.compute_s
        return await super().__call__(key, inputs)


class Recorder:
    def __init__(self) -> None:
        self.dropped: list[str] = []
        self.rejected: list[str] = []
        self.batches: list[tuple[int, int, bool]] = []
        self.waits: list[Lane] = []
        self.depth = 0
        self.closed: list[str] = []

    def on_queue_depth(self, rows: int) -> None:
        self.depth = rows

    def on_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def on_dropped(self, reason: str) -> None:
        self.dropped.append(reason)

    def on_queue_wait(self, wait_s: float, lane: Lane) -> None:
        assert wait_s >= 0
        self.waits.append(lane)

    def on_batch(self, rows: int, n_requests: int, compute_s: float, ok: bool) -> None:
        self.batches.append((rows, n_requests, ok))

    def on_batch_closed(self, reason: str) -> None:
        self.closed.append(reason)


def rows(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.asarray(values, dtype=np.float32)}


def make(model: FakeModel, **kwargs: Any) -> tuple[Batcher, Recorder]:
    recorder = Recorder()
    # The bulk lane's time budgets are off: they cut a BULK batch by the measured compute time of a
    # row, which for these fake models is event-loop turns, so on a loaded machine (pytest -n 2) a
    # budget cut bulk batches to one row where a test expects them whole. The budgets have their
    # own tests (tests/perf/test_bulk_budget.py).
    options: dict[str, Any] = {
        "max_batch_size": 4,
        "max_queue_delay_s": 0.0,
        "max_queue_size": 64,
        "bulk_budget_s": None,
        "bulk_idle_budget_s": None,
    }
    options.update(kwargs)
    batcher = Batcher(model, name="model m version 1", observer=recorder, **options)
    batcher.start()
    return batcher, recorder


async def tracked_submit(batcher: Batcher, value: float) -> float:
    """One row submitted as the service does it, counted in `callers` while in the server; its
    wall time in seconds."""
    batcher.callers += 1
    try:
        started = time.monotonic()
        await batcher.submit("k", rows(value), 1)
        return time.monotonic() - started
    finally:
        batcher.callers -= 1


async def until(predicate: Callable[[], bool], what: str, *, turns: int = 10_000) -> None:
    """Yield to the event loop until `predicate()` holds: a gate on the state a step waits for, not a
    timed sleep that a loaded machine can outlast. Fails the test, naming `what`, if it never holds."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still waiting for {what} after {turns} event-loop turns")


async def let_the_dispatcher_run() -> None:
    """Yield to the event loop until the dispatcher has acted on what is queued (no timed sleep)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def past(moment: float) -> None:
    """Sleep until time.monotonic() has passed `moment` (a deadline under test)."""
    while (left_s := moment - time.monotonic()) >= 0:
        await asyncio.sleep(left_s + 1e-3)


async def close_begun(batcher: Batcher) -> asyncio.Task[None]:
    """Start batcher.close(5) and return once it has begun refusing work."""
    closing = asyncio.ensure_future(batcher.close(5))
    # No public observable for "closing" yet: close() sets _closing before its first await.
    await until(lambda: batcher._closing, "close() to begin")
    return closing


async def hold_runner(batcher: Batcher, model: FakeModel) -> tuple[asyncio.Event, asyncio.Task[Any]]:
    """Occupy the (single) runner with a one-row blocker so that later submits queue up."""
    gate = asyncio.Event()
    model.gate = gate
    blocker = asyncio.ensure_future(batcher.submit("k", rows(-1), 1))
    await model.started.wait()
    return gate, blocker


def test_rows_of_2_3_1_are_shared_fairly_across_batches_and_reassembled() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model)
        gate, blocker = await hold_runner(batcher, model)
        a = asyncio.ensure_future(batcher.submit("k", rows(1, 2), 2))
        b = asyncio.ensure_future(batcher.submit("k", rows(3, 4, 5), 3))
        c = asyncio.ensure_future(batcher.submit("k", rows(6), 1))
        await until(lambda: batcher.queued_rows == 6, "the three requests queued")
        gate.set()
        ra, rb, rc, _ = await asyncio.gather(a, b, c, blocker)
        # Max-min fair: one row each, the spare row to the earliest request; b's rest goes next.
        assert [list(x) for _, x in model.batches] == [[-1], [1, 2, 3, 6], [4, 5]]
        np.testing.assert_array_equal(ra.outputs["y"], [10, 20])
        np.testing.assert_array_equal(rb.outputs["y"], [30, 40, 50])  # straddled two batches
        np.testing.assert_array_equal(rc.outputs["y"], [60])
        assert ra.executed_batch_sizes == [4]
        assert rb.executed_batch_sizes == [4, 2]
        assert rc.executed_batch_sizes == [4]
        assert recorder.batches == [(1, 1, True), (4, 3, True), (2, 1, True)]
        assert recorder.depth == 0
        await batcher.close(1)

    run(body())


def test_single_request_on_idle_runner_does_not_wait_for_the_window() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_queue_delay_s=1.0)
        started = time.monotonic()
        result = await batcher.submit("k", rows(7), 1)
        assert time.monotonic() - started < 0.5  # far below the 1 s window
        np.testing.assert_array_equal(result.outputs["y"], [70])
        await batcher.close(1)

    run(body())


def test_a_results_dispatch_time_is_when_its_batch_started_not_its_admission() -> None:
    """BatchResult.dispatched_at (and queue_s from admission to it) is what KServe's statistics split
    a call's queue from its compute by (core: call.timing.submitted): a request that waited behind a
    running batch reports the moment its own batch started."""

    async def body() -> None:
        model = FakeModel()
        clock = FakeClock()
        batcher, _ = make(model, clock=clock)
        gate, blocker = await hold_runner(batcher, model)
        admitted_at = clock.now
        waiting = asyncio.ensure_future(batcher.submit("k", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "the request queued")
        clock.now += 2.0  # it waits behind the running batch
        gate.set()
        result = await waiting
        assert (result.dispatched_at, result.queue_s) == (admitted_at + 2.0, 2.0)
        await blocker
        await batcher.close(1)

    run(body())


def test_a_finished_batch_is_not_kept_alive_by_the_idle_dispatcher() -> None:
    """The dispatcher's loop kept its last batch's parts in a local while it waited for the next
    request: the request's inputs and assembled outputs (a tiled SuperResolve's tiles, 27 MiB at
    256²) outlived the call and its released working set until the model's next batch."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model)
        outputs = await batcher.submit("k", rows(3, 4), 2)
        kept = weakref.ref(outputs.outputs["y"])  # an output array the request's result holds
        del outputs
        await asyncio.sleep(0)  # the dispatcher is back waiting for work
        gc.collect()
        assert kept() is None, [type(r).__name__ for r in gc.get_referrers(kept())]
        await batcher.close(1)

    run(body())


def test_after_a_burst_a_lone_caller_waits_the_window_only_while_overlaps_are_recent() -> None:
    # On the batcher's clock: on the real one, a stall of OVERLAP_MEMORY_S (a loaded machine) between
    # the burst and the next arrival ended the memory before that arrival, which then went at once.
    async def body() -> None:
        clock = FakeClock()
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=0.05, clock=clock)

        # A burst: every arrival overlapped.
        await asyncio.gather(*(tracked_submit(batcher, i) for i in range(40)))
        assert recorder.closed == ["full"] * 5
        # Right after the burst (within OVERLAP_MEMORY_S) the next arrival is likely within the
        # window: wait it out.
        clock.now += OVERLAP_MEMORY_S * 0.9
        await tracked_submit(batcher, 100)
        assert recorder.closed[-1] == "window"
        # Once no overlap was seen for longer than OVERLAP_MEMORY_S, a lone caller goes at once,
        # however high the per-arrival moving fraction still is.
        clock.now += OVERLAP_MEMORY_S * 0.2
        await tracked_submit(batcher, 101)
        assert recorder.closed[-1] == "at_once"
        await batcher.close(1)

    run(body())


def test_a_lone_caller_at_a_low_rate_goes_without_waiting_for_a_second_that_will_not_come() -> None:
    """An open loop at a low rate: a recent overlap and the callers' peak say more may come, but fewer
    than one request a window arrived lately and most found the server empty, so the lone queued row
    goes at once ('sparse'). Closed-loop callers who find each other in the server still wait."""

    async def body() -> None:
        # On the batcher's clock: on the real one, a stall of OVERLAP_MEMORY_S before the last caller
        # ended the overlap's memory, and the caller went at once without the rate ('at_once').
        clock = FakeClock()
        model = FakeModel()
        window_s = 0.05
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=window_s, clock=clock)
        for i in range(3):  # lone arrivals, one every two windows: the overlap fraction stays low
            await tracked_submit(batcher, i)
            clock.now += 2 * window_s
        await asyncio.gather(*(tracked_submit(batcher, i) for i in range(2)))  # two callers overlapped
        clock.now += window_s
        assert window_s < OVERLAP_MEMORY_S  # the overlap is recent
        # 6 requests in the last 12 windows: without the rate, the lone caller right after the overlap
        # would wait out the window for a second caller (the peak of 2). 'sparse': it went at once.
        await tracked_submit(batcher, 3)
        assert recorder.closed[-1] == "sparse"
        await batcher.close(1)

    run(body())


def test_a_closed_loop_pair_of_a_slow_model_still_waits_for_its_partner() -> None:
    """Two closed-loop callers of a slow model arrive less than once a window, like a light open
    loop, but the second of each pair finds the first in the server: the first to come back waits
    for its partner (a little behind it) instead of going alone ('sparse')."""

    async def body() -> None:
        # On the batcher's clock: on the real one, a stall of 60 ms (a loaded machine) beside the
        # batch's 40 ms took the pair's last overlap out of OVERLAP_MEMORY_S, and the first went alone.
        clock = FakeClock()
        window_s = 0.02
        fake = ClockedModel(clock, 3 * window_s)  # fewer than one request a window arrives
        assert 3 * window_s < OVERLAP_MEMORY_S  # the partner's last arrival is recent
        batcher, recorder = make(fake, max_batch_size=8, max_queue_delay_s=window_s, clock=clock)
        rounds = 6

        def first_held_in_its_window() -> bool:
            # The first of the pair is queued and the dispatcher waits on its window for more (a
            # batch that went alone would have taken the row off the queue).
            return batcher.queued_rows == 1 and bool(batcher._available._waiters)  # type: ignore[attr-defined]

        async def client(value: float, follows: bool) -> None:
            for i in range(rounds):
                if follows and i:
                    # The partner comes back a little later: once the first is back and held, not
                    # after a timed lag that a loaded machine's stall can stretch past the window.
                    await until(first_held_in_its_window, "the first of the pair held in its window")
                await tracked_submit(batcher, value)

        await asyncio.gather(client(1, False), client(2, True))
        assert "sparse" not in recorder.closed
        assert [len(x) for _, x in fake.batches] == [2] * rounds
        await batcher.close(1)

    run(body())


def test_the_callers_peak_is_forgotten_after_its_memory_so_a_smaller_cohort_all_queued_goes_at_once() -> None:
    """Arrivals keeps the most callers seen lately (CALLERS_PEAK_MEMORY_S): once as many requests are
    queued as that peak, nobody else can send and the batch goes (all_queued). An old burst's peak
    is forgotten: two closed-loop callers all queued long after a burst of four are everyone."""
    window_s = 0.004

    def two_callers_queued(after_the_burst_s: float) -> bool:
        arrivals = Arrivals(window_s)
        t = 10.0
        arrivals.arrived(t, 1, 4, 0)  # a burst of four callers
        t += after_the_burst_s
        arrivals.arrived(t, 1, 2, 0)
        arrivals.arrived(t + 0.001, 1, 2, 1)
        return arrivals.more_expected(t + 0.05, 2, 2)

    assert two_callers_queued(0.5)  # the burst's peak holds: two more callers may come back
    assert not two_callers_queued(CALLERS_PEAK_MEMORY_S + 0.5)


def test_sparse_needs_fewer_than_one_request_a_window_mostly_alone_and_nobody_on_the_way() -> None:
    window_s = 0.005
    horizon_s = max(SPARSE_HORIZON_MIN_S, SPARSE_HORIZON_WINDOWS * window_s)
    per_horizon = round(horizon_s / window_s)  # one request a window
    arrivals = Arrivals(window_s)
    for i in range(per_horizon - 1):  # alone, just under one a window
        arrivals.arrived(i * window_s, 1, callers=1, queued_requests=0)
    now = (per_horizon - 1) * window_s
    assert arrivals.sparse(now, callers=1, queued_requests=1)
    # A tracked caller that has not reached the queue yet is certain to come: no.
    assert not arrivals.sparse(now, callers=2, queued_requests=1)
    for _ in range(2):  # over one a window: a second is likely within it
        arrivals.arrived(now, 1, callers=1, queued_requests=0)
    assert not arrivals.sparse(now, callers=1, queued_requests=1)
    # Arrivals older than the horizon no longer count.
    assert arrivals.sparse(now + horizon_s / 2, callers=1, queued_requests=1)
    # Closed-loop callers who find each other in the server: no, however slow they come.
    closed = Arrivals(window_s)
    for i in range(60):
        closed.arrived(i * 1.0, 1, callers=4, queued_requests=2)
    assert not closed.sparse(60.0, callers=1, queued_requests=1)
    # A long window keeps only as many arrival times as it takes to tell one a window.
    long_window = Arrivals(1.0)
    for i in range(10_000):
        long_window.arrived(i * 1e-4, 1, callers=1, queued_requests=0)
    assert len(long_window._arrival_times) <= SPARSE_HORIZON_WINDOWS
    assert not long_window.sparse(1.0, callers=1, queued_requests=1)


def test_interactive_callers_overlap_while_concurrent_and_not_beside_a_bulk_stream() -> None:
    """The runner's solo-session rule reads this (loader: more_work_queued): a lone caller never
    overlaps, not even beside a bulk SampleStream (untracked) or a unary bulk caller, nor do as many
    callers as instances; more concurrent callers do, and the signal ends OVERLAP_MEMORY_S after the
    last overlap."""

    async def body() -> None:
        clock = FakeClock()  # the memory ends when the test moves the clock, not at a stall
        batcher, _ = make(FakeModel(), max_batch_size=8, max_queue_delay_s=0.01, concurrency=2, clock=clock)
        stream = [asyncio.ensure_future(batcher.submit("k", rows(i), 1, lane=Lane.BULK)) for i in range(20)]
        for i in range(5):  # closed loop at concurrency 1
            await tracked_submit(batcher, i)
        await asyncio.gather(*stream)
        assert not batcher.callers_overlap()
        batcher.callers += 1  # a unary BULK caller in the server: no interactive rows of its own
        for i in range(3):
            await tracked_submit(batcher, i)
        batcher.callers -= 1
        assert not batcher.callers_overlap()
        await asyncio.gather(*(tracked_submit(batcher, i) for i in range(2)))  # callers = instances
        assert not batcher.callers_overlap()
        await asyncio.gather(*(tracked_submit(batcher, i) for i in range(40)))
        assert batcher.callers_overlap()
        clock.now += OVERLAP_MEMORY_S  # still within the memory...
        assert batcher.callers_overlap()
        clock.now += 0.001  # ...and past it
        assert not batcher.callers_overlap()
        await batcher.close(1)

    run(body())


def test_closed_loop_callers_all_queued_do_not_wait_the_window() -> None:
    async def body() -> None:
        model = FakeModel()
        window_s = 0.3
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=window_s)

        async def client(value: float, rounds: int) -> None:
            for _ in range(rounds):  # closed loop: the next request only after the answer
                await tracked_submit(batcher, value)

        # The first round may wait out the window: the callers' peak is still rising.
        await asyncio.gather(*(client(i, 1) for i in range(4)))
        # The peak of 4 has held for a window, and is recent (CALLERS_PEAK_MEMORY_S).
        await asyncio.sleep(window_s * 4 / 3)
        assert window_s * 7 / 3 < CALLERS_PEAK_MEMORY_S
        started = time.monotonic()
        await asyncio.gather(*(client(i, 3) for i in range(4)))
        # Every round, the 4 callers in the server are all queued: nobody else can send, so each
        # batch of 4 goes at once instead of waiting out the window for rows that cannot come.
        assert [len(x) for _, x in model.batches] == [4, 4, 4, 4]
        # Nothing suggested more rows when each batch formed: "at_once" (not "window", not "full").
        assert recorder.closed[1:] == ["at_once"] * 3
        # Three rounds that waited out their windows take >= 3 windows; at once, milliseconds. The
        # bound sits between the two, far from both (a loaded machine's stalls are not the window).
        assert time.monotonic() - started < 2 * window_s
        await batcher.close(1)

    run(body())


def test_each_batch_reports_why_it_closed() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=4, max_queue_delay_s=0.05)
        # Six one-row requests queue behind a busy runner: four fill a batch; the other two wait out
        # the window (two untracked requests queued: more may come) and go when it ends.
        gate, blocker = await hold_runner(batcher, model)
        waiting = [asyncio.ensure_future(batcher.submit("k", rows(i), 1)) for i in range(2, 8)]
        await until(lambda: batcher.queued_rows == 6, "six rows queued")
        gate.set()
        await asyncio.gather(blocker, *waiting)
        assert [len(x) for _, x in model.batches] == [1, 4, 2]
        assert recorder.closed == ["at_once", "full", "window"]
        # Idle runner, no other caller: a lone row goes at once.
        await batcher.submit("k", rows(1), 1)
        assert recorder.closed[-1] == "at_once"
        await batcher.close(1)

    run(body())


def test_a_batch_beside_a_running_one_takes_its_even_share_of_the_rows() -> None:
    """With two instances, a batch formed while another runs takes at most half of the rows running
    and queued (closed 'shared'); the rest go in the next batch. One instance: no cap."""

    async def body(concurrency: int) -> tuple[list[int], list[str]]:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=16, concurrency=concurrency, share_side_by_side=True)
        model.gate = gate = asyncio.Event()
        blocker = asyncio.ensure_future(batcher.submit("k", rows(-1, -2, -3, -4), 4))
        await model.started.wait()  # four rows run, held on the gate
        big = asyncio.ensure_future(batcher.submit("k", rows(*range(10)), 10))
        if concurrency > 1:  # the free instance runs its share while the four rows are held
            await until(lambda: len(model.batches) == 3, "the ten rows computed beside the held batch")
        gate.set()
        await asyncio.gather(blocker, big)
        np.testing.assert_array_equal(big.result().outputs["y"], 10 * np.arange(10))
        assert batcher._interactive_rows_in_flight == 0  # every batch's rows counted out again
        await batcher.close(1)
        return [len(x) for _, x in model.batches], recorder.closed

    sizes, closed = asyncio.run(asyncio.wait_for(body(2), 10))
    assert sizes == [4, 7, 3]  # ceil((10 + 4) / 2) = 7, then ceil((3 + 4) / 2) = 4 >= the 3 left
    assert closed == ["at_once", "shared", "at_once"]
    sizes, closed = asyncio.run(asyncio.wait_for(body(1), 10))
    assert sizes == [4, 10]
    assert "shared" not in closed


def test_a_batch_that_starts_with_free_instances_takes_its_share_and_the_rest_runs_beside_it() -> None:
    """With nothing running and two free instances, a batch takes half of the queued rows (closed
    'shared') and the other half goes at once, side by side: not the whole cohort on one instance
    with the other idle. Not where the runner would run the parts on the event loop (one after the
    other), nor where the runner's choice is not known, nor with one instance, nor when the queue
    holds full batches for both instances."""
    window_s = 1.0

    async def body(
        *, concurrency: int = 2, on_loop: bool | None = False, max_batch_size: int = 16, n: int = 4
    ) -> tuple[list[int], list[str], list[int]]:
        model = SlowModel(0.01)  # the first part still runs when the rest is formed
        asked: list[int] = []

        def runs_on_loop(key: Hashable, inputs: Mapping[str, np.ndarray]) -> bool:
            assert on_loop is not None
            asked.append(int(inputs["x"].shape[0]))  # the part's shape, as the runner would get it
            return on_loop

        batcher, recorder = make(
            model,
            max_batch_size=max_batch_size,
            concurrency=concurrency,
            share_side_by_side=True,
            runs_on_loop=None if on_loop is None else runs_on_loop,
            # A window that would show: the rest of a split goes at once, not after it (an untracked
            # submitter beside a running batch waits the window otherwise).
            max_queue_delay_s=window_s,
        )
        started = time.monotonic()
        result = await batcher.submit("k", rows(*range(n)), n)
        assert time.monotonic() - started < window_s / 2
        np.testing.assert_array_equal(result.outputs["y"], 10 * np.arange(n))
        await batcher.close(1)
        return [len(x) for _, x in model.batches], recorder.closed, asked

    def sizes(**kwargs: Any) -> tuple[list[int], list[str], list[int]]:
        return asyncio.run(asyncio.wait_for(body(**kwargs), 10))

    split, closed, asked = sizes()
    assert split == [2, 2] and closed == ["shared", "shared"] and asked == [2]
    assert sizes(n=5)[0] == [3, 2]
    assert sizes(n=5, concurrency=3)[0] == [2, 2, 1]
    assert sizes(n=1) == ([1], ["at_once"], [])  # a lone row: nothing to run beside it, no check
    assert sizes(on_loop=True)[0:3:2] == ([4], [2])  # parts on the loop would run one after the other
    assert sizes(on_loop=None)[0] == [4]
    assert sizes(concurrency=1)[0] == [4]
    assert sizes(max_batch_size=4, n=10)[0][0] == 4  # ceil(10 / 2) > 4: full batches on both


def test_the_split_counts_only_the_rows_that_will_be_computed() -> None:
    """Rows of requests cancelled while queued are not shared out: two live rows of four queued go
    one to each free instance, not both to one (a share of ceil(4 / 2) would have taken them whole,
    labelled 'shared' with nothing beside it)."""

    async def body() -> tuple[list[int], list[str]]:
        model = SlowModel(0.01)
        batcher, recorder = make(
            model,
            max_batch_size=16,
            concurrency=2,
            share_side_by_side=True,
            runs_on_loop=lambda key, inputs: False,
        )
        calls = [asyncio.ensure_future(batcher.submit("k", rows(v), 1)) for v in range(4)]
        await asyncio.sleep(0)  # all four queued; the dispatcher runs on the next turn
        assert batcher._queued_rows == 4 and not model.batches
        for call in calls[:2]:
            call.cancel()
        results = await asyncio.gather(*calls[2:])
        for v, result in zip((2, 3), results, strict=True):
            np.testing.assert_array_equal(result.outputs["y"], [10 * v])
        await batcher.close(1)
        return [len(x) for _, x in model.batches], recorder.closed

    sizes, closed = asyncio.run(asyncio.wait_for(body(), 10))
    assert sizes == [1, 1]
    assert closed == ["shared", "shared"]


def test_a_runner_that_cannot_tell_where_a_part_runs_gets_the_whole_batch() -> None:
    """The split is a heuristic: a failing runner check leaves the batch whole and the dispatcher
    running (before, a failure there would have stopped every later batch of the model)."""

    async def body() -> None:
        model = FakeModel()

        def runs_on_loop(key: Hashable, inputs: Mapping[str, np.ndarray]) -> bool:
            raise RuntimeError("no signature")

        batcher, _ = make(
            model, max_batch_size=16, concurrency=2, share_side_by_side=True, runs_on_loop=runs_on_loop
        )
        for n in (4, 3):
            result = await batcher.submit("k", rows(*range(n)), n)
            np.testing.assert_array_equal(result.outputs["y"], 10 * np.arange(n))
        assert [len(x) for _, x in model.batches] == [4, 3]
        await batcher.close(1)

    run(body())


def test_window_collects_rows_that_arrive_within_it() -> None:
    async def body() -> None:
        model = FakeModel()
        window_s = 0.3
        batcher, _ = make(model, max_batch_size=8, max_queue_delay_s=window_s)
        # Two requests queued together: the dispatcher waits the window for more.
        first = [asyncio.ensure_future(batcher.submit("k", rows(i), 1)) for i in (1, 2)]
        opened = time.monotonic()
        await until(lambda: batcher.queued_rows == 2, "the first two requests queued")
        await let_the_dispatcher_run()
        # The dispatcher has seen both and holds them: the window is open when the third arrives.
        assert batcher.queued_rows == 2 and not model.batches
        late = asyncio.ensure_future(batcher.submit("k", rows(3), 1))
        await asyncio.gather(*first, late)
        assert [list(x) for _, x in model.batches] == [[1, 2, 3]]
        # It went when the window that opened with the first rows ended, not much later.
        assert time.monotonic() - opened < window_s * 5 / 3
        await batcher.close(1)

    run(body())


def test_the_window_is_counted_from_the_oldest_rows_arrival_so_later_rows_do_not_extend_it() -> None:
    """max_queue_delay_s bounds every row's extra wait: the window starts at the oldest queued row's
    arrival, so a row that arrived later does not restart it for the rows queued before it."""

    async def body() -> None:
        model = FakeModel()
        clock = FakeClock()
        window_s = 100.0  # on the test's clock; the rows below are queued far apart on it
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=window_s, clock=clock)
        gate, blocker = await hold_runner(batcher, model)
        batcher.callers = 5  # callers on their way: the window pays off throughout
        oldest = asyncio.ensure_future(batcher.submit("k", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "the oldest row queued")
        clock.now += 0.9 * window_s
        later = asyncio.ensure_future(batcher.submit("k", rows(2), 1))
        await until(lambda: batcher.queued_rows == 2, "the later row queued")
        gate.set()  # the window opens for both, ending window_s after the oldest row's arrival
        await blocker
        await let_the_dispatcher_run()
        assert len(model.batches) == 1  # its window is open
        clock.now += 0.6 * window_s  # past the oldest row's window, within the later row's
        last = asyncio.ensure_future(batcher.submit("k", rows(3), 1))  # wakes the dispatcher
        await let_the_dispatcher_run()
        assert [list(x) for _, x in model.batches] == [[-1], [1, 2, 3]]
        assert recorder.closed[-1] == "window"
        await asyncio.gather(oldest, later, last)
        await batcher.close(1)

    run(body())


def test_a_queued_deadline_inside_the_window_closes_it_in_time() -> None:
    """A long window must not outlast a queued request's deadline while the runner is free: the
    batch goes early enough to compute before it ('deadline'), not after it has expired."""

    async def body() -> None:
        model = SlowModel(0.1)
        window_s = 2.0
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=window_s)
        # One batch measures the compute time (>= 0.1 s a row); later batches are quick. The window's
        # cut then comes >= 0.2 s before a two-row batch's deadline: a margin a loaded machine's
        # stalls do not eat, where an unmeasured cost left DEADLINE_SLACK_S (10 ms) to the timer.
        await batcher.submit("k", rows(0), 1)
        model.compute_s = 0.0
        # Two untracked requests queued together: the dispatcher would wait the window for more.
        deadline = time.monotonic() + 0.6
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit("k", rows(1), 1))
        hurried = asyncio.ensure_future(batcher.submit("k", rows(2), 1, deadline=deadline))
        await asyncio.gather(first, hurried)
        assert time.monotonic() < deadline and time.monotonic() - started < window_s / 2
        assert [list(x) for _, x in model.batches] == [[0], [1, 2]]
        assert recorder.closed[-1] == "deadline"
        assert recorder.dropped == []
        await batcher.close(1)

    run(body())


def test_a_deadline_within_the_slack_of_now_closes_the_window_at_once_and_is_computed() -> None:
    """A window is cut DEADLINE_SLACK_S before a queued deadline (less the batch's compute), the
    slack gRPC's own deadline keeps: a request queued with less than that left goes at once and is
    computed, not held to a cut after its deadline and then dropped unrun."""

    async def body() -> None:
        model = FakeModel()
        clock = FakeClock()
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=5.0, clock=clock)
        batcher.callers = 2  # another caller on its way: the window would pay off
        deadline = clock.now + DEADLINE_SLACK_S / 2
        hurried = asyncio.ensure_future(batcher.submit("k", rows(1), 1, deadline=deadline))
        await let_the_dispatcher_run()
        clock.now = deadline + 1.0  # its deadline passes once its batch has gone
        np.testing.assert_array_equal((await hurried).outputs["y"], [10])
        assert (recorder.closed, recorder.dropped) == (["deadline"], [])
        await batcher.close(1)

    run(body())


def test_a_window_of_one_key_does_not_outlast_a_queued_deadline_of_another_key() -> None:
    """A long window open for one compatibility key (another output size, precision or psi) must not
    hold a request of another key past its deadline while a runner instance is free: it was
    computed never (DEADLINE_EXCEEDED after the window, dropped) though the runner idled."""

    async def body() -> None:
        model = FakeModel()
        window_s = 2.0
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=window_s, concurrency=2)
        gate, blocker = await hold_runner(batcher, model)  # a batch in flight: the window pays off
        # As measured by earlier batches: each window is cut >= 0.1 s before the deadline, a margin
        # a loaded machine's stalls do not eat.
        batcher._row_cost_s = 0.1
        waiting = asyncio.ensure_future(batcher.submit("a", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "the first key's row queued")
        await let_the_dispatcher_run()
        assert not waiting.done()  # its window is open, an instance free
        deadline = time.monotonic() + 0.6
        hurried = asyncio.ensure_future(batcher.submit("b", rows(2), 1, deadline=deadline))
        result = await asyncio.wait_for(hurried, window_s)
        np.testing.assert_array_equal(result.outputs["y"], [20])
        assert time.monotonic() < deadline and recorder.dropped == []
        gate.set()
        await asyncio.gather(waiting, blocker)
        await batcher.close(1)

    run(body())


def test_another_keys_large_request_cuts_a_window_by_one_batch_of_its_rows_not_all() -> None:
    """A request of another key follows this window's batch with one batch of its own rows, not all
    of them: a large one (40 rows, batches of 8) whose deadline left room for that closed every
    window of the first key at once, as if its 40 rows ran before its deadline's batch."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=8, max_queue_delay_s=0.5, concurrency=2)
        gate, blocker = await hold_runner(batcher, model)
        batcher._row_cost_s = 0.1  # a batch of 8 rows: 0.8 s; all 40: 4 s
        waiting = asyncio.ensure_future(batcher.submit("a", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "the first key's row queued")
        await let_the_dispatcher_run()  # its window is open, an instance free
        far = time.monotonic() + 3.0  # room for this window, its batch and one batch of 8
        large = asyncio.ensure_future(batcher.submit("b", rows(*range(40)), 40, deadline=far))
        await until(lambda: batcher.queued_rows == 41, "the large request queued")
        await waiting
        assert recorder.closed[:2] == ["at_once", "window"], recorder.closed  # the runner's hold, then a's
        gate.set()
        await asyncio.gather(waiting, large, blocker)
        await batcher.close(1)

    run(body())


def test_full_batch_goes_without_waiting_the_window() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=2, max_queue_delay_s=5.0)
        started = time.monotonic()
        await asyncio.gather(batcher.submit("k", rows(1), 1), batcher.submit("k", rows(2), 1))
        assert time.monotonic() - started < 2.0
        await batcher.close(1)

    run(body())


def test_interactive_lane_goes_before_bulk() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=1)
        gate, blocker = await hold_runner(batcher, model)
        bulk = asyncio.ensure_future(batcher.submit("k", rows(100), 1, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 1, "the bulk request queued")
        interactive = asyncio.ensure_future(batcher.submit("k", rows(1), 1, lane=Lane.INTERACTIVE))
        await until(lambda: batcher.queued_rows == 2, "the interactive request queued")
        gate.set()
        await asyncio.gather(bulk, interactive, blocker)
        assert [float(x[0]) for _, x in model.batches] == [-1, 1, 100]
        # Each wait is reported with its lane (genserve_queue_duration_seconds{lane=...}).
        assert recorder.waits == [Lane.INTERACTIVE, Lane.INTERACTIVE, Lane.BULK]
        await batcher.close(1)

    run(body())


def test_an_interactive_arrival_ends_a_bulk_batch_window_at_once() -> None:
    async def body() -> None:
        model = FakeModel()
        # A long window, and a batch in flight: a bulk row alone waits for more (untracked callers).
        window_s = 0.5
        batcher, _ = make(model, max_batch_size=8, max_queue_delay_s=window_s, concurrency=2)
        gate, blocker = await hold_runner(batcher, model)
        bulk = asyncio.ensure_future(batcher.submit("b", rows(100), 1, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 1, "the bulk request queued")
        await let_the_dispatcher_run()
        # A runner instance is free and the bulk row is still queued: the bulk window is open.
        assert batcher.queued_rows == 1 and not bulk.done()
        interactive = asyncio.ensure_future(batcher.submit("i", rows(1), 1))
        # Without the early end it would wait out the rest of the bulk window before running.
        result = await asyncio.wait_for(interactive, window_s / 2)
        np.testing.assert_array_equal(result.outputs["y"], [10])
        assert not bulk.done()
        gate.set()
        await asyncio.gather(bulk, blocker)
        assert [float(x[0]) for _, x in model.batches] == [-1, 1, 100]
        await batcher.close(1)

    run(body())


def test_compatibility_keys_never_share_a_batch() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        reqs = [
            asyncio.ensure_future(batcher.submit(k, rows(v), 1)) for k, v in (("a", 1), ("b", 2), ("a", 3))
        ]
        await until(lambda: batcher.queued_rows == 3, "the three requests queued")
        gate.set()
        await asyncio.gather(*reqs, blocker)
        assert [(k, list(x)) for k, x in model.batches] == [("k", [-1]), ("a", [1, 3]), ("b", [2])]
        await batcher.close(1)

    run(body())


def test_expired_deadline_is_dropped_before_compute_and_counted() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model)
        gate, blocker = await hold_runner(batcher, model)
        deadline = time.monotonic() + 0.05
        doomed = asyncio.ensure_future(batcher.submit("k", rows(5), 1, deadline=deadline))
        alive = asyncio.ensure_future(batcher.submit("k", rows(6), 1))
        await past(deadline)  # the deadline passes while the row waits behind the held runner
        gate.set()
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await doomed
        await asyncio.gather(alive, blocker)
        assert all(5 not in x for _, x in model.batches)
        assert recorder.dropped == ["deadline"]
        # A deadline already passed at admission is refused at once.
        with pytest.raises(DeadlineExceeded):
            await batcher.submit("k", rows(7), 1, deadline=time.monotonic() - 1)
        await batcher.close(1)

    run(body())


def test_cancelled_caller_is_dropped_before_compute_and_counted() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model)
        gate, blocker = await hold_runner(batcher, model)
        gone = asyncio.ensure_future(batcher.submit("k", rows(5), 1))
        alive = asyncio.ensure_future(batcher.submit("k", rows(6), 1))
        await until(lambda: batcher.queued_rows == 2, "both requests queued")
        gone.cancel()
        await until(lambda: batcher.queued_rows == 1, "the cancelled rows out of the queue")
        gate.set()
        result = await alive
        await blocker
        np.testing.assert_array_equal(result.outputs["y"], [60])
        assert all(5 not in x for _, x in model.batches)
        assert recorder.dropped == ["cancelled"]
        await batcher.close(1)

    run(body())


def test_rows_withdrawn_because_a_sibling_part_failed_are_not_counted_as_a_cancelled_caller() -> None:
    """A request of several parts (images of several shapes) refused for one part withdraws the others
    (core.gather_or_cancel): the request is counted once, as the refusal, not also as a caller that
    went away (genserve_requests_dropped_total{reason="cancelled"})."""
    from genserve_server.core import gather_or_cancel

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=4)
        gate, blocker = await hold_runner(batcher, model)
        with pytest.raises(ResourceExhausted):
            await gather_or_cancel(
                [batcher.submit("a", rows(1, 2), 2), batcher.submit("b", rows(3, 4, 5), 3)]
            )
        await until(lambda: batcher.queued_rows == 0, "the withdrawn part's rows to leave")
        assert recorder.rejected == ["queue_full"]
        assert recorder.dropped == []
        gate.set()
        await blocker
        await batcher.close(1)

    run(body())


class Rpc:
    """The RPC a request's parts belong to, as core.Call is to the batcher (batch_parts.Caller)."""

    def __init__(self, metrics: Any) -> None:
        self.counted_out = False
        self.refused: tuple[Any, str] | None = None
        self.metrics = metrics  # the model it called: its drops count there


@pytest.mark.parametrize("how", ["expire_queued", "cancelled", "expired_at_admission", "queue_full"])
def test_a_request_whose_parts_all_leave_together_is_counted_once(how: str) -> None:
    """genserve_requests_dropped_total and rejected{queue_full} count requests (docs/metrics.md).
    A Translate or SuperResolve of images (tiles) of two shapes queues two parts, gathered by
    core.gather_or_cancel: when both expired in the queue, both were past the deadline at admission,
    the caller cancelled, or neither fitted the queue, each part was counted, two for one request."""
    from genserve_server.core import gather_or_cancel

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=6)
        gate, blocker = await hold_runner(batcher, model)
        rpc = Rpc(recorder)
        deadline = None
        if how == "expire_queued":
            deadline = time.monotonic() + 0.05
        elif how == "expired_at_admission":
            deadline = time.monotonic() - 1
        elif how == "queue_full":
            other = asyncio.ensure_future(batcher.submit("k", rows(7, 8, 9, 10, 11), 5))
            await until(lambda: batcher.queued_rows == 5, "another caller's rows queued")
        request = asyncio.ensure_future(
            gather_or_cancel(
                [
                    batcher.submit("a", rows(1, 2), 2, deadline=deadline, caller=rpc),
                    batcher.submit("b", rows(3, 4), 2, deadline=deadline, caller=rpc),
                ]
            )
        )
        if how in ("expire_queued", "cancelled"):
            await until(lambda: batcher.queued_rows == 4, "both parts queued")
        if how == "expire_queued":
            assert deadline is not None
            await past(deadline)  # both parts' deadline passes while they wait behind the runner
        elif how == "cancelled":
            request.cancel()
        gate.set()
        with pytest.raises((DeadlineExceeded, asyncio.CancelledError, ResourceExhausted)):
            await request
        await blocker
        if how == "queue_full":
            await other
        await until(lambda: batcher.queued_rows == 0, "the parts out of the queue")
        assert all(v not in x for _, x in model.batches for v in (1, 2, 3, 4))
        if how == "queue_full":
            # Marked on the RPC, whose boundary counts it once as it answers (under the status its
            # client gets: test_a_queue_full_refusal_is_counted_under_the_status_its_client_gets).
            assert rpc.refused == (recorder, "queue_full")
            assert (recorder.rejected, recorder.dropped) == ([], [])
        else:
            assert recorder.dropped == ["cancelled" if how == "cancelled" else "deadline"]
            assert recorder.rejected == []
        # Requests of their own (no caller) still count one each.
        recorder.dropped.clear()
        late = time.monotonic() - 1
        for value in (5, 6):
            with pytest.raises(DeadlineExceeded):
                await batcher.submit("a", rows(value), 1, deadline=late)
        assert recorder.dropped == ["deadline", "deadline"]
        await batcher.close(1)

    run(body())


def test_a_cancelled_callers_rows_leave_a_full_queue_at_once() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=4)
        gate, blocker = await hold_runner(batcher, model)
        gone = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3), 3))
        await until(lambda: batcher.queued_rows == 3, "the request queued")
        gone.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert batcher.queued_rows == 0 and recorder.depth == 0
        # Room the client that gave up held: a live request fits while the runner is still busy.
        accepted = asyncio.ensure_future(batcher.submit("k", rows(4, 5, 6), 3))
        await until(lambda: batcher.queued_rows == 3, "the live request queued")
        gate.set()
        result = await accepted
        await blocker
        np.testing.assert_array_equal(result.outputs["y"], [40, 50, 60])
        assert all(1 not in x for _, x in model.batches)
        assert recorder.dropped == ["cancelled"]
        assert recorder.rejected == []
        await batcher.close(1)

    run(body())


def test_a_request_cancelled_between_its_batches_frees_only_its_untaken_rows() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=2, max_queue_size=8)
        gate = asyncio.Event()
        model.gate = gate
        split = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3, 4, 5), 5))
        await model.started.wait()  # rows 1, 2 are computing; 3, 4, 5 wait
        other = asyncio.ensure_future(batcher.submit("k", rows(6), 1))
        await until(lambda: batcher.queued_rows == 4, "the untaken rows 3, 4, 5 and 6 queued")
        split.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert batcher.queued_rows == 1
        gate.set()
        result = await other
        np.testing.assert_array_equal(result.outputs["y"], [60])
        computed = sorted(float(v) for _, x in model.batches for v in x)
        assert computed == [1.0, 2.0, 6.0]
        assert recorder.dropped == ["cancelled"]
        await batcher.close(1)

    run(body())


def test_caller_cancelled_mid_batch_does_not_disturb_the_others() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model)
        gate = asyncio.Event()
        model.gate = gate
        a = asyncio.ensure_future(batcher.submit("k", rows(1), 1))
        await model.started.wait()
        b = asyncio.ensure_future(batcher.submit("k", rows(2), 1))
        c = asyncio.ensure_future(batcher.submit("k", rows(3), 1))
        await until(lambda: batcher.queued_rows == 2, "b and c queued")
        a.cancel()  # while its batch computes
        gate.set()
        rb, rc = await asyncio.gather(b, c)
        assert a.cancelled()
        np.testing.assert_array_equal(rb.outputs["y"], [20])
        np.testing.assert_array_equal(rc.outputs["y"], [30])
        await batcher.close(1)

    run(body())


def test_failing_batch_fails_only_the_rows_that_fail_again_in_halves() -> None:
    async def body() -> None:
        model = FakeModel()
        model.fail_if_contains = 13
        batcher, recorder = make(model, max_batch_size=2)
        gate, blocker = await hold_runner(batcher, model)
        reqs = [asyncio.ensure_future(batcher.submit("k", rows(v), 1)) for v in (13, 1, 2, 3)]
        await until(lambda: batcher.queued_rows == 4, "the four requests queued")
        gate.set()
        results = await asyncio.gather(*reqs, return_exceptions=True)
        await blocker
        assert isinstance(results[0], Internal)
        assert "model call failed" in str(results[0])
        # Its neighbour in the failed batch was computed again alone.
        assert [np.asarray(r.outputs["y"]).tolist() for r in results[1:]] == [[10], [20], [30]]  # type: ignore[union-attr]
        assert results[1].executed_batch_sizes == [1]  # type: ignore[union-attr]
        assert recorder.batches[1:4] == [(2, 2, False), (1, 1, False), (1, 1, True)]
        # The batcher keeps serving after a failure.
        ok = await batcher.submit("k", rows(4), 1)
        np.testing.assert_array_equal(ok.outputs["y"], [40])
        await batcher.close(1)

    run(body())


def test_a_batch_too_large_for_the_model_computes_in_halves() -> None:
    async def body() -> None:
        model = FakeModel()
        model.fail_above_rows = 2
        batcher, recorder = make(model, max_batch_size=8)
        result = await batcher.submit("k", rows(1, 2, 3, 4, 5), 5)
        np.testing.assert_array_equal(result.outputs["y"], [10, 20, 30, 40, 50])
        # 5 rows fail; 2 compute, 3 fail; of those 1 and 2 compute.
        assert recorder.batches == [(5, 1, False), (2, 1, True), (3, 1, False), (1, 1, True), (2, 1, True)]
        assert sorted(result.executed_batch_sizes) == [1, 2, 2]
        await batcher.close(1)

    run(body())


def test_a_model_failing_every_batch_is_retried_once_per_halving_not_row_by_row() -> None:
    async def body() -> None:
        model = FakeModel()
        model.fail_above_rows = 0
        batcher, recorder = make(model, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        reqs = [asyncio.ensure_future(batcher.submit("k", rows(v, v), 2)) for v in range(1, 5)]
        await until(lambda: batcher.queued_rows == 8, "the four requests queued")
        gate.set()
        results = await asyncio.gather(*reqs, return_exceptions=True)
        with contextlib.suppress(Internal):
            await blocker
        assert all(isinstance(r, Internal) for r in results)
        # The batch, then its two halves: both fail, so the model is failing, not some rows.
        assert recorder.batches[-3:] == [(8, 4, False), (4, 2, False), (4, 2, False)]
        await batcher.close(1)

    run(body())


# What ONNX Runtime raises where it cannot allocate a tensor: its arena's Fail, the plain CPU
# allocator's std::bad_alloc (seen under RLIMIT_AS with the bundled sr-photos-x4 and a large input).
ORT_ALLOCATION_FAILURES = [
    ort_state.Fail(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
        "Name:'conv2d_10_nchwc' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 "
        "void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to "
        "allocate memory for requested buffer of size 536870912"
    ),
    ort_state.RuntimeException(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
        "Name:'conv2d_10_nchwc' Status Message: std::bad_alloc"
    ),
    MemoryError("Unable to allocate 192. MiB for an array with shape (4, 3, 2048, 2048)"),
]


@pytest.mark.parametrize("failure", ORT_ALLOCATION_FAILURES, ids=["arena", "bad_alloc", "numpy"])
def test_a_batch_that_does_not_fit_in_memory_even_in_halves_is_resource_exhausted(failure: Exception) -> None:
    """A model call ONNX Runtime could not allocate for (a large SuperResolve under a container's
    memory limit, a GPU arena's cap) was retried in halves, and where those failed too every request
    got INTERNAL "model call failed", which clients do not retry, though the server serves on and the
    memory comes back as other calls end. It is RESOURCE_EXHAUSTED "the server is out of memory for
    this call", as the boundary answers numpy's MemoryError; ONNX Runtime's text stays in the log."""

    class OutOfMemory(FakeModel):
        async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            await super().__call__(key, inputs)
            raise failure

    async def body() -> None:
        model = OutOfMemory()
        batcher, recorder = make(model, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        reqs = [asyncio.ensure_future(batcher.submit("k", rows(v, v), 2)) for v in range(1, 5)]
        await until(lambda: batcher.queued_rows == 8, "the four requests queued")
        gate.set()
        results = [
            *await asyncio.gather(*reqs, return_exceptions=True),
            *await asyncio.gather(blocker, return_exceptions=True),
        ]
        assert recorder.batches[-3:] == [(8, 4, False), (4, 2, False), (4, 2, False)]  # halved once
        for result in results:  # the four, and the blocker's single row, which is not halved
            assert isinstance(result, ResourceExhausted), repr(result)
            assert str(result).startswith("model m version 1: the server is out of memory for this call")
            assert "bfc_arena" not in str(result) and "Conv" not in str(result)
        await batcher.close(1)

    run(body())


def test_a_batch_out_of_memory_is_one_warning_line_saying_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model call that ran out of memory was logged as a bug: an ERROR with ONNX Runtime's whole
    traceback (its C++ source paths), every call's line saying nothing of what to do. Each failed
    call is one WARNING line naming the model, the batch's rows, ONNX Runtime's short reason and what
    to do (docs/operations.md, "Memory budgets"); the stack only at --log-level debug."""

    class OutOfMemory(FakeModel):
        async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            await super().__call__(key, inputs)
            raise ORT_ALLOCATION_FAILURES[0]

    async def body() -> None:
        batcher, _ = make(OutOfMemory(), max_batch_size=1)
        with pytest.raises(ResourceExhausted):
            await batcher.submit("k", rows(1.0), 1)
        await batcher.close(1)

    with caplog.at_level(logging.INFO, logger="genserve_server.batcher"):
        run(body())
    failed = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING], [r.getMessage() for r in caplog.records]
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    line = failed[0].getMessage()
    assert not failed[0].exc_info
    assert line.startswith("model m version 1: batch of 1 rows from 1 requests ran out of memory"), line
    assert "Failed to allocate memory for requested buffer of size 536870912" in line
    assert "bfc_arena.cc" not in line and "AllocateRawInternal" not in line
    assert "max_sr_input_pixels" in line and "docs/operations.md" in line

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="genserve_server.batcher"):
        run(body())
    assert [bool(r.exc_info) for r in caplog.records if "ran out of memory" in r.getMessage()] == [True]


def test_one_bad_row_among_eight_requests_costs_two_calls_per_halving() -> None:
    async def body() -> None:
        model = FakeModel()
        model.fail_if_contains = 6
        batcher, recorder = make(model, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        reqs = [asyncio.ensure_future(batcher.submit("k", rows(v), 1)) for v in range(1, 9)]
        await until(lambda: batcher.queued_rows == 8, "the eight requests queued")
        gate.set()
        results = await asyncio.gather(*reqs, return_exceptions=True)
        await blocker
        assert [isinstance(r, Internal) for r in results] == [v == 6 for v in range(1, 9)]
        assert [np.asarray(r.outputs["y"]).tolist() for r in results if not isinstance(r, BaseException)] == [
            [10 * v] for v in (1, 2, 3, 4, 5, 7, 8)
        ]
        calls = recorder.batches[1:]
        assert len(calls) == 1 + 2 * 3, calls  # 8 rows, then 4 + 4, 2 + 2, 1 + 1
        assert [ok for _, _, ok in calls].count(False) == 4  # 8, 4, 2 and the bad row alone
        await batcher.close(1)

    run(body())


def test_a_retry_skips_callers_that_left_during_the_other_halfs_call() -> None:
    tasks: list[asyncio.Task[Any]] = []

    class CancelsDuringFirstHalf(FakeModel):
        async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            if np.asarray(inputs["x"]).tolist() == [13, 1]:  # the first half of the failed batch
                for task in tasks[2:]:
                    task.cancel()
            return await super().__call__(key, inputs)

    async def body() -> None:
        model = CancelsDuringFirstHalf()
        model.fail_if_contains = 13
        batcher, _ = make(model, max_batch_size=4)
        gate, blocker = await hold_runner(batcher, model)
        tasks.extend(asyncio.ensure_future(batcher.submit("k", rows(v), 1)) for v in (13, 1, 2, 3))
        await until(lambda: batcher.queued_rows == 4, "the four requests queued")
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await blocker
        assert isinstance(results[0], Internal)
        assert np.asarray(results[1].outputs["y"]).tolist() == [10]  # type: ignore[union-attr]
        assert all(isinstance(r, asyncio.CancelledError) for r in results[2:])
        calls = [x.tolist() for _, x in model.batches[1:]]
        assert calls == [[13, 1, 2, 3], [13, 1], [13], [1]], calls  # [2, 3] was not computed again
        await batcher.close(1)

    run(body())


def test_a_batch_failing_while_the_batcher_closes_is_unavailable_not_retried() -> None:
    async def body() -> None:
        model = FakeModel()
        model.fail_above_rows = 0
        batcher, recorder = make(model, max_batch_size=4)
        gate = model.gate = asyncio.Event()
        two_rows = asyncio.ensure_future(batcher.submit("k", rows(1, 2), 2))
        await model.started.wait()
        closing = await close_begun(batcher)
        gate.set()
        with pytest.raises(Unavailable, match="shut down while the batch was retried"):
            await two_rows
        await closing
        assert recorder.batches == [(2, 1, False)]  # no halves: the runner may be gone

    run(body())


def test_request_split_across_a_failing_batch_fails_once() -> None:
    async def body() -> None:
        model = FakeModel()
        model.fail_if_contains = 13
        batcher, _ = make(model, max_batch_size=2)
        gate, blocker = await hold_runner(batcher, model)
        straddler = asyncio.ensure_future(batcher.submit("k", rows(1, 13, 2), 3))
        other = asyncio.ensure_future(batcher.submit("k", rows(3), 1))
        await until(lambda: batcher.queued_rows == 4, "both requests queued")
        gate.set()
        with pytest.raises(Internal):
            await straddler
        result = await other
        await blocker
        np.testing.assert_array_equal(result.outputs["y"], [30])
        await batcher.close(1)

    run(body())


def test_bulk_batches_go_to_the_bulk_runner_and_interactive_ones_to_the_other() -> None:
    async def body() -> None:
        interactive_model, bulk_model = FakeModel(), FakeModel()
        recorder = Recorder()
        batcher = Batcher(
            interactive_model,
            name="model m version 1",
            observer=recorder,
            max_batch_size=4,
            max_queue_delay_s=0.0,
            max_queue_size=64,
            run_bulk_batch=bulk_model,
        )
        batcher.start()
        bulk = await batcher.submit("k", rows(1, 2), 2, lane=Lane.BULK)
        interactive = await batcher.submit("k", rows(3), 1)
        np.testing.assert_array_equal(bulk.outputs["y"], [10, 20])
        np.testing.assert_array_equal(interactive.outputs["y"], [30])
        assert [x.tolist() for _, x in bulk_model.batches] == [[1, 2]]
        assert [x.tolist() for _, x in interactive_model.batches] == [[3]]
        await batcher.close(1)

    run(body())


def test_a_request_larger_than_the_whole_queue_is_invalid_not_retryable() -> None:
    async def body() -> None:
        batcher, recorder = make(FakeModel(), max_queue_size=4)
        with pytest.raises(InvalidArgument, match=r"needs 5 items, more than.*max_queue_size=4"):
            await batcher.submit("k", rows(1, 2, 3, 4, 5), 5)
        assert recorder.rejected == []  # counted once, by the service, as "invalid"
        result = await batcher.submit("k", rows(1, 2, 3, 4), 4)  # exactly the queue: accepted
        np.testing.assert_array_equal(result.outputs["y"], [10, 20, 30, 40])
        await batcher.close(1)

    run(body())


def test_bulk_fills_half_the_queue_then_waits_for_room_while_interactive_is_still_accepted() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=8, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        first = asyncio.ensure_future(batcher.submit("b", rows(1, 2, 3), 3, lane=Lane.BULK))
        second = asyncio.ensure_future(batcher.submit("b", rows(4, 5), 2, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 3, "the first bulk request queued")
        await let_the_dispatcher_run()
        assert batcher.queued_rows == 3  # 3 + 2 > 8 // 2: the second bulk request waits, unqueued
        assert not second.done()
        # Interactive requests find the other half and are queued at once.
        interactive = asyncio.ensure_future(batcher.submit("i", rows(7, 8, 9, 10, 11), 5))
        await until(lambda: batcher.queued_rows == 8, "the interactive request queued")
        assert batcher.queued_rows == 8
        with pytest.raises(ResourceExhausted, match="queue full"):  # interactive never waits
            await batcher.submit("i", rows(12), 1)
        gate.set()  # the queue drains: the waiting bulk request gets in and completes
        np.testing.assert_array_equal((await second).outputs["y"], [40, 50])
        np.testing.assert_array_equal((await first).outputs["y"], [10, 20, 30])
        np.testing.assert_array_equal((await interactive).outputs["y"], [70, 80, 90, 100, 110])
        await blocker
        assert recorder.rejected == ["queue_full"]
        await batcher.close(1)

    run(body())


def test_bulk_rows_fill_exactly_half_the_queue_and_one_larger_request_fits_an_empty_bulk_share() -> None:
    """docs/operations.md: bulk rows fill at most half the model's queue. Exactly half is let in at
    once, not held back a row short of it; and one bulk request larger than that half (a stream's
    chunk against a small queue) is queued into an empty bulk share rather than waiting for room
    that can never come."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_queue_size=8, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        three = asyncio.ensure_future(batcher.submit("b", rows(1, 2, 3), 3, lane=Lane.BULK))
        one = asyncio.ensure_future(batcher.submit("b", rows(4), 1, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 4, "bulk rows up to exactly half the queue queued")
        gate.set()
        assert (await three).outputs["y"].tolist() == [10, 20, 30]
        assert (await one).outputs["y"].tolist() == [40]
        await blocker
        gate, blocker = await hold_runner(batcher, model)
        large = asyncio.ensure_future(batcher.submit("b", rows(*range(5, 11)), 6, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 6, "a bulk request over half the queue queued")
        gate.set()
        assert (await large).outputs["y"].tolist() == [50, 60, 70, 80, 90, 100]
        await blocker
        await batcher.close(1)

    run(body())


def test_a_bulk_request_cancelled_while_it_waits_for_room_is_counted_once_as_deadline_or_cancelled() -> None:
    """gRPC cancels a handler at its deadline a little before the deadline the server keeps
    (DEADLINE_SLACK_S): a BULK request waiting for room in its lane then left through the cancellation,
    not the batcher's own timer, and was counted in neither genserve_requests_dropped_total reason;
    nor was a caller that went away while it waited."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=8, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        first = asyncio.ensure_future(batcher.submit("b", rows(1, 2, 3, 4), 4, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 4, "the bulk share full")
        deadline = time.monotonic() + 0.05
        timed = asyncio.ensure_future(batcher.submit("b", rows(5), 1, lane=Lane.BULK, deadline=deadline))
        gone = asyncio.ensure_future(batcher.submit("b", rows(6), 1, lane=Lane.BULK))
        await let_the_dispatcher_run()
        assert not timed.done() and not gone.done() and batcher.queued_rows == 4  # both wait for room
        await past(deadline - 0.002)
        timed.cancel()  # gRPC ending the call at its deadline
        gone.cancel()  # a client that went away
        for task in (timed, gone):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert sorted(recorder.dropped) == ["cancelled", "deadline"]
        gate.set()
        await asyncio.gather(first, blocker)
        assert all(5 not in x and 6 not in x for _, x in model.batches)
        await batcher.close(1)

    run(body())


def test_bulk_submits_waiting_for_room_get_in_first_come_first_served() -> None:
    """A large bulk submit waiting for room is not overtaken by a smaller one that arrives later and
    would fit: room goes in arrival order, so a big chunk cannot starve behind a stream of small ones."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_queue_size=8, max_batch_size=8)
        gate, blocker = await hold_runner(batcher, model)
        first = asyncio.ensure_future(batcher.submit("b", rows(1, 2, 3), 3, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 3, "the first bulk request queued")
        large = asyncio.ensure_future(batcher.submit("b", rows(4, 5, 6, 7), 4, lane=Lane.BULK))
        await let_the_dispatcher_run()
        small = asyncio.ensure_future(batcher.submit("b", rows(8), 1, lane=Lane.BULK))
        await let_the_dispatcher_run()
        # 3 + 1 fits the bulk half (4), but the large request came first: the small one waits too.
        assert batcher.queued_rows == 3 and not large.done() and not small.done()
        gate.set()
        await asyncio.gather(first, large, small, blocker)
        order = [v for _, x in model.batches for v in x.tolist()]
        assert order.index(4) < order.index(8)
        await batcher.close(1)

    run(body())


def test_a_bulk_request_waiting_for_room_gives_its_response_bytes_back_until_it_is_queued() -> None:
    """A unary bulk call holds its response's bytes against the server-wide budget (core.reserve_response)
    before it submits: while its request waits for room in the bulk lane it gives them back, so that
    waiting bulk calls do not get interactive ones refused on the budget, and first in line with room
    it holds them again (waiting for the budget, or refused naming it) before it is queued."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_queue_size=4, max_batch_size=4)
        budget = ByteBudget("response budget (response_budget_bytes)", 100, max_wait_s=0.2)
        gate, blocker = await hold_runner(batcher, model)

        async def bulk_call(reservation: Reservation, values: tuple[float, ...]) -> BatchResult:
            await reservation.reserve(40, None, "Sample")
            return await batcher.submit("b", rows(*values), len(values), lane=Lane.BULK, held=reservation)

        queued_bytes, waiting_bytes, refused_bytes = (Reservation(budget) for _ in range(3))
        queued = asyncio.ensure_future(bulk_call(queued_bytes, (1, 2)))
        await until(lambda: batcher.queued_rows == 2, "the first bulk request queued")
        waiting = asyncio.ensure_future(bulk_call(waiting_bytes, (3,)))
        await let_the_dispatcher_run()
        # The bulk half (2 rows) is full: the second waits for room, holding no bytes meanwhile.
        assert not waiting.done() and waiting_bytes.held == 0 and budget.held == 40
        refused = asyncio.ensure_future(bulk_call(refused_bytes, (4,)))
        await let_the_dispatcher_run()
        assert budget.held == 40
        interactive = Reservation(budget)
        await interactive.reserve(60, time.monotonic() + 0.05, "Sample")  # fits at once: 40 + 60
        gate.set()  # room: the waiting request holds its bytes again, waiting for them (60 + 40 held)
        np.testing.assert_array_equal((await queued).outputs["y"], [10, 20])
        queued_bytes.release()
        np.testing.assert_array_equal((await waiting).outputs["y"], [30])  # accepted, not lost
        assert waiting_bytes.held == 40
        # The next in line finds the budget spent (the interactive and the second bulk response,
        # both unsent) for longer than max_wait_s: refused naming the budget, never queued.
        with pytest.raises(ResourceExhausted, match="response_budget_bytes"):
            await refused
        assert refused_bytes.held == 0 and budget.held == 100 and batcher.queued_rows == 0
        assert [v for _, x in model.batches for v in x.tolist()] == [-1, 1, 2, 3]
        await blocker
        await batcher.close(1)

    run(body())


def test_a_bulk_request_whose_deadline_passes_while_it_takes_its_bytes_back_is_counted_as_deadline() -> None:
    """First in line with room, a BULK request holds its response's bytes again (take_back), waiting
    for the budget at most until its deadline. Its deadline passing there answered the call
    DEADLINE_EXCEEDED and counted it in no genserve_requests_dropped_total reason."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=4, max_batch_size=4)
        budget = ByteBudget("response budget (response_budget_bytes)", 100, max_wait_s=5.0)
        gate, blocker = await hold_runner(batcher, model)
        queued_bytes, waiting_bytes, interactive = (Reservation(budget) for _ in range(3))
        await queued_bytes.reserve(40, None, "Sample")
        queued = asyncio.ensure_future(batcher.submit("b", rows(1, 2), 2, lane=Lane.BULK, held=queued_bytes))
        await until(lambda: batcher.queued_rows == 2, "the first bulk request queued")
        await waiting_bytes.reserve(40, None, "Sample")
        deadline = time.monotonic() + 1.0  # room comes long before it
        waiting = asyncio.ensure_future(
            batcher.submit("b", rows(3), 1, lane=Lane.BULK, deadline=deadline, held=waiting_bytes)
        )
        await let_the_dispatcher_run()
        assert not waiting.done() and waiting_bytes.held == 0  # waits for room, its bytes given back
        await interactive.reserve(60, None, "Sample")  # the budget is full: 40 + 60
        gate.set()  # room: the waiting request waits for its bytes until its deadline
        np.testing.assert_array_equal((await queued).outputs["y"], [10, 20])
        with pytest.raises(DeadlineExceeded, match="response_budget_bytes"):
            await waiting
        assert time.monotonic() >= deadline - 0.05
        assert recorder.dropped == ["deadline"] and recorder.rejected == []
        await blocker
        await batcher.close(1)

    run(body())


class RefusingHeld:
    """A batch_parts.Held whose take_back is refused as a response budget spent by other calls
    refuses it once budget_max_wait_s has run out, at `refused_at` on the batcher's clock."""

    def __init__(self, clock: FakeClock, refused_at: float) -> None:
        self.clock = clock
        self.refused_at = refused_at

    def give_back(self) -> None:
        pass

    async def take_back(self, deadline: float | None) -> None:
        self.clock.now = self.refused_at
        raise ResourceExhausted("Sample needs 40 bytes of the response budget (response_budget_bytes)")


@pytest.mark.parametrize("before_deadline_s", [5.0, DEADLINE_SLACK_S / 2])
def test_a_bulk_request_refused_its_bytes_back_before_its_deadline_is_counted_rejected_budget(
    before_deadline_s: float,
) -> None:
    """First in line with room, a BULK request whose bytes wait out budget_max_wait_s before its
    deadline is answered RESOURCE_EXHAUSTED naming the budget: it was counted in no
    genserve_requests_rejected_total reason (and, refused within DEADLINE_SLACK_S of its deadline,
    as a deadline drop, though its client gets the refusal). Now `budget`, and never a drop."""

    async def body() -> None:
        model = FakeModel()
        clock = FakeClock()
        batcher, recorder = make(model, max_queue_size=4, clock=clock)
        gate, blocker = await hold_runner(batcher, model)
        queued = asyncio.ensure_future(batcher.submit("b", rows(1, 2), 2, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 2, "the first bulk request queued")
        deadline = clock.now + 10.0
        held = RefusingHeld(clock, deadline - before_deadline_s)
        waiting = asyncio.ensure_future(
            batcher.submit("b", rows(3), 1, lane=Lane.BULK, deadline=deadline, held=held)
        )
        await let_the_dispatcher_run()
        assert not waiting.done()  # the bulk half (2) is full: it waits for room
        gate.set()
        np.testing.assert_array_equal((await queued).outputs["y"], [10, 20])
        with pytest.raises(ResourceExhausted, match="response_budget_bytes"):
            await waiting
        assert (recorder.rejected, recorder.dropped) == (["budget"], [])
        await blocker
        await batcher.close(1)

    run(body())


def test_a_bulk_request_waiting_for_room_fails_when_the_batcher_closes() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_queue_size=4)
        gate, blocker = await hold_runner(batcher, model)
        queued = asyncio.ensure_future(batcher.submit("b", rows(1, 2), 2, lane=Lane.BULK))
        waiting = asyncio.ensure_future(batcher.submit("b", rows(3), 1, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 2, "the first bulk request queued")
        await let_the_dispatcher_run()
        assert batcher.queued_rows == 2 and not waiting.done()  # the bulk half (2) is full: it waits
        closing = asyncio.ensure_future(batcher.close(5))
        with pytest.raises(Unavailable, match="draining"):
            await waiting
        gate.set()
        await closing
        np.testing.assert_array_equal((await queued).outputs["y"], [10, 20])  # accepted work finishes
        await blocker

    run(body())


def test_wrong_output_count_is_a_typed_error() -> None:
    async def body() -> None:
        model = FakeModel()
        model.drop_a_row = True
        batcher, _ = make(model)
        with pytest.raises(Internal, match="has 1 rows for a batch of 2"):
            await batcher.submit("k", rows(1, 2), 2)
        await batcher.close(1)

    run(body())


def test_outputs_the_process_has_no_memory_to_hand_out_are_resource_exhausted_not_a_misfit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a container's memory limit, a large SuperResolve's tiles were computed but the arrays to
    hand them to the request could not be allocated (numpy's MemoryError): the request failed
    INTERNAL "the model's outputs did not fit the request", as for a model whose output shape
    changed. It fails RESOURCE_EXHAUSTED saying the server is out of memory (clients retry it)."""

    def no_memory(parts: object, outputs: object) -> None:
        raise MemoryError("Unable to allocate 97.0 MiB for an array with shape (121, 3, 512, 512)")

    monkeypatch.setattr("genserve_server.batcher.fan_out", no_memory)

    async def body() -> None:
        batcher, _ = make(FakeModel())
        with pytest.raises(ResourceExhausted, match=r"model m version 1: .*out of memory.*Unable to"):
            await batcher.submit("k", rows(1, 2), 2)
        await batcher.close(1)

    run(body())


def test_queue_full_is_refused_at_once_naming_model_and_limit() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=4)
        gate, blocker = await hold_runner(batcher, model)
        accepted = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3), 3))
        await until(lambda: batcher.queued_rows == 3, "the accepted request queued")
        with pytest.raises(ResourceExhausted, match=r"model m version 1: queue full .*max_queue_size=4"):
            await batcher.submit("k", rows(4, 5), 2)
        assert recorder.rejected == ["queue_full"]
        gate.set()
        result = await accepted
        await blocker
        np.testing.assert_array_equal(result.outputs["y"], [10, 20, 30])
        await batcher.close(1)

    run(body())


class BoundaryContext:
    """The parts of grpc.aio.ServicerContext the boundary uses: `time_remaining_s` left at arrival;
    the statuses it sent in `aborted`."""

    def __init__(self, time_remaining_s: float) -> None:
        self.time_remaining_s = time_remaining_s
        self.aborted: list[grpc.StatusCode] = []

    def time_remaining(self) -> float:
        return self.time_remaining_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()) -> None:
        self.aborted.append(code)
        raise RuntimeError(details)


def refusal_counted_through_the_boundary(
    monkeypatch: pytest.MonkeyPatch,
    refuse: Callable[[Batcher, Call, FakeClock], Coroutine[Any, Any, None]],
    ending: str,
) -> tuple[dict[str, float], dict[str, float], list[grpc.StatusCode]]:
    """An RPC of model p whose request to model d's batcher (a code prior's decoder, a stream's own
    model) is refused by `refuse` in a task of its own (a stream's chunk computed ahead, its decode),
    which the handler awaits, then `ending`: answered at once, past the call's deadline (gRPC's
    DEADLINE_EXCEEDED, the boundary sends nothing), or its client cancelled (CANCELLED). What is
    counted under d (rejected and dropped, by reason), under p, and the statuses the boundary sent."""
    from genserve_server import batcher as batcher_module
    from genserve_server import boundary as boundary_module
    from genserve_server.boundary import Boundary
    from genserve_server.metrics import DROP_REASONS, REJECT_REASONS, BatchMetrics, Metrics

    clock = FakeClock()
    fake_time = type("FakeTime", (), {"monotonic": staticmethod(clock)})
    monkeypatch.setattr(boundary_module, "time", fake_time)
    monkeypatch.setattr(batcher_module, "time", fake_time)  # cancelled_by_deadline's clock
    registry = Metrics(enabled=True)
    context = BoundaryContext(0.5)

    async def handler(request: object, call: Call) -> None:
        call.metrics = registry.for_model("p", "1", 4)
        model = FakeModel()
        batcher = Batcher(
            model,
            name="model d version 1",
            observer=BatchMetrics(registry.for_model("d", "1", 4)),
            max_batch_size=4,
            max_queue_delay_s=0.0,
            max_queue_size=4,
            clock=clock,
        )
        batcher.start()
        try:
            refused = asyncio.ensure_future(refuse(batcher, call, clock))
            await asyncio.wait({refused})
            if ending == "deadline":
                clock.now += 1.0
            elif ending == "client cancelled":
                refused.exception()
                raise asyncio.CancelledError
            refused.result()
        finally:
            await batcher.close(1)

    async def body() -> None:
        with pytest.raises((RuntimeError, asyncio.CancelledError)):
            await Boundary(registry).unary("SampleStream", object(), context, handler)  # type: ignore[arg-type]

    run(body())

    def counted(model: str, family: str, reasons: tuple[str, ...]) -> dict[str, float]:
        labels = {"model": model, "version": "1"}
        values = {r: registry.registry.get_sample_value(family, {**labels, "reason": r}) for r in reasons}
        return {r: n for r, n in values.items() if n}

    rejected = "genserve_requests_rejected_total"
    dropped = "genserve_requests_dropped_total"
    # Under p (the call's own model) the call's drop, counted once (count_once) as it ends: a client
    # that went away before it was answered is one `cancelled` drop, one past its deadline a
    # `deadline` drop (docs/metrics.md: a call's drop counts under the model it called); the
    # refusal is d's, whose queue or lane refused it.
    assert counted("p", rejected, REJECT_REASONS) == {}
    drops = {"client cancelled": {"cancelled": 1.0}, "deadline": {"deadline": 1.0}}.get(ending, {})
    assert counted("p", dropped, DROP_REASONS) == drops
    return counted("d", rejected, REJECT_REASONS), counted("d", dropped, DROP_REASONS), context.aborted


ENDINGS = [
    ("answered", True),
    ("deadline", False),
    ("client cancelled", False),
]


@pytest.mark.parametrize("refused_by", ["submit", "reserved"])
@pytest.mark.parametrize(("ending", "sent"), ENDINGS)
def test_a_queue_full_refusal_is_counted_under_the_status_its_client_gets(
    monkeypatch: pytest.MonkeyPatch, refused_by: str, ending: str, sent: bool
) -> None:
    """A request refused 'queue full' in a task of its own (a SampleStream's chunk computed ahead, a
    code prior stream's decode reservation) reaches the boundary a loop turn or more later, by when
    the client may have cancelled (CANCELLED) or the deadline passed (DEADLINE_EXCEEDED, nothing
    sent): the batcher counted `queue_full` as it raised, whatever its client got. Now the call is
    marked and the boundary counts it as it answers: `queue_full` under the batcher's model (d, not
    the call's p) if RESOURCE_EXHAUSTED is sent; past the deadline a `deadline` drop, and for a call
    its client cancelled (counted CANCELLED) a `cancelled` drop, both under p, the model called."""

    async def refuse(batcher: Batcher, call: Call, clock: FakeClock) -> None:
        with batcher.reserved(4):  # other calls' rows take the whole queue
            if refused_by == "submit":
                await batcher.submit("k", rows(1), 1, deadline=call.deadline, caller=call)
            else:
                with batcher.reserved(1, call, call.deadline):
                    pass

    rejected, dropped, aborted = refusal_counted_through_the_boundary(monkeypatch, refuse, ending)
    assert rejected == ({"queue_full": 1.0} if sent else {})
    assert dropped == {}  # the call's drop is p's (refusal_counted_through_the_boundary)
    assert aborted == ([grpc.StatusCode.RESOURCE_EXHAUSTED] if sent else [])


@pytest.mark.parametrize(("ending", "sent"), ENDINGS)
def test_a_bulk_budget_refusal_is_counted_under_the_status_its_client_gets(
    monkeypatch: pytest.MonkeyPatch, ending: str, sent: bool
) -> None:
    """A BULK request whose bytes, taken back first in line with room, wait out budget_max_wait_s
    before its deadline is refused naming the budget; the batcher counted `budget` on its own clock
    reading as it raised, while the boundary reads the clock again to decide what to send: a refusal
    reaching it after the deadline (a stream's chunk computed ahead, a busy loop) was counted `budget`
    and DEADLINE_EXCEEDED, one whose client had cancelled `budget` and CANCELLED. Now the call is
    marked and the boundary counts it as it answers: `budget` under the batcher's model if
    RESOURCE_EXHAUSTED is sent; a `deadline` drop past the deadline, a `cancelled` drop if
    cancelled, both under p, the model called."""

    async def refuse(batcher: Batcher, call: Call, clock: FakeClock) -> None:
        held = RefusingHeld(clock, clock.now)  # refused at once, before the deadline
        with batcher.reserved(4):  # other calls' rows take the whole queue: it waits in line
            waiting = asyncio.ensure_future(
                batcher.submit(
                    "k", rows(1), 1, lane=Lane.BULK, deadline=call.deadline, caller=call, held=held
                )
            )
            await let_the_dispatcher_run()
            assert not waiting.done()
        await waiting  # first in line with room, its bytes are refused

    rejected, dropped, aborted = refusal_counted_through_the_boundary(monkeypatch, refuse, ending)
    assert rejected == ({"budget": 1.0} if sent else {})
    assert dropped == {}  # the call's drop is p's (refusal_counted_through_the_boundary)
    assert aborted == ([grpc.StatusCode.RESOURCE_EXHAUSTED] if sent else [])


def test_a_request_past_its_deadline_that_finds_the_queue_full_is_a_deadline_drop_not_queue_full() -> None:
    """docs/metrics.md: `queue_full` counts requests answered RESOURCE_EXHAUSTED. A request whose
    deadline had passed before it reached a full queue (the event loop busy past it) was counted
    `queue_full` and refused RESOURCE_EXHAUSTED, though its client gets DEADLINE_EXCEEDED: it is a
    deadline drop, as the same request finding room is."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=4)
        gate, blocker = await hold_runner(batcher, model)
        accepted = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3, 4), 4))
        await until(lambda: batcher.queued_rows == 4, "the queue full")
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await batcher.submit("k", rows(5), 1, deadline=time.monotonic() - 0.1)
        assert (recorder.rejected, recorder.dropped) == ([], ["deadline"])
        gate.set()
        await asyncio.gather(accepted, blocker)
        await batcher.close(1)

    run(body())


def test_close_drains_accepted_work_then_refuses() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=2)
        gate, blocker = await hold_runner(batcher, model)
        reqs = [asyncio.ensure_future(batcher.submit("k", rows(v), 1)) for v in (1, 2, 3)]
        await until(lambda: batcher.queued_rows == 3, "the three requests queued")
        closing = await close_begun(batcher)
        with pytest.raises(Unavailable):
            await batcher.submit("k", rows(9), 1)
        gate.set()
        results = await asyncio.gather(*reqs, blocker)
        await closing
        assert [float(r.outputs["y"][0]) for r in results] == [10, 20, 30, -10]

    run(body())


@pytest.mark.parametrize("second", ["after", "beside"])
def test_closing_again_after_a_drain_timed_out_waits_instead_of_raising_cancelled(second: str) -> None:
    """A reload's drain closes a retired version's batcher within what is left of drain_grace_s; a
    batch still computing then outlasts it (the dispatcher is cancelled, the batch runs on), and
    SIGTERM while that drain waits for the runner closes the same batcher again (Repository.close:
    the version is still registered, DRAINING). The second close re-awaited the cancelled
    dispatcher and raised CancelledError out of App.stop: the rest of the shutdown was skipped and
    the process exited 1 with a traceback. It must wait for the batch like a first close."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=2)
        gate, blocker = await hold_runner(batcher, model)
        queued = asyncio.ensure_future(batcher.submit("k", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "a request queued behind the batch")
        if second == "after":
            await batcher.close(0.05)  # the drain's close: the batch computing outlasts it
            again = asyncio.ensure_future(batcher.close(5))  # the shutdown's close of the same batcher
        else:  # the shutdown's close begins while the drain's still waits, and outlasts it
            again = asyncio.ensure_future(batcher.close(5))
            await batcher.close(0.05)
        with pytest.raises(Unavailable, match="shut down"):
            await queued
        assert not blocker.done()
        await let_the_dispatcher_run()
        assert not again.done()  # it waits for the batch in flight
        gate.set()
        await asyncio.wait_for(again, 5)
        result = await blocker
        assert float(result.outputs["y"][0]) == -10

    run(body())


def test_with_two_instances_bulk_leaves_one_free_while_interactive_requests_arrive() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=1, concurrency=2, interactive_quiet_s=5.0)
        await batcher.submit("k", rows(1), 1, lane=Lane.INTERACTIVE)  # interactive traffic is about
        gate = asyncio.Event()
        model.gate = gate  # the next batch (bulk 2) holds its instance
        model.started.clear()
        bulk_a = asyncio.ensure_future(batcher.submit("k", rows(2), 1, lane=Lane.BULK))
        await model.started.wait()
        bulk_b = asyncio.ensure_future(batcher.submit("k", rows(3), 1, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 1, "bulk 3 queued")
        await let_the_dispatcher_run()  # time for the dispatcher to (wrongly) start bulk 3
        assert [list(x) for _, x in model.batches] == [[1], [2]]  # bulk 3 may not take the last one
        # An interactive request runs on the free instance while bulk 2 is still running.
        interactive = await asyncio.wait_for(batcher.submit("k", rows(4), 1, lane=Lane.INTERACTIVE), 1)
        np.testing.assert_array_equal(interactive.outputs["y"], [40])
        assert not bulk_a.done()
        gate.set()
        await asyncio.gather(bulk_a, bulk_b)
        assert [list(x) for _, x in model.batches] == [[1], [2], [4], [3]]
        await batcher.close(1)

    run(body())


def test_the_efficient_batch_size_the_warm_up_measured_caps_every_batch() -> None:
    """loader.efficient_batch_size (docs/server.md: the batch cap chosen among the sizes measured):
    where larger batches compute no row faster, batches take at most that many rows, below
    max_batch_size, and batch_rows says so."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=8, efficient_batch_size=2)
        assert batcher.batch_rows("k") == 2
        gate, blocker = await hold_runner(batcher, model)
        five = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3, 4, 5), 5))
        await until(lambda: batcher.queued_rows == 5, "the request queued")
        gate.set()
        assert (await five).outputs["y"].tolist() == [10, 20, 30, 40, 50]
        await blocker
        assert [list(x) for _, x in model.batches] == [[-1], [1, 2], [3, 4], [5]]
        assert (await five).executed_batch_sizes == [2, 2, 1]
        await batcher.close(1)

    run(body())


def test_rows_limit_caps_a_keys_batches_and_leaves_other_keys_alone() -> None:
    async def body() -> None:
        model = FakeModel()
        # Key "big" (large images) may take 2 rows a batch; "small" the full max_batch_size of 4.
        batcher, _ = make(model, rows_limit=lambda key: 2 if key == "big" else 1 << 30)
        gate, blocker = await hold_runner(batcher, model)
        big = asyncio.ensure_future(batcher.submit("big", rows(1, 2, 3, 4, 5), 5))
        small = asyncio.ensure_future(batcher.submit("small", rows(6, 7, 8, 9), 4))
        await until(lambda: batcher.queued_rows == 9, "both requests queued")
        gate.set()
        rb, rs = await asyncio.gather(big, small)
        await blocker
        np.testing.assert_array_equal(rb.outputs["y"], [10, 20, 30, 40, 50])
        np.testing.assert_array_equal(rs.outputs["y"], [60, 70, 80, 90])
        assert rb.executed_batch_sizes == [2, 2, 1]
        assert rs.executed_batch_sizes == [4]
        await batcher.close(1)

    run(body())


# --- preferred batch sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows_queued", "limit", "expected_rows", "closes"),
    [
        (8, 64, 0.0, True),  # exactly a preferred size, nothing more coming: go
        (8, 64, 55.0, True),  # 63 rows would not reach 64 either
        (8, 64, 56.0, False),  # the next preferred size is within reach: wait
        (5, 64, 0.0, False),  # not a preferred size: the window decides, as without the setting
        (1, 64, 6.0, True),  # 7 rows would not reach 8
        (1, 64, 7.0, False),
        (8, 16, 7.0, True),  # the next size is capped by the batch limit (16, not 64)
        (8, 16, 8.0, False),
        (64, 64, 0.0, False),  # a full batch goes anyway; nothing to decide
        (8, 64, math.inf, False),  # a request on its way: wait
    ],
)
def test_closes_at_preferred_judges_from_the_rows_queued_and_expected(
    rows_queued: int, limit: int, expected_rows: float, closes: bool
) -> None:
    assert closes_at_preferred(rows_queued, (1, 8, 64), limit, expected_rows) is closes


def test_a_batch_holding_exactly_a_preferred_size_goes_before_its_window_ends() -> None:
    async def body() -> None:
        model = FakeModel()
        # A window far longer than the test's 10 s limit: only the early close can end it. One
        # instance is held busy, so the other waits the window for more rows (untracked callers).
        batcher, _ = make(
            model, max_batch_size=64, max_queue_delay_s=60.0, concurrency=2, preferred_batch_sizes=(1, 8, 64)
        )
        gate, blocker = await hold_runner(batcher, model)
        five = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3, 4, 5), 5))
        await let_the_dispatcher_run()
        assert len(model.batches) == 1  # 5 is no preferred size: the batch keeps waiting
        three = asyncio.ensure_future(batcher.submit("k", rows(6, 7, 8), 3))
        await asyncio.gather(five, three)  # 8 is: it goes without the rest of the window
        assert [len(x) for _, x in model.batches] == [1, 8]
        gate.set()
        await blocker
        await batcher.close(1)

    run(body())


def test_a_request_on_its_way_keeps_a_preferred_batch_open_for_the_next_size() -> None:
    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(
            model, max_batch_size=16, max_queue_delay_s=60.0, concurrency=2, preferred_batch_sizes=(1, 8, 16)
        )
        gate, blocker = await hold_runner(batcher, model)
        batcher.callers = 2  # two RPCs in the server, one of them not queued yet
        first = asyncio.ensure_future(batcher.submit("k", rows(*range(8)), 8))
        await let_the_dispatcher_run()
        assert len(model.batches) == 1  # a preferred size, but more rows are on their way
        second = asyncio.ensure_future(batcher.submit("k", rows(*range(8, 16)), 8))
        await asyncio.gather(first, second)
        assert [len(x) for _, x in model.batches] == [1, 16]
        batcher.callers = 0
        gate.set()
        await blocker
        await batcher.close(1)

    run(body())


def test_a_preferred_batch_of_one_waits_for_requests_already_in_the_server() -> None:
    """Preferred sizes [1, 8, 64] (CUDA-graph sizes) must not turn a loaded server's batches into
    singletons: while tracked callers are about to queue, a lone row keeps waiting for them."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(
            model, max_batch_size=64, max_queue_delay_s=0.3, concurrency=2, preferred_batch_sizes=(1, 8, 64)
        )
        gate, blocker = await hold_runner(batcher, model)
        batcher.callers = 3  # three RPCs in the server, two of them not queued yet
        first = asyncio.ensure_future(batcher.submit("k", rows(1), 1))
        await let_the_dispatcher_run()
        assert len(model.batches) == 1  # 1 is a preferred size, but two rows are on their way
        others = [asyncio.ensure_future(batcher.submit("k", rows(v), 1)) for v in (2, 3)]
        await asyncio.gather(first, *others)
        assert [len(x) for _, x in model.batches] == [1, 3], model.batches
        batcher.callers = 0
        gate.set()
        await blocker
        await batcher.close(1)

    run(body())


class WideModel(FakeModel):
    """out = rows of 2**17 float32 (512 KiB) each, every value 10 * x: batches of big images."""

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        narrow = await super().__call__(key, inputs)
        return {"y": np.repeat(narrow["y"][:, None], 1 << 17, axis=1)}


def test_large_straddling_outputs_are_copied_off_the_event_loop_and_reassembled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request whose rows straddle batches has each batch's rows copied into its arrays; above
    OFF_LOOP_COPY_BYTES that copy runs on a worker thread, so a big request's memcpy and page faults
    never stall the event loop that serves every other model."""
    import threading

    import genserve_server.batcher as batcher_module

    copy_threads: list[threading.Thread] = []
    original_place = batcher_module.place

    def recording_place(*args: Any) -> None:
        copy_threads.append(threading.current_thread())
        original_place(*args)

    monkeypatch.setattr(batcher_module, "place", recording_place)

    async def body() -> None:
        model = WideModel()
        batcher, _ = make(model)
        gate, blocker = await hold_runner(batcher, model)
        big = asyncio.ensure_future(batcher.submit("k", rows(*range(1, 11)), 10))
        small = asyncio.ensure_future(batcher.submit("k", rows(99), 1))
        await until(lambda: batcher.queued_rows == 11, "both requests queued")
        gate.set()
        result, lone, _ = await asyncio.gather(big, small, blocker)
        np.testing.assert_array_equal(result.outputs["y"][:, 0], 10 * np.arange(1, 11))
        np.testing.assert_array_equal(result.outputs["y"][:, -1], 10 * np.arange(1, 11))
        assert len(result.executed_batch_sizes) >= 3  # 10 rows in batches of at most 4
        assert lone.outputs["y"].shape == (1, 1 << 17)
        await batcher.close(1)

    run(body())
    assert copy_threads and all(t is not threading.main_thread() for t in copy_threads)


class GatedModel:
    """out = 10 * x; a batch whose first value has a gate in `gates` waits on it."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gates: dict[float, asyncio.Event] = {}

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        x = np.asarray(inputs["x"])
        self.batches.append([float(v) for v in x])
        gate = self.gates.get(float(x[0]))
        if gate is not None:
            await gate.wait()
        await asyncio.sleep(0)
        return {"y": 10 * x}


def test_an_interactive_window_emptied_by_a_cancel_does_not_give_the_kept_instance_to_bulk() -> None:
    """Two instances, interactive traffic about: one instance stays free of bulk work. An interactive
    row waits out its window while a bulk batch runs, and its caller goes away during the window:
    the bulk row queued beside it must not take the kept instance (the pick after a window was not
    checked against the rule), so the next interactive request runs at once."""

    async def body() -> None:
        model = GatedModel()
        window_s = 0.05
        batcher, _ = make(
            model, max_batch_size=4, max_queue_delay_s=window_s, concurrency=2, interactive_quiet_s=30.0
        )
        model.gates[100.0] = gate_b1 = asyncio.Event()
        model.gates[200.0] = gate_b2 = asyncio.Event()
        await batcher.submit("k", rows(1), 1)  # interactive traffic is about
        bulk_1 = asyncio.ensure_future(batcher.submit("k", rows(100), 1, lane=Lane.BULK))
        await until(lambda: model.batches[-1:] == [[100.0]], "bulk 1 running")
        # An interactive row and a bulk row queue together: the interactive one is picked and, a
        # batch being in flight (untracked callers), waits out its window.
        gone = asyncio.ensure_future(batcher.submit("k", rows(2), 1))
        bulk_2 = asyncio.ensure_future(batcher.submit("k", rows(200), 1, lane=Lane.BULK))
        await let_the_dispatcher_run()
        assert batcher.queued_rows == 2 and len(model.batches) == 2  # in the interactive window
        opened = time.monotonic()
        gone.cancel()
        await past(opened + window_s)
        await let_the_dispatcher_run()
        assert [200.0] not in model.batches, f"bulk 2 took the instance kept free: {model.batches}"
        result = await asyncio.wait_for(batcher.submit("k", rows(3), 1), 1.0)
        np.testing.assert_array_equal(result.outputs["y"], [30])
        gate_b1.set()
        gate_b2.set()
        await asyncio.gather(bulk_1, bulk_2)
        await batcher.close(1)

    run(body())


def test_an_interactive_batch_formed_as_a_bulk_window_fills_is_labelled_yielded() -> None:
    """A bulk window is open; in one loop turn two more bulk rows fill it and an interactive row
    arrives. The interactive row goes first, labelled as a bulk batch's yield (as when it arrives
    earlier in the window), not 'full' from the bulk sub-queue's count."""

    async def body() -> None:
        model = GatedModel()
        batcher, recorder = make(model, max_batch_size=4, max_queue_delay_s=5.0)
        first = [asyncio.ensure_future(batcher.submit("b", rows(v), 1, lane=Lane.BULK)) for v in (100, 101)]
        await let_the_dispatcher_run()
        assert batcher.queued_rows == 2 and not model.batches  # the bulk window is open
        more = [asyncio.ensure_future(batcher.submit("b", rows(v), 1, lane=Lane.BULK)) for v in (102, 103)]
        interactive = asyncio.ensure_future(batcher.submit("i", rows(1), 1))
        result = await asyncio.wait_for(interactive, 1.0)
        np.testing.assert_array_equal(result.outputs["y"], [10])
        await asyncio.wait_for(asyncio.gather(*first, *more), 1.0)
        assert model.batches == [[1.0], [100.0, 101.0, 102.0, 103.0]]
        assert recorder.closed == ["yielded", "full"]
        await batcher.close(1)

    run(body())


def test_a_batch_whose_queued_rows_expired_is_not_labelled_full() -> None:
    """Four rows queued behind a busy runner, three of them past their deadline when it frees: the
    batch computes one row and closes 'at_once', not 'full' (the expired rows leave at _take)."""

    async def body() -> None:
        model = GatedModel()
        clock = FakeClock()
        batcher, recorder = make(model, max_batch_size=4, clock=clock)
        model.gates[-1.0] = gate = asyncio.Event()
        blocker = asyncio.ensure_future(batcher.submit("k", rows(-1), 1))
        await until(lambda: model.batches == [[-1.0]], "the blocker running")
        # On the batcher's clock: on the real one, a stall of 20 ms before the rows were queued
        # refused them at admission, and the four rows never queued.
        deadline = clock.now + 0.02
        doomed = [
            asyncio.ensure_future(batcher.submit("k", rows(v), 1, deadline=deadline)) for v in (1, 2, 3)
        ]
        live = asyncio.ensure_future(batcher.submit("k", rows(4), 1))
        await until(lambda: batcher.queued_rows == 4, "four rows queued")
        clock.now = deadline  # the deadline passes while the rows wait behind the held runner
        gate.set()
        await asyncio.gather(blocker, live)
        for d in doomed:
            assert isinstance(d.exception(), DeadlineExceeded)
        assert model.batches == [[-1.0], [4.0]]
        assert recorder.closed[-1] == "at_once"
        await batcher.close(1)

    run(body())


def test_outputs_that_do_not_fit_a_straddling_request_fail_it_rather_than_leave_it_waiting() -> None:
    """A request split over two batches whose outputs change shape between them (a model that
    misbehaves): its rows cannot be assembled, so it fails with Internal at once, and the batcher
    goes on serving; before, the exception ended the batch's task and the caller waited forever."""

    async def body() -> None:
        calls = 0

        async def shifting_model(key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            nonlocal calls
            calls += 1
            x = np.asarray(inputs["x"])
            width = 1 if calls == 1 else 2
            return {"y": np.repeat(10 * x[:, None], width, axis=1)}

        batcher, _ = make(shifting_model, max_batch_size=2)  # type: ignore[arg-type]
        with pytest.raises(Internal, match="did not fit"):
            await asyncio.wait_for(batcher.submit("k", rows(1, 2, 3), 3), 2.0)
        calls = 0
        result = await asyncio.wait_for(batcher.submit("k", rows(4), 1), 2.0)
        np.testing.assert_array_equal(result.outputs["y"], [[40]])
        await batcher.close(1)

    run(body())


def test_outputs_of_a_retried_half_that_do_not_fit_a_straddling_request_fail_it_rather_than_hang() -> None:
    """As above, where the outputs that do not fit come from a half of a failed batch retried
    (_isolate): the request fails with Internal and the batcher goes on; before, the exception ended
    the batch's task ("Task exception was never retrieved") and the caller waited forever."""

    async def body() -> None:
        calls = 0

        async def shifting_model(key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            nonlocal calls
            calls += 1
            x = np.asarray(inputs["x"])
            if calls == 2:
                raise RuntimeError("out of memory")  # the second batch: retried in halves
            width = 1 if calls == 1 else 2
            return {"y": np.repeat(10 * x[:, None], width, axis=1)}

        batcher, _ = make(shifting_model, max_batch_size=2)  # type: ignore[arg-type]
        with pytest.raises(Internal, match="did not fit"):
            await asyncio.wait_for(batcher.submit("k", rows(1, 2, 3, 4), 4), 2.0)
        calls = 0
        result = await asyncio.wait_for(batcher.submit("k", rows(5), 1), 2.0)
        np.testing.assert_array_equal(result.outputs["y"], [[50]])
        await batcher.close(1)

    run(body())


def test_a_window_whose_rows_all_left_survives_another_keys_arrival() -> None:
    """Every request of the sub-queue a window waits for is cancelled (callers gone, deadlines
    passed), then a request of another key arrives and wakes the dispatcher while that window is
    still open: the dispatcher must go on (it read the emptied sub-queue and died with a KeyError,
    so the model never answered again, though it stayed READY and health SERVING)."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=8, max_queue_delay_s=1.0)
        gone = [asyncio.ensure_future(batcher.submit("a", rows(i), 1)) for i in (1, 2)]
        await until(lambda: batcher.queued_rows == 2, "both requests queued")
        await let_the_dispatcher_run()
        assert not model.batches  # the window for "a" is open
        for task in gone:
            task.cancel()
        await until(lambda: batcher.queued_rows == 0, "the cancelled rows out of the queue")
        other = await asyncio.wait_for(batcher.submit("b", rows(3), 1), 5)
        np.testing.assert_array_equal(other.outputs["y"], [30])
        await batcher.close(1)

    run(body())


def test_a_bug_in_batch_forming_fails_the_queued_requests_and_the_dispatcher_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception out of _form_batch ended the dispatcher task: the model stayed READY and every
    later request waited until its deadline (or forever without one), and nothing was logged."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model)
        real = batcher._form_batch
        calls = {"n": 0}

        async def once_broken() -> list[Any]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("a bookkeeping bug")
            return await real()

        monkeypatch.setattr(batcher, "_form_batch", once_broken)
        with pytest.raises(Internal, match="batching failed"):
            await asyncio.wait_for(batcher.submit("k", rows(1), 1), 5)
        assert batcher.queued_rows == 0 and recorder.depth == 0
        result = await asyncio.wait_for(batcher.submit("k", rows(2), 1), 5)
        np.testing.assert_array_equal(result.outputs["y"], [20])
        await batcher.close(1)

    with caplog.at_level(logging.ERROR, logger="genserve_server.batcher"):
        run(body())
    assert any("forming a batch failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_withdrawn_part_taken_out_by_the_dispatcher_first_is_not_counted_as_dropped() -> None:
    """5cb4528: a part withdrawn because another part of its request failed (WITHDRAWN) is not a
    caller that went away. Its future is cancelled at once, but its rows leave in submit()'s handler
    a loop turn later: a dispatcher woken in the same turn (another request's arrival) took it out
    of the queue first in _take and counted it as dropped{cancelled} all the same."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=2, max_queue_delay_s=5.0)
        batcher.callers = 2  # the part's own call, and one more on its way: the window stays open
        part = asyncio.ensure_future(batcher.submit("b", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "the part queued")
        await let_the_dispatcher_run()
        assert not model.batches  # its window is open
        # Another caller's request fills the batch, and in the same loop turn the part is withdrawn
        # (core.gather_or_cancel: a sibling part failed): the dispatcher wakes first.
        other = asyncio.ensure_future(batcher.submit("b", rows(2), 1))
        await asyncio.sleep(0)  # `other` is queued; the dispatcher's wake-up is scheduled
        part.cancel(WITHDRAWN)
        with pytest.raises(asyncio.CancelledError):
            await part
        np.testing.assert_array_equal((await other).outputs["y"], [20])
        assert batcher.queued_rows == 0
        assert recorder.dropped == []
        await batcher.close(1)

    run(body())


def test_a_cancelled_caller_taken_out_by_the_dispatcher_first_is_counted_cancelled_not_deadline() -> None:
    """A caller that goes away (no deadline) while its rows are queued: its future is cancelled at
    once, its rows leave in submit()'s handler a loop turn later, and a dispatcher woken in that
    turn takes it out first (_take). It is genserve_requests_dropped_total{reason="cancelled"} there
    too, as where its handler runs first."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=2, max_queue_delay_s=5.0)
        batcher.callers = 2  # its own call, and one more on its way: the window stays open
        gone = asyncio.ensure_future(batcher.submit("b", rows(1), 1))
        await until(lambda: batcher.queued_rows == 1, "the request queued")
        await let_the_dispatcher_run()
        assert not model.batches  # its window is open
        other = asyncio.ensure_future(batcher.submit("b", rows(2), 1))
        await asyncio.sleep(0)  # `other` is queued; the dispatcher's wake-up is scheduled
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        np.testing.assert_array_equal((await other).outputs["y"], [20])
        assert [list(x) for _, x in model.batches] == [[2]]
        assert recorder.dropped == ["cancelled"]
        await batcher.close(1)

    run(body())


class GatedHeld:
    """A batch_parts.Held whose take_back waits until the test opens `opened` (a response budget
    spent by other calls)."""

    def __init__(self) -> None:
        self.given_back = 0
        self.taking = False
        self.opened = asyncio.Event()

    def give_back(self) -> None:
        self.given_back += 1

    async def take_back(self, deadline: float | None) -> None:
        self.taking = True
        await self.opened.wait()


def test_a_bulk_request_taking_its_bytes_back_while_the_batcher_closes_fails_instead_of_hanging() -> None:
    """First in line with room, a BULK request waits for its response bytes again (take_back, up to
    budget_max_wait_s); a close (shutdown, or a reload's unload after drain_grace_s) meanwhile drains
    the queue and stops the dispatcher. The request then went into the closed batcher's queue, where
    nothing takes it: its call hung until its deadline (for ever without one), holding its bytes."""

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_queue_size=4)
        gate, blocker = await hold_runner(batcher, model)
        queued = asyncio.ensure_future(batcher.submit("b", rows(1, 2), 2, lane=Lane.BULK))
        await until(lambda: batcher.queued_rows == 2, "the first bulk request queued")
        held = GatedHeld()
        waiting = asyncio.ensure_future(batcher.submit("b", rows(3), 1, lane=Lane.BULK, held=held))
        await let_the_dispatcher_run()
        assert not waiting.done() and held.given_back == 1  # the bulk half (2) is full: it waits
        gate.set()
        np.testing.assert_array_equal((await queued).outputs["y"], [10, 20])
        await until(lambda: held.taking, "the waiting request first in line, taking its bytes back")
        await batcher.close(1)  # nothing queued: the dispatcher stops
        held.opened.set()
        with pytest.raises(Unavailable, match="draining"):
            await asyncio.wait_for(waiting, 1.0)
        await blocker

    run(body())


def test_a_failing_model_logs_one_traceback_per_interval_and_a_line_per_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failed batch (and each retried half) logged ONNX Runtime's whole traceback at ERROR:
    a model whose every batch fails wrote ~25 lines per failed call (20 calls: 501 lines), megabytes
    of the same stack under load. The first failure keeps its traceback; later ones within
    FAILURE_TRACEBACK_INTERVAL_S are one ERROR line each."""

    async def body() -> None:
        model = FakeModel()
        model.fail_if_contains = 7.0
        batcher, _ = make(model, max_batch_size=1)
        for _ in range(5):
            with pytest.raises(Internal):
                await batcher.submit("k", rows(7.0), 1)
        await batcher.close(1)

    with caplog.at_level(logging.ERROR, logger="genserve_server.batcher"):
        run(body())
    failures = [r for r in caplog.records if "failed" in r.getMessage() and r.levelno == logging.ERROR]
    assert len(failures) == 5, [r.getMessage() for r in failures]
    assert sum(1 for r in failures if r.exc_info) == 1


def test_reserved_rows_count_as_queued_and_a_request_into_them_is_never_refused() -> None:
    """Batcher.reserved (a code prior's decode, queued only once its grids are sampled): the rows are
    refused at once where the queue is full, count as queued for everyone else while held (bulk
    too), and the request submitted into them later is queued even when the others filled the rest;
    released, they are room again."""

    async def body() -> None:
        model = FakeModel()
        batcher, recorder = make(model, max_queue_size=6)
        gate, blocker = await hold_runner(batcher, model)
        rpc = Rpc(recorder)
        with batcher.reserved(3, rpc) as room:
            refused = Rpc(recorder)
            with pytest.raises(ResourceExhausted, match="queue full"):
                with batcher.reserved(4, refused):
                    pass
            others = asyncio.ensure_future(batcher.submit("k", rows(1, 2, 3), 3))
            await until(lambda: batcher.queued_rows == 3, "the others queued")
            with pytest.raises(ResourceExhausted, match=r"3 more reserved for requests on their way"):
                await batcher.submit("k", rows(4), 1)
            assert not batcher._bulk_fits(1)
            decode = asyncio.ensure_future(
                batcher.submit("k", rows(5, 6, 7), 3, caller=rpc, reservation=room)
            )
            await until(lambda: batcher.queued_rows == 6, "the reserved request queued")
            with pytest.raises(ValueError, match="do not fit the reservation"):
                await batcher.submit("k", rows(8), 1, reservation=room)
            gate.set()
            assert (await decode).outputs["y"].tolist() == [50, 60, 70]
            await asyncio.gather(others, blocker)
        # An RPC's refusal is marked for its boundary to count (the other is a request of its own).
        assert refused.refused == (recorder, "queue_full")
        assert recorder.rejected == ["queue_full"]
        assert batcher._rows_taken() == 0
        with batcher.reserved(6):
            pass
        await batcher.close(1)

    run(body())


def test_a_close_whose_batch_outlasts_it_returns_after_its_timeout_not_twice_that(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutdown gives each batcher what is left of drain_grace_s: a batch still computing at its
    end made close wait the whole timeout for the dispatcher (which waits for its batches), then
    the whole timeout again for the same batches, so the exit outlasted the grace. Once its timeout
    is spent (the drain-timed-out warning), close returns within a few event-loop turns, with no
    further wait on the clock, however late a loaded machine ran the loop."""
    caplog.set_level(logging.WARNING, logger="genserve_server.batcher")

    def timed_out() -> bool:
        return any("drain timed out" in record.getMessage() for record in caplog.records)

    async def body() -> None:
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=1)
        gate, blocker = await hold_runner(batcher, model)
        closing = asyncio.ensure_future(batcher.close(0.2))
        while not timed_out():
            assert not closing.done(), "close returned before its timeout, its batch still computing"
            await asyncio.sleep(0.01)
        await until(closing.done, "close to return once its timeout was spent", turns=100)
        await closing
        assert not blocker.done()  # the batch computes on: only the close gave up waiting
        gate.set()
        await asyncio.wait_for(blocker, 5)

    run(body())

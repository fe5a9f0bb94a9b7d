"""A reload's drain waits on the RPCs that hold a version (Batcher.hold/release), not on a poll."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np

from genserve_server.batcher import Batcher


async def _echo(key: Any, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return inputs


def test_wait_released_wakes_when_the_last_holder_leaves_and_times_out_while_held() -> None:
    async def body() -> tuple[bool, bool, bool, int, int]:
        batcher = Batcher(_echo, name="m", max_batch_size=4, max_queue_delay_s=0.001, max_queue_size=8)
        free_at_once = await batcher.wait_released(0)
        batcher.hold()
        batcher.hold(stream=True)
        held_counts = batcher.callers, batcher.streams
        timed_out = not await batcher.wait_released(0.01)
        waiter = asyncio.ensure_future(batcher.wait_released(5))
        batcher.release()
        await asyncio.sleep(0)
        assert not waiter.done()  # the stream still holds it
        batcher.release(stream=True)
        woke = await asyncio.wait_for(waiter, 1)
        return free_at_once, timed_out, woke, *held_counts

    free_at_once, timed_out, woke, callers, streams = asyncio.run(body())
    assert free_at_once and timed_out and woke
    assert (callers, streams) == (1, 1)


def test_a_dependent_hold_keeps_the_drain_waiting_without_counting_as_a_caller() -> None:
    """A version another model's RPC uses (a code prior's decoder, a style generator's mapping) holds
    the drain like a caller, but is not a caller about to submit rows: the batching signals, which
    read `callers`, do not see it."""

    async def body() -> tuple[int, int, int, bool, bool]:
        batcher = Batcher(_echo, name="m", max_batch_size=4, max_queue_delay_s=0.001, max_queue_size=8)
        batcher.hold(dependent=True)
        counts = batcher.callers, batcher.streams, batcher.dependents
        timed_out = not await batcher.wait_released(0.01)
        waiter = asyncio.ensure_future(batcher.wait_released(5))
        batcher.release(dependent=True)
        return *counts, timed_out, await asyncio.wait_for(waiter, 1)

    callers, streams, dependents, timed_out, woke = asyncio.run(body())
    assert (callers, streams, dependents) == (0, 0, 1)
    assert timed_out and woke


def test_a_drain_wait_cancelled_as_the_last_holder_leaves_raises_the_cancel() -> None:
    """The drain awaiting wait_released is cancelled (its version revived, the shutdown's close
    ending the drains) in the turn the last holder leaves: the cancel is raised, whichever turn of
    the loop it comes in (Python 3.11's asyncio.wait_for returned True and dropped a cancel that
    crossed the event being set)."""

    async def scenario(turns: int) -> bool:
        batcher = Batcher(_echo, name="m", max_batch_size=4, max_queue_delay_s=0.001, max_queue_size=8)
        batcher.hold()
        waiter = asyncio.ensure_future(batcher.wait_released(30))
        await asyncio.sleep(0)
        assert not waiter.done()
        batcher.release()  # the last holder leaves: the wait is released
        for _ in range(turns):
            await asyncio.sleep(0)
        if waiter.done():  # it saw the release before the cancel came: nothing to drop
            return True
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        return waiter.cancelled()

    for turns in range(6):
        cancelled = asyncio.run(scenario(turns))
        assert cancelled, f"cancelled {turns} turn(s) after the release: the cancel was dropped"

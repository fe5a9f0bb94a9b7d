"""The split / concatenate / fan-out functions between requests and model calls, with uneven
per-request sizes and requests that straddle batches."""

from __future__ import annotations

import asyncio

import numpy as np

from genserve_server.batch_parts import Lane, Part, PendingRequest, concat, fan_out, split


def _requests(loop: asyncio.AbstractEventLoop, sizes: list[int]) -> list[PendingRequest]:
    requests = []
    first = 0
    for n in sizes:
        rows = np.arange(first, first + n, dtype=np.float32)
        requests.append(
            PendingRequest("k", {"x": rows[:, None]}, n, Lane.INTERACTIVE, None, 0.0, loop.create_future())
        )
        first += 100  # row values say which request they came from
    return requests


def test_uneven_requests_straddling_three_batches_get_their_rows_back_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        requests = _requests(loop, [3, 1, 5, 2])  # 11 rows
        whole = [Part(r, 0, r.n_rows) for r in requests]
        first, rest = split(whole, 4)  # request 0 whole, request 1 whole
        second, third = split(rest, 4)  # request 2 straddles second and third
        assert [(p.request.n_rows, p.start, p.rows) for p in first] == [(3, 0, 3), (1, 0, 1)]
        assert [(p.request.n_rows, p.start, p.rows) for p in second] == [(5, 0, 4)]
        assert [(p.request.n_rows, p.start, p.rows) for p in third] == [(5, 4, 1), (2, 0, 2)]
        # Computed out of order: the straddling request still assembles its rows in order.
        for batch in (third, first, second):
            inputs = concat(batch)
            fan_out(batch, {"y": inputs["x"] * 2})
        for request in requests:
            result = request.future.result()
            np.testing.assert_array_equal(result.outputs["y"], request.inputs["x"] * 2)
        assert requests[2].future.result().executed_batch_sizes == [3, 4]  # third ran first
        assert requests[0].future.result().executed_batch_sizes == [4]
    finally:
        loop.close()


def test_a_whole_request_alone_is_passed_through_without_a_copy_and_cancelled_callers_are_skipped() -> None:
    loop = asyncio.new_event_loop()
    try:
        alone, gone = _requests(loop, [4, 2])
        assert concat([Part(alone, 0, 4)])["x"] is alone.inputs["x"]
        gone.future.cancel()
        parts = [Part(alone, 0, 4), Part(gone, 0, 2)]
        fan_out(parts, {"y": concat(parts)["x"]})
        assert alone.future.result().outputs["y"].shape == (4, 1)
        assert gone.rows_done == 0  # nothing delivered to a caller that left
    finally:
        loop.close()

"""Priority under load: while interactive requests arrive, BULK batches are cut to the compute budget.

On a CPU a running batch cannot be preempted, so the size of a bulk batch is what an interactive
request may have to wait for. The fake runner costs 10 ms a row (asyncio.sleep: no CPU, no flakiness
from a busy machine); the assertions are on batch sizes, not on timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping

import numpy as np

from genserve_server.batcher import Batcher, Lane

ROW_S = 0.01


class SlowRows:
    """run_batch: identity on `x`, costing ROW_S per row; records (lane tag, rows) of each batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []

    async def __call__(self, key: Hashable, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        rows = len(inputs["x"])
        self.batches.append((str(key), rows))
        await asyncio.sleep(ROW_S * rows)
        return {"y": np.asarray(inputs["x"]) * 2}


def _rows(n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n, dtype=np.float32)[:, None]}


Batches = list[tuple[str, int]]


async def _scenario(idle_budget_s: float | None = None) -> tuple[Batches, Batches, Batches]:
    runner = SlowRows()
    quiet_s = 0.3
    batcher = Batcher(
        runner,
        name="budget",
        max_batch_size=64,
        max_queue_delay_s=0.0,
        max_queue_size=1024,
        bulk_budget_s=0.05,  # about 5 rows of 10 ms
        bulk_idle_budget_s=idle_budget_s,
        interactive_quiet_s=quiet_s,
    )
    batcher.start()
    try:
        # 1. No interactive traffic: the bulk job runs in full batches.
        result = await batcher.submit("bulk", _rows(64), 64, lane=Lane.BULK)
        np.testing.assert_array_equal(result.outputs["y"], _rows(64)["x"] * 2)
        alone = list(runner.batches)
        runner.batches.clear()

        # 2. Interactive requests keep arriving while a bulk job runs: bulk batches shrink, and
        #    every interactive request is answered, in order, with the right rows.
        bulk = asyncio.ensure_future(batcher.submit("bulk", _rows(64, 100), 64, lane=Lane.BULK))
        for i in range(6):
            answer = await batcher.submit("interactive", _rows(1, i), 1, lane=Lane.INTERACTIVE)
            np.testing.assert_array_equal(answer.outputs["y"], _rows(1, i)["x"] * 2)
        result = await bulk
        np.testing.assert_array_equal(result.outputs["y"], _rows(64, 100)["x"] * 2)
        contended = list(runner.batches)
        runner.batches.clear()

        # 3. Quiet again for longer than interactive_quiet_s: back to full batches (or to the idle
        #    budget, which bounds what the next interactive request to arrive may wait for).
        await asyncio.sleep(quiet_s * 4 / 3)
        await batcher.submit("bulk", _rows(64), 64, lane=Lane.BULK)
        quiet = list(runner.batches)
    finally:
        await batcher.close(timeout_s=5)
    return alone, contended, quiet


def test_bulk_batches_shrink_only_while_interactive_traffic_arrives() -> None:
    alone, contended, quiet = asyncio.run(_scenario())
    assert alone == [("bulk", 64)]
    assert sum(rows for key, rows in contended if key == "bulk") == 64
    # While interactive requests arrive, every bulk batch but the first (it may start before the
    # first interactive request is seen) fits the 50 ms budget at 10 ms a row. Once they stop for
    # longer than interactive_quiet_s, the rest of the job may go in bigger batches again.
    last_interactive = max(i for i, (key, _) in enumerate(contended) if key == "interactive")
    during = [rows for key, rows in contended[:last_interactive] if key == "bulk"]
    assert len(during) >= 5, contended
    assert all(1 <= rows <= 5 for rows in during[1:]), contended
    assert [rows for key, rows in contended if key == "interactive"] == [1] * 6
    assert quiet == [("bulk", 64)]


def test_idle_budget_bounds_bulk_batches_once_their_cost_is_known() -> None:
    alone, _, quiet = asyncio.run(_scenario(idle_budget_s=0.2))  # about 20 rows of 10 ms
    assert alone == [("bulk", 64)]  # the first batch: no cost measured yet
    sizes = [rows for _, rows in quiet]
    assert sum(sizes) == 64 and max(sizes) <= 20 and len(sizes) >= 4, sizes

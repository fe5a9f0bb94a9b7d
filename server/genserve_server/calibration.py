"""The warm-up of one version (loader.py): batch sizes warmed and timed from the smallest up, within
a time budget and a memory budget.

Time: the server config's `calibration_budget_s` (per version). Before each size the step's seconds
are predicted from the last measured cost per row; a size whose step would end past the budget is
not timed, and the batch cap is chosen among the sizes measured (loader.efficient_batch_size). The
smallest size is always timed: inline execution and the bulk budgets need its cost.

Memory: a warm-up batch must fit `warmup_memory_bytes`, by default the memory available when the
version warms up (MemAvailable, or a cgroup's limit less its usage, whichever is less) divided by
2 x instances, so that every instance running such a batch at once takes at most half of it. What
a row takes is measured while warming (the process's RSS growth per row, at least the row's own
inputs and outputs); a size that would not fit is replaced by the largest that does, and that
becomes the version's batch cap, so serving never builds the batch that warm-up avoided.
(Image kinds are also bounded by `max_batch_pixels` before any of this: loader.warmup_limit.)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genserve_server.load_gate import Steps
from genserve_server.runner import Runner

Inputs = Mapping[str, np.ndarray]
MemoryMeter = Callable[[], int | None]

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What one version's warm-up did."""

    # The sizes warmed, in order, and the compute seconds measured for each.
    warmed: list[int] = field(default_factory=list)
    costs_s: dict[int, float] = field(default_factory=dict)
    # Seconds spent warming (waits for the gate not counted).
    spent_s: float = 0.0
    # "" (every size warmed), "time budget" or "memory budget": why larger sizes were left out.
    stopped: str = ""
    # Rows a batch of the warm-up's shape may hold within the memory budget; None = not limited.
    memory_rows: int | None = None
    # Bytes one row was measured (or known) to take.
    row_bytes: float = 0.0

    def row_cost_s(self) -> float:
        """Compute seconds per row of the smallest size timed, where the batcher's cost per row starts
        (its bulk budgets and deadline cuts, before it has timed a batch of its own); 0.0 where no
        size has a cost > 0 (a clock that did not move, or nothing timed)."""
        for size in sorted(self.costs_s):
            cost_s = self.costs_s[size]
            if size > 0 and math.isfinite(cost_s) and cost_s > 0:
                return cost_s / size
        return 0.0


def rss_bytes() -> int | None:
    """This process's resident memory (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_memory_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, or its cgroup's limit less usage if smaller."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text(encoding="ascii").strip()
            usage = int(Path(usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or v1's huge number: no limit
            found.append(max(0, int(limit) - usage))
        break
    return min(found) if found else None


def warmup_memory_budget(configured_bytes: int, instances: int) -> int:
    """Bytes one warm-up batch may take: the configured figure, else available / (2 x instances)."""
    if configured_bytes > 0:
        return configured_bytes
    available = available_memory_bytes()
    if available is None:
        return 1 << 62  # nothing to go by: not limited
    return max(1, available // (2 * max(1, instances)))


def probe(
    runner: Runner,
    inputs: Inputs,
    scale: float = 1.0,
    check: Callable[[Mapping[str, np.ndarray]], None] | None = None,
) -> tuple[float, float]:
    """Two calls the runner does not record: (seconds of the faster, bytes of inputs + outputs per
    row), both times `scale` (the probe may run on a smaller image than the warm-up's). The first
    call of a session pays its allocations, hence two. Under the shared gate: only good enough to
    order warm-up steps and as a lower bound of a row's memory, never a cost the server decides on.
    `check` sees the first call's outputs (and may raise)."""
    rows = int(next(iter(inputs.values())).shape[0])
    seconds = math.inf
    outputs: dict[str, np.ndarray] = {}
    for call in range(2):
        started = time.perf_counter()
        outputs = runner.run_sync(inputs)
        seconds = min(seconds, time.perf_counter() - started)
        if call == 0 and check is not None:
            check(outputs)
    io_bytes = sum(a.nbytes for a in inputs.values()) + sum(np.asarray(a).nbytes for a in outputs.values())
    return seconds * scale, io_bytes * scale / rows


# Timed runs per size: the fastest of three, so that a busy moment does not stick; a call this long
# or longer is timed twice (the first pays the size's allocations): a moment's noise is a small
# part of it, and a third run of a large SR batch costs seconds of start-up.
TIMED_RUNS = 3
LONG_CALL_S = 0.05


def timed_runs(call_s: float) -> int:
    return TIMED_RUNS if call_s < LONG_CALL_S else 2


def warm_calls(runner: Runner, call_s: float) -> int:
    """Model calls one `Runner.warm` of a call of `call_s` makes (timed, and one on the solo session)."""
    return timed_runs(call_s) + (1 if runner.solo_session is not None else 0)


def run_warmup(
    runner: Runner,
    inputs_for: Callable[[int], Inputs],
    sizes: Sequence[int],
    *,
    time_budget_s: float,
    memory_budget_bytes: int,
    min_row_bytes: float,
    first_call_s: float,
    gate: Steps,
    check_stopping: Callable[[], None],
    memory_meter: MemoryMeter = rss_bytes,
    clock: Callable[[], float] = time.perf_counter,
    then: Callable[[], None] | None = None,
) -> Calibration:
    """Warm and time `sizes` (ascending) within both budgets (see the module), as one exclusive
    step of `gate` queued at the first size's predicted seconds: versions calibrate one at a time,
    cheapest first. (Not a step per size: between two steps of one version, another version's
    waiting step would take the gate, and a large model's calibration would run before a small
    model's remaining sizes.) `then`: more of this version's model calls (a tiled model's tile
    radius, the arena shrink), made in the same step: never beside another version's timings and
    RSS readings, and without waiting for the gate again behind them."""
    result = Calibration(row_bytes=max(1.0, min_row_bytes))
    first = min(sizes, default=1)
    priority_s = first_call_s * first * warm_calls(runner, first_call_s * first)
    with gate.step(priority_s, exclusive=True, check_stopping=check_stopping):
        _warm_sizes(
            runner,
            inputs_for,
            sorted(set(sizes)),
            result,
            time_budget_s,
            memory_budget_bytes,
            first_call_s,
            check_stopping,
            memory_meter,
            clock,
        )
        if then is not None:
            check_stopping()
            then()
    # Sizes left out for time are bounded too: serving must not build a batch the budget forbids.
    fit = max(1, int(memory_budget_bytes // result.row_bytes))
    if sizes and fit < max(sizes):
        result.memory_rows = min(fit, result.memory_rows or fit)
    return result


def _warm_sizes(
    runner: Runner,
    inputs_for: Callable[[int], Inputs],
    pending: list[int],
    result: Calibration,
    time_budget_s: float,
    memory_budget_bytes: int,
    first_call_s: float,
    check_stopping: Callable[[], None],
    memory_meter: MemoryMeter,
    clock: Callable[[], float],
) -> None:
    """run_warmup's loop, holding the gate: fills `result` in."""
    base: int | None = None
    while pending:
        batch = pending.pop(0)
        if result.warmed:
            fit = max(1, int(memory_budget_bytes // result.row_bytes))
            if batch > fit:
                result.stopped, result.memory_rows = "memory budget", fit
                if fit <= result.warmed[-1]:
                    break
                batch, pending = fit, []  # the largest size that fits, and nothing after it
            last = result.warmed[-1]
            call_s = result.costs_s.get(last, 0.0) / last * batch
            predicted_s = call_s * warm_calls(runner, call_s)
            if result.spent_s + predicted_s > time_budget_s:
                result.stopped = "time budget"
                break
        else:
            call_s = first_call_s * batch
            predicted_s = call_s * warm_calls(runner, call_s)
        check_stopping()
        logger.debug("%s: warming batch %d (predicted %.3g s)", runner.label, batch, predicted_s)
        inputs = inputs_for(batch)
        before = memory_meter()
        if base is None:
            base = before
        started = clock()
        runner.warm(inputs, times=timed_runs(call_s), check_stopping=check_stopping)
        result.spent_s += clock() - started
        after = memory_meter()
        cost_s = runner.measured_cost_s(inputs)
        if cost_s is not None and math.isfinite(cost_s):
            result.costs_s[batch] = cost_s
        result.warmed.append(batch)
        if base is not None and after is not None and after > base:
            result.row_bytes = max(result.row_bytes, (after - base) / batch)

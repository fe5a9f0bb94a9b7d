"""Every model call of a version's load passes the load gate (load_gate.py): a version's warm-up
timings and memory readings (calibration.py, an exclusive step) are never taken beside another
version's load work (docs/server.md, "Start-up loading")."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_support import write_tiny_generator

from genserve_server import calibration
from genserve_server.config import ServerConfig
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository
from genserve_server.runner import Runner

WAIT_S = 2.0  # how long each side waits for the other's step (the fixed code: one wait times out)


def test_the_arena_shrink_after_warm_up_never_runs_beside_another_versions_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arena shrink after a warm-up is a model call and hands memory back (RSS falls): run while
    another version times its batch sizes and reads RSS (exclusive step), it skewed that version's
    costs and its per-row memory (its memory budget's batch cap). The first version to shrink waits
    (up to WAIT_S) for the other's timing to start, which it must never see running."""
    root = tmp_path / "models"
    write_tiny_generator(root, "a")
    write_tiny_generator(root, "b")
    timing: set[str] = set()  # the runners timing their batch sizes now
    shrinks = 0
    timing_started, recorded = threading.Event(), threading.Event()
    lock = threading.Lock()
    seen_timing: list[set[str]] = []  # at each shrink, the other versions timing meanwhile

    original_warm_sizes = calibration._warm_sizes

    def warm_sizes(runner: Runner, *args: Any, **kwargs: Any) -> None:
        with lock:
            timing.add(runner.label)
            overlapping = shrinks == 1  # the other version is shrinking: it must not see this
        if overlapping:
            timing_started.set()
            recorded.wait(WAIT_S)  # until the shrink has looked (tiny models time in milliseconds)
        try:
            original_warm_sizes(runner, *args, **kwargs)
        finally:
            with lock:
                timing.discard(runner.label)

    original_shrink = Runner.shrink_arena

    def shrink_arena(self: Runner, inputs: Mapping[str, np.ndarray]) -> None:
        nonlocal shrinks
        with lock:
            shrinks += 1
            first = shrinks == 1
        if first:  # the other version's timing may start meanwhile, if the gate lets it
            timing_started.wait(WAIT_S)
        with lock:
            seen_timing.append(timing - {self.label})
        recorded.set()
        original_shrink(self, inputs)

    monkeypatch.setattr(calibration, "_warm_sizes", warm_sizes)
    monkeypatch.setattr(Runner, "shrink_arena", shrink_arena)

    async def body() -> None:
        repo = Repository(root, ServerConfig(load_concurrency=2), Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        await repo.close(1)

    asyncio.run(body())
    assert len(seen_timing) == 2
    assert seen_timing == [set(), set()], "an arena shrink (a model call) ran while another version timed"


def test_a_versions_load_time_leaves_out_its_wait_behind_other_versions_loads(tmp_path: Path) -> None:
    """genserve_model_load_duration_seconds (and the log's "ready in") is a version's load and
    warm-up. With many models it counted the wait behind every version loading before it (the load
    pool's queue, the gate): the 300th tiny model of a repository said 11 s for a 0.03 s load.
    Here another step holds the gate for HOLD_S while the version waits: that is not its load."""
    hold_s = 3.0
    root = tmp_path / "models"
    write_tiny_generator(root, "a")
    held = threading.Event()

    async def body() -> float:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()

        def hold() -> None:
            with repo.gate.step(-1.0, exclusive=True):
                held.set()
                threading.Event().wait(hold_s)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        await repo.load_all()
        holder.join()
        mv = repo.models["a"].versions["1"]
        assert mv.state.name == "READY", mv.reason
        await repo.close(1)
        return mv.load_s

    load_s = asyncio.run(body())
    assert 0 < load_s < hold_s

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
    costs and its per-row memory (its memory budget's batch cap)."""
    root = tmp_path / "models"
    write_tiny_generator(root, "a")
    write_tiny_generator(root, "b")
    repo_box: list[Repository] = []
    second_timing = threading.Event()
    shrunk = threading.Event()
    timings = 0
    lock = threading.Lock()
    beside_exclusive: list[bool] = []

    original_warm_sizes = calibration._warm_sizes

    def warm_sizes(*args: Any, **kwargs: Any) -> None:
        nonlocal timings
        with lock:
            timings += 1
            second = timings == 2
        if second:  # the other version has finished timing: give its shrink the chance to overlap
            second_timing.set()
            shrunk.wait(WAIT_S)
        original_warm_sizes(*args, **kwargs)

    original_shrink = Runner.shrink_arena

    def shrink_arena(self: Runner, inputs: Mapping[str, np.ndarray]) -> None:
        if not beside_exclusive:  # the first version to shrink: is the other one timing meanwhile?
            second_timing.wait(WAIT_S)
            beside_exclusive.append(repo_box[0].gate.held_exclusively)
            shrunk.set()
        original_shrink(self, inputs)

    monkeypatch.setattr(calibration, "_warm_sizes", warm_sizes)
    monkeypatch.setattr(Runner, "shrink_arena", shrink_arena)

    async def body() -> None:
        repo = Repository(root, ServerConfig(load_concurrency=2), Metrics(enabled=False))
        repo_box.append(repo)
        repo.scan()
        await repo.load_all()
        await repo.close(1)

    asyncio.run(body())
    assert timings == 2
    assert beside_exclusive == [False], "an arena shrink (a model call) ran while another version timed"

"""Start-up loading: the load gate (load_gate.py), and the warm-up's time and memory budgets
(calibration.py, loader.warm_up). Structural assertions only: which sizes were warmed, which caps the
batcher got, in which order steps ran; never a duration or a memory figure of this machine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from server_support import (
    TINY_LATENT,
    slow_generator_graph,
    super_resolution_graph,
    write_model,
    write_tiny_generator,
)

from genserve_server import calibration
from genserve_server.batch_keys import TileRows
from genserve_server.config import ConfigError, ServerConfig, cpu_count, load_server_config
from genserve_server.load_gate import LoadGate
from genserve_server.metrics import Metrics
from genserve_server.repository import ModelState, ModelVersion, Repository
from genserve_server.runner import Runner

TILE = 96  # the tiny SR model's tile: warm-up batches are rows of 3 x 96 x 96
SR_SIZES = [1, 2, 4, 8, 16]


def write_tiny_sr(root: Path, *, batching: Mapping[str, Any] | None = None) -> None:
    """A tiny fully convolutional x2 SR model timing every power of two up to 16 at warm-up."""
    write_model(
        root,
        "sr",
        "super_resolution",
        super_resolution_graph(2),
        {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "size_multiple": 1,
            "tile_size": TILE,
            "tile_overlap": 8,
            "min_size": 4,
        },
        config={"batching": {"max_batch_size": 16, "efficient_batch_tolerance": 0.05, **(batching or {})}},
    )


def load(root: Path, config: ServerConfig, check: Callable[[Repository], None]) -> None:
    async def body() -> None:
        repo = Repository(root, config, Metrics(enabled=False))
        repo.scan()
        await repo.load_all()
        try:
            check(repo)
        finally:
            await repo.close(1)

    asyncio.run(body())


def ready_version(repo: Repository, name: str) -> ModelVersion:
    mv = repo.get(name).resolve("")
    assert mv.state == ModelState.READY and mv.batcher is not None and mv.calibration is not None
    return mv


# ------------------------------------------------------------------------------------ memory budget


def test_warm_up_batches_are_capped_by_the_memory_budget_never_the_whole_largest_batch(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    write_tiny_sr(root, batching={"efficient_batch_tolerance": None})  # sizes 1 and 16
    # A row holds at least its input (3 x 96 x 96) and output (3 x 192 x 192) floats: a budget of
    # four such rows cannot hold the largest warm-up batch (16 rows), whatever RSS adds on top.
    io_row_bytes = 4 * 3 * (TILE * TILE + 4 * TILE * TILE)
    budget = 4 * io_row_bytes
    seen: dict[str, Any] = {}

    def check(repo: Repository) -> None:
        mv = ready_version(repo, "sr")
        assert mv.batcher is not None and mv.calibration is not None
        seen["calibration"] = mv.calibration
        seen["tile rows"] = mv.batcher.batch_rows(TileRows((3, TILE, TILE)))
        seen["small rows"] = mv.batcher.batch_rows(TileRows((3, TILE // 2, TILE // 2)))

    load(root, ServerConfig(warmup_memory_bytes=budget, calibration_budget_s=600.0), check)
    result: calibration.Calibration = seen["calibration"]
    assert result.stopped == "memory budget"
    assert result.row_bytes >= io_row_bytes
    assert result.memory_rows == max(1, int(budget // result.row_bytes)) <= 4
    assert result.warmed[0] == 1 and max(result.warmed) <= 4  # the most that fits, never 16 rows
    # Serving keeps to it: a batch of warm-up tiles takes at most the rows that fit; rows of a quarter
    # of the pixels may take up to four times as many (memory goes with pixels).
    assert seen["tile rows"] == result.memory_rows
    assert seen["small rows"] == min(16, 4 * result.memory_rows)


def test_warm_up_rows_of_image_kinds_stay_within_max_batch_pixels(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_tiny_sr(root, batching={"max_batch_pixels": 2 * TILE * TILE})

    def check(repo: Repository) -> None:
        mv = ready_version(repo, "sr")
        assert mv.calibration is not None
        # Serving never batches more than two tiles: warming 4, 8 or 16 would only spend memory.
        assert mv.calibration.warmed == [1, 2]
        assert mv.calibration.stopped == ""

    load(root, ServerConfig(calibration_budget_s=600.0), check)


class FakeRunner:
    """A runner whose calls cost 1 ms a row (by a fake clock; a warm-up makes 3) and whose rows
    take 10 MB (by a fake RSS meter)."""

    solo_session = None
    label = "fake"

    def __init__(self) -> None:
        self.rss = 100 << 20
        self.now = 0.0
        self.warmed: list[int] = []

    def warm(
        self,
        inputs: Mapping[str, np.ndarray],
        times: int = 3,
        check_stopping: Callable[[], None] | None = None,
    ) -> None:
        rows = int(inputs["x"].shape[0])
        self.warmed.append(rows)
        self.now += 3 * 1e-3 * rows
        self.rss = max(self.rss, (100 << 20) + rows * 10_000_000)

    def measured_cost_s(self, inputs: Mapping[str, np.ndarray]) -> float:
        return 1e-3 * int(inputs["x"].shape[0])


def fake_warmup(
    runner: FakeRunner, *, time_budget_s: float, memory_budget_bytes: int
) -> calibration.Calibration:
    return calibration.run_warmup(
        cast(Runner, runner),
        lambda rows: {"x": np.zeros((rows, 1), np.float32)},
        SR_SIZES,
        time_budget_s=time_budget_s,
        memory_budget_bytes=memory_budget_bytes,
        min_row_bytes=1.0,
        first_call_s=1e-3,
        gate=LoadGate(1),
        check_stopping=lambda: None,
        memory_meter=lambda: runner.rss,
        clock=lambda: runner.now,
    )


def test_a_size_past_the_memory_budget_is_replaced_by_the_largest_that_fits() -> None:
    runner = FakeRunner()
    result = fake_warmup(runner, time_budget_s=600.0, memory_budget_bytes=35_000_000)
    # 10 MB a row, measured at batch 1: 1, 2 fit; 4 does not, so 3 (the most that fits) and no more.
    assert runner.warmed == [1, 2, 3]
    assert result.warmed == [1, 2, 3] and result.memory_rows == 3 and result.stopped == "memory budget"


def test_sizes_whose_step_would_pass_the_time_budget_are_not_timed() -> None:
    # 1 ms a row, 3 calls a step: 1 -> 3 ms, 2 -> 6 ms (9 ms spent), 4 would end at 21 ms > 15 ms.
    runner = FakeRunner()
    result = fake_warmup(runner, time_budget_s=0.015, memory_budget_bytes=1 << 40)
    assert runner.warmed == [1, 2] and result.stopped == "time budget"
    assert set(result.costs_s) == {1, 2} and result.memory_rows is None


def test_a_sizes_step_is_predicted_from_the_last_sizes_cost_per_row_times_its_rows() -> None:
    # 1 ms a row, 3 calls a step: 1 -> 3 ms, 2 -> 6 ms (9 ms spent); 4 rows at the last size's 1 ms a
    # row predict 12 ms, ending at 21 ms > 18 ms (the last size's 2-ms call, unscaled, would not).
    runner = FakeRunner()
    result = fake_warmup(runner, time_budget_s=0.018, memory_budget_bytes=1 << 40)
    assert runner.warmed == [1, 2] and result.stopped == "time budget"


def test_a_zero_calibration_budget_times_only_the_smallest_batch(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_tiny_sr(root)

    def check(repo: Repository) -> None:
        mv = ready_version(repo, "sr")
        assert mv.calibration is not None
        assert mv.calibration.warmed == [1] and mv.calibration.stopped == "time budget"
        assert mv.efficient_batch_size == 1  # the cap is chosen among the sizes measured

    load(root, ServerConfig(calibration_budget_s=0.0), check)


def test_the_default_memory_budget_comes_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    available = calibration.available_memory_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo here")
    assert available > 0
    # The budget from that one reading: MemAvailable is the whole machine's, and another process (the
    # other pytest worker's servers) frees or takes memory between two readings.
    read: list[int] = []
    monkeypatch.setattr(calibration, "available_memory_bytes", lambda: read.append(available) or available)
    assert calibration.warmup_memory_budget(0, instances=2) == available // 4 and read
    assert calibration.warmup_memory_budget(12345, instances=2) == 12345


# ------------------------------------------------------------------------------------------ the gate


def test_exclusive_steps_run_alone_and_waiting_steps_go_cheapest_first() -> None:
    gate = LoadGate(2)
    order: list[str] = []
    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    lock = threading.Lock()

    def step(name: str, priority: float, exclusive: bool) -> None:
        with gate.step(priority, exclusive=exclusive):
            with lock:
                order.append(name)
                running.append(name)
                overlaps.append(tuple(running))
            time.sleep(0.02)
            with lock:
                running.remove(name)

    # Hold the gate exclusively while the others queue up, then let them go.
    release = threading.Event()

    def holder() -> None:
        with gate.step(0.0, exclusive=True):
            release.wait(10)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    while not gate.held_exclusively:  # the holder has it
        time.sleep(0.001)
    queued = [
        ("slow-time", 5.0, True),
        ("tiny-time", 0.001, True),
        ("prep-a", 0.0, False),
        ("prep-b", 0.0, False),
    ]
    for name, priority, exclusive in queued:
        thread = threading.Thread(target=step, args=(name, priority, exclusive))
        thread.start()
        threads.append(thread)
    while gate.waiting < len(queued):
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(10)
    # The two load steps (priority 0) first, side by side; then the timing steps, cheapest first, alone.
    assert set(order[:2]) == {"prep-a", "prep-b"} and order[2:] == ["tiny-time", "slow-time"]
    for names in overlaps:
        assert len(names) == 1 or not any(n.endswith("-time") for n in names), overlaps


def test_a_waiting_step_is_cancelled_by_check_stopping() -> None:
    gate = LoadGate(1)

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with gate.step(0.0, exclusive=True):
        with pytest.raises(Stop):
            with gate.step(1.0, exclusive=True, check_stopping=stop):
                pass  # never reached
    assert gate.waiting == 0
    with gate.step(0.0, exclusive=True):  # the gate is free again
        pass


def test_a_gate_runs_exactly_width_shared_steps_at_once_and_the_next_waits() -> None:
    """load_concurrency bounds the load steps that run side by side: with width 2, two shared steps
    hold the gate together, and a third waits until one of them ends."""
    gate = LoadGate(2)
    release = threading.Event()
    entered: list[str] = []
    lock = threading.Lock()

    def step(name: str) -> None:
        with gate.step(0.0):
            with lock:
                entered.append(name)
            release.wait(10)

    threads = [threading.Thread(target=step, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    while len(entered) < 2:
        time.sleep(0.001)
    third = threading.Thread(target=step, args=("c",))
    third.start()
    while gate.waiting < 1 and len(entered) < 3:  # queued behind the two (or let in)
        time.sleep(0.001)
    time.sleep(0.05)  # it would have started by now if the gate let it
    with lock:
        assert entered == ["a", "b"], entered
    assert gate.waiting == 1
    release.set()
    for thread in [*threads, third]:
        thread.join(10)
    assert sorted(entered) == ["a", "b", "c"] and gate.waiting == 0


def test_a_tiny_model_is_ready_before_a_slow_model_that_comes_first_in_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(
        root,
        "a-slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 400),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 16, "efficient_batch_tolerance": 0.1}},
    )
    write_tiny_generator(root, "b-tiny")
    order: list[str] = []

    async def body() -> None:
        repo = Repository(root, ServerConfig(calibration_budget_s=600.0), Metrics(enabled=False))
        repo.scan()
        repo.add_listener(lambda name, serving: order.append(name) if serving else None)
        await repo.load_all()
        await repo.close(1)

    asyncio.run(body())
    assert order == ["b-tiny", "a-slow"]


def test_a_models_first_ready_version_turns_it_serving_before_its_other_versions_have_loaded(
    tmp_path: Path,
) -> None:
    """load_all: a READY version serves at once, and its model's health key turns SERVING with it,
    not once every version of the model has been tried (version 2's load is held here)."""
    root = tmp_path / "models"
    version_1 = write_tiny_generator(root, "gen", config={"version_policy": {"latest": 2}})
    shutil.copytree(version_1, root / "gen" / "2")
    events: list[tuple[str, bool]] = []
    said_before: list[bool] = []  # whether version 1's readiness was said before version 2 loaded

    async def body() -> None:
        repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
        repo.scan()
        assert list(repo.models["gen"].versions) == ["1", "2"]
        load = repo.load_version
        release = asyncio.Event()

        async def held_load(mv: ModelVersion) -> bool:
            if mv.version == "2":  # waits for the model's readiness to be said (a bounded wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(release.wait(), 10)
                said_before.append(release.is_set())
            return await load(mv)

        def listener(name: str, serving: bool) -> None:
            events.append((name, serving))
            release.set()  # version 2 loads once the model's readiness was said

        repo.load_version = held_load  # type: ignore[method-assign]
        repo.add_listener(listener)
        await repo.load_all()
        await repo.close(1)

    asyncio.run(body())
    assert said_before == [True] and events[0] == ("gen", True), (said_before, events)


def test_the_start_up_settings_read_from_the_server_config_and_errors_name_them(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text('{"calibration_budget_s": 2.5, "warmup_memory_bytes": 1000000, "load_concurrency": 3}')
    config = load_server_config(path)
    assert (config.calibration_budget_s, config.warmup_memory_bytes, config.load_concurrency) == (
        2.5,
        10**6,
        3,
    )
    for field, value in (
        ("calibration_budget_s", -1),
        ("warmup_memory_bytes", -1),
        ("load_concurrency", 1.5),
    ):
        path.write_text(f'{{"{field}": {value}}}')
        with pytest.raises(ConfigError, match=rf"server.json: {field} must be"):
            load_server_config(path)


def test_load_concurrency_is_the_width_of_the_repositorys_load_gate(tmp_path: Path) -> None:
    """server.json's load_concurrency is how many versions' load steps run at once; 0 means one per core."""
    metrics = Metrics(enabled=False)
    assert Repository(tmp_path, ServerConfig(load_concurrency=5), metrics).gate.width == 5
    assert Repository(tmp_path, ServerConfig(load_concurrency=0), metrics).gate.width == cpu_count()


def test_each_finished_start_up_load_counts_the_ready_versions_without_visiting_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator with hundreds of models: each finished start-up load counted the READY versions
    for its 'loaded i/n model versions (r ready)' line by looking at every version again (quadratic
    in the number of versions, on the event loop). The line still says how many are READY."""
    root = tmp_path / "models"
    models = 40
    for i in range(models):
        write_tiny_generator(root, f"m{i:03d}")
    reads = 0

    class CountingVersion(ModelVersion):
        def __getattribute__(self, name: str) -> Any:
            nonlocal reads
            if name == "state":
                reads += 1
            return super().__getattribute__(name)

    async def fake_load(mv: ModelVersion) -> None:  # the loading itself is not what is counted
        mv.state = ModelState.UNAVAILABLE if mv.name == "m003" else ModelState.READY

    lines: list[str] = []

    async def body() -> None:
        repo = Repository(root, ServerConfig(), Metrics(enabled=False))
        repo.scan()
        for model in repo:
            for mv in model.versions.values():
                mv.__class__ = CountingVersion
        monkeypatch.setattr(repo, "load_version", fake_load)
        await repo.load_all()

    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("genserve_server.repository")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(body())
    finally:
        logger.removeHandler(handler)
    assert reads <= 4 * models, f"{reads} reads of a version's state to load {models} versions"
    done = [line for line in lines if line.startswith("loaded ")]
    assert done[-1].startswith(f"loaded {models}/{models} model versions ({models - 1} ready)")

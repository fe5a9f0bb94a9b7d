"""The event loop stays awake for `idle_spin_s` after a call, except while it awaits other threads."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_boundary_unit import FakeContext
from test_runner import make_runner

from genserve_server.batch_keys import SEED_INPUT, SeedRows
from genserve_server.boundary import Boundary
from genserve_server.config import ConfigError, ServerConfig, load_server_config
from genserve_server.core import Call
from genserve_server.encoding import Codec
from genserve_server.idle_spin import (
    DEFAULT_WINDOW_S,
    OVERLAP_MEMORY_S,
    IdleSpin,
    off_loop_jobs,
    off_loop_work,
)
from genserve_server.metrics import Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def turns(n: int = 5) -> None:
    """Let the loop go round n times (each spun turn checks the clock, the calls and off-loop work)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_sleeping_loop_keeps_turning_after_a_poke_and_stops_by_itself() -> None:
    spin = IdleSpin(0.005)  # real time: the loop really goes round while its coroutine sleeps

    async def body() -> tuple[int, bool]:
        spin.poke()
        await asyncio.sleep(0.002)
        during = spin.turns
        await asyncio.sleep(0.03)
        return during, spin.spinning

    during, spinning_after = asyncio.run(body())
    assert during > 1  # without the spin nothing turns the loop while it sleeps
    assert not spinning_after


def test_the_window_runs_from_the_last_poke_and_a_zero_window_never_spins() -> None:
    clock = FakeClock()
    spin = IdleSpin(0.006, clock=clock)

    async def body() -> list[bool]:
        seen = []
        spin.poke()  # window until +6 ms
        clock.now += 0.005
        await turns()
        seen.append(spin.spinning)
        spin.poke()  # until +11 ms
        clock.now += 0.005
        await turns()
        seen.append(spin.spinning)  # 10 ms after the first poke, 5 after the second
        clock.now += 0.002
        await turns()
        seen.append(spin.spinning)
        return seen

    assert asyncio.run(body()) == [True, True, False]
    off = IdleSpin(0.0, clock=clock)

    async def poke_off() -> tuple[bool, int]:
        off.poke()
        await turns()
        return off.spinning, off.turns

    assert asyncio.run(poke_off()) == (False, 0)


def test_the_spin_stops_while_the_loop_awaits_work_on_another_thread() -> None:
    spin = IdleSpin(0.01, clock=FakeClock())

    async def body() -> tuple[bool, bool]:
        spin.poke()
        await turns()
        before = spin.spinning
        with off_loop_work():
            await turns()
            return before, spin.spinning

    assert asyncio.run(body()) == (True, False)
    assert off_loop_jobs() == 0


def test_the_spin_is_for_a_lone_caller_and_waits_out_overlapping_calls() -> None:
    clock = FakeClock()
    spin = IdleSpin(0.01, clock=clock)

    async def body() -> list[bool]:
        seen = []
        spin.begin()
        spin.end()  # a call ended: the window opens
        spin.begin()  # the next one starts (a closed-loop client at concurrency 1)
        await turns()
        seen.append(spin.spinning)
        spin.begin()  # a second caller
        await turns()
        seen.append(spin.spinning)
        spin.end()
        spin.end()  # both done: still within OVERLAP_MEMORY_S of the overlap
        await turns()
        seen.append(spin.spinning)
        clock.now += OVERLAP_MEMORY_S + 0.001
        spin.begin()
        spin.end()  # a lone caller again
        await turns()
        seen.append(spin.spinning)
        return seen

    assert asyncio.run(body()) == [True, False, False, True]
    assert spin.calls == 0


def test_a_poke_outside_an_event_loop_does_nothing() -> None:
    spin = IdleSpin()
    spin.poke()
    assert not spin.spinning and spin.turns == 0


def test_every_call_end_pokes_the_spin() -> None:
    spin = IdleSpin(0.01, clock=FakeClock())
    boundary = Boundary(Metrics(), idle_spin=spin)
    seen_in_handler: list[bool] = []

    async def handler(request: object, call: Call) -> str:
        seen_in_handler.append(spin.spinning)
        return "response"

    async def body() -> bool:
        await boundary.unary("Sample", object(), FakeContext(), handler)  # type: ignore[arg-type]
        return spin.spinning

    assert asyncio.run(body())
    assert seen_in_handler == [False]  # the window opens when the call ends


def test_work_handed_to_other_threads_counts_as_off_the_loop(tmp_path: Path) -> None:
    seen: list[int] = []
    codec_pool = Codec(ThreadPoolExecutor(1), threads=1, max_send_bytes=1 << 20)
    runner = make_runner(tmp_path, inline_max_s=0.0)  # every batch on the pool
    original = runner.run_sync

    def spy(inputs, **kwargs):  # type: ignore[no-untyped-def]
        assert threading.current_thread() is not threading.main_thread()
        seen.append(off_loop_jobs())
        return original(inputs, **kwargs)

    runner.run_sync = spy  # type: ignore[method-assign]

    async def body() -> None:
        await codec_pool.off_loop(lambda: seen.append(off_loop_jobs()))
        rows = {SEED_INPUT: np.array([1, 2], np.int64), "label": np.array([0, 1], np.int64)}
        await runner.run(SeedRows(), rows)

    try:
        asyncio.run(body())
    finally:
        codec_pool.pool.shutdown()
        runner.close()
    assert seen == [1, 1]
    assert off_loop_jobs() == 0


def test_idle_spin_s_is_read_from_the_server_config_and_bounded(tmp_path: Path) -> None:
    assert ServerConfig().idle_spin_s == pytest.approx(DEFAULT_WINDOW_S)
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"idle_spin_s": 0}))
    assert load_server_config(path).idle_spin_s == 0.0
    path.write_text(json.dumps({"idle_spin_s": 0.5}))
    with pytest.raises(ConfigError, match="idle_spin_s.*<= 0.01"):
        load_server_config(path)

"""The event loop stays awake for `idle_spin_s` after a call, except while it awaits other threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_boundary_unit import Aborted, FakeContext
from test_runner import make_runner

from genserve_server import encoding
from genserve_server.arrivals import OVERLAP_MEMORY_S
from genserve_server.batch_keys import SEED_INPUT, SeedRows
from genserve_server.boundary import Boundary
from genserve_server.codecs import ImageFormat
from genserve_server.config import ConfigError, ServerConfig, load_server_config
from genserve_server.core import Call
from genserve_server.encoding import Codec
from genserve_server.idle_spin import DEFAULT_WINDOW_S, IdleSpin, off_loop_jobs, off_loop_work
from genserve_server.metrics import Metrics, ModelMetrics
from genserve_server.validate import OutputSpec


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
    assert off_loop_jobs() == 0
    # The loop really goes round while its coroutine sleeps (real sleeps), but the window is read off
    # a clock the test moves: on the real one, a stall of 10 ms (a loaded machine) before the first
    # spun turn ended the window before it turned at all.
    clock = FakeClock()
    spin = IdleSpin(0.01, clock=clock)

    async def body() -> tuple[int, bool, bool]:
        spin.poke()
        await asyncio.sleep(0.003)
        during, spinning = spin.turns, spin.spinning
        clock.now += 0.0101  # the window has passed
        await asyncio.sleep(0.003)
        return during, spinning, spin.spinning

    during, spinning_during, spinning_after = asyncio.run(body())
    assert during >= 1 and spinning_during  # without the spin nothing turns the loop while it sleeps
    assert not spinning_after

    # On the real clock it stops by itself too (a stall only ends the window sooner).
    real = IdleSpin(0.01)

    async def real_body() -> bool:
        real.poke()
        await asyncio.sleep(0.05)
        return real.spinning

    assert not asyncio.run(real_body())


def test_a_spin_left_on_a_stopped_loop_starts_again_on_the_next_one() -> None:
    spin = IdleSpin(0.01, clock=FakeClock())

    async def poke_and_leave() -> None:
        spin.poke()  # the loop ends with this spin's turn still queued

    async def poke_and_turn() -> int:
        before = spin.turns
        spin.poke()
        await turns()
        return spin.turns - before

    asyncio.run(poke_and_leave())
    assert asyncio.run(poke_and_turn()) >= 3  # turns on the new loop, not a dead one's


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


def test_calls_that_overlapped_until_one_ended_keep_the_spin_off() -> None:
    clock = FakeClock()
    spin = IdleSpin(0.01, clock=clock)

    async def body() -> list[bool]:
        seen = []
        spin.begin()
        spin.begin()  # two long calls overlap from the start...
        clock.now += 1.0
        spin.end()  # ...until now: one is still in its handler
        await turns()
        seen.append(spin.spinning)
        clock.now += 0.05
        spin.end()  # the other ends within OVERLAP_MEMORY_S of the overlap
        await turns()
        seen.append(spin.spinning)
        return seen

    assert asyncio.run(body()) == [False, False]


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
    assert spin.calls == 0

    async def failing(request: object, call: Call) -> str:
        raise ZeroDivisionError("boom")

    async def items(request: object, call: Call) -> AsyncIterator[str]:
        yield "one"

    async def other_paths() -> tuple[int, bool]:
        with contextlib.suppress(Aborted):
            await boundary.unary("Sample", object(), FakeContext(), failing)  # type: ignore[arg-type]
        calls_after_failure = spin.calls
        async for _ in streams.stream("SampleStream", object(), FakeContext(), items):  # type: ignore[arg-type]
            pass
        return calls_after_failure, stream_spin.spinning

    stream_spin = IdleSpin(0.01, clock=FakeClock())
    streams = Boundary(Metrics(), idle_spin=stream_spin)

    assert asyncio.run(other_paths()) == (0, True)


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


def test_an_encode_on_the_codec_pool_counts_as_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = encoding.encode_sync

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(off_loop_jobs())
        return original(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_sync", spy)
    codec = Codec(ThreadPoolExecutor(1), threads=1, max_send_bytes=1 << 26)
    images = np.random.default_rng(0).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    png = OutputSpec(ImageFormat.PNG, quality=90, png_compression=1, return_latents=False)
    assert not encoding.encodes_inline(images, png)
    try:
        asyncio.run(codec.encode(ModelMetrics(Metrics(), "m", "1"), images, png, (-1.0, 1.0)))
    finally:
        codec.pool.shutdown()
    assert seen == [1]
    assert off_loop_jobs() == 0


def test_idle_spin_s_is_read_from_the_server_config_and_bounded(tmp_path: Path) -> None:
    assert ServerConfig().idle_spin_s == pytest.approx(DEFAULT_WINDOW_S)
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"idle_spin_s": 0}))
    assert load_server_config(path).idle_spin_s == 0.0
    path.write_text(json.dumps({"idle_spin_s": 0.5}))
    with pytest.raises(ConfigError, match="idle_spin_s.*<= 0.01"):
        load_server_config(path)

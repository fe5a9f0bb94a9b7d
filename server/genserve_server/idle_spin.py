"""Keep the event loop's CPU awake for a moment after a call ends (`idle_spin_s`).

A tiny model's request is a few hundred microseconds of work on the event loop thread, cut into
pieces by gRPC's hand-offs (the message, the send). Whenever the loop has nothing to do between
them, or between one call's answer and the next call of a closed-loop client, its thread blocks in
epoll and the kernel idles the CPU. On a virtual machine an idle vCPU halts (a VM exit), and the
work after the wake-up runs on cold caches: on the 2-core VM of bench/README.md the same one-seed
latents take 37-67 us after a 0.8-ms sleep against 23-30 us after a 0.8-ms busy wait, and a
one-row ONNX Runtime call 43 against 33 us (bench/profile.md, sixteenth round).

`IdleSpin.end` (Boundary.end, at the end of every call) keeps the loop turning, one cheap callback
per turn (epoll with a zero timeout, then `sched_yield`), until `window_s` has passed since the last
call ended. It spins only for a lone caller (not within OVERLAP_MEMORY_S of two calls in their
handlers at once: several callers' work fills the gaps) and stops while work this loop awaits runs
on another thread (`off_loop_work`: pooled and bulk model calls, off-loop encodes and decodes): a
spinning loop would take a core from that work (model loads count too). At
saturation the loop never idles, so the spin costs one callback per turn and no CPU of its own; an
idle server does not spin at all. What it costs is CPU in the gaps of a light load: at most
`window_s` per call. A closed-loop client at concurrency 1 answers and sends again within the
window, so there the loop's thread stays busy (about half a core more for a tiny model's ~1,000
calls/s), for 0.1 ms less per call (bench/profile.md, sixteenth round). Busy-waiting for latency is
ONNX Runtime's own default for its intra-op threads (genserve turns that one off: those spin during
batches, when the cores have work).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

from genserve_server.arrivals import OVERLAP_MEMORY_S

# Seconds of spinning after each call by default (ServerConfig.idle_spin_s): the window starts when
# the handler returns, before gRPC sends the answer; 300 us gave half of 600's gain at c=1 (a client
# on the same host sends its next request ~0.4-0.5 ms after the handler's end), 1 ms no more.
DEFAULT_WINDOW_S = 600e-6
MAX_WINDOW_S = 0.01
# Spin only for a lone caller: not within OVERLAP_MEMORY_S (the batcher's memory of overlapping
# callers, imported above) of two calls being in their handlers at once. With several callers, other
# calls' work fills the loop's gaps, and a spinning loop takes the cores from the threads that
# deliver the next requests (gRPC's, a client's on a shared host): dcgan-digits at c=2-8 on 2 cores
# lost 5-25 % of its images/s when the loop spun whatever the calls, and 0-28 % at c=8-16 when it
# spun whenever at most one call was in a handler (between two batches' worth of calls).

# os.sched_yield each spun turn: a thread woken on the spinning core (gRPC's poller, an event-engine
# thread) runs at once instead of waiting out the loop's time slice.
_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)

T = TypeVar("T")


class _OffLoop:
    """Jobs this process's event loop has handed to other threads and not yet got back."""

    running = 0


_OFF_LOOP = _OffLoop()


@contextlib.contextmanager
def off_loop_work() -> Iterator[None]:
    """Around an `await` of work on another thread (run_in_executor): no spinning meanwhile. Entered
    and left on the loop's thread, so a plain counter is enough; one per process (a server process
    runs one event loop). A call cancelled while it waits leaves at once, though its job may still
    finish on the pool: the spin may then start up to one job early."""
    _OFF_LOOP.running += 1
    try:
        yield
    finally:
        _OFF_LOOP.running -= 1


async def run_off_loop(executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `executor` (None: the loop's default), awaited as off-loop work."""
    with off_loop_work():
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def run_off_loop_tracked(
    executor: Executor, computing: list[asyncio.Future[None]] | None, fn: Callable[..., T], *args: Any
) -> T:
    """`fn(*args)` on `executor`, awaited as run_off_loop awaits it. `computing` (a core.Call's): where
    the caller is cancelled while the job runs on its thread, gets a future resolved once the job has
    ended (returned or raised), which what the call holds for the job's buffers (its working set, its
    response's bytes) waits for; a job not started yet is cancelled with its caller, as
    run_off_loop's. A caller that waits the job out adds nothing: no future per call on that path."""
    if computing is None:
        return await run_off_loop(executor, fn, *args)
    loop = asyncio.get_running_loop()
    with off_loop_work():
        job = executor.submit(fn, *args)
        try:
            return await asyncio.wrap_future(job, loop=loop)
        except asyncio.CancelledError:
            if not job.done():  # still running on its thread (one not started was cancelled with it)
                ended: asyncio.Future[None] = loop.create_future()
                computing.append(ended)
                job.add_done_callback(lambda _: _resolve_threadsafe(loop, ended))
            raise


def _resolve_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """From any thread: `future` resolved (None) on its loop, unless done or the loop has closed."""

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop closed meanwhile: nobody is waiting
        pass


def off_loop_jobs() -> int:
    """Jobs handed to other threads and not back yet (tests, diagnostics)."""
    return _OFF_LOOP.running


class IdleSpin:
    """Keeps its event loop turning for `window_s` after each `poke` or `end` (0: never), for a lone
    caller (no two calls at once within OVERLAP_MEMORY_S) and while nothing runs off the loop."""

    def __init__(
        self, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0.0 <= window_s <= MAX_WINDOW_S:
            raise ValueError(f"idle_spin_s must be in [0, {MAX_WINDOW_S}], got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.turns = 0  # loop turns spun (tests, diagnostics)
        self.calls = 0  # calls between Boundary.begin and Boundary.end
        self._overlapped_at = -math.inf  # when two calls were last in their handlers at once

    def begin(self) -> None:
        """A call's handler starts (Boundary.begin)."""
        self.calls += 1
        if self.calls > 1:
            self._overlapped_at = self._clock()

    def end(self) -> None:
        """A call's handler has ended (Boundary.end): spin for `window_s` from now, unless another
        call is still in its handler (then the two overlapped until now)."""
        if self.calls > 1:
            self._overlapped_at = self._clock()
        self.calls -= 1
        self.poke()

    @property
    def spinning(self) -> bool:
        return self._loop is not None

    def poke(self) -> None:
        """A call has ended (on the loop's thread): spin until `window_s` from now."""
        now = self._clock()
        if self.window_s <= 0.0 or not self._lone(now):
            return  # off, or several callers: not even one callback
        self._until = now + self.window_s
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop's thread (a test's direct call): nothing to keep awake
            return
        # A turn queued on a loop that stopped meanwhile never runs: start again on this one.
        if self._loop is not running:
            self._loop = running
            running.call_soon(self._turn, running)

    def _lone(self, now: float) -> bool:
        """No two calls were in their handlers at once within OVERLAP_MEMORY_S."""
        return now - self._overlapped_at >= OVERLAP_MEMORY_S

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return  # a stale turn of a loop this spin has left
        now = self._clock()
        if _OFF_LOOP.running or not self._lone(now) or now >= self._until:
            self._loop = None
            return
        self.turns += 1
        _yield()
        loop.call_soon(self._turn, loop)

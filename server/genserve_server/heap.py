"""The garbage collector and a serving process: keep full collections off the request path.

CPython's cyclic collector runs a full (generation 2) collection once enough objects have survived
the younger ones, and a full collection walks every tracked object in the process. A loaded server
holds tens of thousands of them from its start (57,000 with the default models: modules, protobuf
descriptors, the models' Python wrappers) that will never be garbage, and under load each full
collection stopped the event loop for tens of milliseconds every few seconds: every request in flight
at that moment waited for it, which is a saturated server's p99 (bench/profile.md, "Twelfth round").
Requests themselves leave a little cyclic garbage each (grpc.aio's method-handler closure, 5 objects;
and, with a done callback, the call's state and context, which is why the calls accept.py takes
release their response bytes through `accept.at_call_end` instead), so the collector must keep
running; it only has to stop re-reading the start-up heap.

`freeze_startup_heap` is called once the initial models are loaded: it collects what start-up left
behind, then moves every surviving object to the permanent generation (`gc.freeze`), which later
collections skip. Objects frozen there are still freed by reference counting, but a cycle among them
never is, and a loaded model version is one (its runner, batcher and sessions refer to each other):
a version unloaded by a reload would keep its ONNX Runtime sessions for the process's life. So the
reloader calls `refreeze_soon` once it has forgotten a version: the frozen objects go back to the
collector for one full collection (tens of ms) and what survives is frozen again; versions unloaded
within REFREEZE_DELAY_S of each other (a reload that removes several models) share one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

logger = logging.getLogger(__name__)

# Unloaded versions' requests for a full collection within this long of the first share it.
REFREEZE_DELAY_S = 0.2
# The loop a refreeze is due on (a process may run several loops one after another: tests).
_refreeze_due_on: asyncio.AbstractEventLoop | None = None


def freeze_startup_heap() -> int:
    """Collect, then freeze what is left; returns how many objects are now frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug(
        "froze %d start-up objects out of the cyclic collector's reach in %.1f ms",
        frozen,
        (time.perf_counter() - started) * 1e3,
    )
    return frozen


def refreeze() -> None:
    """After model versions were unloaded: one full collection over the frozen objects too (frees
    the versions' cycles), then freeze again. Nothing where the heap is not frozen (the many Apps
    of a test process)."""
    if gc.get_freeze_count() == 0:
        return
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    elapsed_ms = (time.perf_counter() - started) * 1e3
    logger.debug("refroze %d objects in %.1f ms", gc.get_freeze_count(), elapsed_ms)


def refreeze_soon() -> None:
    """`refreeze` on the running loop REFREEZE_DELAY_S from now, unless one is already due there (a
    reload that unloads several versions pays for one full collection, not one each). Later, not
    at once, also because the caller's frame still holds the version it forgot."""
    global _refreeze_due_on
    loop = asyncio.get_running_loop()
    if _refreeze_due_on is loop:
        return

    def run() -> None:
        global _refreeze_due_on
        _refreeze_due_on = None
        refreeze()

    _refreeze_due_on = loop
    loop.call_later(REFREEZE_DELAY_S, run)

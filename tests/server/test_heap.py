"""heap.py: the start-up heap leaves the cyclic collector's reach; later garbage does not. (That an
unloaded version is still freed: tests/reliability/test_reload.py.)"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from genserve_server.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture()
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's heap goes back to the collector


def test_freeze_moves_the_live_heap_out_of_full_collections(unfreeze: None) -> None:
    kept = [_Node() for _ in range(100)]
    frozen = freeze_startup_heap()
    # Frozen objects only leave the permanent generation (freed by another thread of this process,
    # e.g. grpc's): the count never grows after the freeze, and the live heap is in it.
    assert len(kept) <= gc.get_freeze_count() <= frozen
    ids = {id(node) for node in kept}
    assert not any(id(o) in ids for generation in range(3) for o in gc.get_objects(generation))
    # A full collection now walks only what was created after the freeze.
    assert sum(len(gc.get_objects(generation)) for generation in range(3)) < frozen


def test_garbage_made_before_the_freeze_is_collected_not_frozen(unfreeze: None) -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: only the collector can free it
    gone = weakref.ref(a)
    del a, b
    freeze_startup_heap()
    assert gone() is None


def test_cycles_made_after_the_freeze_are_still_collected(unfreeze: None) -> None:
    freeze_startup_heap()
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # what a request leaves behind (grpc.aio's handler closure, a done callback)
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_versions_unloaded_close_together_share_one_full_collection(
    unfreeze: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reloader asked for a full collection per unloaded version (tens of ms of event loop
    each): removing four models ran four back to back. Requests made within REFREEZE_DELAY_S of
    each other share one."""
    from genserve_server import heap

    runs: list[int] = []
    monkeypatch.setattr(heap, "refreeze", lambda: runs.append(1))

    async def unload_four() -> None:
        for _ in range(4):
            heap.refreeze_soon()
            await asyncio.sleep(0)  # drains end on different turns of the loop
        await asyncio.sleep(heap.REFREEZE_DELAY_S * 3)
        heap.refreeze_soon()  # a later unload gets its own
        await asyncio.sleep(heap.REFREEZE_DELAY_S * 3)

    asyncio.run(unload_four())
    assert len(runs) == 2

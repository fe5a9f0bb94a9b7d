"""heap.py: the start-up heap leaves the cyclic collector's reach; later garbage does not. (That an
unloaded version is still freed: tests/reliability/test_reload.py.)"""

from __future__ import annotations

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

"""The gate that model loads pass through (repository.py, calibration.py): several versions load at
once, but the warm-up steps that time batch sizes run alone, cheapest first.

Timings measured beside another load come out inflated, and they decide inline execution and batch
caps; so a timing step holds the gate exclusively. The other load steps (card, sha256, sessions,
graph check; a tiled model's tile radius without warm-up) hold it shared, `width` at a time; the
model calls after a version's timing (tile radius, arena shrink) are made in its exclusive step.
Waiting steps start in priority order (lower first, then first come): load steps are queued at
priority 0, so at start-up every version is prepared before any is calibrated, and then warm-ups go
by their predicted seconds, so tiny models are READY before a large one calibrates.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

# How often a waiting step checks whether loading was cancelled (SIGTERM during start-up).
_POLL_S = 0.1


@dataclass(order=True, frozen=True)
class _Waiter:
    priority: float
    seq: int
    exclusive: bool = field(compare=False)


class LoadGate:
    """A readers-writer gate whose waiters are served in priority order (see the module)."""

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = width
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    @contextlib.contextmanager
    def step(
        self,
        priority: float = 0.0,
        *,
        exclusive: bool = False,
        check_stopping: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Hold the gate for one load step; `check_stopping` (raises to cancel) is called while waiting."""
        waiter = _Waiter(priority, next(self._seq), exclusive)
        with self._cond:
            self._waiting.append(waiter)
            try:
                while not self._may_start(waiter):
                    self._cond.wait(_POLL_S)
                    if check_stopping is not None:
                        check_stopping()
            finally:
                self._waiting.remove(waiter)
                self._cond.notify_all()  # a waiter behind this one may start now (or after it)
            if exclusive:
                self._exclusive = True
            else:
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()

    def _may_start(self, waiter: _Waiter) -> bool:
        if self._exclusive:
            return False
        for other in self._waiting:
            # A step ahead in the order goes first unless both are shared (they may run together).
            if other < waiter and (other.exclusive or waiter.exclusive):
                return False
        return self._shared == 0 if waiter.exclusive else self._shared < self.width

    @property
    def held_exclusively(self) -> bool:
        with self._cond:
            return self._exclusive

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)


class Steps(Protocol):
    """What a version's load takes its steps through: a LoadGate, or a HeldSteps of one."""

    def step(
        self,
        priority: float = 0.0,
        *,
        exclusive: bool = False,
        check_stopping: Callable[[], None] | None = None,
    ) -> AbstractContextManager[None]: ...


class HeldSteps:
    """One version's steps through `gate`, and the seconds they held it (`held_s`): its load and
    warm-up time, without its waits behind the other versions' steps (at start-up with hundreds of
    models, the last version's wait is every other version's load)."""

    def __init__(self, gate: LoadGate) -> None:
        self.gate = gate
        self.held_s = 0.0

    @contextlib.contextmanager
    def step(
        self,
        priority: float = 0.0,
        *,
        exclusive: bool = False,
        check_stopping: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        with self.gate.step(priority, exclusive=exclusive, check_stopping=check_stopping):
            started = time.monotonic()
            try:
                yield
            finally:
                self.held_s += time.monotonic() - started

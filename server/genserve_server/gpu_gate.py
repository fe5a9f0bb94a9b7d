"""The process-wide gate between CUDA graph captures and every other GPU call (ort_session,
session_runner)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Final


class _CaptureGate:
    """Process-wide: CUDA graph captures run alone; other GPU calls may run together.

    ORT captures in global mode, so a capture while any other thread makes a GPU call fails with
    CUDA error 900 (and may abort the process at teardown). GPU model calls hold the gate shared,
    captures hold it exclusively (a readers-writer lock; captures happen at load, so rarely wait). A
    waiting capture goes first: new GPU calls wait behind it, so that serving cannot starve a load.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._capturing = False
        self._waiting = 0

    @contextlib.contextmanager
    def gpu_call(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing and not self._waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._capturing and self._running == 0)
            self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()

    @property
    def capturing(self) -> bool:
        return self._capturing


CAPTURE_GATE: Final = _CaptureGate()

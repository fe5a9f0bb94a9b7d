"""genserve_contract.stop_signals, the CLIs' (genserve-client, genserve-export) shared signal
machinery: the process's wakeup fd as watch_arrivals and unwatch_arrivals found it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from genserve_contract import stop_signals


@pytest.fixture
def preset_wakeup_fd() -> Iterator[int]:
    """A wakeup fd set before (an event loop's), with Python's own Ctrl-C handler; both put back."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.set_wakeup_fd(write)
    try:
        yield write
    finally:
        signal.set_wakeup_fd(before)
        signal.signal(signal.SIGINT, handler)
        os.close(read)
        os.close(write)


def _ctrl_c_when_set_to(fd_wanted: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """signal.set_wakeup_fd, whose first swap to an fd `fd_wanted` accepts is followed by a Ctrl-C
    that Python handles as the swap returns (before its caller has the fd it found)."""
    set_wakeup_fd = signal.set_wakeup_fd
    swapped: list[int] = []

    def setting(fd: int, **kwargs: Any) -> int:
        found = set_wakeup_fd(fd, **kwargs)
        if fd_wanted(fd) and not swapped:
            swapped.append(fd)
            signal.raise_signal(signal.SIGINT)
        return found

    monkeypatch.setattr(signal, "set_wakeup_fd", setting)
    return swapped


def test_a_ctrl_c_as_watch_arrivals_sets_its_fd_leaves_the_wakeup_fd_set_before(
    preset_wakeup_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watch_arrivals swaps its pipe in as the wakeup fd to learn whether one was set (an event
    loop's), and puts that one back. A Ctrl-C handled as the swap returned raised out of it with the
    fd found only in the swap's return: unwatch_arrivals then left no wakeup fd at all, the event
    loop's lost for good (its signals never woke it). The stop is raised once the fd is back."""
    swapped = _ctrl_c_when_set_to(lambda fd: fd not in (-1, preset_wakeup_fd), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        stop_signals.watch_arrivals()
    stop_signals.unwatch_arrivals()
    monkeypatch.undo()
    left = signal.set_wakeup_fd(preset_wakeup_fd)
    assert swapped and left == preset_wakeup_fd, (swapped, left)
    with pytest.raises(OSError):  # its pipe closed
        os.fstat(swapped[0])


def test_a_ctrl_c_as_unwatch_arrivals_looks_leaves_the_wakeup_fd_set_before(
    preset_wakeup_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """unwatch_arrivals after a signal stopped watch_arrivals before it set its fd (the pipe made,
    the wakeup fd still the one set before): it swaps -1 in to look, and puts back what is not its
    own. A Ctrl-C handled as that swap returned left no wakeup fd. The stop is raised once it is
    back, the pipe closed."""
    read, write = os.pipe()
    stop_signals._Watch.pipe = read, write  # as a signal in watch_arrivals after os.pipe() leaves it
    swapped = _ctrl_c_when_set_to(lambda fd: fd == -1, monkeypatch)
    try:
        with pytest.raises(KeyboardInterrupt):
            stop_signals.unwatch_arrivals()
    finally:
        stop_signals._Watch.pipe = None
    monkeypatch.undo()
    left = signal.set_wakeup_fd(preset_wakeup_fd)
    assert swapped and left == preset_wakeup_fd, (swapped, left)
    for fd in (read, write):
        with pytest.raises(OSError):
            os.fstat(fd)

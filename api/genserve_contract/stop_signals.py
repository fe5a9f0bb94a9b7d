"""How genserve's CLIs (genserve-client, genserve-export) take SIGINT (Ctrl-C) and SIGTERM (`kill`,
`timeout`, systemd, a Kubernetes pod's stop): which of them arrived first, a stop's line said with
both held, a signal once the command has stopped ending the process at once, and the stop passed on
to a program that ran the command in its own process. Each CLI keeps its own lines, statuses and
exceptions; this is the mechanism they share. Standard library only: genserve_client/__main__.py
imports it before the CLI's imports.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Watch:
    """The process's one wakeup fd of watch_arrivals (a process has one, whichever CLI set it)."""

    pipe: tuple[int, int] | None = None  # its pipe, read and write ends, till unwatch_arrivals


def watch_arrivals() -> None:
    """Python runs the handlers of the signals that arrived since the main thread last looked in
    the order of their numbers, SIGINT (2) before SIGTERM (15): a SIGTERM followed, before it looked
    (a grpc call's wait looks every 0.1 s, a torch op or an ONNX export not at all), by a Ctrl-C
    stopped the command as the Ctrl-C. The C handler writes each signal's number to the wakeup fd as
    it arrives: the first stop is the one that came first (arrived_first). Only in the main thread
    and where no wakeup fd is set (an event loop's stays). unwatch_arrivals() puts the process back
    as it was, also after a signal stopped this call part-way."""
    try:
        read, write = os.pipe()
    except OSError:  # no file descriptor left: Python's order, as without it
        return
    _Watch.pipe = read, write  # before the wakeup fd is set: a signal from now on, unwatch_arrivals undoes it
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    held: list[int] = []
    try:
        with _handlers_held(held):
            try:
                found = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            except ValueError:  # not the main thread
                found = -1
                _Watch.pipe = None
            if found != -1:
                signal.set_wakeup_fd(found)
                _Watch.pipe = None
    finally:
        if _Watch.pipe is None:
            os.close(read)
            os.close(write)
    _raise_held(held)


def unwatch_arrivals() -> None:
    """Puts back what watch_arrivals changed: no wakeup fd where it set its own, its pipe closed."""
    pipe, _Watch.pipe = _Watch.pipe, None
    if pipe is None:
        return
    read, write = pipe
    held: list[int] = []
    try:
        with _handlers_held(held):
            found = signal.set_wakeup_fd(-1)
            if found != write:  # not ours (a signal stopped watch_arrivals before it set it): left as it was
                signal.set_wakeup_fd(found)
    finally:
        os.close(read)
        os.close(write)
    _raise_held(held)


@contextmanager
def _handlers_held(held: list[int]) -> Iterator[None]:
    """A wakeup fd is set by swapping: the one found is only in set_wakeup_fd's return, and a stop
    signal's Python handler run as it returned raised with it there, the fd found lost (an event
    loop's, never woken again). Inside, SIGINT's and SIGTERM's Python handlers are one that appends
    the signal to `held` (_raise_held raises them again once the wakeup fd is as it should be)."""
    found = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    ours = [signum for signum, handler in found.items() if callable(handler)]
    try:
        try:
            for signum in ours:
                signal.signal(signum, lambda signum, frame: held.append(signum))
        except ValueError:  # not the main thread (the first refused), where no Python handler runs
            ours = []
        yield
    finally:  # also where a handler found ran before its own was set
        for signum in ours:
            signal.signal(signum, found[signum])


def _raise_held(held: list[int]) -> None:
    """The signals _handlers_held held, again: to their handlers, and the wakeup fd (arrived_first)."""
    for signum in held:
        signal.raise_signal(signum)


def arrived_first(signum: int) -> int | None:
    """For a stop signal's handler: the stop signal that arrived first of those not handled yet.
    `signum` where arrivals are not watched or none was read; None where nothing was written since
    an earlier handler read (its arrival was read with that earlier signal's)."""
    if _Watch.pipe is None:
        return signum
    try:
        arrived = os.read(_Watch.pipe[0], 4096)
    except OSError:  # nothing written (BlockingIOError)
        return None
    for first in arrived:
        if first in STOP_SIGNALS:
            return first
    return signum


@contextmanager
def stops_held() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread inside: a stop's line is said, and recorded said,
    before a signal meanwhile ends the process (end_now), not said twice or not at all. The mask
    found is put back: a signal blocked before stays so."""
    mask = getattr(signal, "pthread_sigmask", None)  # not on Windows
    found = mask(signal.SIG_BLOCK, STOP_SIGNALS) if mask is not None else None
    try:
        yield
    finally:
        if mask is not None and found is not None:
            mask(signal.SIG_SETMASK, found)


def end_now(status: int, line: str | None) -> None:
    """A signal while the command stops or once it is done: what is buffered flushed, `line` (the
    stop's, where not said yet) on stderr, and os._exit(status). Nothing is waited for: what the CLI
    wrote survives a kill -9 as well; interrupted part-way, grpc's channel close hung a CLI for good."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001,S110 - a reader gone, a reentrant flush: exit all the same
            pass
    if line and sys.stderr is not None:
        try:
            os.write(sys.stderr.fileno(), f"{line}\n".encode())
        except (OSError, ValueError):  # stderr closed: the exit status says it
            pass
    os._exit(status)


def pass_on(received: Collection[int], *, sigterm: bool) -> None:
    """A CLI's main(argv) called from a program (a test suite, a program running a command in its
    own process), once its command has stopped through its cleanup: the signals that stopped it
    (`received`) go on to that program, not lost in a returned 130 or 143. A SIGTERM, where
    `sigterm` (main() took it over and has put back the handler it found), to that handler: by
    default the process's end; a Ctrl-C as the KeyboardInterrupt its handler (Python's) raises."""
    if sigterm and signal.SIGTERM in received:
        signal.raise_signal(signal.SIGTERM)
    if signal.SIGINT in received:
        raise KeyboardInterrupt

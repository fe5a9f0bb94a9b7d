"""How the CLI stops when told to: Ctrl-C (SIGINT) and SIGTERM (`kill`, `timeout`, systemd, a
Kubernetes pod's stop) end it the same way: what it must finish or flush is, one line on stderr,
exit 128 + the signal (130, 143). Standard library only: genserve_client/__main__.py uses it before
the CLI's imports.
"""

from __future__ import annotations

import signal
from collections.abc import Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

INTERRUPTED = "genserve-client: interrupted"
TERMINATED = "genserve-client: terminated (SIGTERM)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that every place that stops cleanly
    on a Ctrl-C (a bulk job stops its streams, closes its manifest and prints how to resume) stops
    the same way on SIGTERM."""


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def stop_line(exc: KeyboardInterrupt) -> str:
    """The one line on stderr for an interrupt or a SIGTERM."""
    return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED


def stop_status(exc: KeyboardInterrupt) -> int:
    """The exit status a shell reports for a process killed by that signal."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), which a SIGTERM stops as asyncio.run stops it on Ctrl-C: the main task is
    cancelled (its `finally` blocks close what it opened) and Terminated raised once it ends.
    raise_terminated, a handler of the process, would raise Terminated wherever the loop is: inside
    a task (a traceback of it printed beside the line) or a grpc callback (swallowed: the command
    went on). Where SIGTERM is not raise_terminated's (ignored, say), it is left as it is; so it is
    where the loop takes no signal handlers (Windows)."""
    import asyncio  # here: __main__ imports this module before the CLI's imports

    if signal.getsignal(signal.SIGTERM) is not raise_terminated:
        return asyncio.run(main)
    terminated = False

    async def stoppable() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except NotImplementedError:  # Windows' loops: SIGTERM ends the process there, as it does
            return await main
        try:
            return await main
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # which sets SIG_DFL: the CLI's again
            signal.signal(signal.SIGTERM, raise_terminated)

    try:
        result = asyncio.run(stoppable())
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    if terminated:  # the main task caught its cancel and returned
        raise Terminated
    return result

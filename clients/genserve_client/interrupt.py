"""How the CLI stops when told to: Ctrl-C (SIGINT) and SIGTERM (`kill`, `timeout`, systemd, a
Kubernetes pod's stop) end it the same way: what it must finish or flush is, one line on stderr,
exit 128 + the signal (130, 143). A second one while it stops (a call's channel closing, a bulk job
its manifest), or one once the command is done (the interpreter's exit), ends the process at once:
interrupted part-way, grpc's channel close hung the CLI for good. Standard library only (and
genserve_contract.stop_signals, the mechanism genserve-export shares): genserve_client/__main__.py
uses it before the CLI's imports.
"""

from __future__ import annotations

import atexit
import signal
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

from genserve_contract import stop_signals

T = TypeVar("T")

INTERRUPTED = "genserve-client: interrupted"
TERMINATED = "genserve-client: terminated (SIGTERM)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that every place that stops cleanly
    on a Ctrl-C (a bulk job stops its streams, closes its manifest and prints how to resume) stops
    the same way on SIGTERM."""


class _Stop:
    """The process's stop, as genserve_client/__main__.py's handlers and the CLI's lines saw it."""

    first: KeyboardInterrupt | None = None  # the signal that stopped the command
    said = False  # its line is on stderr
    status: int | None = None  # the command's exit status, once it is done


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGINT's handler once the CLI's imports are done: KeyboardInterrupt the first time."""
    _stop_signal(KeyboardInterrupt())


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM's: Terminated the first time."""
    _stop_signal(Terminated())


def _stop_signal(exc: KeyboardInterrupt) -> None:
    if _Stop.first is None and _Stop.status is None:
        exc = _arrived_first(exc)
        _Stop.first = exc
        raise exc
    end_now(exc)


def _arrived_first(exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """The stop of the signal that arrived first of those not handled yet (watch_arrivals), `exc`
    where unknown."""
    signum = _signum(exc)
    first = stop_signals.arrived_first(signum)
    if first is None or first == signum:
        return exc
    return Terminated() if first == signal.SIGTERM else KeyboardInterrupt()


def _signum(exc: KeyboardInterrupt) -> int:
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


def first_stop() -> KeyboardInterrupt | None:
    """The signal that stopped the command (KeyboardInterrupt, or Terminated for SIGTERM), if one did."""
    return _Stop.first


def stopping(exc: KeyboardInterrupt) -> None:
    """`exc` stops the command (where it was raised other than by these handlers: asyncio.run's own
    Ctrl-C): a signal from now on ends the process at once."""
    if _Stop.first is None:
        _Stop.first = exc


def end_now(exc: KeyboardInterrupt) -> None:
    """A signal while the command stops or once it is done: what is buffered flushed, the first
    stop's line where it was not said yet, and os._exit with its status (the command's own where no
    signal stopped it). Nothing is waited for: what the CLI writes survives a kill -9 as well."""
    first = _Stop.first
    line = stop_line(first) if first is not None and not _Stop.said else None
    if first is not None:
        status = stop_status(first)
    else:
        status = _Stop.status if _Stop.status is not None else stop_status(exc)
    stop_signals.end_now(status, line)


def say_stop(exc: KeyboardInterrupt, say: Callable[[str], None]) -> None:
    """Says the stop's one line with `say`, unless this run said it already (cli.main(argv) said it
    before its KeyboardInterrupt reached __main__.main(argv)); a signal meanwhile ends the process
    once it is said, not with it said twice or not at all."""
    stopping(exc)
    if _Stop.said:
        return
    with stop_signals.stops_held():
        say(stop_line(exc))
        _Stop.said = True


def finished(status: int) -> None:
    """The command is done with `status`: a signal from now on ends the process at once with it;
    after the interpreter's atexit calls it is ignored, as the interpreter then puts back the
    default action of a signal that has a Python handler (a SIGINT while it freed grpc's objects
    killed the process: -2, not the status)."""
    _Stop.status = status
    atexit.register(_ignore_at_exit)


def reset() -> None:
    """No stop seen and no command done: a process that runs the CLI's main() more than once (a
    test, a program embedding the CLI) starts each run as the first."""
    _Stop.first, _Stop.said, _Stop.status = None, False, None


def pass_on(stop: KeyboardInterrupt | None, *, sigterm: bool) -> None:
    """main(argv) called from a program (a test suite, a program running a command in its own
    process), once its command has stopped through its cleanup: the signal that stopped it (`stop`,
    first_stop()) goes on to that program, not lost in a returned 130 or 143. A Ctrl-C as the
    KeyboardInterrupt its handler raises; a SIGTERM, where `sigterm` (main() took it over from its
    default action and has put back the handler it found), to that handler: the process's end."""
    stop_signals.pass_on([] if stop is None else [_signum(stop)], sigterm=sigterm)


def _ignore_at_exit() -> None:
    for signum, handler in ((signal.SIGINT, raise_interrupted), (signal.SIGTERM, raise_terminated)):
        if signal.getsignal(signum) is handler:
            signal.signal(signum, signal.SIG_IGN)


def stop_line(exc: KeyboardInterrupt) -> str:
    """The one line on stderr for an interrupt or a SIGTERM."""
    return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED


def stop_status(exc: KeyboardInterrupt) -> int:
    """The exit status a shell reports for a process killed by that signal."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), which Ctrl-C and SIGTERM stop as the CLI's other commands stop: the first
    cancels the main task (its `finally` blocks close what it opened) and its KeyboardInterrupt or
    Terminated is raised once the task ends; a second one while it stops ends the process at once
    with the first's line and status (end_now). raise_interrupted and raise_terminated, handlers of
    the process, would raise wherever the loop is: inside a task (a traceback of it printed beside
    the line) or a grpc callback (swallowed: the command went on); and asyncio.run's own Ctrl-C
    raises its second KeyboardInterrupt there too. So while the main task runs, a signal whose
    handler is theirs goes to one that cancels the task and wakes the loop. A signal whose handler
    is not theirs (ignored, say, or a program's own) is left as it is: Ctrl-C is then asyncio.run's
    where SIGINT is Python's default handler; a stop it raised makes a later signal end the process
    at once, as raise_interrupted's first does."""
    import asyncio  # here: __main__ imports this module before the CLI's imports

    ours = [
        signum
        for signum, handler in ((signal.SIGINT, raise_interrupted), (signal.SIGTERM, raise_terminated))
        if signal.getsignal(signum) is handler
    ]
    stop: list[KeyboardInterrupt] = []  # the signal that cancelled the main task

    async def stoppable() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
            if stop or _Stop.first is not None or _Stop.status is not None:
                end_now(exc)
            exc = _arrived_first(exc)
            stop.append(exc)
            stopping(exc)
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wakes a loop asleep in select()

        previous = {signum: signal.signal(signum, on_signal) for signum in ours}
        try:
            return await main
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    try:
        result = asyncio.run(stoppable())
    except asyncio.CancelledError:
        if stop:
            raise stop[0] from None
        raise
    except KeyboardInterrupt as exc:  # asyncio.run's own Ctrl-C, or one before the task ran
        stopping(exc)
        raise
    if stop:  # the main task caught its cancel and returned
        raise stop[0]
    return result

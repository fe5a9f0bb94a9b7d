"""SIGTERM, SIGINT and SIGHUP between the process's start and serve()'s event-loop handlers.

The server's imports (grpc, ONNX Runtime, numpy) take half a second, more on a cold disk, and the
App is built after them: a signal in that time acted by default, SIGINT as a KeyboardInterrupt
traceback, SIGTERM and SIGHUP as the end of the process (exit -15 / -1, 143 / 129 in a shell).
`genserve-server` (genserve_server/__main__.py) calls hold() before importing anything else; until
serve() installs the loop's handlers a SIGTERM or SIGINT is recorded here and serve() acts on it
(stop_requested: the start-up stops, exit 0), and a SIGHUP is dropped: the start-up scan, which
has not begun, reads the repository after it. Standard library only: it runs before the imports.
"""

from __future__ import annotations

import signal
from types import FrameType

# SIGUSR1/SIGUSR2 mean nothing to the server: by default they end the process without a word, so
# they are dropped here and logged by serve(), then logged and ignored by the event loop's handlers.
IGNORED = (signal.SIGUSR1, signal.SIGUSR2)
HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *IGNORED)

_held = False
_stop_signal: int | None = None
_dropped_hups = 0
_dropped_ignored: dict[int, None] = {}


def _record(signum: int, frame: FrameType | None) -> None:
    record(signum)


def record(signum: int) -> None:
    """A held signal: the first SIGTERM/SIGINT is the stop; a SIGHUP or SIGUSR1/2 is dropped."""
    global _stop_signal, _dropped_hups
    if signum == signal.SIGHUP:
        _dropped_hups += 1
    elif signum in IGNORED:
        _dropped_ignored[signum] = None
    elif _stop_signal is None:
        _stop_signal = signum


def hold() -> None:
    """From now on until the event loop's handlers replace these, record the three signals."""
    global _held
    _held = True
    for sig in HELD:
        signal.signal(sig, _record)


def stop_requested() -> bool:
    """A SIGTERM or SIGINT arrived while held."""
    return _stop_signal is not None


def dropped_hups() -> int:
    """SIGHUPs that arrived while held (the start-up scan had not begun)."""
    return _dropped_hups


def dropped_ignored() -> list[str]:
    """The names of the SIGUSR1/SIGUSR2 that arrived while held, in their order."""
    return [signal.Signals(sig).name for sig in _dropped_ignored]


def release() -> None:
    """The default actions again (a command that is not `serve`), a stop signal held meanwhile
    delivered now. Nothing where hold() was not called (main() run in process)."""
    global _held
    if not _held:
        return
    _held = False
    for sig in HELD:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if _stop_signal is not None:
        signal.raise_signal(_stop_signal)

"""How the CLI stops when told to: Ctrl-C (SIGINT) and SIGTERM (`kill`, `timeout`, systemd, a
Kubernetes pod's stop) end it the same way: what it must finish or flush is, one line on stderr,
exit 128 + the signal (130, 143). Standard library only: genserve_client/__main__.py uses it before
the CLI's imports.
"""

from __future__ import annotations

import signal
from types import FrameType

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

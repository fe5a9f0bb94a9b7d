"""Test support for every area: start a command with some descriptors closed or SIGINT's disposition
set, without subprocess's preexec_fn.

preexec_fn runs Python in the forked child of a threaded process (a pytest process holds a fake
gRPC server's threads, grpc core's, a tiny server's log readers), which the subprocess docs call
unsafe: a lock held by another thread at the fork stays held in the child for good. The child of
`preexec_fn=lambda: os.close(2)` aborted (-6, SIGABRT, no message) in 3 of 40 runs of one test.

exec_wrapped(command, ...) instead runs `command` through a fresh, single-threaded Python that makes
those changes and then execs it: the same pid (a signal sent to proc.pid, /proc/PID/maps, reach the
command once exec'd), the command's own start (its imports) after the wrapper's, never overlapping.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Literal

_SIGINT = {"default": "signal.SIG_DFL", "ignore": "signal.SIG_IGN"}


def exec_wrapped(
    command: Sequence[str],
    *,
    close_fds: Iterable[int] = (),
    sigint: Literal["default", "ignore"] | None = None,
) -> list[str]:
    """The argv that runs `command` (its first item a program, searched on PATH as exec does) with
    the descriptors `close_fds` (0, 1, 2: `<&-`, `>&-`, `2>&-`) closed and, where `sigint` is given,
    SIGINT's disposition default (as a terminal starts a program) or ignored (as a script's
    background job does); None leaves the disposition inherited. For subprocess.run/Popen in place
    of preexec_fn; the command's environment, cwd and other descriptors are the wrapper's."""
    lines = ["import os, signal, sys"]
    # The wrapper's Python ignores SIGPIPE and SIGXFSZ, and an exec keeps what is ignored: put them
    # back as subprocess (restore_signals) does for the commands it starts.
    lines.append("for name in ('SIGPIPE', 'SIGXFSZ'):")
    lines.append("    if hasattr(signal, name): signal.signal(getattr(signal, name), signal.SIG_DFL)")
    if sigint is not None:
        lines.append(f"signal.signal(signal.SIGINT, {_SIGINT[sigint]})")
    for fd in close_fds:
        lines.append(f"os.close({int(fd)})")
    lines.append("os.execvp(sys.argv[1], sys.argv[1:])")
    # -S -E: no site or environment-driven start-up in the wrapper (the command gets the environment
    # unchanged), so its start is short and imports nothing the command's could depend on.
    return [sys.executable, "-S", "-E", "-c", "\n".join(lines), *command]

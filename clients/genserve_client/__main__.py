"""`genserve-client` and `python -m genserve_client`: Ctrl-C and SIGTERM from the first statement on.

The CLI's imports (grpc, numpy, PIL) take half a second or more, and cli.main() turns a Ctrl-C into
exit 130 only once they are done; a KeyboardInterrupt raised inside them is not even always one
(numpy reports it as an ImportError). Entered here (the package's __init__ imports nothing heavy),
a SIGINT or SIGTERM during those imports ends the process at once: one line on stderr, exit 130 or
143, as later. After them SIGTERM raises Terminated (a KeyboardInterrupt) where Ctrl-C raises
KeyboardInterrupt, so that the command stops as on a Ctrl-C (genserve_client/interrupt.py); a
second signal while it stops, or a signal once the command is done, ends the process at once with
the first's line (once) and status, or the command's status. Standard library only: it runs before
the imports.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from genserve_client.interrupt import (
    INTERRUPTED,
    TERMINATED,
    finished,
    first_stop,
    pass_on,
    raise_interrupted,
    raise_terminated,
    reset,
    say_stop,
    stop_status,
)
from genserve_contract.stop_signals import unwatch_arrivals, watch_arrivals


def _interrupted(signum: int, frame: FrameType | None) -> None:
    line = TERMINATED if signum == signal.SIGTERM else INTERRUPTED
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:  # stderr closed (`2>&-`): the exit status says it
        pass
    os._exit(128 + signum)  # nothing written yet, nothing to clean up: the imports are not done


def main(argv: Sequence[str] | None = None) -> int:
    # Called without arguments it is the process's entry (the console script, `python -m`): its
    # handlers stay once the command is done (see below). Called with them from Python (a test, a
    # program running the CLI in its own process) it puts the process's handlers back as it found
    # them: a Ctrl-C there later is the program's, not an os._exit of ours; and the signal that
    # stopped the command goes on to the program (a Ctrl-C's KeyboardInterrupt, a SIGTERM).
    entry = argv is None
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    reset()
    # Not where a signal is ignored (SIGINT in a background job of a script, nohup): it stays so.
    held_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    held_term = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if held_int:
        signal.signal(signal.SIGINT, _interrupted)
    if held_term:
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        try:
            # A signal from the moment raise_interrupted/raise_terminated are set is the command's
            # stop, its KeyboardInterrupt caught below (not a traceback), the CLI's imports done.
            try:
                from genserve_client.cli import main as cli_main
            finally:
                if held_int:
                    signal.signal(signal.SIGINT, raise_interrupted)
                if held_term:
                    signal.signal(signal.SIGTERM, raise_terminated)
            # The signal that came first stops the command, not the one Python handles first.
            if held_int and held_term:
                watch_arrivals()
            status = cli_main(argv)
            if entry:  # in the try: a signal before finished() has it done is the command's stop
                finished(status)
        except KeyboardInterrupt as exc:  # where cli.main() does not catch it (its argument parsing)
            from genserve_contract.stdio import err_line  # loaded by the CLI's imports, done by now

            say_stop(exc, err_line)  # nothing where stderr is closed (`2>&-`): the exit status says it
            status = stop_status(exc)
            if entry:  # a signal from now on ends the process at once, with this status
                finished(status)
    finally:
        if not entry:  # also where argparse's SystemExit (a usage error) leaves the command
            stop = first_stop()
            unwatch_arrivals()
            for signum, handler in zip((signal.SIGINT, signal.SIGTERM), handlers, strict=True):
                if handler is not None:  # None: not set from Python, left as it is
                    signal.signal(signum, handler)
            reset()
            # The signal that stopped the command was sent to the program that called main(argv):
            # a Ctrl-C (cli.main(argv)'s too) goes on to it as its KeyboardInterrupt, a SIGTERM to
            # the handler found, with the program's handlers put back.
            pass_on(stop, sigterm=held_term)
    # Called as the entry, the handlers stay (finished above): a signal from now on (grpc's cleanup
    # at the interpreter's exit, which one interrupted part-way could hang) ends the process at once
    # with this status.
    return status


if __name__ == "__main__":
    sys.exit(main())

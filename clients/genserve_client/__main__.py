"""`genserve-client` and `python -m genserve_client`: Ctrl-C from the first statement on.

The CLI's imports (grpc, numpy, PIL) take half a second or more, and cli.main() turns a Ctrl-C into
exit 130 only once they are done; a KeyboardInterrupt raised inside them is not even always one
(numpy reports it as an ImportError). Entered here (the package's __init__ imports nothing heavy),
a SIGINT during those imports ends the process at once: one line on stderr, exit 130, as later.
Standard library only: it runs before the imports.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

INTERRUPTED = "genserve-client: interrupted"


def _interrupted(signum: int, frame: FrameType | None) -> None:
    os.write(2, f"{INTERRUPTED}\n".encode())
    os._exit(130)  # nothing written yet, nothing to clean up: the imports are not done


def main(argv: Sequence[str] | None = None) -> int:
    # Not where SIGINT is ignored (a background job of a script, nohup): it stays ignored.
    held = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if held:
        signal.signal(signal.SIGINT, _interrupted)
    try:
        from genserve_client.cli import main as cli_main
    finally:
        if held:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return cli_main(argv)
    except KeyboardInterrupt:  # where cli.main() does not catch it (its argument parsing)
        sys.stderr.write(INTERRUPTED + "\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`genserve-server` and `python -m genserve_server`: hold the start-up signals, then import the server.

Before the server's imports, which take half a second or more: a SIGTERM, SIGINT or SIGHUP in that
time is held (start_signals.py) instead of ending the process undrained or with a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from genserve_server import start_signals


def main(argv: Sequence[str] | None = None) -> int:
    start_signals.hold()
    from genserve_server.main import main as server_main

    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main())

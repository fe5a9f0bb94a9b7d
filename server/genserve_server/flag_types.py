"""argparse types of the server's flags, shared by `serve` (main.py) and the health probe (probe.py,
which must stay light: only the standard library here)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from genserve_contract.flags import nonempty_path, nonempty_path_text

__all__ = [
    "MAX_TIMEOUT_S",
    "bind_address",
    "nonempty_path",
    "nonempty_path_text",
    "port_number",
    "seconds",
]

# The longest deadline of a gRPC call a flag may give (the health probe's --timeout-s): grpc takes
# the time now plus the timeout in nanoseconds, which past ~7e9 s (2**63 ns from the epoch)
# overflows into a deadline already past: every call DEADLINE_EXCEEDED at once, a healthy server
# reported unhealthy. A day is more than any probe waits.
MAX_TIMEOUT_S = 86400.0


def port_number(lowest: int = 0) -> Callable[[str], int]:
    """argparse type of a TCP port flag: lowest..65535 (0 for a server: the OS picks a free one)."""

    def parse(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
        if not lowest <= port <= 65535:
            raise argparse.ArgumentTypeError(f"must be a port in {lowest}..65535, got {port}")
        return port

    return parse


def seconds(*, allow_zero: bool, max_s: float = math.inf) -> Callable[[str], float]:
    """argparse type of a duration flag: a finite number of seconds, >= 0 or > 0 (NaN and inf
    would otherwise be accepted and fail later, at SIGTERM, as a traceback), and <= `max_s`."""
    bound = ">= 0" if allow_zero else "> 0"
    if max_s < math.inf:
        bound += f" and <= {max_s:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0) and value <= max_s):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {bound}, got {text}")
        return value

    return parse


def bind_address(text: str) -> str:
    """argparse type of a bind address flag (--host, --metrics-host): not empty. An empty value
    (`--metrics-host "$HOST"` with the variable unset) bound every interface, where the default is
    127.0.0.1 and every interface is asked for by name (0.0.0.0, ::)."""
    if not text:
        raise argparse.ArgumentTypeError(
            "expected an address (0.0.0.0 for every interface), got an empty value"
        )
    return text

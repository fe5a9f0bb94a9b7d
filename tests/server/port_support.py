"""Ports for tests that need a number before anything listens on it: held, never found free and let go.

`make test` runs two pytest workers side by side. A port found free (bind port 0, read it, close the
socket) is free for no one in particular: until the test uses it, the other worker's servers (or
anything) may take it, and a server the test starts there fails 'port in use', or a client the test
points at "nothing" reaches a stranger's server. These keep a socket bound to the port, not
listening, for as long as the test needs the port:

- refused_port(): nothing listens there and nothing else can bind it; a connection is refused by the
  kernel (ECONNREFUSED: gRPC's UNAVAILABLE, "Connection refused"), as where no server runs.
- reserved_port(): the same, with SO_REUSEADDR, so that the test's own servers, which bind with
  SO_REUSEADDR (gRPC's, genserve's metrics, Prometheus'), may listen on it one after another (a
  restart on the same port). Between them a connection is refused; a bind of port 0 elsewhere is
  never given it, nor is a bind without SO_REUSEADDR.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

HOST = "127.0.0.1"


class HeldPort:
    """A bound, never listening socket on 127.0.0.1: `port` is this test's until close()."""

    def __init__(self, *, reuse_addr: bool) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if reuse_addr:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((HOST, 0))
        except BaseException:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def close(self) -> None:
        self._sock.close()


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port where every connection is refused, and that no one can bind, till the block ends."""
    held = HeldPort(reuse_addr=False)
    try:
        yield held.port
    finally:
        held.close()


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port for the servers this block starts on it (SO_REUSEADDR), refused while none listens."""
    held = HeldPort(reuse_addr=True)
    try:
        yield held.port
    finally:
        held.close()

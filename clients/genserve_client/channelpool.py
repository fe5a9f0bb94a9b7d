"""Channels no older than a period, for the streams of a long bulk job.

gRPC resolves a DNS target (`dns:///genserve-headless:50051`) when a channel starts and again only
when a connection breaks, so replicas added while a job runs (an autoscaler reacting to the job's
own load) would never get any of its streams. A job opens each stream on a channel at most
`period_s` old: a new channel resolves the target again and round_robin spreads its streams over
every replica it finds. A replaced channel is closed once its last stream has ended (closing a
channel cancels its calls); the caller's own client is never closed here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from genserve_client.client import GenserveClient

DEFAULT_PERIOD_S = 60.0


class FreshChannels:
    """Hands out a client whose channel is at most `period_s` old (0: always the caller's own), or
    the current one where a new channel's target does not resolve at that moment."""

    def __init__(
        self,
        client: GenserveClient,
        period_s: float = DEFAULT_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._own = client
        self._current = client
        self._period_s = period_s
        self._clock = clock
        self._born = clock()
        self._users: dict[GenserveClient, int] = {client: 0}
        self._lock = threading.Lock()
        self.opened = 0  # channels opened here (for the tests and the curious)

    def acquire(self) -> GenserveClient:
        """The client to open the next stream on; give it back with release() when the stream ended."""
        with self._lock:
            if self._period_s > 0 and self._clock() - self._born >= self._period_s:
                old = self._current
                own = self._own
                try:
                    fresh = GenserveClient(own.config, timeout_s=own.timeout_s, retry=own.retry, rng=own._rng)
                except ValueError:
                    # An address list's host name that does not resolve now (a DNS hiccup): the
                    # stream goes on the current channel, and the next one tries again.
                    self._users[self._current] += 1
                    return self._current
                self._current = fresh
                self._users[self._current] = 0
                self._born = self._clock()
                self.opened += 1
                self._close_if_unused(old)
            self._users[self._current] += 1
            return self._current

    def release(self, client: GenserveClient) -> None:
        with self._lock:
            self._users[client] -= 1
            self._close_if_unused(client)

    def close(self) -> None:
        """Close every channel opened here (the job is over)."""
        with self._lock:
            for client in list(self._users):
                if client is not self._own:
                    client.close()
            self._users = {self._own: 0}
            self._current = self._own

    def _close_if_unused(self, client: GenserveClient) -> None:
        if client is not self._current and client is not self._own and self._users.get(client) == 0:
            client.close()
            del self._users[client]

"""The decisions around a call's attempts, shared by the sync and asyncio clients (sans I/O).

`Attempts` holds one call's request id, metadata and deadline, maps each failed attempt's
RpcError to GenserveClientError and asks the RetryPolicy whether and how long to wait;
`StreamResume` also tracks where a SampleStream job has got to. The clients only perform the
calls and the waits, so the retry, deadline and error rules cannot drift apart between them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any, TypeVar

import grpc

from genserve.v1 import genserve_pb2
from genserve_client.calls import StreamCall, UnaryCall
from genserve_client.channel import ChannelConfig, new_request_id
from genserve_client.errors import GenserveClientError, from_rpc_error, request_id_from
from genserve_client.results import SampleResult
from genserve_client.retry import RetryPolicy

Out = TypeVar("Out")

Metadata = Iterable[tuple[str, str | bytes]] | None


# gRPC Python sends a call with the deadline time.time() + timeout in int64 nanoseconds since 1970:
# a timeout past about 7e9 s wrapped it, and the call failed DEADLINE_EXCEEDED at once, unsent.
# A timeout is given to gRPC as at most this (~31 years), which no call outlives.
MAX_GRPC_TIMEOUT_S = 1e9


def grpc_timeout(timeout_s: float | None) -> float | None:
    """`timeout_s` as gRPC can take it: at most MAX_GRPC_TIMEOUT_S (None: no deadline)."""
    return None if timeout_s is None else min(timeout_s, MAX_GRPC_TIMEOUT_S)


def remaining_s(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Attempts:
    """One call's attempts: all carry the same request id; the deadline (None: none) bounds them all."""

    def __init__(
        self, config: ChannelConfig, retry: RetryPolicy, rng: random.Random, timeout_s: float | None
    ) -> None:
        self.request_id = new_request_id()
        self.metadata = config.metadata(self.request_id)
        self._retry = retry
        self._rng = rng
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._failures = 0  # since the start, or since the last progress of a stream
        self._reconnect_left_s = retry.reconnect_wait_s  # likewise
        self._last_error: GenserveClientError | None = None

    def timeout_s(self) -> float | None:
        """What is left of the deadline, for the next attempt (as gRPC can take it)."""
        return grpc_timeout(remaining_s(self._deadline))

    def wait_s(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt after `exc`; raises the GenserveClientError
        (with the server's request id when it sent one) when the failure is final."""
        self._failures += 1
        error = from_rpc_error(exc, self.request_id)
        delay = self._retry.delay_s(
            error.code, self._failures, self.timeout_s(), self._rng, details=error.details
        )
        if delay is None:
            raise error from None
        self._last_error = error
        return delay

    def reconnect_wait_s(self) -> float:
        """How long the next attempt may first wait for a channel without a connection to connect
        again: after UNAVAILABLE, what the call has left of RetryPolicy.reconnect_wait_s, within
        its deadline; 0 after any other failure."""
        if self._last_error is None or self._last_error.code != grpc.StatusCode.UNAVAILABLE:
            return 0.0
        left = self.timeout_s()
        return self._reconnect_left_s if left is None else min(self._reconnect_left_s, left)

    def reconnect_waited(self, waited_s: float, ran_out: bool) -> None:
        """Count a wait for the channel; when it ran out without a connection and the deadline has
        passed, raise the last failure (the connection's UNAVAILABLE) rather than try an attempt
        with no time left."""
        self._reconnect_left_s = max(0.0, self._reconnect_left_s - waited_s)
        if ran_out and self.timeout_s() == 0.0 and self._last_error is not None:
            raise self._last_error from None

    def progressed(self) -> None:
        """Progress resets the retry budget (a long stream may break more than max_attempts times)."""
        self._failures = 0
        self._reconnect_left_s = self._retry.reconnect_wait_s

    def result(self, call: UnaryCall[Out], response: Any, trailing: Metadata) -> Out:
        # The request id the server echoes wins over the one we sent.
        return call.parse(response, request_id_from(trailing) or self.request_id)


class StreamResume:
    """Where a SampleStream job stands: each reopened stream starts at the index after the last
    image handed out, so a consumer sees each index exactly once, and asks for the model version the
    first images came from: a stream for the default version (none given) would otherwise get the
    server's default at the time it reopens, after a reload or a restart another version, whose
    images the same iteration would mix with the first ones. Where that version is no longer served,
    the reopened stream fails (NOT_FOUND) instead."""

    def __init__(self, call: StreamCall, attempts: Attempts) -> None:
        self.call = call
        self.attempts = attempts
        self.next_index = call.request.start_index
        self.version = call.request.sample.version  # "" until the first images say which one served

    def next_request(self) -> genserve_pb2.SampleStreamRequest | None:
        """The request for the next attempt, or None when every index has been handed out."""
        if self.next_index >= self.call.request.sample.count:
            return None
        request = genserve_pb2.SampleStreamRequest()
        request.CopyFrom(self.call.request)
        request.start_index = self.next_index
        request.sample.version = self.version
        return request

    def chunk(self, chunk: genserve_pb2.SampleStreamChunk) -> SampleResult:
        result = SampleResult.from_proto(chunk, self.attempts.request_id)
        if result.items:
            self.version = self.version or result.provenance.version
            self.next_index = result.items[-1].index + 1
            self.attempts.progressed()
        return result

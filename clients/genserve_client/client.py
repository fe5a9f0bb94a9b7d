"""Synchronous client: one typed method per genserve.v1 RPC, with deadlines and retries.

The methods are the call plans of calls.py bound to this client's blocking transport; what to send,
how to read the answer and when to retry are shared with the asyncio client (calls.py, attempts.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_client import calls
from genserve_client.attempts import Attempts, StreamResume, grpc_timeout
from genserve_client.binding import ClientBase
from genserve_client.channel import RECONNECTING
from genserve_client.errors import GenserveClientError, closed_client_error, from_rpc_error
from genserve_client.results import CodesProgress, CodesResult, SampleResult

Out = TypeVar("Out")

# How often a SampleStream in a retry backoff looks whether its client was closed (its own cancel()
# wakes it at once).
_WAKE_S = 0.05


class GenserveClient(ClientBase):
    """Blocking genserve client. Thread-safe: one channel, shared by all threads.

    `timeout_s` (per call, default the client's) is the whole call's deadline, retries included.
    Failures raise GenserveClientError once the RetryPolicy gives up.
    """

    def _connect(self) -> None:
        self._closed = False
        # Set by close(): a call waiting out a retry backoff wakes at once, not when the wait ends.
        self._closing = threading.Event()
        self._channel = self.config.sync_channel()
        self._stub = genserve_pb2_grpc.GenerationServiceStub(self._channel)

    def close(self) -> None:
        self._closed = True
        self._closing.set()
        self._channel.close()

    def _closed_channel(self, request_id: str | None, began_open: bool) -> GenserveClientError | None:
        """The error for an attempt refused by a closed channel (grpc's ValueError) of a call that
        began on an open client: it was closed under the call (while it waited to retry); None
        otherwise (a call on a client already closed keeps grpc's ValueError)."""
        return closed_client_error(request_id) if self._closed and began_open else None

    def _reconnect(self, attempts: Attempts, stopped: Callable[[], bool]) -> None:
        """Before a retry: while the channel is (re)connecting (its server went away), wait until it
        is connected, at most what the call has left of RetryPolicy.reconnect_wait_s (returns at
        once on a connected or idle channel; `stopped()` or close() ends the wait)."""
        budget_s = attempts.reconnect_wait_s()
        if budget_s <= 0 or self._closed or stopped():
            return
        settled = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state not in RECONNECTING:
                settled.set()

        began = time.monotonic()
        # Without try_to_connect: grpc's polling thread then ends once unsubscribed, and never
        # touches a channel closed after (the failed attempt has already started a connection).
        self._channel.subscribe(watch)  # tells the current state at once
        try:
            while not (self._closed or stopped()) and (left := began + budget_s - time.monotonic()) > 0:
                if settled.wait(min(left, _WAKE_S)):
                    break
        finally:
            self._channel.unsubscribe(watch)
        ran_out = not (settled.is_set() or self._closed or stopped())
        attempts.reconnect_waited(time.monotonic() - began, ran_out)

    def __enter__(self) -> GenserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, call: calls.UnaryCall[Out]) -> Out:
        self._check_process()
        rpc: grpc.UnaryUnaryMultiCallable[Any, Any] = getattr(self._stub, call.rpc)
        attempts = self._attempts(call.timeout_s)
        began_open = not self._closed
        while True:
            try:
                response, done = rpc.with_call(
                    call.request, timeout=attempts.timeout_s(), metadata=attempts.metadata
                )
            except grpc.RpcError as exc:
                self._closing.wait(attempts.wait_s(exc))  # the next attempt meets a closed channel
                self._reconnect(attempts, self._closing.is_set)
                continue
            except ValueError:  # "Cannot invoke RPC on closed channel!"
                if (closed := self._closed_channel(attempts.request_id, began_open)) is None:
                    raise
                raise closed from None
            return attempts.result(call, response, done.trailing_metadata())

    def _progress(self, plan: Callable[[], calls.ProgressCall]) -> Iterator[CodesProgress | CodesResult]:
        self._check_process()
        # Checked and begun now, as _stream's: not at the first iteration (a client closed before
        # it was closed under the call).
        return self._progress_chunks(plan(), began_open=not self._closed)

    def _progress_chunks(
        self, call: calls.ProgressCall, *, began_open: bool
    ) -> Iterator[CodesProgress | CodesResult]:
        """Retried as a unary call until its first message (a refusal at admission began nothing);
        a failure after it raises: a new attempt would sample over what was delivered."""
        attempts = self._attempts(call.timeout_s)
        while True:
            try:
                stream = self._stub.SampleCodesStream(
                    call.request, timeout=attempts.timeout_s(), metadata=attempts.metadata
                )
            except ValueError:  # "Cannot invoke RPC on closed channel!"
                if (closed := self._closed_channel(attempts.request_id, began_open)) is None:
                    raise
                raise closed from None
            delivered = False
            try:
                for chunk in stream:
                    delivered = True
                    yield calls.progress_item(chunk, attempts.request_id, call.request)
                return
            except grpc.RpcError as exc:
                if delivered:
                    raise from_rpc_error(exc, attempts.request_id) from None
                delay_s = attempts.wait_s(exc)  # raises when the failure is final
            finally:
                stream.cancel()  # the iterator is also the call
            self._closing.wait(delay_s)  # the next attempt meets a closed channel
            self._reconnect(attempts, self._closing.is_set)

    def _stream(self, plan: Callable[[], calls.StreamCall]) -> SampleStream:
        self._check_process()
        call = plan()  # checked now: a bad range fails at the call, not at the first iteration
        return SampleStream(self, call.request, call.timeout_s)


class SampleStream:
    """Iterable over SampleStream chunks. On UNAVAILABLE / RESOURCE_EXHAUSTED it reopens the stream
    at the index after the last image it yielded, so a consumer sees each index exactly once.
    `cancel()` (from any thread) ends the iteration quietly."""

    def __init__(
        self, client: GenserveClient, request: genserve_pb2.SampleStreamRequest, timeout_s: float | None
    ):
        self._client = client
        self._resume = StreamResume(calls.StreamCall(request, timeout_s), client._stream_attempts())
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._cancelled = False
        self._cancel_event = threading.Event()  # wakes a retry backoff
        self._began_open = not client._closed
        self.request_id = self._resume.attempts.request_id

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            self._cancel_event.set()
            if self._call is not None:
                self._call.cancel()

    def _backoff(self, delay_s: float) -> None:
        """Wait before the next attempt; cancel() or the client's close() ends the wait at once."""
        end = time.monotonic() + delay_s
        while not self._cancelled and not self._client._closed and (left := end - time.monotonic()) > 0:
            self._cancel_event.wait(min(left, _WAKE_S))

    def _open(
        self, request: genserve_pb2.SampleStreamRequest
    ) -> Iterator[genserve_pb2.SampleStreamChunk] | None:
        self._client._check_process()  # a stream made before a fork, iterated after it
        with self._lock:
            if self._cancelled:
                return None
            try:
                call: Iterator[genserve_pb2.SampleStreamChunk] = self._client._stub.SampleStream(
                    request,
                    timeout=grpc_timeout(self._resume.call.timeout_s),
                    metadata=self._resume.attempts.metadata,
                )
            except ValueError:  # "Cannot invoke RPC: Channel closed!" (closed while waiting to retry)
                if (closed := self._client._closed_channel(self.request_id, self._began_open)) is None:
                    raise
                raise closed from None
            self._call = call  # type: ignore[assignment]  # the iterator is also the call: cancel() reaches the server
        return call

    def __iter__(self) -> Iterator[SampleResult]:
        try:
            while (request := self._resume.next_request()) is not None:
                stream = self._open(request)
                if stream is None:
                    return
                try:
                    yield from map(self._resume.chunk, stream)
                    return
                except grpc.RpcError as exc:
                    if self._cancelled:
                        return
                    self._backoff(self._resume.attempts.wait_s(exc))
                    self._client._reconnect(self._resume.attempts, lambda: self._cancelled)
        finally:
            # A consumer that stops early (break, an exception, close()) must not leave the server
            # computing the rest of the job until the call is garbage-collected; a no-op on a
            # call that already ended.
            with self._lock:
                if self._call is not None:
                    self._call.cancel()


__all__ = ["GenserveClient", "GenserveClientError", "SampleStream"]

"""asyncio client (grpc.aio): the same typed methods as GenserveClient, awaitable.

The methods are the call plans of calls.py bound to this client's grpc.aio transport; what to send,
how to read the answer and when to retry are shared with the sync client (calls.py, attempts.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar, cast

import grpc

from genserve.v1 import genserve_pb2_grpc
from genserve_client import calls
from genserve_client.attempts import Attempts, StreamResume, grpc_timeout
from genserve_client.binding import ClientBase
from genserve_client.channel import RECONNECTING
from genserve_client.errors import GenserveClientError, closed_client_error, from_rpc_error
from genserve_client.results import CodesProgress, CodesResult, SampleResult

Out = TypeVar("Out")


def _closed_under(request_id: str | None) -> GenserveClientError | None:
    """What a call whose await raised CancelledError should raise: None when the caller's own task
    is being cancelled (the CancelledError must go on), else the error the sync client raises for a
    call whose client was closed under it (grpc.aio cancels the calls of a closing channel and
    raises CancelledError in tasks nobody cancelled)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return None
    return closed_client_error(request_id)


def _raise_if_cancelling() -> None:
    """Raise the caller's cancel where grpc.aio swallowed it: a unary call's task catches the
    CancelledError of a call whose status arrived as the cancel came, and its caller gets that
    status (an AioRpcError) with the cancel left only in Task.cancelling(); retried, a cancelled
    call went on calling and waiting until its attempts ran out."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _without_call(exc: BaseException) -> BaseException:
    """`exc` with no way back to the grpc.aio call that failed: without its traceback (the frames
    of the attempt hold the call and its channel's multicallable) and its context (the AioRpcError
    it was made from, whose traceback does too). A grpc.aio channel keeps its connection open after
    close() (to a server that is down: reconnecting every backoff) while any of them lives, so an
    error kept by its caller, or freed only by the cycle collector, held the closed client's
    connection."""
    exc.__context__ = None
    return exc.with_traceback(None)


class _ClosedChannel:
    """What a closed client keeps in place of its grpc.aio channel (which, referenced, keeps its
    connection open after close()): its RPCs refuse as grpc.aio does on a closed channel."""

    @staticmethod
    def _refuse(*args: object, **kwargs: object) -> Any:
        raise grpc.aio.UsageError("Channel is closed.")

    def unary_unary(self, *args: object, **kwargs: object) -> Callable[..., Any]:
        return self._refuse

    unary_stream = unary_unary

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.SHUTDOWN

    async def close(self, grace: float | None = None) -> None:
        return None


class AsyncGenserveClient(ClientBase):
    """Non-blocking genserve client on one grpc.aio channel. Create and use it inside one event loop
    (a call from another loop is a RuntimeError saying so); close it with `await client.close()` or
    `async with`."""

    def _connect(self) -> None:
        self._closed = False
        # Set by close(): a call waiting out a retry backoff wakes at once, not when the wait ends.
        self._closing = asyncio.Event()
        try:
            self._channel = self.config.aio_channel()
        except RuntimeError as e:
            if "no current event loop" not in str(e):
                raise
            # grpc.aio binds the channel to the thread's current loop, and this thread has none (a
            # worker thread, the main thread after an asyncio.run).
            raise RuntimeError(
                "AsyncGenserveClient: created where no event loop is running or current "
                f"({e}); a grpc.aio channel serves the loop it was created in: create the client "
                "inside the loop that uses it (in an async function, or `async with "
                "AsyncGenserveClient(...)` per asyncio.run), or use GenserveClient outside asyncio"
            ) from None
        self._stub = genserve_pb2_grpc.GenerationServiceStub(self._channel)
        # The loop the channel is bound to: the running one, else the thread's current one.
        self._loop: asyncio.AbstractEventLoop | None = getattr(self._channel, "_loop", None)

    def _check_loop(self) -> None:
        """A RuntimeError naming the client and the fix when a call runs in a loop other than the
        channel's (asyncio said 'Event loop is closed' or 'Future attached to a different loop')."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            state = "closed" if self._loop.is_closed() else "another, still open"
            raise RuntimeError(
                "AsyncGenserveClient: this call runs in another event loop than the one the client "
                f"was created in ({state}); a grpc.aio channel serves one loop: create the client "
                "inside the loop that uses it (in an async function, or `async with "
                "AsyncGenserveClient(...)` per asyncio.run)"
            )

    async def close(self) -> None:
        self._closed = True
        self._closing.set()
        channel: Any = self._channel
        # Closed, the grpc.aio channel is let go: a reference to it (this client's, kept by its
        # caller after `async with`) kept its connection open; later calls meet grpc's UsageError.
        self._channel = cast(grpc.aio.Channel, _ClosedChannel())
        self._stub = genserve_pb2_grpc.GenerationServiceStub(self._channel)
        await channel.close()

    async def _backoff(self, delay_s: float) -> None:
        """Wait before the next attempt (which then meets the closed channel if close() ended the
        wait); the caller's own cancellation still propagates."""
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({closing}, timeout=delay_s)
        finally:
            closing.cancel()

    async def _reconnect(self, attempts: Attempts) -> None:
        """Before a retry: while the channel is (re)connecting (its server went away), wait until it
        is connected, at most what the call has left of RetryPolicy.reconnect_wait_s (returns at
        once on a connected or idle channel; close() ends the wait)."""
        budget_s = attempts.reconnect_wait_s()
        if budget_s <= 0 or self._closed or self._channel.get_state() not in RECONNECTING:
            return
        began = time.monotonic()
        settled = asyncio.ensure_future(self._settled())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({settled, closing}, timeout=budget_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settled.cancel()
            closing.cancel()
        done = settled.done() and not settled.cancelled() and settled.exception() is None
        attempts.reconnect_waited(time.monotonic() - began, not (done or self._closed))

    async def _settled(self) -> None:
        channel = self._channel
        state = channel.get_state()
        while state in RECONNECTING:
            await channel.wait_for_state_change(state)
            state = channel.get_state()

    def _closed_channel(self, request_id: str | None, began_open: bool) -> GenserveClientError | None:
        """The error for an attempt refused by a closed channel (grpc.aio.UsageError) of a call
        that began on an open client: it was closed under the call (while it waited to retry); None
        otherwise (a call on a client already closed keeps grpc's UsageError)."""
        return closed_client_error(request_id) if self._closed and began_open else None

    async def __aenter__(self) -> AsyncGenserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, call: calls.UnaryCall[Out]) -> Out:
        try:
            return await self._unary_attempts(call)
        except (GenserveClientError, asyncio.CancelledError) as exc:
            raise _without_call(exc) from None

    async def _unary_attempts(self, call: calls.UnaryCall[Out]) -> Out:
        self._check_process()
        self._check_loop()
        rpc: grpc.aio.UnaryUnaryMultiCallable[Any, Any] = getattr(self._stub, call.rpc)
        attempts = self._attempts(call.timeout_s)
        began_open = not self._closed
        while True:
            try:
                pending = rpc(call.request, timeout=attempts.timeout_s(), metadata=attempts.metadata)
            except grpc.aio.UsageError:
                if (closed := self._closed_channel(attempts.request_id, began_open)) is None:
                    raise
                raise closed from None
            try:
                response = await pending
                trailing = await pending.trailing_metadata()
            except grpc.aio.AioRpcError as exc:
                _raise_if_cancelling()
                await self._backoff(attempts.wait_s(exc))
                await self._reconnect(attempts)
                continue
            except asyncio.CancelledError:
                if (closed := _closed_under(attempts.request_id)) is None:
                    raise
                raise closed from None
            return attempts.result(call, response, trailing)

    async def _progress(
        self, plan: Callable[[], calls.ProgressCall]
    ) -> AsyncGenerator[CodesProgress | CodesResult, None]:
        self._check_process()
        self._check_loop()
        call = plan()
        attempts = self._attempts(call.timeout_s)
        began_open = not self._closed
        while True:  # retried until its first message only, as GenserveClient's
            try:
                stream = self._stub.SampleCodesStream(
                    call.request, timeout=attempts.timeout_s(), metadata=attempts.metadata
                )
            except grpc.aio.UsageError:
                if (closed := self._closed_channel(attempts.request_id, began_open)) is None:
                    raise
                raise closed from None
            delivered = False
            try:
                async for chunk in stream:
                    delivered = True
                    yield calls.progress_item(chunk, attempts.request_id, call.request)
                return
            except grpc.aio.AioRpcError as exc:
                _without_call(exc)  # the context of what is raised here
                if delivered:
                    raise from_rpc_error(exc, attempts.request_id) from None
                delay_s = attempts.wait_s(exc)  # raises when the failure is final
            except asyncio.CancelledError as exc:
                _without_call(exc)
                if (closed := _closed_under(attempts.request_id)) is None:
                    raise
                raise closed from None
            finally:
                stream.cancel()
                del stream  # this frame is in the traceback of what it raises (_without_call)
            await self._backoff(delay_s)
            await self._reconnect(attempts)

    async def _stream(self, plan: Callable[[], calls.StreamCall]) -> AsyncGenerator[SampleResult, None]:
        self._check_process()
        self._check_loop()
        resume = StreamResume(plan(), self._stream_attempts())
        began_open = not self._closed
        while (request := resume.next_request()) is not None:
            try:
                stream = self._stub.SampleStream(
                    request, timeout=grpc_timeout(resume.call.timeout_s), metadata=resume.attempts.metadata
                )
            except grpc.aio.UsageError:
                if (closed := self._closed_channel(resume.attempts.request_id, began_open)) is None:
                    raise
                raise closed from None
            try:
                async for chunk in stream:
                    yield resume.chunk(chunk)
                return
            except grpc.aio.AioRpcError as exc:
                _without_call(exc)  # the context of what is raised here
                await self._backoff(resume.attempts.wait_s(exc))
                await self._reconnect(resume.attempts)
            except asyncio.CancelledError as exc:
                _without_call(exc)
                if (closed := _closed_under(resume.attempts.request_id)) is None:
                    raise
                raise closed from None
            finally:
                stream.cancel()  # no-op when finished; stops the server when the consumer breaks out
                del stream  # this frame is in the traceback of what it raises (_without_call)

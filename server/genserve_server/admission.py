"""Admission per class of RPC, in front of every servicer (docs/operations.md, "Admission").

grpc's own `maximum_concurrent_rpcs` counts every call from its headers on, whatever the method:
1,030 streams that sent headers and never a request (or 1,030 health `Watch` streams) took every
slot, and the health check itself answered RESOURCE_EXHAUSTED. Here instead:

- A call's request must arrive within `request_timeout_s` of its headers, or the call ends with
  DEADLINE_EXCEEDED: a stream that never sends its request holds nothing for long. (Each
  unary-request handler is registered as a stream-request one, so this code runs at the headers and
  reads the one request itself; on the wire the two are the same.)
- A call counts against its class's limit only once its request has arrived, so streams without a
  request block no client. The classes, each with its own limit, none shared:
  generation (Sample, Decode, ..., KServe ModelInfer: `max_concurrent_rpcs`), bulk streams
  (SampleStream, SampleCodesStream: `max_concurrent_sample_streams`), control (ListModels,
  GetModel, KServe metadata, reflection: `max_concurrent_control_rpcs`) and health Watch
  (`max_health_watchers`). Health Check counts in no class: it always answers. Beyond a limit a
  call is answered RESOURCE_EXHAUSTED at once, naming the limit.
- A call that aborts keeps its exception in grpc's call state, whose traceback holds the handler
  frames and so the request: a reference cycle that only the garbage collector frees (a 63 MiB
  request cost ~1 GB until then). The abort's traceback and context are dropped on the way out,
  so the request is freed when the call ends.
- A stream whose client stops reading ends after `stream_write_timeout_s`, its status queued behind
  the unread message. When that client cancels or disconnects instead of reading on, the status
  cannot be sent, and grpc logs the failed send ('ExecuteBatchError raised in core') at ERROR with a
  traceback unless it has already handled the client leaving: the usual end of such a call, not a
  server fault. Those records are dropped, for the calls the server ended that way only. So are
  those of a unary call whose handler has returned its response: gRPC sends it after the handler,
  and a client that cancels or disconnects while a response larger than its flow-control window
  waits there (or that refuses it: grpc's client takes 4 MiB by default) fails that send alike.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import grpc

from genserve_server.boundary import ENDED_UNREAD, REQUEST_ID_KEY, ThrottledLog, abort, request_id
from genserve_server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

# A string: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

HEALTH_SERVICE = "/grpc.health.v1.Health/"
HEALTH_CHECK = HEALTH_SERVICE + "Check"
HEALTH_WATCH = HEALTH_SERVICE + "Watch"
# Bulk server streams: they share max_concurrent_sample_streams.
BULK_STREAMS = (
    "/genserve.v1.GenerationService/SampleStream",
    "/genserve.v1.GenerationService/SampleCodesStream",
)
GENERATION_CONTROL = ("/genserve.v1.GenerationService/ListModels", "/genserve.v1.GenerationService/GetModel")

FAILED_SEND_LOG = "ExecuteBatchError raised in core"


# Set in a unary call's task once its handler has returned the response that gRPC then sends.
_RESPONSE_RETURNED: ContextVar[bool] = ContextVar("genserve_response_returned", default=False)


class _UnreadStreamEnds(logging.Filter):
    """Drops grpc's ERROR for the failed send of a stream the server ended unread, or of a unary
    call's returned response (the client went away instead of reading it); every other record of
    grpc's logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        client_gone = ENDED_UNREAD.get() or _RESPONSE_RETURNED.get()
        return not (client_gone and record.getMessage().startswith(FAILED_SEND_LOG))


# grpc's aio server logs from its Cython module's logger, in the call's task.
logging.getLogger("grpc._cython.cygrpc").addFilter(_UnreadStreamEnds())


@dataclass(slots=True)
class RpcClass:
    """Calls of one class running at once (their request received); `limit` None: not counted."""

    name: str
    limit_name: str
    limit: int | None
    active: int = 0  # touched only on the event loop thread
    # Counts each refusal (genserve_requests_rejected_total{reason="concurrency"}).
    on_refused: Callable[[str], None] | None = None
    # A line per refusal let a client write the log at will (opening calls past the limit).
    refusals: ThrottledLog = field(default_factory=lambda: ThrottledLog(logger))

    def admit(self) -> bool:
        if self.limit is not None and self.active >= self.limit:
            return False
        self.active += 1
        return True

    def refusal(self, method: str, context: Context | None = None) -> ResourceExhausted:
        self.refusals.log(
            method,
            "request_id=%s refused %s: %d %s calls running (%s)",
            "-" if context is None else request_id(context),
            method,
            self.active,
            self.name,
            self.limit_name,
        )
        if self.on_refused is not None:
            self.on_refused(method)
        return ResourceExhausted(
            f"{self.active} {self.name} calls are running, {self.limit_name}={self.limit}; retry with backoff"
        )


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    generation: int
    sample_streams: int
    control: int
    health_watchers: int
    request_timeout_s: float
    stream_write_timeout_s: float = 60.0


class Admission:
    """Wraps each method handler once, at registration (limits.GuardedRegistrar): request timeout,
    per-class admission, prompt release of an aborted call's request."""

    def __init__(
        self,
        limits: AdmissionLimits,
        *,
        control_services: Collection[str] = (),
        control_methods: Collection[str] = GENERATION_CONTROL,
        generation_methods: Collection[str] = (),
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        for name, value in (
            ("generation", limits.generation),
            ("sample_streams", limits.sample_streams),
            ("control", limits.control),
            ("health_watchers", limits.health_watchers),
        ):
            if value < 1:
                raise ValueError(f"{name} limit must be >= 1, got {value}")
        if limits.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {limits.request_timeout_s}")
        self.request_timeout_s = limits.request_timeout_s
        self._timeouts = ThrottledLog(logger)  # header-only calls: as many as a client opens
        self._unread_ends = ThrottledLog(logger)  # unread streams: as many as a client opens
        self.stream_write_timeout_s = limits.stream_write_timeout_s
        self.generation = RpcClass("generation", "max_concurrent_rpcs", limits.generation)
        self.streams = RpcClass("bulk stream", "max_concurrent_sample_streams", limits.sample_streams)
        self.control = RpcClass("control", "max_concurrent_control_rpcs", limits.control)
        self.watchers = RpcClass("health Watch", "max_health_watchers", limits.health_watchers)
        self.health = RpcClass("health Check", "", None)
        for rpc_class in (self.generation, self.streams, self.control, self.watchers):
            rpc_class.on_refused = on_refused
        self._control_services = frozenset(control_services)
        self._control_methods = frozenset(control_methods)
        self._generation_methods = frozenset(generation_methods)

    def classify(self, method: str) -> RpcClass:
        """The class of a full method name (`/package.Service/Method`): `generation_methods`, then
        `control_methods` and every method of `control_services`; any other: generation."""
        if method == HEALTH_CHECK:
            return self.health
        if method == HEALTH_WATCH:
            return self.watchers
        if method.startswith(HEALTH_SERVICE):  # List, and whatever grpc.health.v1 adds: control calls
            return self.control
        if method in BULK_STREAMS:
            return self.streams
        if method in self._generation_methods:
            return self.generation
        service = method[1:].partition("/")[0]
        if method in self._control_methods or service in self._control_services:
            return self.control
        return self.generation

    def wrap(self, method: str, handler: Handler) -> Handler:
        rpc_class = self.classify(method)
        if handler.unary_unary is not None:
            return self._unary_unary(method, rpc_class, handler)
        if handler.unary_stream is not None:
            return self._unary_stream(method, rpc_class, handler)
        if handler.stream_stream is not None:
            return self._stream_stream(method, rpc_class, handler)
        return handler  # stream-unary: genserve registers none

    async def _write_all(self, responses: AsyncGenerator[Any, None], context: Context) -> None:
        await _write_all(responses, context, self.stream_write_timeout_s, self._unread_ends)

    async def _read(self, method: str, context: Context) -> Any:
        """The call's next request message (or grpc.aio.EOF), within request_timeout_s."""
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await context.read()
        except TimeoutError:
            self._timeouts.log(
                method,
                "request_id=%s cancelled %s: no request within request_timeout_s",
                request_id(context),
                method,
            )
            await abort(
                context,
                DeadlineExceeded(
                    f"no request message arrived within request_timeout_s={self.request_timeout_s:g} s"
                ),
            )

    async def _read_request(self, method: str, context: Context) -> Any:
        """The call's one request message."""
        request = await self._read(method, context)
        if request is grpc.aio.EOF:
            await abort(context, InvalidArgument(f"{method} needs one request message; the call sent none"))
        return request

    def _unary_unary(self, method: str, rpc_class: RpcClass, handler: Handler) -> Handler:
        inner = cast(Callable[[Any, Any], Any], handler.unary_unary)

        async def admitted(request_iterator: Any, context: Context) -> Any:
            request = await self._read_request(method, context)
            if not rpc_class.admit():
                del request  # not held by the refusal's traceback
                await abort(context, rpc_class.refusal(method, context))
            try:
                result = inner(request, context)
                del request  # the handler's frames hold it while they need it, no longer
                response = await result if inspect.isawaitable(result) else result
                _RESPONSE_RETURNED.set(True)  # gRPC sends it now: the client may go meanwhile
                return response
            except grpc.aio.AbortError as exc:
                raise _released(exc) from None
            finally:
                rpc_class.active -= 1

        return grpc.stream_unary_rpc_method_handler(
            admitted, handler.request_deserializer, handler.response_serializer
        )

    def _unary_stream(self, method: str, rpc_class: RpcClass, handler: Handler) -> Handler:
        inner = cast(Callable[[Any, Any], Any], handler.unary_stream)
        generator = inspect.isasyncgenfunction(inner)

        async def admitted(request_iterator: Any, context: Context) -> None:
            request = await self._read_request(method, context)
            if not rpc_class.admit():
                del request  # not held by the refusal's traceback
                await abort(context, rpc_class.refusal(method, context))
            try:
                result = inner(request, context)
                del request
                if generator:
                    await self._write_all(cast(AsyncGenerator[Any, None], result), context)
                else:  # a handler that writes with context.write() itself
                    await result
            except grpc.aio.AbortError as exc:
                raise _released(exc) from None
            finally:
                rpc_class.active -= 1

        return grpc.stream_stream_rpc_method_handler(
            admitted, handler.request_deserializer, handler.response_serializer
        )

    def _stream_stream(self, method: str, rpc_class: RpcClass, handler: Handler) -> Handler:
        """Reflection: every request message within request_timeout_s of the one before. The call
        holds a slot of its class only from a request's arrival until the handler has answered it
        (yielded its response, or asked for the next request), so a stream that sends headers only,
        idles between requests or never reads its answers (each would wait up to
        stream_write_timeout_s to be sent) blocks no ListModels or KServe metadata call."""
        inner = cast(Callable[[Any, Any], Any], handler.stream_stream)
        generator = inspect.isasyncgenfunction(inner)

        async def admitted(request_iterator: Any, context: Context) -> None:
            holding = False

            def answered() -> None:
                nonlocal holding
                if holding:
                    rpc_class.active -= 1
                    holding = False

            async def requests() -> AsyncGenerator[Any, None]:
                nonlocal holding
                try:
                    while True:
                        answered()
                        request = await self._read(method, context)
                        if request is grpc.aio.EOF:
                            return
                        if not rpc_class.admit():
                            await abort(context, rpc_class.refusal(method, context))
                        holding = True
                        yield request
                finally:
                    answered()

            messages = requests()
            try:
                result = inner(messages, context)
                if generator:
                    await _write_all(
                        cast(AsyncGenerator[Any, None], result),
                        context,
                        self.stream_write_timeout_s,
                        self._unread_ends,
                        on_item=answered,
                    )
                else:
                    await result
            except grpc.aio.AbortError as exc:
                raise _released(exc) from None
            finally:
                await messages.aclose()  # the slot of a request being answered when the call ended
                answered()

        return grpc.stream_stream_rpc_method_handler(
            admitted, handler.request_deserializer, handler.response_serializer
        )


async def _write_all(
    responses: AsyncGenerator[Any, None],
    context: Context,
    write_timeout_s: float,
    unread_ends: ThrottledLog,
    on_item: Callable[[], None] | None = None,
) -> None:
    """Each response written; the generator closed at once, also when the client cancels (its
    `finally` releases what it holds now, not when the garbage collector finalizes it). A message
    the client has not taken within `write_timeout_s` (it stopped reading: its flow-control window
    stays full) ends the stream, so that an unread stream cannot keep its slot, and is logged
    through `unread_ends` (a client opens as many as it likes). `on_item`: called with each response
    before it is written."""
    try:
        async for item in responses:
            if on_item is not None:
                on_item()
            try:
                async with asyncio.timeout(write_timeout_s):
                    await context.write(item)
            except TimeoutError:
                # Not context.abort(): its status would queue behind the stalled message and the
                # handler (holding its slot) would wait as long as the client. The handler returns
                # now, its slot is freed, and gRPC sends this status if the client ever reads on.
                unread_ends.log(
                    "unread",
                    "request_id=%s ended a stream whose client read nothing for %.3g s",
                    request_id(context),
                    write_timeout_s,
                )
                ENDED_UNREAD.set(True)  # its status may never be sent: the client may go instead
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id(context)),))
                context.set_details(
                    f"the client took no message for stream_write_timeout_s={write_timeout_s:g} s; "
                    "the stream ended to free its slot (resume it from the last index received)"
                )
                return
            except grpc.aio.InternalError:
                # gRPC's core ended the call (the client cancelled, or its deadline passed) while this
                # message waited to be sent, and failed the write before grpc's cancellation of this
                # handler ran: the call is over, nothing more can be sent. Let it end as a cancelled
                # handler does; raised on, grpc logged it at ERROR with a traceback.
                raise asyncio.CancelledError from None
    finally:
        await responses.aclose()


def _released(exc: grpc.aio.AbortError) -> grpc.aio.AbortError:
    """`exc` without the traceback and context that hold the aborted call's frames (and request).

    grpc keeps the AbortError in the call's state (`abort_exception`, which `_handle_exceptions`
    checks by identity), so the same object goes on; only its links to finished frames are cut.
    """
    exc.__context__ = None
    exc.__cause__ = None
    return exc.with_traceback(None)

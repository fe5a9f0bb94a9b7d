"""Guards applied to every method handler at registration (docs/operations.md, "Limits").

Most limits live where the data is: message sizes in grpc's channel options, images per request
and pixels per image in service.py/codecs.py (the pixel count is read from the image header before
any decoder runs), queue depth in each model's batcher, concurrent calls per class of RPC and the
request timeout in admission.py. `GuardedRegistrar` applies admission.py's wrapper and this
module's guard to each method handler once.

This module holds the guard against bytes that are not a protobuf of the method's request type:
grpc answers those INTERNAL ("Exception deserializing request!"), which blames the server for
the client's bytes; `MalformedRequestInterceptor` answers INVALID_ARGUMENT instead.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc

from genserve_server.boundary import ThrottledLog, abort, request_id
from genserve_server.errors import InvalidArgument

logger = logging.getLogger(__name__)

# A string: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request whose bytes did not parse; the wrapped handler answers INVALID_ARGUMENT."""

    method: str
    problem: str

    def message(self) -> str:
        return f"the request is not a valid protobuf message for {self.method}: {self.problem}"


def _lenient(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError (or its C++/upb variants): the client's bytes
            return Malformed(method, f"{type(exc).__name__}: {exc}"[:200])

    return parse


def _uncounted(method: str) -> None:
    return None


def guard_malformed(method: str, handler: Handler, on_reject: Callable[[str], None] = _uncounted) -> Handler:
    """Answers INVALID_ARGUMENT (not grpc's INTERNAL) for request bytes that do not parse.

    Wraps unary-request handlers (unary-unary and unary-stream) and stream-stream ones (reflection:
    each request message is checked as the handler reads it; grpc's deserializer raised inside the
    handler, which answered UNKNOWN and logged an ERROR traceback per call); stream-unary handlers
    (genserve registers none) are returned as they are. `on_reject(method)` counts each refusal
    (genserve_requests_rejected_total{reason="invalid"}: no handler, so no boundary, sees it).
    """
    deserialize = _lenient(method, handler.request_deserializer)
    serialize = handler.response_serializer
    Context = grpc.aio.ServicerContext[Any, Any]
    reject = _rejecter(method, on_reject)
    if handler.unary_unary is None and handler.unary_stream is None:
        return _guard_bidi(handler, deserialize, reject)

    if handler.unary_unary is not None:
        unary = cast(Callable[[Any, Any], Any], handler.unary_unary)

        if inspect.iscoroutinefunction(unary):

            async def guarded_unary(request: Any, context: Context) -> Any:
                if isinstance(request, Malformed):
                    await reject(request, context)
                return await unary(request, context)

        else:

            async def guarded_unary(request: Any, context: Context) -> Any:
                if isinstance(request, Malformed):
                    await reject(request, context)
                result = unary(request, context)
                return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(guarded_unary, deserialize, serialize)
    stream = cast(Callable[[Any, Any], Any], handler.unary_stream)
    if inspect.isasyncgenfunction(stream):

        async def guarded_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await reject(request, context)
            async for item in stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(guarded_stream, deserialize, serialize)

    async def guarded_writer(request: Any, context: Context) -> None:  # handlers that context.write()
        if isinstance(request, Malformed):
            await reject(request, context)
        await stream(request, context)

    return grpc.unary_stream_rpc_method_handler(guarded_writer, deserialize, serialize)


def _rejecter(method: str, on_reject: Callable[[str], None]) -> Callable[[Malformed, Any], Awaitable[None]]:
    refusals = ThrottledLog(logger)  # a line per call let a client write the log at will

    async def reject(request: Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        refusals.log(None, "request_id=%s refused %s: %s", request_id(context), method, request.problem)
        on_reject(method)
        await abort(context, InvalidArgument(request.message()))

    return reject


def _guard_bidi(
    handler: Handler,
    deserialize: Callable[[bytes], Any] | None,
    reject: Callable[[Malformed, Any], Awaitable[None]],
) -> Handler:
    """A stream-stream handler whose request messages are checked as its handler reads them; a
    stream-unary one (genserve registers none) as it is."""
    if handler.stream_stream is None:
        return handler
    bidi = cast(Callable[[Any, Any], Any], handler.stream_stream)
    serialize = handler.response_serializer

    async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await reject(request, context)
            yield request

    if inspect.isasyncgenfunction(bidi):

        async def guarded_bidi(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for item in bidi(checked(requests, context), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(guarded_bidi, deserialize, serialize)

    async def guarded_bidi_writer(requests: AsyncIterator[Any], context: Any) -> None:
        await bidi(checked(requests, context), context)

    return grpc.stream_stream_rpc_method_handler(guarded_bidi_writer, deserialize, serialize)


class GuardedRegistrar:
    """Stands in for the server in generated `add_*Servicer_to_server()`: wraps every method handler
    once, at registration, with `wrap(full_method_name, handler)`.

    The same guards as grpc.aio interceptors, without their per-call cost: an interceptor chain runs
    coroutines for every RPC (measured: ~0.09 ms of server CPU per tiny Sample request, 14 %).

    `hot(full_method_name, handler)`: whether a method is also registered with grpc as a registered
    method (its wrapped handler then lands in `registered`), for accept.Acceptor to accept several of
    its calls per loop turn. Every other method is served through the generic handlers alone.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        wrap: Callable[[str, Handler], Handler],
        hot: Callable[[str, Handler], bool] | None = None,
    ) -> None:
        self._server = server
        self._wrap = wrap
        self._hot = hot
        self.registered: dict[str, Handler] = {}

    def as_server(self) -> grpc.aio.Server:
        """This registrar typed as the server the generated functions expect (they call only the
        two methods below)."""
        return cast(grpc.aio.Server, self)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Handler]) -> None:
        """Only the hot methods: the generated code hands the same handlers to add_generic_rpc_handlers
        too, and grpc.aio's server waits on one pending call per registered method on every new call
        (an `asyncio.wait` over ~30 futures): with the generic handlers alone a trivial call cost
        2-27 % less server CPU (bench/profile.md, item 31)."""
        if self._hot is None:
            return
        hot = {}
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            if self._hot(method, handler):
                hot[name] = self.registered[method] = self._wrap(method, handler)
        if hot:
            self._server.add_registered_method_handlers(service_name, hot)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_WrappedGeneric(h, self._wrap) for h in generic_rpc_handlers])


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped once per method (then cached)."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Callable[[str, Handler], Handler]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._cache[method] = (handler, self._wrap(method, handler))
        return cached[1]

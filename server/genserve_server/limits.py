"""Admission limits enforced in front of the servicers (docs/operations.md, "Limits").

Most limits live where the data is: message sizes in grpc's channel options, images per request
and pixels per image in service.py/codecs.py (the pixel count is read from the image header before
any decoder runs), queue depth in each model's batcher, `maximum_concurrent_rpcs` in grpc itself.
This module holds the one that needs its own state: at most `max_concurrent_sample_streams`
SampleStream calls at once, so bulk jobs cannot take every RPC slot from interactive traffic.
Beyond the limit a new stream is answered RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, cast

import grpc

logger = logging.getLogger(__name__)

SAMPLE_STREAM_METHOD = "/genserve.v1.GenerationService/SampleStream"


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):
    """Caps the server-streaming calls of `methods` running at once (one counter for all of them)."""

    def __init__(self, limit: int, *, methods: Collection[str] = (SAMPLE_STREAM_METHOD,)) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0  # touched only on the event loop thread
        self._methods = frozenset(methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.unary_stream is None
            or handler_call_details.method not in self._methods
        ):
            return handler
        # grpc.aio runs async-generator handlers; the stubs type them as the sync API's iterators.
        inner = cast(Callable[[Any, Any], AsyncIterator[Any]], handler.unary_stream)
        method = handler_call_details.method

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if self.active >= self.limit:
                logger.info(
                    "refused %s: %d streams running (max_concurrent_sample_streams)", method, self.active
                )
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.active} streams are running, max_concurrent_sample_streams={self.limit}; "
                    "retry with backoff",
                )
            self.active += 1
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                self.active -= 1

        return grpc.unary_stream_rpc_method_handler(
            limited, handler.request_deserializer, handler.response_serializer
        )

"""asyncio client (grpc.aio): the same typed methods as GenserveClient, awaitable."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar, Unpack

import grpc
import numpy.typing as npt

from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_client import requests as rq
from genserve_client.channel import ChannelConfig, new_request_id
from genserve_client.client import DEFAULT_TIMEOUT_S, remaining_s
from genserve_client.convert import ImageInput
from genserve_client.errors import from_rpc_error, request_id_from
from genserve_client.results import EncodeResult, ImageResult, SampleResult
from genserve_client.retry import RetryPolicy

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Out = TypeVar("Out")


class AsyncGenserveClient:
    """Non-blocking genserve client on one grpc.aio channel. Create and use it inside one event loop;
    close it with `await client.close()` or `async with`."""

    def __init__(
        self,
        target: str | ChannelConfig = "127.0.0.1:50051",
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = target if isinstance(target, ChannelConfig) else ChannelConfig(target)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._channel = self.config.aio_channel()
        self._stub = genserve_pb2_grpc.GenerationServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGenserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout_s: float | None,
        parse: Callable[[Resp, str | None], Out],
    ) -> Out:
        request_id = new_request_id()
        metadata = self.config.metadata(request_id)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            call = rpc(request, timeout=remaining_s(deadline), metadata=metadata)
            try:
                response = await call
                trailing = await call.trailing_metadata()
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, request_id)
                delay = self.retry.delay_s(
                    error.code, attempt, remaining_s(deadline), self._rng, details=error.details
                )
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
                continue
            return parse(response, request_id_from(trailing) or request_id)

    # --- RPCs -------------------------------------------------------------------------------

    async def sample(
        self, model: str, n: int = 0, *, timeout_s: float | None = None, **opts: Unpack[rq.SampleOptions]
    ) -> SampleResult:
        req = rq.sample_request(model, n, **opts)
        return await self._unary(self._stub.Sample, req, timeout_s, SampleResult.from_proto)

    async def interpolate(
        self,
        model: str,
        start: rq.Latent,
        end: rq.Latent,
        steps: int,
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.InterpolateOptions],
    ) -> SampleResult:
        req = rq.interpolate_request(model, start, end, steps, **opts)
        return await self._unary(self._stub.Interpolate, req, timeout_s, SampleResult.from_proto)

    async def encode(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.EncodeOptions],
    ) -> EncodeResult:
        req = rq.encode_request(model, images, **opts)
        return await self._unary(self._stub.Encode, req, timeout_s, EncodeResult.from_proto)

    async def decode(
        self,
        model: str,
        latents: npt.ArrayLike,
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.DecodeOptions],
    ) -> SampleResult:
        req = rq.decode_request(model, latents, **opts)
        return await self._unary(self._stub.Decode, req, timeout_s, SampleResult.from_proto)

    async def super_resolve(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.ImageOptions],
    ) -> ImageResult:
        req = rq.image_request(model, images, **opts)
        return await self._unary(self._stub.SuperResolve, req, timeout_s, ImageResult.from_proto)

    async def translate(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.ImageOptions],
    ) -> ImageResult:
        req = rq.image_request(model, images, **opts)
        return await self._unary(self._stub.Translate, req, timeout_s, ImageResult.from_proto)

    async def list_models(self, *, timeout_s: float | None = None) -> list[genserve_pb2.ModelInfo]:
        return await self._unary(
            self._stub.ListModels, genserve_pb2.ListModelsRequest(), timeout_s, lambda r, _: list(r.models)
        )

    async def get_model(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> genserve_pb2.ModelInfo:
        req = genserve_pb2.GetModelRequest(name=name, version=version)
        return await self._unary(self._stub.GetModel, req, timeout_s, lambda r, _: r)

    async def sample_stream(
        self, model: str, count: int, *, timeout_s: float | None = None, **opts: Unpack[rq.StreamOptions]
    ) -> AsyncIterator[SampleResult]:
        """Images [start_index, count) chunk by chunk; on a transient error the stream reopens at
        the index after the last image yielded (each index is yielded exactly once)."""
        request = rq.sample_stream_request(model, count, **opts)
        request_id = new_request_id()
        metadata = self.config.metadata(request_id)
        attempt = 0
        while request.start_index < count:
            call = self._stub.SampleStream(request, timeout=timeout_s, metadata=metadata)
            try:
                async for chunk in call:
                    result = SampleResult.from_proto(chunk, request_id)
                    if result.items:
                        request.start_index = result.items[-1].index + 1
                        attempt = 0
                    yield result
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, request_id)
                attempt += 1
                delay = self.retry.delay_s(error.code, attempt, None, self._rng, details=error.details)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()  # no-op when finished; stops the server when the consumer breaks out

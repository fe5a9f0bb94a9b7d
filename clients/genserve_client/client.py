"""Synchronous client: one typed method per genserve.v1 RPC, with deadlines and retries."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, Unpack

import grpc
import numpy.typing as npt

from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_client import requests as rq
from genserve_client.channel import ChannelConfig, new_request_id
from genserve_client.convert import ImageInput
from genserve_client.errors import GenserveClientError, from_rpc_error, request_id_from
from genserve_client.results import EncodeResult, ImageResult, SampleResult
from genserve_client.retry import RetryPolicy

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Out = TypeVar("Out")

DEFAULT_TIMEOUT_S = 60.0


def remaining_s(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class GenserveClient:
    """Blocking genserve client. Thread-safe: one channel, shared by all threads.

    `timeout_s` (per call, default the client's) is the whole call's deadline, retries included.
    Failures raise GenserveClientError once the RetryPolicy gives up.
    """

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
        self._channel = self.config.sync_channel()
        self._stub = genserve_pb2_grpc.GenerationServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GenserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return None if timeout is None else time.monotonic() + timeout

    def _unary(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout_s: float | None,
        parse: Callable[[Resp, str | None], Out],
    ) -> Out:
        request_id = new_request_id()
        metadata = self.config.metadata(request_id)
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                response, call = rpc.with_call(request, timeout=remaining_s(deadline), metadata=metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, request_id)
                delay = self.retry.delay_s(
                    error.code, attempt, remaining_s(deadline), self._rng, details=error.details
                )
                if delay is None:
                    raise error from None
                time.sleep(delay)
                continue
            return parse(response, request_id_from(call.trailing_metadata()) or request_id)

    # --- RPCs -------------------------------------------------------------------------------

    def sample(
        self, model: str, n: int = 0, *, timeout_s: float | None = None, **opts: Unpack[rq.SampleOptions]
    ) -> SampleResult:
        """Draw `n` images (or one per seed / latent row). See genserve.proto SampleRequest."""
        return self._unary(
            self._stub.Sample, rq.sample_request(model, n, **opts), timeout_s, SampleResult.from_proto
        )

    def interpolate(
        self,
        model: str,
        start: rq.Latent,
        end: rq.Latent,
        steps: int,
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.InterpolateOptions],
    ) -> SampleResult:
        """A path of `steps` images between two seeds (ints) or two latents (float32 [Z])."""
        req = rq.interpolate_request(model, start, end, steps, **opts)
        return self._unary(self._stub.Interpolate, req, timeout_s, SampleResult.from_proto)

    def encode(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.EncodeOptions],
    ) -> EncodeResult:
        req = rq.encode_request(model, images, **opts)
        return self._unary(self._stub.Encode, req, timeout_s, EncodeResult.from_proto)

    def decode(
        self,
        model: str,
        latents: npt.ArrayLike,
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.DecodeOptions],
    ) -> SampleResult:
        req = rq.decode_request(model, latents, **opts)
        return self._unary(self._stub.Decode, req, timeout_s, SampleResult.from_proto)

    def super_resolve(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.ImageOptions],
    ) -> ImageResult:
        req = rq.image_request(model, images, **opts)
        return self._unary(self._stub.SuperResolve, req, timeout_s, ImageResult.from_proto)

    def translate(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        timeout_s: float | None = None,
        **opts: Unpack[rq.ImageOptions],
    ) -> ImageResult:
        req = rq.image_request(model, images, **opts)
        return self._unary(self._stub.Translate, req, timeout_s, ImageResult.from_proto)

    def list_models(self, *, timeout_s: float | None = None) -> list[genserve_pb2.ModelInfo]:
        return self._unary(
            self._stub.ListModels, genserve_pb2.ListModelsRequest(), timeout_s, lambda r, _: list(r.models)
        )

    def get_model(
        self, name: str, version: str = "", *, timeout_s: float | None = None
    ) -> genserve_pb2.ModelInfo:
        req = genserve_pb2.GetModelRequest(name=name, version=version)
        return self._unary(self._stub.GetModel, req, timeout_s, lambda r, _: r)

    def sample_stream(
        self, model: str, count: int, *, timeout_s: float | None = None, **opts: Unpack[rq.StreamOptions]
    ) -> SampleStream:
        """Images [start_index, count) of a bulk job, chunk by chunk, resumed after transient errors.

        `timeout_s` bounds each attempt of the stream; None (the default here, unlike unary
        calls) means no deadline, since a bulk job may run for hours.
        """
        return SampleStream(self, rq.sample_stream_request(model, count, **opts), timeout_s)


class SampleStream:
    """Iterable over SampleStream chunks. On UNAVAILABLE / RESOURCE_EXHAUSTED it reopens the stream
    at the index after the last image it yielded, so a consumer sees each index exactly once.
    `cancel()` (from any thread) ends the iteration quietly."""

    def __init__(
        self, client: GenserveClient, request: genserve_pb2.SampleStreamRequest, timeout_s: float | None
    ):
        self._client = client
        self._request = request
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._cancelled = False
        self.request_id = new_request_id()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()

    def _open(self, start_index: int) -> Iterator[genserve_pb2.SampleStreamChunk] | None:
        request = genserve_pb2.SampleStreamRequest()
        request.CopyFrom(self._request)
        request.start_index = start_index
        with self._lock:
            if self._cancelled:
                return None
            call: Iterator[genserve_pb2.SampleStreamChunk] = self._client._stub.SampleStream(
                request, timeout=self._timeout_s, metadata=self._client.config.metadata(self.request_id)
            )
            self._call = call  # type: ignore[assignment]  # the iterator is also the call: cancel() reaches the server
        return call

    def __iter__(self) -> Iterator[SampleResult]:
        next_index = self._request.start_index
        attempt = 0
        try:
            while next_index < self._request.sample.count:
                stream = self._open(next_index)
                if stream is None:
                    return
                try:
                    for chunk in stream:
                        result = SampleResult.from_proto(chunk, self.request_id)
                        if result.items:
                            next_index = result.items[-1].index + 1
                            attempt = 0  # progress resets the retry budget
                        yield result
                    return
                except grpc.RpcError as exc:
                    if self._cancelled:
                        return
                    error = from_rpc_error(exc, self.request_id)
                    attempt += 1
                    delay = self._client.retry.delay_s(
                        error.code, attempt, None, self._client._rng, details=error.details
                    )
                    if delay is None:
                        raise error from None
                    time.sleep(delay)
        finally:
            # A consumer that stops early (break, an exception, close()) must not leave the server
            # computing the rest of the job until the call is garbage-collected; a no-op on a
            # call that already ended.
            with self._lock:
                if self._call is not None:
                    self._call.cancel()


__all__ = ["GenserveClient", "GenserveClientError", "SampleStream"]

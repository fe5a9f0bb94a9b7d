"""Call plans: what each genserve.v1 RPC sends and how its answer becomes a result, written once.

A plan builder takes the public method's arguments (its signature *is* the method's: the sync and
asyncio clients bind these builders, see binding.py), builds and checks the request, and says which
RPC carries it and how to read the response. Nothing here touches a channel, so the two clients
differ only in how they perform the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Unpack

import numpy.typing as npt

from genserve.v1 import genserve_pb2
from genserve_client import requests as rq
from genserve_client.convert import ImageInputs
from genserve_client.results import CodesProgress, CodesResult, EncodeResult, ImageResult, SampleResult

Out = TypeVar("Out")


def check_timeout(timeout_s: float | None) -> None:
    """A ValueError naming `timeout_s` where it is NaN: max(0.0, nan) is 0.0 and gRPC takes a NaN
    timeout as one that has passed, so the call failed DEADLINE_EXCEEDED at once, unsent, as if the
    server had been slow. 0 or less stays a deadline that has passed (a budget spent), +inf none."""
    if timeout_s is not None and math.isnan(timeout_s):
        raise ValueError(f"timeout_s: must be a number of seconds (None: the default), got {timeout_s}")


@dataclass(frozen=True, slots=True)
class UnaryCall(Generic[Out]):
    """One unary RPC: the stub attribute (`rpc`), the request, and how the response (with the
    request id the server echoed, or the one sent) becomes the result. `timeout_s` None: the
    client's default deadline."""

    rpc: str
    request: Any
    parse: Callable[[Any, str | None], Out]
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s)


@dataclass(frozen=True, slots=True)
class StreamCall:
    """A SampleStream job. `timeout_s` bounds each attempt; None means no deadline."""

    request: genserve_pb2.SampleStreamRequest
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s)


@dataclass(frozen=True, slots=True)
class ProgressCall:
    """A SampleCodesStream call. Retried only until its first message (a refusal at admission
    began nothing); not after: a new attempt would start the sampling over."""

    request: genserve_pb2.SampleCodesRequest
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s)


def progress_item(
    chunk: genserve_pb2.SampleCodesChunk, request_id: str | None, request: genserve_pb2.SampleCodesRequest
) -> CodesProgress | CodesResult:
    """A progress chunk, or (the last chunk) the whole answer."""
    if chunk.HasField("result"):
        return CodesResult.from_codes_proto(chunk.result, request_id, request)
    return CodesProgress.from_proto(chunk)


def _models(response: genserve_pb2.ListModelsResponse, _: str | None) -> list[genserve_pb2.ModelInfo]:
    return list(response.models)


def _model(response: genserve_pb2.ModelInfo, _: str | None) -> genserve_pb2.ModelInfo:
    return response


def sample(
    model: str, n: int = 0, *, timeout_s: float | None = None, **opts: Unpack[rq.SampleOptions]
) -> UnaryCall[SampleResult]:
    """Draw `n` images (or one per seed / latent row). See genserve.proto SampleRequest."""
    rq.check_options("sample", opts, rq.SampleOptions)
    return UnaryCall("Sample", rq.sample_request(model, n, **opts), SampleResult.from_proto, timeout_s)


def sample_codes(
    model: str, n: int = 0, *, timeout_s: float | None = None, **opts: Unpack[rq.CodesOptions]
) -> UnaryCall[CodesResult]:
    """Sample `n` code grids (or one per seed) from a code prior and decode them with its decoder.
    See genserve.proto SampleCodesRequest."""
    rq.check_options("sample_codes", opts, rq.CodesOptions)
    request = rq.sample_codes_request(model, n, **opts)

    def parse(response: genserve_pb2.SampleCodesResponse, request_id: str | None) -> CodesResult:
        return CodesResult.from_codes_proto(response, request_id, request)

    return UnaryCall("SampleCodes", request, parse, timeout_s)


def sample_codes_progress(
    model: str, n: int = 0, *, timeout_s: float | None = None, **opts: Unpack[rq.CodesProgressOptions]
) -> ProgressCall:
    """`sample_codes` with progress (SampleCodesStream): a CodesProgress every `preview_every` prior
    steps short of a level's last (a level of at most `preview_every` positions gives none), with
    previews of the grids so far, then the CodesResult. Retried as `sample_codes` until
    the first message (a full row budget at admission, a server not reachable yet); a failure after
    it raises GenserveClientError (a new attempt would start over); leaving the loop early cancels
    the call."""
    rq.check_options("sample_codes_progress", opts, rq.CodesProgressOptions)
    return ProgressCall(rq.sample_codes_request(model, n, **opts), timeout_s)


def interpolate(
    model: str,
    start: rq.Latent,
    end: rq.Latent,
    steps: int,
    *,
    timeout_s: float | None = None,
    **opts: Unpack[rq.InterpolateOptions],
) -> UnaryCall[SampleResult]:
    """A path of `steps` images between two seeds (ints) or two latents (float32 [Z])."""
    rq.check_options("interpolate", opts, rq.InterpolateOptions)
    request = rq.interpolate_request(model, start, end, steps, **opts)
    return UnaryCall("Interpolate", request, SampleResult.from_proto, timeout_s)


def mix_styles(
    model: str,
    mixes: Sequence[rq.Mix],
    *,
    timeout_s: float | None = None,
    **opts: Unpack[rq.MixOptions],
) -> UnaryCall[SampleResult]:
    """Style mixing on a style generator: image i takes layers [0, crossover) from the w of
    mixes[i]'s coarse seed and the rest from its fine seed's; a mix is (coarse, fine) or (coarse,
    fine, crossover), `crossover=` the default. Each result item's seed is its coarse seed."""
    rq.check_options("mix_styles", opts, rq.MixOptions)
    request = rq.mix_styles_request(model, mixes, **opts)
    return UnaryCall("MixStyles", request, SampleResult.from_proto, timeout_s)


def encode(
    model: str,
    images: ImageInputs,
    *,
    timeout_s: float | None = None,
    **opts: Unpack[rq.EncodeOptions],
) -> UnaryCall[EncodeResult]:
    """Encode images to latents (mu, logvar and, with `sample=True`, a drawn z).

    `images`: a list of images (paths, encoded bytes, PIL images, uint8 HW or HWC arrays in RGB
    order) or one N x H x W x C array; one image goes as [image] (one HW or HWC array alone is a
    TypeError, never H images of one row each).
    """
    rq.check_options("encode", opts, rq.EncodeOptions)
    request = rq.encode_request(model, images, **opts)

    def parse(response: genserve_pb2.EncodeResponse, request_id: str | None) -> EncodeResult:
        return EncodeResult.from_proto(response, request_id, request)

    return UnaryCall("Encode", request, parse, timeout_s)


def decode(
    model: str, latents: npt.ArrayLike, *, timeout_s: float | None = None, **opts: Unpack[rq.DecodeOptions]
) -> UnaryCall[SampleResult]:
    """Decode float32 [N, Z] latents to images."""
    rq.check_options("decode", opts, rq.DecodeOptions)
    return UnaryCall("Decode", rq.decode_request(model, latents, **opts), SampleResult.from_proto, timeout_s)


def super_resolve(
    model: str,
    images: ImageInputs,
    *,
    timeout_s: float | None = None,
    **opts: Unpack[rq.ImageOptions],
) -> UnaryCall[ImageResult]:
    """Upscale images (tiled on the server when large).

    `images`: a list of images (paths, encoded bytes, PIL images, uint8 HW or HWC arrays in RGB
    order) or one N x H x W x C array; one image goes as [image] (one HW or HWC array alone is a
    TypeError, never H images of one row each).
    """
    rq.check_options("super_resolve", opts, rq.ImageOptions)
    request = rq.image_request(model, images, **opts)
    return UnaryCall("SuperResolve", request, ImageResult.from_proto, timeout_s)


def translate(
    model: str,
    images: ImageInputs,
    *,
    timeout_s: float | None = None,
    **opts: Unpack[rq.ImageOptions],
) -> UnaryCall[ImageResult]:
    """Image-to-image translation.

    `images`: a list of images (paths, encoded bytes, PIL images, uint8 HW or HWC arrays in RGB
    order) or one N x H x W x C array; one image goes as [image] (one HW or HWC array alone is a
    TypeError, never H images of one row each).
    """
    rq.check_options("translate", opts, rq.ImageOptions)
    request = rq.image_request(model, images, **opts)
    return UnaryCall("Translate", request, ImageResult.from_proto, timeout_s)


def list_models(*, timeout_s: float | None = None) -> UnaryCall[list[genserve_pb2.ModelInfo]]:
    return UnaryCall("ListModels", genserve_pb2.ListModelsRequest(), _models, timeout_s)


def get_model(
    name: str, version: str = "", *, timeout_s: float | None = None
) -> UnaryCall[genserve_pb2.ModelInfo]:
    return UnaryCall("GetModel", rq.get_model_request(name, version), _model, timeout_s)


def sample_stream(
    model: str, count: rq.Int, *, timeout_s: float | None = None, **opts: Unpack[rq.StreamOptions]
) -> StreamCall:
    """Images [start_index, count) of a bulk job, chunk by chunk, resumed after transient errors
    at the index after the last image yielded (each index is yielded exactly once) and on the
    version the first images came from (StreamResume); none, and no call, where start_index ==
    count (a job resumed after its last image).

    `timeout_s` bounds each attempt of the stream; None (the default here, unlike unary
    calls) means no deadline, since a bulk job may run for hours.
    """
    rq.check_options("sample_stream", opts, rq.StreamOptions)
    return StreamCall(rq.sample_stream_request(model, count, **opts), timeout_s)

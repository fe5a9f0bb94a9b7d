"""The genserve.v1 GenerationService: validate -> domain tensors -> batcher -> encode -> proto.

Reading guide (for whoever extends this file):
- every RPC method is a thin line calling `self._unary(...)` / `self._stream(...)`: that is the ONE
  boundary which assigns the request id, counts in-flight/finished RPCs, and turns a
  GenserveError into its status (unknown exceptions become INTERNAL "internal error (request id
  X)", the traceback goes only to the log);
- `_do_<rpc>` methods validate every field BEFORE anything is queued (errors name the field and
  the limit), call the batcher with numpy tensors, then build the response;
- image decode and large encodes run on `codec_pool`; encodes cheaper than the hop (small PNGs, raw
  copies) run on the event loop (`_encodes_inline`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

import grpc
import numpy as np
import onnxruntime as ort

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import codecs, latents, tiling
from genserve_server.batcher import Batcher, BatchResult, Lane, cancelled_by_deadline
from genserve_server.config import LATENT_KINDS, Card, ServerConfig, cpu_count
from genserve_server.errors import GenserveError, InvalidArgument, NotFound, invalid
from genserve_server.image_cache import ImageCache, image_key
from genserve_server.metrics import Metrics, ModelMetrics
from genserve_server.repository import Model, ModelState, ModelVersion, Repository
from genserve_server.runner import PIXELS_OUTPUT, PSI_INPUT, SEED_INPUT

logger = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"
REQUEST_ID_KEY = "x-request-id"
SEED_LIMIT = 2**63
MAX_ABS_LATENT = 1e4
MAX_PSI = 10.0
DEFAULT_CHUNK = 64
MAX_TILE = 1024
SEND_OVERHEAD_BYTES = 64 * 1024
# Truncation below this psi may redraw for long: those latents are drawn per request, not per batch.
BATCH_LATENTS_MIN_PSI = 0.01
STREAM_CHUNKS_AHEAD = 2  # chunks computed ahead of the one being sent (HTTP/2 flow control bounds the rest)
# Encodes cheaper than a hop to the codec pool run on the event loop (values = H * W * C).
INLINE_COPY_MAX_VALUES = 1 << 16  # RAW_UINT8 / TENSOR_F32: one memcpy
# RAW_UINT8 from the runner's uint8 pixels is only a memcpy (~10 us for 256x256 RGB), well below a hop.
INLINE_RAW_PIXELS_MAX_BYTES = 1 << 20
INLINE_PNG_MAX_VALUES = 4096  # per image: 64x64 gray, 28x28 RGB; not 64x64 RGB (~0.4 ms)
INLINE_PNG_MAX_TOTAL_VALUES = 4 * 4096  # a request of many small images still goes to the pool

DECODE_KINDS = ("generator", "vae_decoder")
FORMAT_NAMES: dict[int, str] = {
    tpb.IMAGE_FORMAT_UNSPECIFIED: "png",
    tpb.IMAGE_FORMAT_PNG: "png",
    tpb.IMAGE_FORMAT_JPEG: "jpeg",
    tpb.IMAGE_FORMAT_WEBP: "webp",
    tpb.IMAGE_FORMAT_RAW_UINT8: "raw_uint8",
    tpb.IMAGE_FORMAT_TENSOR_F32: "tensor_f32",
}

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """Per-RPC bookkeeping the boundary reads in `finally`."""

    method: str
    request_id: str
    started: float
    metrics: ModelMetrics
    deadline: float | None = None
    batcher: Batcher | None = None  # its `callers` count includes this RPC while it runs
    stream_batcher: Batcher | None = None  # a SampleStream's: its `streams` count includes this RPC


@dataclass(frozen=True, slots=True)
class OutputSpec:
    format: tpb.ImageFormat.ValueType
    quality: int
    png_compression: int
    return_latents: bool

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.format]


@dataclass(slots=True)
class Rendered:
    """Model outputs of one response turned into proto images."""

    images: list[tpb.Image]
    executed_batch_sizes: list[int]


async def _gather_or_cancel(aws: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """asyncio.gather that cancels the siblings when one fails (their rows leave the queue)."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class EncodeQueue:
    """Codec-pool encodes of one event-loop turn, sent to the pool together.

    When a batch of 64 completes, its 64 requests resume in the same turn of the loop and each asks
    for an encode; one pool task per request would cost 64 hops there and back (~90 us each on 2
    cores). Instead the first request of a turn schedules a flush at the end of the turn, which
    splits everything queued into at most `threads` pool tasks; each task resolves its futures with
    one call back into the loop.
    """

    def __init__(self, pool: ThreadPoolExecutor, threads: int) -> None:
        self._pool = pool
        self._threads = max(1, threads)
        self._jobs: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._jobs:
            loop.call_soon(self._flush, loop)
        self._jobs.append((job, future))
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, self._jobs = self._jobs, []
        jobs = [(job, future) for job, future in jobs if not future.done()]  # callers gone
        n_tasks = min(self._threads, len(jobs))
        for i in range(n_tasks):
            chunk = jobs[i::n_tasks]
            try:
                self._pool.submit(self._run_chunk, loop, chunk)
            except RuntimeError as exc:  # the pool is shut down (server stopping)
                for _, future in chunk:
                    _set_future(future, None, exc)

    @staticmethod
    def _run_chunk(
        loop: asyncio.AbstractEventLoop, chunk: list[tuple[Callable[[], Any], asyncio.Future[Any]]]
    ) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for job, future in chunk:
            try:
                results.append((future, job(), None))
            except BaseException as exc:  # delivered to the request that asked for it
                results.append((future, None, exc))
        try:
            loop.call_soon_threadsafe(_resolve_all, results)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting
            pass


def _set_future(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _resolve_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        _set_future(future, value, exc)


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(
        self, repository: Repository, config: ServerConfig, metrics: Metrics, codec_pool: ThreadPoolExecutor
    ) -> None:
        self.repo = repository
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.codec_pool = codec_pool
        self._encode_queue = EncodeQueue(codec_pool, config.codec_threads or cpu_count())
        self._unresolved = metrics.unresolved()
        self.image_cache = ImageCache(config.image_cache_bytes) if config.image_cache_bytes else None

    # ================================================================== the boundary

    def _begin(self, method: str, context: Context) -> Call:
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if (
                key == REQUEST_ID_KEY
                and isinstance(value, str)
                and 0 < len(value) <= 128
                and value.isprintable()
            ):
                request_id = value
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        remaining_s = context.time_remaining()
        now = time.monotonic()
        call = Call(method, request_id, now, self._unresolved)
        if remaining_s is not None:
            call.deadline = now + remaining_s
        self.metrics.in_flight_children[method].inc()
        return call

    async def _fail(self, call: Call, exc: BaseException, context: Context) -> NoReturn:
        """Log and translate an exception into the call's status (context.abort raises)."""
        trailing = ((REQUEST_ID_KEY, call.request_id),)
        if isinstance(exc, GenserveError):
            if isinstance(exc, InvalidArgument):
                call.metrics.rejected["invalid"].inc()
            elif exc.code == grpc.StatusCode.UNAVAILABLE:
                call.metrics.rejected["not_ready"].inc()
            logger.info(
                "request_id=%s method=%s code=%s: %s", call.request_id, call.method, exc.code.name, exc
            )
            await context.abort(exc.code, exc.message, trailing_metadata=trailing)
        logger.error(
            "request_id=%s method=%s failed with an unexpected error",
            call.request_id,
            call.method,
            exc_info=exc,
        )
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error (request id {call.request_id})",
            trailing_metadata=trailing,
        )
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def _end(self, call: Call, code: str) -> None:
        duration_s = time.monotonic() - call.started
        self.metrics.in_flight_children[call.method].dec()
        if call.batcher is not None:
            call.batcher.callers -= 1
        if call.stream_batcher is not None:
            call.stream_batcher.streams -= 1
        call.metrics.request_done(call.method, code, duration_s)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request request_id=%s method=%s model=%s version=%s code=%s duration_ms=%.3f",
                call.request_id,
                call.method,
                call.metrics.model,
                call.metrics.version,
                code,
                duration_s * 1e3,
            )

    async def _unary(
        self, method: str, request: Req, context: Context, handler: Callable[[Req, Call], Awaitable[Resp]]
    ) -> Resp:
        call = self._begin(method, context)
        code = "OK"
        try:
            response = await handler(request, call)
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
            return response
        except asyncio.CancelledError:
            code = _cancelled_code(call)
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, GenserveError) else "INTERNAL"
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await self._fail(call, exc, context)
        finally:
            self._end(call, code)

    async def _stream(
        self, method: str, request: Req, context: Context, handler: Callable[[Req, Call], AsyncIterator[Resp]]
    ) -> AsyncIterator[Resp]:
        call = self._begin(method, context)
        code = "OK"
        try:
            async for item in handler(request, call):
                yield item
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        except asyncio.CancelledError:
            code = _cancelled_code(call)
            raise
        except Exception as exc:
            code = exc.code.name if isinstance(exc, GenserveError) else "INTERNAL"
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await self._fail(call, exc, context)
        finally:
            self._end(call, code)

    # ================================================================== RPCs

    async def Sample(self, request: pb.SampleRequest, context: Context) -> pb.SampleResponse:
        return await self._unary("Sample", request, context, self._do_sample)

    async def SampleStream(  # an async generator, as grpc.aio expects for server streaming
        self, request: pb.SampleStreamRequest, context: Context
    ) -> AsyncIterator[pb.SampleStreamChunk]:
        async for chunk in self._stream("SampleStream", request, context, self._do_sample_stream):
            yield chunk

    async def Interpolate(self, request: pb.InterpolateRequest, context: Context) -> pb.SampleResponse:
        return await self._unary("Interpolate", request, context, self._do_interpolate)

    async def Encode(self, request: pb.EncodeRequest, context: Context) -> pb.EncodeResponse:
        return await self._unary("Encode", request, context, self._do_encode)

    async def Decode(self, request: pb.DecodeRequest, context: Context) -> pb.SampleResponse:
        return await self._unary("Decode", request, context, self._do_decode)

    async def SuperResolve(self, request: pb.ImageRequest, context: Context) -> pb.ImageResponse:
        return await self._unary("SuperResolve", request, context, self._do_super_resolve)

    async def Translate(self, request: pb.ImageRequest, context: Context) -> pb.ImageResponse:
        return await self._unary("Translate", request, context, self._do_translate)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return await self._unary("ListModels", request, context, self._do_list_models)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelInfo:
        return await self._unary("GetModel", request, context, self._do_get_model)

    # ================================================================== shared validation

    def _resolve(
        self, call: Call, name: str, version: str, kinds: Sequence[str], method: str, field_prefix: str = ""
    ) -> ModelVersion:
        """`field_prefix` ("sample." for SampleStream) makes messages name the field as the client set it."""
        if not name:
            raise invalid(f"{field_prefix}model", "required (see ListModels)")
        model = self.repo.get(name)
        if model.kind and model.kind not in kinds:
            raise invalid(
                f"{field_prefix}model", f"{name} is a {model.kind} model; {method} needs {' or '.join(kinds)}"
            )
        try:
            mv = model.resolve(version)
        except GenserveError:
            if model.versions:  # count the refusal against the model, not the unresolved series
                call.metrics = model.versions[max(model.versions, key=int)].metrics
            raise
        call.metrics = mv.metrics
        # A stream keeps its own chunks queued ahead; it is not a caller about to send a row, but
        # a reload's drain waits for it all the same.
        if mv.batcher is not None and call.batcher is None and call.stream_batcher is None:
            if call.method == "SampleStream":
                call.stream_batcher = mv.batcher
                mv.batcher.streams += 1
            else:
                call.batcher = mv.batcher
                mv.batcher.callers += 1
        return mv

    def _output_spec(self, options: tpb.OutputOptions, field_prefix: str = "output") -> OutputSpec:
        if options.format not in FORMAT_NAMES:
            raise invalid(f"{field_prefix}.format", f"unknown image format {options.format}")
        if options.quality > 100:
            raise invalid(
                f"{field_prefix}.quality", f"must be in 1..100 (0 = default 90), got {options.quality}"
            )
        compression = options.png_compression if options.HasField("png_compression") else 1
        if compression > 9:
            raise invalid(f"{field_prefix}.png_compression", f"must be in 0..9, got {compression}")
        fmt = options.format or tpb.IMAGE_FORMAT_PNG
        return OutputSpec(fmt, options.quality or 90, compression, options.return_latents)

    def _count(self, n: int, field_name: str, limit: int | None = None) -> int:
        limit = limit or self.limits.max_images_per_request
        if not 1 <= n <= limit:
            raise invalid(field_name, f"must be in 1..{limit} (max_images_per_request), got {n}")
        return n

    @staticmethod
    def _psi(request: pb.SampleRequest | pb.InterpolateRequest, field_prefix: str = "") -> float | None:
        if not request.HasField("truncation_psi"):
            return None
        psi = request.truncation_psi
        if not (0.0 < psi <= MAX_PSI) or not math.isfinite(psi):
            raise invalid(f"{field_prefix}truncation_psi", f"must be in (0, {MAX_PSI:g}], got {psi:g}")
        return float(psi)

    @staticmethod
    def _latent_tensor(tensor: tpb.Tensor, dim: int, field_name: str, *, vector: bool = False) -> np.ndarray:
        """float32 [N, dim] (or [dim] when `vector`) from a Tensor, zero-copy, finite and bounded."""
        if tensor.dtype not in (tpb.DTYPE_UNSPECIFIED, tpb.DTYPE_FLOAT32):
            raise invalid(f"{field_name}.dtype", "must be DTYPE_FLOAT32")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise invalid(f"{field_name}.shape", f"dimensions must be >= 0, got {list(shape)}")
        if vector:
            if shape not in ((dim,), (1, dim)):
                raise invalid(f"{field_name}.shape", f"must be [{dim}] (the latent size), got {list(shape)}")
        elif len(shape) != 2 or shape[1] != dim:
            raise invalid(
                f"{field_name}.shape", f"must be [N, {dim}] (the latent size is {dim}), got {list(shape)}"
            )
        n_values = math.prod(shape)
        if len(tensor.data) != 4 * n_values:
            raise invalid(
                f"{field_name}.data",
                f"must hold {n_values} float32 values ({4 * n_values} bytes), got {len(tensor.data)} bytes",
            )
        values = np.frombuffer(tensor.data, dtype="<f4").reshape(shape)
        if not np.isfinite(values).all():
            raise invalid(field_name, "values must be finite")
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > MAX_ABS_LATENT:
            raise invalid(field_name, f"values must satisfy |z| <= {MAX_ABS_LATENT:g}, got {peak:g}")
        return values.reshape(dim) if vector else values

    @staticmethod
    def _labels(labels: Sequence[int], card: Card, n: int, field_name: str = "labels") -> np.ndarray | None:
        """int64 [n] for conditional models (one label for all or one per image); None otherwise."""
        if card.kind != "conditional_generator":
            if labels:
                raise invalid(
                    field_name, f"only conditional models take labels; {card.name} is a {card.kind}"
                )
            return None
        if not labels:
            raise invalid(
                field_name,
                f"required for conditional model {card.name} (classes 0..{len(card.class_names) - 1})",
            )
        if len(labels) not in (1, n):
            raise invalid(field_name, f"must have 1 or {n} values (one per image), got {len(labels)}")
        n_classes = len(card.class_names)
        if len(labels) == 1:  # the usual request: plain Python, no numpy on a 1-element container
            label = labels[0]
            if not 0 <= label < n_classes:
                raise invalid(f"{field_name}[0]", f"must be in [0, {n_classes}), got {label}")
            return np.full(n, label, dtype=np.int64)
        values = np.asarray(labels, dtype=np.int64)
        bad = np.flatnonzero((values < 0) | (values >= n_classes))
        if bad.size:
            i = int(bad[0])
            raise invalid(f"{field_name}[{i}]", f"must be in [0, {n_classes}), got {labels[i]}")
        return values

    @staticmethod
    def _lane(priority: int, default: Lane, field_prefix: str = "") -> Lane:
        if priority == tpb.PRIORITY_INTERACTIVE:
            return Lane.INTERACTIVE
        if priority == tpb.PRIORITY_BULK:
            return Lane.BULK
        if priority != tpb.PRIORITY_UNSPECIFIED:
            raise invalid(f"{field_prefix}priority", f"unknown priority {priority}")
        return default

    def _check_send_size(self, n_bytes: int, what: str, fmt: int | None = None) -> None:
        """InvalidArgument when a response would exceed max_send_message_bytes.

        Not RESOURCE_EXHAUSTED: that code means "refused at admission, retry" to clients (and the
        project's RetryPolicy), while the same request would be refused again every time.
        """
        limit = self.limits.max_send_message_bytes
        # Protobuf framing (shapes, seeds, latents, provenance) rides on top of the pixel bytes.
        if n_bytes + SEND_OVERHEAD_BYTES > limit:
            if fmt in (tpb.IMAGE_FORMAT_PNG, tpb.IMAGE_FORMAT_UNSPECIFIED):
                hint = (
                    "fewer or smaller images, a higher output.png_compression or a lossy format (JPEG/WEBP)"
                )
            elif fmt in (tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_WEBP):
                hint = "fewer or smaller images or a lower output.quality"
            else:
                hint = "fewer or smaller images or an encoded format (PNG/JPEG/WEBP)"
            raise invalid(
                "output",
                f"{what} would be {n_bytes} bytes, above max_send_message_bytes={limit}; request {hint}",
            )

    def _predict_raw_size(self, out: OutputSpec, n: int, c: int, h: int, w: int) -> None:
        """Refuse before compute what is sure to exceed the send limit (sizes known in advance)."""
        if out.format == tpb.IMAGE_FORMAT_TENSOR_F32:
            self._check_send_size(n * c * h * w * 4, "the response", out.format)
        elif out.format == tpb.IMAGE_FORMAT_RAW_UINT8:
            self._check_send_size(n * c * h * w, "the response", out.format)
        elif out.format == tpb.IMAGE_FORMAT_PNG and out.png_compression == 0:
            # Stored deflate blocks: at least the pixels plus one filter byte per row.
            self._check_send_size(n * (c * h * w + h), "the response", out.format)

    @staticmethod
    def _check_encodable(out: OutputSpec, sizes: Sequence[tuple[int, int]]) -> None:
        """Before compute: every output image (height, width) fits the chosen format's side limit."""
        limit = codecs.MAX_SIDE.get(out.format)
        if limit is None:
            return
        for i, (h, w) in enumerate(sizes):
            if max(h, w) > limit:
                raise invalid(
                    "output.format",
                    f"{out.format_name.upper()} holds at most {limit} pixels a side; output image {i} "
                    f"would be {h}x{w} (use PNG, or smaller inputs)",
                )

    def _provenance(self, mv: ModelVersion, batch_sizes: Sequence[int]) -> tpb.Provenance:
        return tpb.Provenance(
            model=mv.name,
            version=mv.version,
            model_sha256=mv.sha256,
            onnxruntime_version=ort.__version__,
            execution_provider=mv.provider,
            precision=mv.precision,
            executed_batch_sizes=batch_sizes,
            rng_algorithm=latents.RNG_ALGORITHM,
            server_version=SERVER_VERSION,
        )

    async def _run(
        self, mv: ModelVersion, call: Call, key: Hashable, inputs: dict[str, np.ndarray], n: int, lane: Lane
    ) -> BatchResult:
        assert mv.batcher is not None
        return await mv.batcher.submit(key, inputs, n, lane=lane, deadline=call.deadline)

    # ================================================================== encode / decode (codec pool)

    def _encode_sync(
        self,
        images: np.ndarray,
        out: OutputSpec,
        output_range: tuple[float, float],
        pixels: np.ndarray | None = None,
    ) -> list[tpb.Image]:
        """float32 [N, C, H, W] model output (or its uint8 [N, H, W, C] `pixels`, converted once per
        executed batch by the runner) -> proto images. On the loop when small, else on the codec pool."""
        if out.format == tpb.IMAGE_FORMAT_TENSOR_F32:
            chw = images.astype("<f4", copy=False)
            return [
                tpb.Image(format=out.format, data=chw[i].tobytes(), shape=chw.shape[1:])
                for i in range(len(chw))
            ]
        nhwc = pixels if pixels is not None else codecs.to_uint8(images, output_range)
        if out.format == tpb.IMAGE_FORMAT_RAW_UINT8:
            return [
                tpb.Image(format=out.format, data=nhwc[i].tobytes(), shape=nhwc.shape[1:])
                for i in range(len(nhwc))
            ]
        encoded = []
        for i in range(len(nhwc)):
            data, shape = codecs.encode_image(
                nhwc[i], out.format, quality=out.quality, png_compression=out.png_compression
            )
            encoded.append(tpb.Image(format=out.format, data=data, shape=shape))
        return encoded

    def _encodes_inline(self, images: np.ndarray, out: OutputSpec, pixels: np.ndarray | None = None) -> bool:
        """Whether encoding costs less than the hop to the codec pool and back (~90 us on 2 cores)."""
        if out.format == tpb.IMAGE_FORMAT_RAW_UINT8 and pixels is not None:
            return bool(pixels.nbytes <= INLINE_RAW_PIXELS_MAX_BYTES)
        if out.format in (tpb.IMAGE_FORMAT_TENSOR_F32, tpb.IMAGE_FORMAT_RAW_UINT8):
            return bool(images.size <= INLINE_COPY_MAX_VALUES)  # a memcpy of a few KiB
        if out.format == tpb.IMAGE_FORMAT_PNG:
            # A 28x28 gray PNG at zlib level 1 encodes in ~47 us; JPEG/WebP always go to the pool.
            per_image = images.size // max(1, len(images))
            return per_image <= INLINE_PNG_MAX_VALUES and images.size <= INLINE_PNG_MAX_TOTAL_VALUES
        return False

    async def _encode(
        self,
        mv: ModelVersion,
        images: np.ndarray,
        out: OutputSpec,
        output_range: tuple[float, float],
        pixels: np.ndarray | None = None,
    ) -> list[tpb.Image]:
        started = time.monotonic()
        if images.dtype != np.float32 and (pixels is None or out.format == tpb.IMAGE_FORMAT_TENSOR_F32):
            images = images.astype(np.float32)  # fp16 graphs
        if self._encodes_inline(images, out, pixels):
            result = self._encode_sync(images, out, output_range, pixels)
        else:
            result = await self._encode_queue.submit(
                functools.partial(self._encode_sync, images, out, output_range, pixels)
            )
        mv.metrics.encode_duration[out.format_name].observe(time.monotonic() - started)
        self._check_send_size(sum(len(im.data) for im in result), "the response", out.format)
        return result

    def _decode_sync(
        self, images: Sequence[tpb.Image], card: Card, max_pixels: int, field_prefix: str
    ) -> list[np.ndarray]:
        """Proto images -> float32 [C, H, W] in the card's input_range with the model's channels."""
        assert card.input_range is not None and card.input_channels is not None
        arrays = []
        for i, image in enumerate(images):
            name = f"{field_prefix}[{i}]"
            decoded = codecs.decode_image(
                image.data, image.format, list(image.shape), max_pixels=max_pixels, field=name
            )
            if image.format == tpb.IMAGE_FORMAT_TENSOR_F32:
                check_input_range(decoded, card.input_range, name)
                chw = codecs.convert_channels(decoded.astype(np.float32, copy=False), card.input_channels)
            else:
                chw = codecs.from_uint8(
                    decoded.astype(np.uint8, copy=False), card.input_range, card.input_channels
                )
            arrays.append(chw)
        return arrays

    async def _decode(
        self,
        mv: ModelVersion,
        images: Sequence[tpb.Image],
        card: Card,
        max_pixels: int,
        field_prefix: str = "images",
    ) -> list[np.ndarray]:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        arrays = await loop.run_in_executor(
            self.codec_pool, self._decode_sync, images, card, max_pixels, field_prefix
        )
        mv.metrics.decode_duration.observe(time.monotonic() - started)
        return arrays

    # ================================================================== Sample / SampleStream / Decode

    async def _generate(
        self,
        mv: ModelVersion,
        call: Call,
        labels: np.ndarray | None,
        out: OutputSpec,
        lane: Lane,
        *,
        seeds: Sequence[int] | None = None,
        psi: float | None = None,
        z: np.ndarray | None = None,
        seed_field: str = "seeds",
    ) -> tuple[list[tpb.Image], list[int], np.ndarray]:
        """Images for explicit latents `z`, or for `seeds` (+ psi); returns them with the latents used."""
        card = mv.card
        assert card is not None and card.image_size is not None and card.latent_dim is not None
        inputs: dict[str, np.ndarray]
        key: Hashable
        if psi is not None:  # here, not in the runner, so that a bad psi fails only its own request
            latents.check_truncation_psi(psi, card.latent_dim)
        if z is None and seeds is not None and (psi is None or psi >= BATCH_LATENTS_MIN_PSI):
            # The runner draws the latents of a whole batch in one vectorised call; row i depends
            # only on (seed_i, psi), so an image never depends on its batch. psi is part of the
            # key: one psi per batch. Labels and seeds mix freely.
            n = len(seeds)
            key = ("seeds", psi)
            inputs = {
                SEED_INPUT: np.asarray(seeds, dtype=np.int64),
                PSI_INPUT: np.full(n, np.nan if psi is None else psi, dtype=np.float64),
            }
        else:
            if z is None:
                # A tiny psi may redraw for long (~1 ms a seed): per request, not per batch, and on
                # the codec pool so that the event loop keeps serving everyone else meanwhile.
                assert seeds is not None
                draw = functools.partial(latents.latents_for_seeds, field=seed_field)
                drawn: np.ndarray = await asyncio.get_running_loop().run_in_executor(
                    self.codec_pool, draw, seeds, card.latent_dim, psi
                )
                z = drawn
            n = len(z)
            key = ("z",)
            inputs = {"z": z}
        self._predict_raw_size(out, n, card.channels, *card.image_size)
        if out.return_latents:
            self._check_send_size(n * card.latent_dim * 4, "the returned latents")
        if labels is not None:
            inputs["label"] = labels
        result = await self._run(mv, call, key, inputs, n, lane)
        images = await self._encode(
            mv, result.outputs["image"], out, card.output_range, result.outputs.get(PIXELS_OUTPUT)
        )
        used = z if z is not None else result.outputs["z"]
        return images, result.executed_batch_sizes, used

    @staticmethod
    def _latent_proto(z: np.ndarray) -> tpb.Tensor:
        return tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.astype("<f4", copy=False).tobytes())

    def _generated(
        self,
        images: Sequence[tpb.Image],
        z: np.ndarray,
        seeds: Sequence[int] | None,
        labels: np.ndarray | None,
        out: OutputSpec,
        first_index: int = 0,
    ) -> list[tpb.GeneratedImage]:
        result = []
        for i, image in enumerate(images):
            g = tpb.GeneratedImage(image=image, index=first_index + i)
            if seeds is not None:
                g.seed = seeds[i]
            if labels is not None:
                g.label = int(labels[i])
            if out.return_latents:
                g.latent.CopyFrom(self._latent_proto(z[i]))
            result.append(g)
        return result

    async def _do_sample(self, request: pb.SampleRequest, call: Call) -> pb.SampleResponse:
        mv = self._resolve(call, request.model, request.version, LATENT_KINDS, "Sample")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        out = self._output_spec(request.output)
        lane = self._lane(request.priority, Lane.INTERACTIVE)
        psi = self._psi(request)
        seeds: list[int] | None
        if request.HasField("latents"):
            for name, given in (
                ("seeds", bool(request.seeds)),
                ("base_seed", request.HasField("base_seed")),
                ("truncation_psi", psi is not None),
            ):
                if given:
                    raise invalid(name, "cannot be combined with explicit latents")
            z = self._latent_tensor(request.latents, card.latent_dim, "latents")
            n = self._count(len(z), "latents.shape[0]")
            if request.count not in (0, n):
                raise invalid("count", f"must be 0 or {n} (the number of latents), got {request.count}")
            seeds = None
        else:
            if request.seeds:
                n = self._count(len(request.seeds), "seeds")
                if request.count not in (0, n):
                    raise invalid("count", f"must be 0 or {n} (the number of seeds), got {request.count}")
                if request.HasField("base_seed"):
                    raise invalid("base_seed", "cannot be combined with seeds")
                seeds = list(request.seeds)
                for i, seed in enumerate(seeds):
                    if not 0 <= seed < SEED_LIMIT:
                        raise invalid(f"seeds[{i}]", f"must be in [0, 2^63), got {seed}")
            else:
                n = self._count(request.count, "count")
                if request.HasField("base_seed"):
                    base = request.base_seed
                    if not 0 <= base <= SEED_LIMIT - n:
                        raise invalid("base_seed", f"must be in [0, 2^63 - count], got {base}")
                else:
                    base = secrets.randbelow(SEED_LIMIT - n)
                seeds = list(range(base, base + n))
            z = None
        labels = self._labels(request.labels, card, n)
        if seeds is not None and self.image_cache is not None:
            return await self._sample_through_cache(self.image_cache, mv, call, seeds, labels, psi, out, lane)
        images, batch_sizes, z = await self._generate(mv, call, labels, out, lane, seeds=seeds, psi=psi, z=z)
        return pb.SampleResponse(
            images=self._generated(images, z, seeds, labels, out),
            provenance=self._provenance(mv, batch_sizes),
        )

    async def _sample_through_cache(
        self,
        cache: ImageCache,
        mv: ModelVersion,
        call: Call,
        seeds: list[int],
        labels: np.ndarray | None,
        psi: float | None,
        out: OutputSpec,
        lane: Lane,
    ) -> pb.SampleResponse:
        """Sample where the image cache is on: only the seeds it does not hold are computed."""
        assert mv.card is not None and mv.card.latent_dim is not None
        keys = [
            image_key(
                mv.load_id,
                seed,
                None if labels is None else int(labels[i]),
                psi,
                out.format,
                out.quality,
                out.png_compression,
            )
            for i, seed in enumerate(seeds)
        ]
        found = [cache.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        mv.metrics.cache_hits.inc(len(seeds) - len(missing))
        mv.metrics.cache_misses.inc(len(missing))
        images = [tpb.Image() if entry is None else entry.image(out.format) for entry in found]
        z = np.empty((len(seeds), mv.card.latent_dim), np.float32)
        for i, entry in enumerate(found):
            if entry is not None:
                z[i] = entry.latent()
        batch_sizes: list[int] = []
        if missing:
            computed, batch_sizes, computed_z = await self._generate(
                mv,
                call,
                None if labels is None else labels[missing],
                out,
                lane,
                seeds=[seeds[i] for i in missing],
                psi=psi,
            )
            for j, i in enumerate(missing):
                images[i] = computed[j]
                z[i] = computed_z[j]
                cache.put(keys[i], computed[j], computed_z[j])
            self.metrics.image_cache_bytes.set(cache.nbytes)
        if len(missing) < len(seeds):  # what _generate checks for computed images, for the whole response
            self._check_send_size(sum(len(image.data) for image in images), "the response", out.format)
            if out.return_latents:
                self._check_send_size(z.nbytes, "the returned latents")
        generated = self._generated(images, z, seeds, labels, out)
        for g, entry in zip(generated, found, strict=True):
            g.from_cache = entry is not None
        return pb.SampleResponse(images=generated, provenance=self._provenance(mv, batch_sizes))

    async def _do_decode(self, request: pb.DecodeRequest, call: Call) -> pb.SampleResponse:
        mv = self._resolve(call, request.model, request.version, DECODE_KINDS, "Decode")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        out = self._output_spec(request.output)
        if not request.HasField("latents"):
            raise invalid("latents", f"required: float32 [N, {card.latent_dim}]")
        z = self._latent_tensor(request.latents, card.latent_dim, "latents")
        self._count(len(z), "latents.shape[0]")
        images, batch_sizes, z = await self._generate(mv, call, None, out, Lane.INTERACTIVE, z=z)
        return pb.SampleResponse(
            images=self._generated(images, z, None, None, out), provenance=self._provenance(mv, batch_sizes)
        )

    async def _do_sample_stream(
        self, request: pb.SampleStreamRequest, call: Call
    ) -> AsyncIterator[pb.SampleStreamChunk]:
        sample = request.sample
        mv = self._resolve(call, sample.model, sample.version, LATENT_KINDS, "SampleStream", "sample.")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        if sample.seeds:
            raise invalid("sample.seeds", "not accepted by SampleStream: image i uses base_seed + i")
        if sample.HasField("latents"):
            raise invalid("sample.latents", "not accepted by SampleStream: image i uses base_seed + i")
        count = sample.count
        limit = self.limits.max_stream_images
        if not 1 <= count <= limit:
            raise invalid("sample.count", f"must be in 1..{limit}, got {count}")
        base = sample.base_seed if sample.HasField("base_seed") else 0
        if not 0 <= base <= SEED_LIMIT - count:
            raise invalid("sample.base_seed", f"must be in [0, 2^63 - count], got {base}")
        if request.start_index > count:
            raise invalid("start_index", f"must be in 0..count ({count}), got {request.start_index}")
        chunk_size = request.chunk_size or min(DEFAULT_CHUNK, self.limits.max_images_per_request)
        if chunk_size > self.limits.max_images_per_request:
            raise invalid(
                "chunk_size", f"must be in 1..{self.limits.max_images_per_request}, got {chunk_size}"
            )
        out = self._output_spec(sample.output, "sample.output")
        psi = self._psi(sample, "sample.")
        lane = self._lane(sample.priority, Lane.BULK, "sample.")
        label_cycle = np.asarray(sample.labels, dtype=np.int64)
        self._labels(sample.labels, card, len(sample.labels) or 1, "sample.labels")  # validates values only

        async def chunk(start: int, n: int) -> pb.SampleStreamChunk:
            seeds = list(range(base + start, base + start + n))
            labels = label_cycle[np.arange(start, start + n) % len(label_cycle)] if len(label_cycle) else None
            images, batch_sizes, z = await self._generate(
                mv, call, labels, out, lane, seeds=seeds, psi=psi, seed_field="sample.base_seed"
            )
            return pb.SampleStreamChunk(
                images=self._generated(images, z, seeds, labels, out, first_index=start),
                provenance=self._provenance(mv, batch_sizes),
            )

        pending: deque[asyncio.Task[pb.SampleStreamChunk]] = deque()
        next_index = request.start_index
        try:
            while next_index < count or pending:
                while len(pending) <= STREAM_CHUNKS_AHEAD and next_index < count:
                    n = min(chunk_size, count - next_index)
                    pending.append(asyncio.ensure_future(chunk(next_index, n)))
                    next_index += n
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()

    # ================================================================== Interpolate

    def _point(
        self, point: pb.LatentPoint, dim: int, psi: float | None, field_name: str
    ) -> tuple[np.ndarray, int | None]:
        which = point.WhichOneof("point")
        if which == "seed":
            if not 0 <= point.seed < SEED_LIMIT:  # checked here: latents_for_seeds would name "seed[0]"
                raise invalid(f"{field_name}.seed", f"must be in [0, 2^63), got {point.seed}")
            return latents.latents_for_seeds([point.seed], dim, psi, field=f"{field_name}.seed")[
                0
            ], point.seed
        if which == "latent":
            return self._latent_tensor(point.latent, dim, f"{field_name}.latent", vector=True), None
        raise invalid(field_name, "required: a seed or a latent")

    async def _do_interpolate(self, request: pb.InterpolateRequest, call: Call) -> pb.SampleResponse:
        mv = self._resolve(call, request.model, request.version, LATENT_KINDS, "Interpolate")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        out = self._output_spec(request.output)
        steps = request.steps
        limit = self.limits.max_images_per_request
        if not 2 <= steps <= limit:
            raise invalid("steps", f"must be in 2..{limit}, got {steps}")
        if request.mode not in (
            pb.INTERPOLATION_MODE_UNSPECIFIED,
            pb.INTERPOLATION_MODE_LERP,
            pb.INTERPOLATION_MODE_SLERP,
        ):
            raise invalid("mode", f"unknown interpolation mode {request.mode}")
        psi = self._psi(request)
        start, start_seed = self._point(request.start, card.latent_dim, psi, "start")
        end, end_seed = self._point(request.end, card.latent_dim, psi, "end")
        z = latents.interpolate(start, end, steps, int(request.mode))
        labels: np.ndarray | None = None
        if card.kind == "conditional_generator":
            if len(request.labels) == 2:
                # The class embedding is not interpolated: the first half uses the first label.
                self._labels(request.labels, card, 2)
                labels = np.where(
                    np.arange(steps) < (steps + 1) // 2, request.labels[0], request.labels[1]
                ).astype(np.int64)
            else:
                if len(request.labels) > 2:
                    raise invalid(
                        "labels",
                        f"must have 1 value (every image) or 2 (start, end), got {len(request.labels)}",
                    )
                labels = self._labels(request.labels, card, 1)
                assert labels is not None
                labels = np.broadcast_to(labels[:1], (steps,))
        elif request.labels:
            self._labels(request.labels, card, steps)  # raises: labels on an unconditional model
        images, batch_sizes, z = await self._generate(mv, call, labels, out, Lane.INTERACTIVE, z=z)
        generated = self._generated(images, z, None, labels, out)
        if start_seed is not None:
            generated[0].seed = start_seed
        if end_seed is not None:
            generated[-1].seed = end_seed
        return pb.SampleResponse(images=generated, provenance=self._provenance(mv, batch_sizes))

    # ================================================================== Encode (VAE)

    async def _do_encode(self, request: pb.EncodeRequest, call: Call) -> pb.EncodeResponse:
        mv = self._resolve(call, request.model, request.version, ("vae_encoder",), "Encode")
        card = mv.card
        assert card is not None and card.image_size is not None
        n = self._count(len(request.images), "images")
        if request.sample and not 0 <= request.seed <= SEED_LIMIT - n:
            raise invalid("seed", f"must be in [0, 2^63 - len(images)], got {request.seed}")
        h, w = card.image_size
        for i, image in enumerate(request.images):
            # From the header or shape, before decoding: a large image is refused without its cost.
            declared = codecs.declared_size(image.data, image.format, image.shape)
            if declared is not None and declared != (h, w):
                raise invalid(
                    f"images[{i}]",
                    f"must be {h}x{w} (the encoder's input size; never resized), "
                    f"got {declared[0]}x{declared[1]}",
                )
        arrays = await self._decode(mv, request.images, card, max(h * w, 1))
        for i, chw in enumerate(arrays):
            if chw.shape[1:] != (h, w):
                raise invalid(
                    f"images[{i}]",
                    f"must be {h}x{w} (the encoder's input size; never resized), "
                    f"got {chw.shape[1]}x{chw.shape[2]}",
                )
        result = await self._run(mv, call, (), {"image": np.stack(arrays)}, n, Lane.INTERACTIVE)
        mu = result.outputs["mu"].astype(np.float32, copy=False).reshape(n, -1)
        logvar = result.outputs["logvar"].astype(np.float32, copy=False).reshape(n, -1)
        z = None
        if request.sample:
            eps = latents.eps_for_seeds(
                list(range(request.seed, request.seed + n)), mu.shape[1], field="seed"
            )
            z = (mu + np.exp(logvar / 2) * eps).astype(np.float32)
        dists = []
        for i in range(n):
            d = pb.LatentDistribution(mu=self._latent_proto(mu[i]), logvar=self._latent_proto(logvar[i]))
            if z is not None:
                d.z.CopyFrom(self._latent_proto(z[i]))
            dists.append(d)
        return pb.EncodeResponse(latents=dists, provenance=self._provenance(mv, result.executed_batch_sizes))

    # ================================================================== SuperResolve / Translate

    def _image_count(self, images: Sequence[tpb.Image]) -> int:
        limit = self.limits.max_images_per_image_request
        if not 1 <= len(images) <= limit:
            raise invalid("images", f"must have 1..{limit} images, got {len(images)}")
        return len(images)

    @staticmethod
    def _check_min_size(arrays: Sequence[np.ndarray], card: Card) -> None:
        for i, chw in enumerate(arrays):
            if min(chw.shape[1:]) < card.min_size:
                raise invalid(
                    f"images[{i}]",
                    f"must be at least {card.min_size} pixels on each side, "
                    f"got {chw.shape[2]}x{chw.shape[1]}",
                )

    async def _do_super_resolve(self, request: pb.ImageRequest, call: Call) -> pb.ImageResponse:
        mv = self._resolve(call, request.model, request.version, ("super_resolution",), "SuperResolve")
        card = mv.card
        assert card is not None
        self._image_count(request.images)
        out = self._output_spec(request.output)
        # Defaults make tiling exact: overlap >= 2 * the receptive-field radius measured at load,
        # each tile discarding `radius` pixels at its inner edges (tiling.py explains the rule).
        radius = mv.tile_radius
        default_overlap = max(card.tile_overlap or 0, 2 * radius if radius is not None else 0)
        overlap = request.tile_overlap if request.HasField("tile_overlap") else default_overlap
        tile = request.tile_size or min(MAX_TILE, max(card.tile_size or 128, 4 * overlap))
        check_tiling(tile, overlap, card.size_multiple)
        arrays = await self._decode(mv, request.images, card, self.limits.max_sr_input_pixels)
        self._check_min_size(arrays, card)
        scale = card.scale_factor
        self._check_encodable(out, [(a.shape[1] * scale, a.shape[2] * scale) for a in arrays])
        self._predict_raw_size(
            out,
            1,
            card.channels,
            sum(a.shape[1] * scale for a in arrays),
            max(a.shape[2] for a in arrays) * scale,
        )
        # Pad each image to the size multiple (reflect), cut equal-sized tiles; tiles of one shape
        # from this and other requests share batches; blend, then crop the padding back off.
        padded = [_pad_to_multiple(a, card.size_multiple) for a in arrays]
        margin = min(radius, overlap // 2) if radius is not None else None
        plans = [
            tiling.plan_tiles(p.shape[1], p.shape[2], tile, overlap, card.size_multiple, margin=margin)
            for p in padded
        ]
        n_tiles = sum(len(plan) for plan in plans)
        assert mv.batcher is not None
        if n_tiles > mv.batcher.max_queue_size:  # could never be queued: not worth a retry
            raise invalid(
                "tile_size",
                f"{len(plans)} image(s) cut into {n_tiles} tiles of {tile}x{tile}, more than this model's "
                f"queue holds (max_queue_size={mv.batcher.max_queue_size}); use a larger tile_size or "
                "send fewer or smaller images",
            )
        groups: dict[tuple[int, ...], list[tuple[int, int, np.ndarray]]] = {}
        for img_i, (chw, tiles) in enumerate(zip(padded, plans, strict=True)):
            for tile_i, t in enumerate(tiles):
                patch = tiling.extract(chw, t)
                groups.setdefault(patch.shape, []).append((img_i, tile_i, patch))
        keys = list(groups)
        results = await _gather_or_cancel(
            [
                self._run(
                    mv,
                    call,
                    ("tile", k),
                    {"image": np.stack([g[2] for g in groups[k]])},
                    len(groups[k]),
                    Lane.INTERACTIVE,
                )
                for k in keys
            ]
        )
        tile_out: list[list[np.ndarray]] = [[np.empty(0)] * len(p) for p in plans]
        batch_sizes: list[int] = []
        for k, result in zip(keys, results, strict=True):
            batch_sizes.extend(result.executed_batch_sizes)
            for row, (img_i, tile_i, _) in enumerate(groups[k]):
                tile_out[img_i][tile_i] = result.outputs["output_image"][row]

        def blend_all() -> list[np.ndarray]:  # CPU-heavy numpy: on the codec pool, not the event loop
            return [
                tiling.blend(outs, plan, p.shape[1], p.shape[2], scale)[
                    :, : a.shape[1] * scale, : a.shape[2] * scale
                ]
                for outs, plan, p, a in zip(tile_out, plans, padded, arrays, strict=True)
            ]

        if all(len(plan) == 1 for plan in plans):
            # Each image fit one tile (the usual small input): its output is the result, no blend
            # and no pool hop for one.
            upscaled = [
                outs[0][:, : a.shape[1] * scale, : a.shape[2] * scale]
                for outs, a in zip(tile_out, arrays, strict=True)
            ]
        else:
            upscaled = await asyncio.get_running_loop().run_in_executor(self.codec_pool, blend_all)
        images: list[tpb.Image] = []
        for up in upscaled:
            images.extend(
                await self._encode(mv, up[np.newaxis].astype(np.float32, copy=False), out, card.output_range)
            )
        self._check_send_size(sum(len(im.data) for im in images), "the response", out.format)
        return pb.ImageResponse(
            images=images, provenance=self._provenance(mv, batch_sizes), tiles=[len(p) for p in plans]
        )

    async def _do_translate(self, request: pb.ImageRequest, call: Call) -> pb.ImageResponse:
        mv = self._resolve(call, request.model, request.version, ("image_to_image",), "Translate")
        card = mv.card
        assert card is not None
        self._image_count(request.images)
        if request.tile_size or request.HasField("tile_overlap"):
            raise invalid("tile_size", "only SuperResolve takes tile_size/tile_overlap")
        out = self._output_spec(request.output)
        arrays = await self._decode(mv, request.images, card, self.limits.max_input_pixels)
        self._check_min_size(arrays, card)
        self._check_encodable(out, [(a.shape[1], a.shape[2]) for a in arrays])
        self._predict_raw_size(
            out, 1, card.channels, sum(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
        )
        # Bucket by padded shape: same-shape images (of any request) share a batch.
        groups: dict[tuple[int, ...], list[int]] = {}
        padded = [_pad_to_multiple(a, card.size_multiple) for a in arrays]
        for i, p in enumerate(padded):
            groups.setdefault(p.shape, []).append(i)
        keys = list(groups)
        results = await _gather_or_cancel(
            [
                self._run(
                    mv,
                    call,
                    ("image", k),
                    {"image": np.stack([padded[i] for i in groups[k]])},
                    len(groups[k]),
                    Lane.INTERACTIVE,
                )
                for k in keys
            ]
        )
        outputs: list[np.ndarray | None] = [None] * len(arrays)
        batch_sizes: list[int] = []
        for k, result in zip(keys, results, strict=True):
            batch_sizes.extend(result.executed_batch_sizes)
            for row, i in enumerate(groups[k]):
                h, w = arrays[i].shape[1:]
                outputs[i] = result.outputs["output_image"][row, :, :h, :w]  # crop the padding back off
        images: list[tpb.Image] = []
        for o in outputs:
            assert o is not None
            images.extend(await self._encode(mv, o[np.newaxis], out, card.output_range))
        self._check_send_size(sum(len(im.data) for im in images), "the response", out.format)
        return pb.ImageResponse(images=images, provenance=self._provenance(mv, batch_sizes))

    # ================================================================== ListModels / GetModel

    @staticmethod
    def _model_info(model: Model, version: str = "") -> pb.ModelInfo:
        card = model.card()
        info = pb.ModelInfo(name=model.name, kind=model.kind)
        if model.config is not None:
            info.max_batch_size = model.config.batching.max_batch_size
        if model.reason and not model.versions:
            info.versions.append(pb.ModelVersionInfo(state=pb.MODEL_STATE_UNAVAILABLE, reason=model.reason))
        for mv in sorted(model.versions.values(), key=lambda v: int(v.version)):
            if version and mv.version != version:
                continue
            info.versions.append(
                pb.ModelVersionInfo(
                    version=mv.version,
                    state=_STATE[mv.state],
                    reason=mv.reason,
                    model_sha256=mv.sha256,
                    precision=mv.precision,
                    execution_provider=mv.provider,
                    card_json=mv.card.raw_json if mv.card else "",
                )
            )
        if card is not None:
            info.description = card.description
            info.latent_dim = card.latent_dim or 0
            info.class_names.extend(card.class_names)
            if card.kind in LATENT_KINDS and card.image_size is not None:
                info.output_shape.extend([card.channels, *card.image_size])
            info.scale_factor = card.scale_factor if card.kind == "super_resolution" else 1
            info.size_multiple = card.size_multiple
        return info

    async def _do_list_models(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(m) for m in self.repo])

    async def _do_get_model(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        if not request.name:
            raise invalid("name", "required (see ListModels)")
        model = self.repo.get(request.name)
        if request.version and request.version not in model.versions:
            raise NotFound(
                f"model {model.name} has no version {request.version!r}; versions: "
                f"{', '.join(model.versions) or 'none'}",
                field="version",
            )
        return self._model_info(model, request.version)


_STATE = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
    ModelState.DRAINING: pb.MODEL_STATE_DRAINING,
}


def _cancelled_code(call: Call) -> str:
    """The status a cancelled handler is counted under: gRPC cancels it at the client's deadline too."""
    return "DEADLINE_EXCEEDED" if cancelled_by_deadline(call.deadline) else "CANCELLED"


def check_input_range(values: np.ndarray, input_range: tuple[float, float], field: str) -> None:
    """TENSOR_F32 inputs must lie in the card's input_range (1 % slack for rounding): a model fed far
    outside it returns garbage or NaN with OK (a VAE encoder at 3e38 gave NaN latents)."""
    lo, hi = input_range
    slack = 0.01 * (hi - lo)
    low, high = float(values.min()), float(values.max())
    if low < lo - slack or high > hi + slack:
        raise invalid(
            field,
            f"TENSOR_F32 values must be in the model's input_range [{lo:g}, {hi:g}], got {low:g}..{high:g}",
        )


def check_tiling(tile: int, overlap: int, size_multiple: int) -> None:
    """InvalidArgument naming tile_size or tile_overlap unless tiles of that size can be planned."""
    if overlap > MAX_TILE // 4:  # no tile_size could hold it: name the overlap, not a derived tile
        raise invalid(
            "tile_overlap",
            f"must be in 0..{MAX_TILE // 4} (tile_size / 4, tile_size <= {MAX_TILE}), got {overlap}",
        )
    if not 2 * overlap + 8 <= tile <= MAX_TILE:
        raise invalid(
            "tile_size", f"must be in {2 * overlap + 8}..{MAX_TILE} (>= 2 * tile_overlap + 8), got {tile}"
        )
    if overlap > tile // 4:
        raise invalid("tile_overlap", f"must be in 0..{tile // 4} (tile_size / 4), got {overlap}")
    # Tiles start and step in whole multiples of the model's size multiple (tiling.plan_tiles).
    overlap_units = -(-overlap // size_multiple)
    if tile // size_multiple <= overlap_units:
        smallest = size_multiple * (overlap_units + 1)
        raise invalid(
            "tile_size",
            f"must be at least {smallest} for this model (size multiple {size_multiple}, "
            f"tile_overlap {overlap}), got {tile}",
        )


def _pad_to_multiple(chw: np.ndarray, multiple: int) -> np.ndarray:
    """Pad H and W up to a multiple (bottom/right, reflect) so the graph accepts them; crop after."""
    h, w = chw.shape[1:]
    pad_h = -h % multiple
    pad_w = -w % multiple
    if not pad_h and not pad_w:
        return chw
    mode: Literal["reflect", "symmetric"] = "reflect" if pad_h < h and pad_w < w else "symmetric"
    padded: np.ndarray = np.pad(chw, ((0, 0), (0, int(pad_h)), (0, int(pad_w))), mode=mode)
    return padded

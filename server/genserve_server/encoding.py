"""Encoding and decoding of images for the serving core: the codec pool, the encode queue and the
inline-vs-pool policy (an encode cheaper than a hop to the pool runs on the event loop).

Images leave as `EncodedImage` (format, bytes, shape): plain values the servicers turn into their
own messages. Images arrive as anything with `format`, `data` and `shape` (`ImageInput`), which a
genserve.v1 `Image` message already is.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from genserve_server import codecs, validate
from genserve_server.codecs import ImageFormat
from genserve_server.config import Card
from genserve_server.errors import Internal, invalid
from genserve_server.idle_spin import off_loop_work, run_off_loop, run_off_loop_tracked
from genserve_server.infer_stats import CallTiming
from genserve_server.metrics import ModelMetrics
from genserve_server.validate import OutputSpec

T = TypeVar("T")

# Encodes cheaper than a hop to the codec pool run on the event loop (values = H * W * C).
INLINE_COPY_MAX_VALUES = 1 << 16  # RAW_UINT8 / TENSOR_F32: one memcpy
# RAW_UINT8 from the runner's uint8 pixels is only a memcpy (~10 us for 256x256 RGB), well below a hop.
INLINE_RAW_PIXELS_MAX_BYTES = 1 << 20
# Raw (uncompressed) inputs of at most this many bytes in all decode on the loop: a 64x64 RGB
# from_uint8 takes ~20 us, a fifth of the pool hop (which a GPU-served SuperResolve paid per request).
INLINE_DECODE_MAX_BYTES = 1 << 16
INLINE_PNG_MAX_VALUES = 4096  # per image: 64x64 gray, 28x28 RGB; not 64x64 RGB (~0.4 ms)
INLINE_PNG_MAX_TOTAL_VALUES = 4 * 4096  # a request of many small images still goes to the pool


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One response image: `shape` is [H, W, C] of what the bytes decode to ([C, H, W] for TENSOR_F32)."""

    format: ImageFormat
    data: bytes
    shape: tuple[int, ...]


class ImageInput(Protocol):
    """An input image as a client sent it (a genserve.v1 `Image` message is one)."""

    @property
    def format(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def shape(self) -> Sequence[int]: ...


class EncodeQueue:
    """Codec-pool encodes of one event-loop turn, sent to the pool together.

    When a batch of 64 completes, its 64 requests resume in the same turn of the loop and each asks
    for an encode; one pool task per request would cost 64 hops there and back (~90 us each on 2
    cores). Instead the first request of a turn schedules a flush at the end of the turn, which
    splits everything queued into at most `threads` pool tasks (chunks); each task resolves its
    futures with one call back into the loop.

    A caller that leaves before the flush is dropped there (its encode never runs), one that leaves
    while its chunk's earlier encodes run is skipped when its turn comes; one that leaves once its
    chunk is on the pool can ask to be told when that chunk has ended (`left`): its encode may be
    building its response's bytes until then. Nothing is added for a caller that waits its encode out.
    """

    def __init__(self, pool: ThreadPoolExecutor, threads: int) -> None:
        self._pool = pool
        self._threads = max(1, threads)
        self._jobs: list[_Job] = []
        # Chunks handed to the pool whose results have not come back to the loop yet, by id(chunk);
        # and, by the same key, the futures of their callers that left meanwhile (`left`). Callers
        # that wait their encodes out cost one dict entry a chunk: no future, no object per job.
        self._running: dict[int, list[_Job]] = {}
        self._left: dict[int, list[asyncio.Future[None]]] = {}

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._jobs:
            loop.call_soon(self._flush, loop)
        self._jobs.append((job, future))
        return future

    def left(self, future: asyncio.Future[Any], computing: Computing) -> None:
        """The caller of `future` (submit's) left (cancelled). Where its encode is in a chunk handed to
        the pool, `computing` (the call's) gets a future resolved once that chunk has ended (returned
        or raised); where it is still queued, nothing: the flush drops it and it never runs. On the
        loop's thread, as everything here: a chunk's end is delivered there too."""
        for key, chunk in self._running.items():
            if any(queued is future for _, queued in chunk):
                ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                computing.append(ended)
                self._left.setdefault(key, []).append(ended)
                return

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, self._jobs = self._jobs, []
        jobs = [job for job in jobs if not job[1].done()]  # callers gone: their encodes never run
        n_tasks = min(self._threads, len(jobs))
        for i in range(n_tasks):
            chunk = jobs[i::n_tasks]
            self._running[id(chunk)] = chunk  # the entry keeps the chunk alive: its id stays its own
            try:
                self._pool.submit(self._run_chunk, loop, chunk)
            except RuntimeError as exc:  # the pool is shut down (server stopping)
                self._ended(chunk, [(future, None, exc) for _, future in chunk])

    def _run_chunk(self, loop: asyncio.AbstractEventLoop, chunk: list[_Job]) -> None:
        results: list[_Result] = []
        for job, future in chunk:
            # A caller that left (cancelled on the loop) while the chunk's earlier encodes ran: its
            # encode is skipped. Read from this thread, done() is a hint that can only come late
            # (results are set on the loop once the chunk has ended): at worst the encode runs.
            if future.done():
                continue
            try:
                results.append((future, job(), None))
            except BaseException as exc:  # delivered to the request that asked for it
                results.append((future, None, exc))
        try:
            loop.call_soon_threadsafe(self._ended, chunk, results)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting
            pass

    def _ended(self, chunk: list[_Job], results: list[_Result]) -> None:
        """On the loop: the chunk's callers get their results; those that left, their `computing`'s."""
        key = id(chunk)
        del self._running[key]
        for future, value, exc in results:
            _set_future(future, value, exc)
        if self._left:
            for ended in self._left.pop(key, ()):
                _set_future(ended, None, None)


# A Call's `computing`: futures resolved once work that holds its buffers has ended, which
# holding_working_set waits for before it gives a call's working set back, and the boundary before it
# gives its response's bytes back.
Computing = list[asyncio.Future[None]]
# An EncodeQueue job: the encode and its caller's future; a chunk's result for that future.
_Job = tuple[Callable[[], Any], asyncio.Future[Any]]
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]


def _set_future(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def check_finite(images: np.ndarray, label: str, rows: Sequence[int] | None = None) -> None:
    """INTERNAL naming `label` (the model) where the model's output holds NaN or infinity (a diverged
    checkpoint, an fp16 graph overflowing): such an image would go out as black pixels or NaN values,
    answered OK and kept by the image cache. Two SIMD reductions; the details only on failure.
    `rows`: each image's index in the request (the cache's misses, a stream's chunk, one image of
    several sizes), 0..N-1 if None."""
    if codecs.all_finite(images):
        return
    finite = np.isfinite(images.reshape(len(images), -1))
    bad = np.flatnonzero(~finite.all(axis=1))[:8]
    shown = ", ".join(str(i if rows is None else rows[i]) for i in bad)
    nan = int(np.count_nonzero(np.isnan(images)))
    raise Internal(
        f"{label}: the model's output is not finite for image(s) {shown} of the request "
        f"({nan} NaN and {int(finite.size - np.count_nonzero(finite)) - nan} infinite values); "
        "a diverged or overflowing model"
    )


def encode_sync(
    images: np.ndarray,
    out: OutputSpec,
    output_range: tuple[float, float],
    pixels: np.ndarray | None = None,
    label: str = "the model",
    rows: Sequence[int] | None = None,
    finite: np.ndarray | None = None,
) -> list[EncodedImage]:
    """float32 [N, C, H, W] model output (or its uint8 [N, H, W, C] `pixels`, converted once per
    executed batch by the runner) -> encoded images. On the loop when small, else on the codec pool.
    An output that is not finite is no image: INTERNAL naming `label` and `rows` (check_finite).
    `finite`: bool [N], the runner's check of each row (done once per batch), else checked here."""
    # Per request the check's two reductions cost a tiny model ~5 % of its throughput at c=64.
    if finite is None or not finite.all():
        check_finite(images, label, rows)
    fmt = out.format
    if fmt == ImageFormat.TENSOR_F32:
        chw = images.astype("<f4", copy=False)
        return [EncodedImage(fmt, chw[i].tobytes(), chw.shape[1:]) for i in range(len(chw))]
    nhwc = pixels if pixels is not None else codecs.to_uint8(images, output_range)
    if fmt == ImageFormat.RAW_UINT8:
        return [EncodedImage(fmt, nhwc[i].tobytes(), nhwc.shape[1:]) for i in range(len(nhwc))]
    encoded = []
    for i in range(len(nhwc)):
        data, shape = codecs.encode_image(
            nhwc[i], fmt, quality=out.quality, png_compression=out.png_compression
        )
        encoded.append(EncodedImage(fmt, data, tuple(shape)))
    return encoded


def encodes_inline(images: np.ndarray, out: OutputSpec, pixels: np.ndarray | None = None) -> bool:
    """Whether encoding costs less than the hop to the codec pool and back (~90 us on 2 cores)."""
    if out.format == ImageFormat.RAW_UINT8 and pixels is not None:
        return bool(pixels.nbytes <= INLINE_RAW_PIXELS_MAX_BYTES)
    if out.format in (ImageFormat.TENSOR_F32, ImageFormat.RAW_UINT8):
        return bool(images.size <= INLINE_COPY_MAX_VALUES)  # a memcpy of a few KiB
    if out.format == ImageFormat.PNG:
        # A 28x28 gray PNG at zlib level 1 encodes in ~47 us; JPEG/WebP always go to the pool.
        per_image = images.size // max(1, len(images))
        return per_image <= INLINE_PNG_MAX_VALUES and images.size <= INLINE_PNG_MAX_TOTAL_VALUES
    return False


def decodes_inline(images: Sequence[ImageInput]) -> bool:
    """Whether decoding costs less than the hop to the codec pool: raw formats only, a few KiB in all."""
    total = 0
    for image in images:
        if image.format not in (ImageFormat.RAW_UINT8, ImageFormat.TENSOR_F32):
            return False
        total += len(image.data)
    return total <= INLINE_DECODE_MAX_BYTES


def _check_input_channels(card: Card, field: str) -> None:
    if card.input_channels not in (1, 3):
        # A card may take 2 or 4 channels (config.py), served by KServe's tensors; an image here
        # has 1 or 3 (decode_image) and converts only between gray and RGB.
        raise invalid(
            field,
            f"{card.name} takes {card.input_channels}-channel images (its card's input_channels) "
            "and a genserve.v1 image has 1 or 3 channels: send it through KServe ModelInfer",
        )


def declared_sizes(
    images: Sequence[ImageInput],
    card: Card,
    max_pixels: int,
    field_prefix: str = "images",
    limit_name: str = "max_input_pixels",
) -> list[tuple[int, int]]:
    """(height, width) of each input image as its header or shape declares it, refused as decode_sync
    would refuse it before decoding (codecs.checked_size), without decoding: decode_sync gives back
    float32 [card.input_channels, H, W] of these sizes. A TENSOR_F32 image, which decodes to a view
    of its bytes, is checked as decode_sync checks it (finite, in the card's input_range): what no
    wait for memory could make valid is refused before the call waits for it, and the decode after
    the wait (decode_sync's values_checked) does not check it again. A header (or chunk)
    walk each, a TENSOR_F32's values: on the pool (Codec.declared_sizes)."""
    assert card.input_range is not None
    sizes = []
    for i, image in enumerate(images):
        name = f"{field_prefix}[{i}]"
        _check_input_channels(card, name)
        if image.format == ImageFormat.TENSOR_F32:
            tensor = codecs.decode_image(
                image.data,
                image.format,
                list(image.shape),
                max_pixels=max_pixels,
                field=name,
                limit_name=limit_name,
            )
            validate.input_range(tensor, card.input_range, name)
            sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
            continue
        sizes.append(
            codecs.checked_size(
                image.data,
                image.format,
                list(image.shape),
                max_pixels=max_pixels,
                field=name,
                limit_name=limit_name,
            )
        )
    return sizes


def decode_sync(
    images: Sequence[ImageInput],
    card: Card,
    max_pixels: int,
    field_prefix: str,
    limit_name: str = "max_input_pixels",
    values_checked: bool = False,
) -> list[np.ndarray]:
    """Input images -> float32 [C, H, W] in the card's input_range with the model's channels;
    `limit_name`: what `max_pixels` is called in a refusal (Limits.input_pixels); `values_checked`:
    declared_sizes has checked these images (a TENSOR_F32's values, finite and in input_range, are
    not passed over again: its bytes are the same)."""
    assert card.input_range is not None and card.input_channels is not None
    arrays = []
    for i, image in enumerate(images):
        name = f"{field_prefix}[{i}]"
        _check_input_channels(card, name)
        decoded: np.ndarray
        if values_checked and image.format == ImageFormat.TENSOR_F32:
            # Its values were checked before the call's wait: one full pass over them, not two.
            decoded = codecs.tensor_view(
                image.data, list(image.shape), max_pixels=max_pixels, field=name, limit_name=limit_name
            )
        else:
            decoded = codecs.decode_image(
                image.data,
                image.format,
                list(image.shape),
                max_pixels=max_pixels,
                field=name,
                limit_name=limit_name,
            )
            if image.format == ImageFormat.TENSOR_F32:
                validate.input_range(decoded, card.input_range, name)
        if image.format == ImageFormat.TENSOR_F32:
            chw = codecs.convert_channels(decoded.astype(np.float32, copy=False), card.input_channels)
        else:
            chw = codecs.from_uint8(
                decoded.astype(np.uint8, copy=False), card.input_range, card.input_channels
            )
        arrays.append(chw)
    return arrays


class Codec:
    """Encodes and decodes on behalf of every request: small encodes inline, the rest on the pool."""

    def __init__(self, pool: ThreadPoolExecutor, threads: int, max_send_bytes: int) -> None:
        self.pool = pool
        self.max_send_bytes = max_send_bytes
        self._queue = EncodeQueue(pool, threads)

    async def encode(
        self,
        metrics: ModelMetrics,
        images: np.ndarray,
        out: OutputSpec,
        output_range: tuple[float, float],
        pixels: np.ndarray | None = None,
        timing: CallTiming | None = None,
        rows: Sequence[int] | None = None,
        finite: np.ndarray | None = None,
        computing: Computing | None = None,
    ) -> list[EncodedImage]:
        """Encoded images, refused (InvalidArgument) when they would not fit the send limit;
        `timing`: the call's, which counts this as its compute_output (KServe statistics); `rows`:
        each image's index in the request, for check_finite's message (0..N-1 if None); `finite`:
        the runner's check of each image (FINITE_ROWS_OUTPUT, beside its `pixels`); `computing`: the
        call's, told when an encode on the pool it left running has ended (the encode holds copies a
        working set counts and builds the response's bytes: EncodeQueue.left)."""
        started = time.monotonic()
        if images.dtype != np.float32 and (pixels is None or out.format == ImageFormat.TENSOR_F32):
            images = images.astype(np.float32)  # fp16 graphs
        label = metrics.label
        if encodes_inline(images, out, pixels):
            result = encode_sync(images, out, output_range, pixels, label, rows, finite)
        else:
            with off_loop_work():
                queued = self._queue.submit(
                    functools.partial(encode_sync, images, out, output_range, pixels, label, rows, finite)
                )
                try:
                    result = await queued
                except asyncio.CancelledError:
                    if computing is not None:  # left while its encode may run: told once it has ended
                        self._queue.left(queued, computing)
                    raise
        elapsed_s = time.monotonic() - started
        metrics.encode_duration[out.format_name].observe(elapsed_s)
        if timing is not None:
            timing.output_s += elapsed_s
        validate.send_size(
            sum(len(im.data) for im in result),
            self.max_send_bytes,
            "the response",
            out.format,
            items=len(result),
        )
        return result

    async def decode(
        self,
        metrics: ModelMetrics,
        images: Sequence[ImageInput],
        card: Card,
        max_pixels: int,
        field_prefix: str = "images",
        timing: CallTiming | None = None,
        limit_name: str = "max_input_pixels",
        values_checked: bool = False,
        computing: Computing | None = None,
    ) -> list[np.ndarray]:
        """`timing`: the call's, which counts this as its compute_input (KServe statistics);
        `limit_name`: what `max_pixels` is called in a refusal; `values_checked`: as decode_sync's;
        `computing`: the call's, told when a decode on the pool it left running has ended (a call
        holding a working set)."""
        started = time.monotonic()
        if decodes_inline(images):
            arrays = decode_sync(images, card, max_pixels, field_prefix, limit_name, values_checked)
        else:
            arrays = await run_off_loop_tracked(
                self.pool,
                computing,
                decode_sync,
                images,
                card,
                max_pixels,
                field_prefix,
                limit_name,
                values_checked,
            )
        elapsed_s = time.monotonic() - started
        metrics.decode_duration.observe(elapsed_s)
        if timing is not None:
            timing.input_s += elapsed_s
        return arrays

    async def declared_sizes(
        self, images: Sequence[ImageInput], card: Card, max_pixels: int, limit_name: str = "max_input_pixels"
    ) -> list[tuple[int, int]]:
        """declared_sizes(images): inline for a few KiB of raw pixels (decodes_inline), else on the
        pool (a PNG's chunk walk, a TENSOR_F32's values)."""
        if decodes_inline(images):
            return declared_sizes(images, card, max_pixels, limit_name=limit_name)
        return await run_off_loop(self.pool, declared_sizes, images, card, max_pixels, "images", limit_name)

    async def off_loop(self, job: Callable[[], T], computing: Computing | None = None) -> T:
        """CPU-heavy numpy work (blending tiles, drawing strongly truncated latents) on the pool;
        `computing`: the call's, told when the job it left running has ended (a call holding a working
        set, or response bytes the job builds)."""
        return await run_off_loop_tracked(self.pool, computing, job)

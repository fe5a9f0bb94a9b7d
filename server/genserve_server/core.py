"""The protocol-free generation core: what both servicers (genserve.v1 and KServe v2) call.

decode -> plan -> submit (typed batch keys, batch_keys.py) -> unbatch -> encode. Inputs are plain
values and numpy arrays, already parsed from the wire by a servicer; outputs are numpy arrays and
`EncodedImage`s. No module of the core imports grpc, protobuf or the generated stubs
(tests/server/test_layering.py checks it).

- `generate`: seed rows (latents drawn per batch by the runner) or latent rows, plus labels;
- `sample`: `generate` through the image cache when it is on;
- `encode_vae`: images -> latent distributions;
- `upscale`: plan tiles from the declared sizes -> hold the working set -> decode -> pad -> group by
  shape -> submit -> blend -> crop;
- `translate`: bucket by padded declared shape (and a two-way translator's direction) -> hold the
  working set -> decode -> pad -> submit -> crop (`holding_working_set`, which KServe's ModelInfer
  on these kinds holds too, sized by `whole_images_working_set`).
- code priors: code_sampling.py (a prior's step scheduler -> its code_decoder's batcher).
- style generators: style_sampling.py (z -> w by the mapping's batcher, truncation and style
  mixing in w space, ws -> image by the synthesis batcher); `generate` dispatches to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from genserve_server import codecs, latents, style_sampling, tiling, validate
from genserve_server.batch_keys import (
    DRAWN_LATENTS_OUTPUT,
    FINITE_ROWS_OUTPUT,
    PIXELS_OUTPUT,
    SEED_INPUT,
    BatchKey,
    ImageRows,
    LatentRows,
    SeedRows,
    StepRows,
    TileRows,
)
from genserve_server.batch_parts import QueueReservation, Refusals, count_once
from genserve_server.batcher import WITHDRAWN, Batcher, BatchResult, Lane, drop_reason
from genserve_server.config import Card, ServerConfig, cpu_count
from genserve_server.encoding import Codec, EncodedImage, ImageInput
from genserve_server.errors import (
    DeadlineExceeded,
    GenserveError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    invalid,
)
from genserve_server.image_cache import ImageCache, image_key, loaded_versions
from genserve_server.infer_stats import CallTiming
from genserve_server.metrics import Metrics, ModelMetrics
from genserve_server.providers import CPU as CPU_PROVIDER
from genserve_server.repository import Model, ModelVersion, Repository
from genserve_server.response_budget import ByteBudget, Reservation
from genserve_server.step_sampler import StepScheduler
from genserve_server.validate import OutputSpec

if TYPE_CHECKING:
    from genserve_server.runner import Runner

T = TypeVar("T")

# Truncation below this psi may redraw for long: those latents are drawn per request, not per batch.
BATCH_LATENTS_MIN_PSI = 0.01
STREAM_CHUNKS_AHEAD = 2  # chunks computed ahead of the one being sent (HTTP/2 flow control bounds the rest)


@dataclass(slots=True)
class Call:
    """Per-RPC bookkeeping: the boundary creates it and reads it in `finally`; the core fills in the
    model version's metrics and the batcher the call counts against.

    A call holds every model version it uses from resolve to its end (a reload drains a version
    only once no call holds it): its own model's through `batcher` or `stream_batcher`, the models it
    uses beside it through `uses` (GenerationCore.use). The boundary releases them all in `finally`."""

    method: str
    request_id: str
    started: float
    metrics: ModelMetrics
    deadline: float | None = None
    batcher: Batcher | None = None  # its `callers` count includes this RPC while it runs
    stream_batcher: Batcher | None = None  # a SampleStream's: its `streams` count includes this RPC
    # Versions of other models this call uses beside its own (a code prior's decoder and top prior,
    # a style generator's mapping), each held (`dependents`) until the call ends; None for most calls.
    uses: list[ModelVersion] | None = None
    code: str = "OK"  # the status the call ends with (the boundary counts it)
    unary: bool = False  # a unary RPC: its response is held against the response budget
    response: Reservation | None = None  # its bytes held there (response_budget.py)
    timing: CallTiming = field(default_factory=CallTiming)  # its batches' queue and compute (KServe stats)
    # Set once a batcher has counted the call refused (queue_full) or dropped: its other requests
    # (images or tiles of other shapes, a stream's chunks ahead) are not counted again (batch_parts.Caller).
    counted_out: bool = False
    # A refusal found before its deadline (a budget wait that ran out, a code prior's full row
    # budget, a batcher's full queue): where to count it (the refusing model's metrics) and the
    # reason; the boundary counts it as it answers, rejected under the reason if sent before the
    # deadline, else a `deadline` drop (batch_parts.Caller).
    refused: tuple[Refusals, str] | None = None
    # Its requests cancelled while batches holding their rows still computed: each resolved once
    # those have ended (Batcher.submit's `computing`); and its jobs left running off the loop (the
    # decode, blend of a call holding a working set; every kind's encodes on the codec pool, which
    # build its response's bytes; a large response built off the loop: ModelInfer's, the boundary's
    # serialize), each resolved once the job has ended (idle_spin.run_off_loop_tracked, Codec's
    # `computing`, EncodeQueue.left): added only as the call leaves, none for a call that waits.
    # holding_working_set waits for them before it gives the working set back, the boundary before
    # it gives the response's bytes back (Call.release_once_computed).
    computing: list[asyncio.Future[None]] = field(default_factory=list)

    def release_once_computed(self, release: Callable[[], None]) -> None:
        """`release()` now, or once the futures of `computing` still pending have resolved: a call
        that left while its batches computed or a job of its ran off the loop gives back what those
        hold (its working set, its response's bytes) once they have ended."""
        pending = [f for f in self.computing if not f.done()]
        if pending:
            asyncio.gather(*pending).add_done_callback(lambda _: release())
        else:
            release()

    def release_uses(self) -> None:
        """Release the versions of `uses` (at the call's end; a second call releases nothing)."""
        uses, self.uses = self.uses, None
        for mv in uses or ():
            if mv.batcher is not None:
                mv.batcher.release(dependent=True)


@dataclass(slots=True)
class Generated:
    """Images of one generate/sample call, with the latents used and the executed batch sizes."""

    images: list[EncodedImage]
    latents: np.ndarray
    executed_batch_sizes: list[int]
    from_cache: list[bool] | None = None


@dataclass(slots=True)
class Upscaled:
    images: list[EncodedImage]
    executed_batch_sizes: list[int]
    tiles: list[int] = field(default_factory=list)


@dataclass(slots=True)
class EncodedLatents:
    mu: np.ndarray
    logvar: np.ndarray
    z: np.ndarray | None
    executed_batch_sizes: list[int]


async def gather_or_cancel(aws: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """asyncio.gather that cancels the siblings when one fails (their rows leave the queue, counted
    as that failure, not as a caller that went away: batcher.WITHDRAWN), and raises once they have
    left. The parts of one call that expire or are cancelled together count one drop: the batcher
    counts once per Call (Caller)."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except asyncio.CancelledError:
        for task in tasks:  # the call itself was cancelled: the caller's own drop (counted once)
            task.cancel()
        raise
    except BaseException:
        for task in tasks:
            task.cancel(WITHDRAWN)
        # The error goes on once they have left: a sibling whose batch still computes adds that batch
        # to call.computing as it leaves (Batcher.submit), which the call's working set and response
        # bytes wait for (holding_working_set, Call.release_once_computed); raised at once, they
        # were given back while it still held them. Cancelled parts leave at their next loop turn.
        await asyncio.wait(tasks)
        raise


def _unless_unloaded(
    mv: ModelVersion, runner: Runner
) -> Callable[[Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]:
    """A code prior's step call: `runner.run` on step rows, refused with UNAVAILABLE once a reload's
    drain has unloaded the version (its drain_grace_s passed while the call ran): the steps call the
    runner directly, with no batcher to refuse them, and a closed runner's pool would fail the rows
    with a RuntimeError (INTERNAL to the client) instead of what docs/operations.md promises."""
    step = functools.partial(runner.run, StepRows())

    def unloaded() -> Unavailable:
        return Unavailable(
            f"{mv.label} was unloaded while this call ran: a reload replaced it and the call outlasted "
            "drain_grace_s; retry (a request without a version gets the serving one)"
        )

    async def run(inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        if runner.closed:
            raise unloaded()
        try:
            return await step(inputs)
        except RuntimeError:
            if runner.closed:  # closed while this step was handed to its pool
                raise unloaded() from None
            raise

    return run


def image_batch_key(card: Card, shape: tuple[int, ...], direction: int | None = None) -> BatchKey:
    """The key of whole-image rows of `shape` (C, H, W): tiles for super-resolution, images else;
    fixed-size models batch every row together. A two-way translator's rows also by `direction`."""
    if card.image_size is not None:
        return ImageRows(direction=direction)
    if card.kind.tiled:
        return TileRows(shape)
    return ImageRows(shape, direction)


def _count_against(call: Call, model: Model, version: str) -> None:
    """A call refused before it resolved a version of `model`, which exists (its kind, a version not
    ready) counts against the model, not the unresolved series (model=""): the version asked for
    where it exists, else the one a request without a version gets, else the newest."""
    if model.versions:
        asked = model.versions.get(version) if version else model.newest_ready()
        call.metrics = (asked or model.versions[max(model.versions, key=int)]).metrics


def _shutting_down_before(sent: int) -> Unavailable:
    """How a SampleStream the shutdown ends says where its client resumes."""
    return Unavailable(
        f"server is shutting down: the stream ended before image {sent}; "
        f"resume with start_index={sent} (another replica, or this one restarted)"
    )


class GenerationCore:
    """Validation beyond the wire format, planning, batching and encoding, for every protocol."""

    def __init__(
        self, repository: Repository, config: ServerConfig, metrics: Metrics, codec_pool: ThreadPoolExecutor
    ) -> None:
        self.repo = repository
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.codec = Codec(
            codec_pool, config.codec_threads or cpu_count(), config.limits.max_send_message_bytes
        )
        self.image_cache = ImageCache(config.image_cache_bytes) if config.image_cache_bytes else None
        # Versions forget_version dropped that a call may still hold (a drain past drain_grace_s):
        # what such a call computes is served, not cached under a load_id no request reaches again.
        self._forgotten: weakref.WeakSet[ModelVersion] = weakref.WeakSet()
        limits = config.limits
        self.responses = ByteBudget(
            "response budget (response_budget_bytes)",
            limits.response_budget_bytes,
            limits.budget_max_wait_s,
            metrics.response_bytes_pending if metrics.enabled else None,
        )
        self.sr_working_set = ByteBudget(
            "SuperResolve working-set budget (sr_working_set_bytes)",
            limits.sr_working_set_bytes,
            limits.budget_max_wait_s,
            metrics.sr_working_set_bytes if metrics.enabled else None,
        )
        self.translate_working_set = ByteBudget(
            "Translate working-set budget (translate_working_set_bytes)",
            limits.translate_working_set_bytes,
            limits.budget_max_wait_s,
            metrics.translate_working_set_bytes if metrics.enabled else None,
        )
        # Set at SIGTERM (begin_shutdown): SampleStreams end at their next chunk boundary.
        self.shutting_down = asyncio.Event()
        # Set just before the drain grace ends (end_streams): a SampleStream still computing the chunk
        # it would send ends now, with where to resume, not with gRPC's 'Cancelling all calls'.
        self.streams_ending = asyncio.Event()

    def forget_version(self, mv: ModelVersion) -> None:
        """`mv` unloaded: its cached images go (no request can reach them again)."""
        cache = self.image_cache
        if cache is None:
            return
        self._forgotten.add(mv)
        if cache.drop_version(mv.load_id):
            self.metrics.image_cache_bytes.set(cache.nbytes)

    def begin_shutdown(self) -> None:
        """A drain: unary calls finish, each SampleStream ends after the chunk it is sending with
        UNAVAILABLE naming the start_index to resume from (a bulk job's stream can last hours)."""
        self.shutting_down.set()

    def end_streams(self) -> None:
        """The drain grace is about to end: each SampleStream still computing its chunk ends now with
        UNAVAILABLE naming the start_index to resume from (gRPC's cancel at the grace's end names none)."""
        self.shutting_down.set()
        self.streams_ending.set()

    # ------------------------------------------------------------------ resolving and submitting

    def resolve(
        self,
        call: Call,
        name: str,
        version: str,
        kinds: Sequence[str],
        method: str,
        field_prefix: str = "",
        model_field: str = "model",
        elsewhere: Callable[[str], str] | None = None,
    ) -> ModelVersion:
        """The serving version of `name` for a call of `method`; `field_prefix` ("sample." for
        SampleStream) and `model_field` (KServe's "model_name") make messages name the field as the
        client set it; `elsewhere(kind)`: where a model of a kind `method` does not take is served
        ("": nothing to add)."""
        field = f"{field_prefix}{model_field}"
        if not name:
            raise invalid(field, "required (see ListModels)")
        model = self.repo.get(name)
        kind = model.kind_of(version)  # the version's that would serve it, not an edited config.json's
        if kind and kind not in kinds:
            _count_against(call, model, version)
            where = elsewhere(kind) if elsewhere is not None else ""
            hint = f" ({where})" if where else ""
            raise invalid(field, f"{name} is a {kind} model; {method} needs {' or '.join(kinds)}{hint}")
        try:
            mv = model.resolve(version)
        except GenserveError:
            _count_against(call, model, version)
            raise
        call.metrics = mv.metrics
        # A stream keeps its own chunks queued ahead; it is not a caller about to send a row, but
        # a reload's drain waits for it all the same.
        if mv.batcher is not None and call.batcher is None and call.stream_batcher is None:
            if call.method == "SampleStream":
                call.stream_batcher = mv.batcher
                mv.batcher.hold(stream=True)
            else:
                call.batcher = mv.batcher
                mv.batcher.hold()
        return mv

    def use(self, call: Call, name: str, owner: ModelVersion, field: str) -> ModelVersion:
        """The version of `name` that `call` uses beside its own model `owner` (a code prior's decoder
        or top prior, a style generator's mapping: `owner`'s config.json `field`): the serving one at
        the first use, the same one at every later use in the call (a stream's chunks, previews and
        result), held until the call ends. A reload that publishes a new version meanwhile drains the
        old one only after this call. UNAVAILABLE naming `owner` and `field` where `name` is not in
        the repository or has no ready version: the client asked for `owner`, which is there."""
        uses = call.uses
        if uses is None:
            uses = call.uses = []
        else:
            for mv in uses:
                if mv.name == name:
                    return mv
        try:
            mv = self.repo.get(name).resolve("")
        except NotFound:
            raise Unavailable(
                f"{owner.label}: its {field} {name} is not in the repository (config.json {field})"
            ) from None
        except Unavailable as exc:
            raise Unavailable(
                f"{owner.label}: its {field} {name}: {exc.message} (config.json {field})"
            ) from None
        if mv.batcher is not None:  # held before any await: a drain cannot slip in between
            mv.batcher.hold(dependent=True)
        uses.append(mv)
        return mv

    async def submit(
        self,
        mv: ModelVersion,
        call: Call,
        key: BatchKey,
        inputs: dict[str, np.ndarray],
        n: int,
        lane: Lane,
        reservation: QueueReservation | None = None,
    ) -> BatchResult:
        """`reservation`: rows of the queue the call holds (Batcher.reserved), queued into."""
        assert mv.batcher is not None
        entered = time.monotonic()
        result = await mv.batcher.submit(
            key,
            inputs,
            n,
            lane=lane,
            deadline=call.deadline,
            caller=call,
            held=call.response,
            reservation=reservation,
            computing=call.computing,
        )
        call.timing.submitted(entered, result.dispatched_at, time.monotonic())
        return result

    def check_send_size(self, n_bytes: int, what: str, fmt: int | None = None, items: int = 0) -> None:
        """`items`: the images (or other repeated messages) the response holds, each framed."""
        validate.send_size(
            n_bytes,
            self.limits.max_send_message_bytes,
            what,
            None if fmt is None else codecs.ImageFormat(fmt),
            items=items,
        )

    def check_encoded_send_size(
        self,
        images: Sequence[EncodedImage],
        fmt: int,
        beside_bytes: int = 0,
        *,
        what: str | None = None,
        beside_items: int = 0,
    ) -> None:
        """Encoded images, with what the same response holds beside them (`beside_bytes`: the latents
        returned, or a code prior's grids, `beside_items` framed items of them), against the send
        limit: after encoding, where JPEG and WebP sizes are known only then. `what`: the response
        as the refusal names it (default: with its latents)."""
        encoded = sum(len(image.data) for image in images)
        self.check_send_size(
            encoded + beside_bytes,
            what or validate.with_latents(beside_bytes),
            fmt,
            len(images) + beside_items,
        )

    async def reserve_response(self, call: Call, n_bytes: int) -> None:
        """Before compute: hold a unary response's predicted size against the response budget
        (waits while it is spent); the boundary settles and releases it."""
        if not call.unary:  # a stream's chunks are bounded by HTTP/2 flow control and chunks ahead
            return
        if call.response is None:
            call.response = Reservation(self.responses)
        reserve = call.response.reserve(n_bytes + validate.SEND_OVERHEAD_BYTES, call.deadline, call.method)
        await self.wait_for_budget(call, reserve)

    async def wait_for_budget(self, call: Call, wait: Awaitable[T]) -> T:
        """`wait` for a budget (response_budget.py): a call whose deadline passes while it waits, or
        whose caller goes away, counts in genserve_requests_dropped_total (`deadline`, `cancelled`),
        once for its RPC, as a request that leaves a batcher's queue does; one refused when its wait
        runs out before its deadline (budget_max_wait_s) is marked `refused` (`budget`), and the boundary
        counts it in genserve_requests_rejected_total (`budget`) if it answers before the deadline,
        else as a `deadline` drop (Boundary.fail)."""
        try:
            return await wait
        except asyncio.CancelledError as exc:  # gRPC ended the call (its deadline) or the client left
            if exc.args != (WITHDRAWN,) and count_once(call):
                call.metrics.dropped[drop_reason(call.deadline, time.monotonic())].inc()
            raise
        except DeadlineExceeded:  # the wait ran out at the deadline
            if count_once(call):
                call.metrics.dropped["deadline"].inc()
            raise
        except ResourceExhausted:  # the wait ran out: budget_max_wait_s, or the deadline
            if call.deadline is not None and time.monotonic() >= call.deadline:
                if count_once(call):  # as the client gets it (boundary._past_deadline: no slack here)
                    call.metrics.dropped["deadline"].inc()  # DEADLINE_EXCEEDED
            else:
                # RESOURCE_EXHAUSTED only if the boundary answers before the deadline: counted there
                # (Boundary.fail), with the clock reading that decides what its client gets.
                call.refused = (call.metrics, "budget")
            raise

    def random_base_seed(self, n: int) -> int:
        return secrets.randbelow(validate.SEED_LIMIT - n)

    # ------------------------------------------------------------------ generators and decoders

    async def generate_batch(
        self,
        mv: ModelVersion,
        call: Call,
        labels: np.ndarray | None,
        lane: Lane,
        *,
        seeds: Sequence[int] | None = None,
        psi: float | None = None,
        z: np.ndarray | None = None,
        seed_field: str = "seeds",
        psi_field: str = "truncation_psi",
    ) -> tuple[BatchResult, np.ndarray]:
        """The model's outputs for explicit latents `z` or for `seeds` (+ psi), and the latents used.

        Seed rows go to the batcher as seeds (SeedRows): the runner draws the latents of a whole
        batch in one vectorised call, and row i depends only on (seed_i, psi), so an image never
        depends on its batch. psi is part of the key (one psi per batch); labels and seeds mix freely.
        """
        card = mv.card
        assert card is not None and card.latent_dim is not None
        if card.kind.styled:  # z -> w through its mapping, truncation in w space (style_sampling.py)
            return await style_sampling.generate_batch(self, mv, call, lane, seeds=seeds, psi=psi, z=z)
        key: BatchKey
        inputs: dict[str, np.ndarray]
        if psi is not None:  # here, not in the runner, so that a bad psi fails only its own request
            latents.check_truncation_psi(psi, card.latent_dim, field=psi_field)
        if z is None and seeds is not None and (psi is None or psi >= BATCH_LATENTS_MIN_PSI):
            n = len(seeds)
            key = SeedRows(psi)
            inputs = {SEED_INPUT: np.asarray(seeds, dtype=np.int64)}
        else:
            if z is None:
                # A tiny psi may redraw for long (~1 ms a seed): per request, not per batch, and on
                # the codec pool so that the event loop keeps serving everyone else meanwhile.
                assert seeds is not None
                draw = functools.partial(
                    latents.latents_for_seeds, seeds, card.latent_dim, psi, field=seed_field
                )
                drawn: np.ndarray = await self.codec.off_loop(draw)
                z = drawn
            n = len(z)
            key = LatentRows()
            inputs = {"z": z}
        if labels is not None:
            inputs["label"] = labels
        result = await self.submit(mv, call, key, inputs, n, lane)
        return result, z if z is not None else result.outputs[DRAWN_LATENTS_OUTPUT]

    async def generate(
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
        psi_field: str = "truncation_psi",
        reserve: bool = True,
        rows: Sequence[int] | None = None,
    ) -> Generated:
        """`generate_batch`, encoded; refused before compute where the size could be too large, and
        its size held against the response budget (`reserve` False: the caller holds it). `rows`:
        each image's index in the request (Codec.encode)."""
        card = mv.card
        assert card is not None and card.image_size is not None and card.latent_dim is not None
        n = len(seeds) if z is None and seeds is not None else len(z) if z is not None else 0
        limit = self.limits.max_send_message_bytes
        # The returned latents ride in the same response as the images: their sum must fit.
        latent_bytes = n * card.latent_dim * 4 if out.return_latents else 0
        expected = validate.predicted_send_size(out, n, card.channels, *card.image_size, limit, latent_bytes)
        if reserve:
            await self.reserve_response(call, expected)
        result, used = await self.generate_batch(
            mv, call, labels, lane, seeds=seeds, psi=psi, z=z, seed_field=seed_field, psi_field=psi_field
        )
        images = await self.codec.encode(
            mv.metrics,
            result.outputs["image"],
            out,
            card.output_range,
            result.outputs.get(PIXELS_OUTPUT),
            timing=call.timing,
            finite=result.outputs.get(FINITE_ROWS_OUTPUT),
            rows=rows,
            computing=call.computing,  # left meanwhile: its response bytes are held until it has ended
        )
        if latent_bytes:  # JPEG and WebP are known only now (the others were checked exactly above)
            self.check_encoded_send_size(images, out.format, latent_bytes)
        return Generated(images, used, result.executed_batch_sizes)

    async def sample(
        self,
        mv: ModelVersion,
        call: Call,
        seeds: list[int],
        labels: np.ndarray | None,
        psi: float | None,
        out: OutputSpec,
        lane: Lane,
    ) -> Generated:
        """Images for seeds; where the image cache is on, only the seeds it does not hold are computed."""
        cache = self.image_cache
        if cache is None:
            return await self.generate(mv, call, labels, out, lane, seeds=seeds, psi=psi)
        card = mv.card
        assert card is not None and card.image_size is not None and card.latent_dim is not None
        loaded = mv.load_id
        used = [mv]
        if card.kind.styled:  # its images depend on its mapping's version too: the one this call holds
            used.append(style_sampling.style_mapping(self, call, mv))
            loaded = loaded_versions(loaded, used[1].load_id)
        # The whole response is held, cached images too: an unread one holds their copies.
        limit = self.limits.max_send_message_bytes
        latent_bytes = len(seeds) * card.latent_dim * 4 if out.return_latents else 0
        expected = validate.predicted_send_size(
            out, len(seeds), card.channels, *card.image_size, limit, latent_bytes
        )
        await self.reserve_response(call, expected)
        keys = [
            image_key(
                loaded,
                seed,
                None if labels is None else int(labels[i]),
                psi,
                out.format,
                out.quality,
                out.png_compression,
            )
            for i, seed in enumerate(seeds)
        ]
        looking = time.monotonic()
        found = [cache.get(key) for key in keys]
        call.timing.cache_done(time.monotonic() - looking)
        missing = [i for i, entry in enumerate(found) if entry is None]
        mv.metrics.cache_hits.inc(len(seeds) - len(missing))
        mv.metrics.cache_misses.inc(len(missing))
        images = [EncodedImage(out.format, b"", ()) if e is None else e.image(out.format) for e in found]
        z = np.empty((len(seeds), card.latent_dim), np.float32)
        for i, entry in enumerate(found):
            if entry is not None:
                z[i] = entry.latent()
        batch_sizes: list[int] = []
        if missing:
            computed = await self.generate(
                mv,
                call,
                None if labels is None else labels[missing],
                out,
                lane,
                seeds=[seeds[i] for i in missing],
                psi=psi,
                reserve=False,
                rows=missing,
            )
            batch_sizes = computed.executed_batch_sizes
            # A version unloaded while this call computed (forget_version dropped its entries): none kept.
            keep = not any(v in self._forgotten for v in used)
            inserting = time.monotonic()
            for j, i in enumerate(missing):
                images[i] = computed.images[j]
                z[i] = computed.latents[j]
                if keep:
                    cache.put(keys[i], computed.images[j], computed.latents[j])
            call.timing.cache_done(time.monotonic() - inserting)
            self.metrics.image_cache_bytes.set(cache.nbytes)
        if len(missing) < len(seeds):  # what generate checks for computed images, for the whole response
            self.check_encoded_send_size(images, out.format, latent_bytes)
        return Generated(images, z, batch_sizes, [entry is not None for entry in found])

    async def sample_range(
        self,
        mv: ModelVersion,
        call: Call,
        base: int,
        count: int,
        start_index: int,
        chunk_size: int,
        label_cycle: np.ndarray,
        psi: float | None,
        out: OutputSpec,
        lane: Lane,
        queue_rows: int | None = None,
    ) -> AsyncIterator[tuple[int, list[int], np.ndarray | None, Generated]]:
        """Images start_index .. count - 1 of a stream (image i: seed base + i, label i mod cycle), in
        chunks, computed up to STREAM_CHUNKS_AHEAD chunks ahead of the one being sent.

        `queue_rows`: the smallest queue the chunks go to (a style generator's mapping's too). An
        INTERACTIVE stream's chunks are refused at once where the queue is full, so it keeps no
        more chunks in it than it holds: its own chunks ahead would otherwise fill it and fail the
        stream with RESOURCE_EXHAUSTED on an idle server (a BULK chunk waits for room instead)."""
        ahead = STREAM_CHUNKS_AHEAD
        if lane == Lane.INTERACTIVE and queue_rows is not None:
            ahead = max(0, min(ahead, queue_rows // chunk_size - 1))

        async def chunk(start: int, n: int) -> tuple[int, list[int], np.ndarray | None, Generated]:
            seeds = list(range(base + start, base + start + n))
            labels = label_cycle[np.arange(start, start + n) % len(label_cycle)] if len(label_cycle) else None
            try:
                generated = await self.generate(
                    mv,
                    call,
                    labels,
                    out,
                    lane,
                    seeds=seeds,
                    psi=psi,
                    seed_field="sample.base_seed",
                    psi_field="sample.truncation_psi",
                    rows=range(start, start + n),
                )
            except InvalidArgument as exc:
                if exc.field != "output":
                    raise
                # A chunk above the send limit: the stream's fields are sample.output and chunk_size
                # (its count is not the problem: any count streams in chunks).
                problem = exc.message.removeprefix("output: ")
                raise invalid(
                    "sample.output", f"a chunk of {n} images: {problem}, or a smaller chunk_size"
                ) from None
            return start, seeds, labels, generated

        pending: deque[asyncio.Task[tuple[int, list[int], np.ndarray | None, Generated]]] = deque()
        next_index = sent = start_index
        withdraw: str | None = None  # the message the chunks ahead are cancelled with at the end
        stopping = asyncio.ensure_future(self.shutting_down.wait())
        try:
            while sent < count:
                if self.shutting_down.is_set():
                    # Shutting down: the chunk in flight is sent, the ones computed ahead are dropped,
                    # and the stream ends at that chunk boundary with a status clients resume from
                    # (counted as that status, not as a caller that went away: WITHDRAWN).
                    while len(pending) > 1:
                        pending.pop().cancel(WITHDRAWN)
                    if not pending:
                        raise _shutting_down_before(sent)
                while not self.shutting_down.is_set() and len(pending) <= ahead and next_index < count:
                    n = min(chunk_size, count - next_index)
                    pending.append(asyncio.ensure_future(chunk(next_index, n)))
                    next_index += n
                if not self.shutting_down.is_set():
                    await asyncio.wait((pending[0], stopping), return_when=asyncio.FIRST_COMPLETED)
                    if not pending[0].done():
                        continue  # shutting down while this chunk computes: drop the ones ahead first
                await self._chunk_before_streams_end(pending, sent)
                try:
                    item = await pending.popleft()
                except Unavailable as exc:  # the version unloaded under it: where to resume, as above
                    raise Unavailable(
                        f"{exc.message}: the stream ended before image {sent}; resume with start_index={sent}"
                    ) from None
                sent = item[0] + len(item[1])
                yield item
        except Exception:
            # A chunk failed: the ones ahead leave as that failure, as gather_or_cancel's parts do.
            withdraw = WITHDRAWN
            raise
        finally:
            stopping.cancel()
            for task in pending:  # else the caller went away (cancelled): its own drop
                task.cancel(withdraw)

    async def _chunk_before_streams_end(self, pending: deque[asyncio.Task[Any]], sent: int) -> None:
        """Wait for a stream's next chunk (pending[0]) until end_streams; where the grace ends first,
        it is withdrawn and the stream ends saying where to resume (from `sent`)."""
        task = pending[0]
        if task.done():
            return
        ending = asyncio.ensure_future(self.streams_ending.wait())
        try:
            await asyncio.wait((task, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
        if not task.done():
            pending.popleft().cancel(WITHDRAWN)
            raise _shutting_down_before(sent)

    # ------------------------------------------------------------------ code priors (step batching)

    def stepper(self, mv: ModelVersion) -> StepScheduler:
        """The step scheduler of a code_prior version (made on first use). Kept on the version, so
        that it goes with it: a reload's new version gets its own while the old one finishes its
        running rows, and the old one's (which holds its runner's sessions) is freed with it."""
        found = mv.stepper
        if found is None:
            card = mv.card
            runner = mv.runner
            assert card is not None and card.grid is not None and card.codebook_size is not None
            assert runner is not None
            found = StepScheduler(
                _unless_unloaded(mv, runner),
                name=mv.label,
                grid=card.grid,
                codebook_size=card.codebook_size,
                max_rows=mv.config.batching.max_batch_size,
                stream=1 if card.top_grid is not None else 0,
                takes_label=bool(card.class_names),
                top_grid=card.top_grid,
                metrics=mv.metrics,
                defaults=mv.config.sampling,
                # On a GPU a step is flat in its rows but a new input shape rebuilds cuDNN plans.
                stable_shapes=runner.info.on_gpu,
            )
            mv.stepper = found
        return found

    # ------------------------------------------------------------------ VAE encoder

    async def encode_vae(
        self, mv: ModelVersion, call: Call, images: Sequence[ImageInput], sample_seed: int | None
    ) -> EncodedLatents:
        """Latent distributions of images of the encoder's size; with `sample_seed`, also z = mu +
        sigma * eps with eps from seeds sample_seed + i."""
        card = mv.card
        assert card is not None and card.image_size is not None and card.latent_dim is not None
        n = len(images)
        # The response's size is exact before compute: mu and logvar (and z) of each image, float32.
        latent_bytes = n * card.latent_dim * 4 * (2 if sample_seed is None else 3)
        limit = self.limits.max_send_message_bytes
        if latent_bytes + n * validate.ITEM_FRAMING_BYTES + validate.SEND_OVERHEAD_BYTES > limit:
            raise invalid(
                "images",
                f"the returned latents of {n} images would be {latent_bytes} bytes ({card.latent_dim} "
                f"float32 each for mu, logvar{'' if sample_seed is None else ' and z'}), above "
                f"max_send_message_bytes={limit}; send fewer images",
            )
        for i, image in enumerate(images):
            # From the header or shape, before decoding: a large image is refused without its cost.
            declared = codecs.declared_size(image.data, image.format, image.shape)
            if declared is not None:
                validate.input_size(card, *declared, f"images[{i}]")
        # Every input image is bounded by max_input_pixels (as KServe's ModelInfer bounds the same
        # encoder's): one of the encoder's size above it is refused, naming the limit.
        max_pixels, limit_name = self.limits.input_pixels(card.kind)
        arrays = await self.codec.decode(
            mv.metrics, images, card, max_pixels, timing=call.timing, limit_name=limit_name
        )
        for i, chw in enumerate(arrays):
            validate.input_size(card, chw.shape[1], chw.shape[2], f"images[{i}]")
        await self.reserve_response(call, latent_bytes)
        result = await self.submit(mv, call, ImageRows(), {"image": np.stack(arrays)}, n, Lane.INTERACTIVE)
        mu = result.outputs["mu"].astype(np.float32, copy=False).reshape(n, -1)
        logvar = result.outputs["logvar"].astype(np.float32, copy=False).reshape(n, -1)
        z = None
        if sample_seed is not None:
            eps = latents.eps_for_seeds(list(range(sample_seed, sample_seed + n)), mu.shape[1], field="seed")
            z = sampled_z(mv.label, mu, logvar, eps)
        return EncodedLatents(mu, logvar, z, result.executed_batch_sizes)

    # ------------------------------------------------------------------ super-resolution

    async def upscale(
        self,
        mv: ModelVersion,
        call: Call,
        images: Sequence[ImageInput],
        tile_size: int,
        tile_overlap: int | None,
        out: OutputSpec,
    ) -> Upscaled:
        """`tile_size` 0 / `tile_overlap` None: the model's defaults, which make tiling exact: overlap
        >= 2 * the receptive-field radius measured at load, each tile discarding `radius` pixels at
        its inner edges (tiling.py explains the rule)."""
        card = mv.card
        assert card is not None
        radius = mv.tile_radius
        fixed_tile = validate.fixed_tile(card, tile_size)
        if fixed_tile is not None:
            # A graph of one input size takes each image (of that size) whole: one tile, no seam.
            tile, overlap = fixed_tile, 0
        else:
            _, default_overlap = validate.default_tiling(card, radius)
            overlap = default_overlap if tile_overlap is None else tile_overlap
            tile = tile_size or validate.tile_for(card, overlap)
            validate.tiling(
                tile,
                overlap,
                card.size_multiple,
                overlap_given=tile_overlap is not None,
                min_size=card.min_size,
            )
        max_pixels, limit_name = self.limits.input_pixels(card.kind)
        # Sized from what the images declare: they are decoded once the call holds its working set.
        sizes = await self.codec.declared_sizes(images, card, max_pixels, limit_name=limit_name)
        validate.input_sizes(sizes, card)
        validate.min_size(sizes, card)
        scale = card.scale_factor
        out_sizes = [(h * scale, w * scale) for h, w in sizes]
        validate.encodable(out, out_sizes)
        expected = validate.predicted_images_send_size(
            out, card.channels, out_sizes, self.limits.max_send_message_bytes
        )
        # Counted before anything is decoded, padded or planned (on the event loop): a few KB of
        # blank PNGs in 8x8 tiles are hundreds of thousands of tiles, refused here at no cost.
        multiple = card.size_multiple
        sides = [padded_size(h, w, multiple) for h, w in sizes]
        n_tiles = sum(tiling.count_tiles(h, w, tile, overlap, multiple) for h, w in sides)
        assert mv.batcher is not None
        if n_tiles > mv.batcher.max_queue_size:  # could never be queued: not worth a retry
            raise invalid(
                "tile_size",
                f"{len(sizes)} image(s) cut into {n_tiles} tiles of {tile}x{tile}, more than this model's "
                f"queue holds (max_queue_size={mv.batcher.max_queue_size}); use a larger tile_size or "
                "send fewer or smaller images",
            )
        # Pad each image to the size multiple (reflect), cut equal-sized tiles; tiles of one shape
        # from this and other requests share batches; blend, then crop the padding back off.
        margin = min(radius, overlap // 2) if radius is not None else None
        plans = [tiling.plan_tiles(h, w, tile, overlap, multiple, margin=margin) for h, w in sides]
        channels = card.input_channels or card.channels
        tile_shapes = {(channels, t.h, t.w) for plan in plans for t in plan}
        most_rows = max(mv.batcher.most_rows(TileRows(shape)) for shape in tile_shapes)
        working_set = image_working_set(
            card, sizes, sides, plans, out, most_rows, mv.batcher.concurrency, on_cpu=on_cpu(mv)
        )
        # The working set first: a call waiting for it holds no response bytes, or a burst of
        # SuperResolves would hold the server-wide response budget every other RPC needs.
        async with self.holding_working_set(call, card, working_set, "SuperResolve"):
            arrays = await self._decode_declared(mv, call, images, sizes, max_pixels, limit_name)
            padded = [pad_to_multiple(a, multiple) for a in arrays]
            await self.reserve_response(call, expected)
            return await self._upscale_tiles(mv, call, arrays, padded, plans, out)

    @contextlib.asynccontextmanager
    async def holding_working_set(
        self, call: Call, card: Card, n_bytes: int, what: str
    ) -> AsyncIterator[None]:
        """Hold `n_bytes` (an image_working_set) of the working-set budget of `card`'s kind while
        the block runs: sr_working_set_bytes for super-resolution, translate_working_set_bytes for
        the kinds Translate answers. Waits as wait_for_budget does (RESOURCE_EXHAUSTED naming the
        budget after budget_max_wait_s, counted `budget`); more than the whole budget is clamped to
        it (the call runs alone). `what`: the RPC, for the refusal. A call that leaves (cancelled,
        failed) while batches holding its rows still compute, or while its decode, blend or encode
        runs on the codec pool, gives its bytes back once they have ended: their inputs, the
        model's intermediates and outputs, the decoded images, canvases and encoded copies are alive
        until then."""
        budget = self.sr_working_set if card.kind.tiled else self.translate_working_set
        held = await self.wait_for_budget(call, budget.acquire(n_bytes, call.deadline, what))
        try:
            yield
        finally:
            # call.computing is kept: the boundary gives the call's response bytes back once they
            # have ended too (a ModelInfer's response built on the codec pool).
            call.release_once_computed(lambda: budget.release(held))

    def whole_images_working_set(
        self,
        mv: ModelVersion,
        sizes: Sequence[tuple[int, int]],
        padded: Sequence[tuple[int, int]],
        out: OutputSpec,
        direction: int | None = None,
    ) -> int:
        """image_working_set of images that `mv` takes whole (a Translate's; a KServe ModelInfer's on
        super-resolution or image-to-image, which tiles nothing): one tiling.whole_image plan an
        image of `sizes` padded to `padded`, batched as their shapes' batch keys allow."""
        card = mv.card
        assert card is not None and mv.batcher is not None
        channels = card.input_channels or card.channels
        shapes = {(channels, h, w) for h, w in padded}
        return image_working_set(
            card,
            sizes,
            padded,
            [tiling.whole_image(h, w) for h, w in padded],
            out,
            max(mv.batcher.most_rows(image_batch_key(card, shape, direction)) for shape in shapes),
            mv.batcher.concurrency,
            on_cpu=on_cpu(mv),
        )

    async def _decode_declared(
        self,
        mv: ModelVersion,
        call: Call,
        images: Sequence[ImageInput],
        sizes: Sequence[tuple[int, int]],
        max_pixels: int,
        limit_name: str,
    ) -> list[np.ndarray]:
        """Decode `images` of the `sizes` they declare (declared_sizes), which the call's working set
        was sized from: codecs refuses an image its decoder reads at another size, and so does this.
        A TENSOR_F32's values, which declared_sizes checked, are not checked again."""
        assert mv.card is not None
        arrays = await self.codec.decode(
            mv.metrics,
            images,
            mv.card,
            max_pixels,
            timing=call.timing,
            limit_name=limit_name,
            values_checked=True,
            computing=call.computing,
        )
        for i, (chw, (h, w)) in enumerate(zip(arrays, sizes, strict=True)):
            if chw.shape[1:] != (h, w):
                raise invalid(
                    f"images[{i}]",
                    f"corrupt image: it declares {h}x{w} pixels and decodes to {chw.shape[1]}x{chw.shape[2]}",
                )
        return arrays

    async def _upscale_tiles(
        self,
        mv: ModelVersion,
        call: Call,
        arrays: Sequence[np.ndarray],
        padded: Sequence[np.ndarray],
        plans: Sequence[Sequence[tiling.Tile]],
        out: OutputSpec,
    ) -> Upscaled:
        """Cut, submit, blend and encode (within the request's working-set budget)."""
        card = mv.card
        assert card is not None
        scale = card.scale_factor
        groups: dict[tuple[int, ...], list[tuple[int, int, np.ndarray]]] = {}
        for img_i, (chw, tiles) in enumerate(zip(padded, plans, strict=True)):
            for tile_i, t in enumerate(tiles):
                patch = tiling.extract(chw, t)
                groups.setdefault(patch.shape, []).append((img_i, tile_i, patch))
        shapes = list(groups)
        results = await gather_or_cancel(
            [
                self.submit(
                    mv,
                    call,
                    TileRows(shape),
                    {"image": np.stack([g[2] for g in groups[shape]])},
                    len(groups[shape]),
                    Lane.INTERACTIVE,
                )
                for shape in shapes
            ]
        )
        tile_out: list[list[np.ndarray]] = [[np.empty(0)] * len(p) for p in plans]
        batch_sizes: list[int] = []
        for shape, result in zip(shapes, results, strict=True):
            batch_sizes.extend(result.executed_batch_sizes)
            for row, (img_i, tile_i, _) in enumerate(groups[shape]):
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
            upscaled = await self.codec.off_loop(blend_all, call.computing)
        encoded = await self._encode_each(mv, call, upscaled, out)
        return Upscaled(encoded, batch_sizes, [len(p) for p in plans])

    async def _encode_each(
        self, mv: ModelVersion, call: Call, outputs: Sequence[np.ndarray], out: OutputSpec
    ) -> list[EncodedImage]:
        """Images of different sizes, one encode each; the whole response checked against the limit."""
        assert mv.card is not None
        images: list[EncodedImage] = []
        for i, o in enumerate(outputs):
            images.extend(
                await self.codec.encode(
                    mv.metrics,
                    o[np.newaxis].astype(np.float32, copy=False),
                    out,
                    mv.card.output_range,
                    timing=call.timing,
                    rows=(i,),
                    computing=call.computing,
                )
            )
        self.check_encoded_send_size(images, out.format)
        return images

    # ------------------------------------------------------------------ image-to-image

    async def translate(
        self,
        mv: ModelVersion,
        call: Call,
        images: Sequence[ImageInput],
        out: OutputSpec,
        direction: int = validate.A_TO_B,
    ) -> Upscaled:
        """`direction` (validate.A_TO_B or B_TO_A): a two-way translator's generator; a one-way
        model has A_TO_B only."""
        card = mv.card
        assert card is not None
        validate.direction(direction, card)
        two_way = direction if card.kind.two_way else None
        max_pixels, limit_name = self.limits.input_pixels(card.kind)
        # As SuperResolve's: sized from what the images declare, decoded once the call holds it.
        sizes = await self.codec.declared_sizes(images, card, max_pixels, limit_name=limit_name)
        validate.input_sizes(sizes, card)
        validate.min_size(sizes, card)
        validate.encodable(out, sizes)
        expected = validate.predicted_images_send_size(
            out, card.channels, sizes, self.limits.max_send_message_bytes
        )
        # Bucket by padded shape: same-shape images (of any request) share a batch.
        sides = [padded_size(h, w, card.size_multiple) for h, w in sizes]
        channels = card.input_channels or card.channels
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (h, w) in enumerate(sides):
            groups.setdefault((channels, h, w), []).append(i)
        working_set = self.whole_images_working_set(mv, sizes, sides, out, two_way)
        # As SuperResolve's: the working set first, then the response's bytes.
        async with self.holding_working_set(call, card, working_set, "Translate"):
            arrays = await self._decode_declared(mv, call, images, sizes, max_pixels, limit_name)
            padded = [pad_to_multiple(a, card.size_multiple) for a in arrays]
            await self.reserve_response(call, expected)
            return await self._translate_images(mv, call, arrays, padded, groups, out, two_way)

    async def _translate_images(
        self,
        mv: ModelVersion,
        call: Call,
        arrays: Sequence[np.ndarray],
        padded: Sequence[np.ndarray],
        groups: Mapping[tuple[int, ...], Sequence[int]],
        out: OutputSpec,
        two_way: int | None,
    ) -> Upscaled:
        """Submit each padded shape's images, crop and encode (within the request's working-set budget)."""
        card = mv.card
        assert card is not None
        shapes = list(groups)
        results = await gather_or_cancel(
            [
                self.submit(
                    mv,
                    call,
                    image_batch_key(card, shape, two_way),
                    {"image": np.stack([padded[i] for i in groups[shape]])},
                    len(groups[shape]),
                    Lane.INTERACTIVE,
                )
                for shape in shapes
            ]
        )
        outputs: list[np.ndarray] = [np.empty(0)] * len(arrays)
        batch_sizes: list[int] = []
        for shape, result in zip(shapes, results, strict=True):
            batch_sizes.extend(result.executed_batch_sizes)
            for row, i in enumerate(groups[shape]):
                h, w = arrays[i].shape[1:]
                outputs[i] = result.outputs["output_image"][row, :, :h, :w]  # crop the padding back off
        return Upscaled(await self._encode_each(mv, call, outputs, out), batch_sizes)


def sampled_z(label: str, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """z = mu + exp(logvar / 2) * eps, float32 [N, Z]. A z that is not finite (float32's exp overflows
    for logvar above ~177: a diverged or fp16-overflowing encoder; or mu/logvar NaN) fails the call
    INTERNAL naming the model: an infinite latent answered OK would only be refused by Decode."""
    with np.errstate(over="ignore", invalid="ignore"):
        z: np.ndarray = (mu + np.exp(logvar / 2) * eps).astype(np.float32)
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:8])
        mu_bad, logvar_bad = mu[bad], logvar[bad]
        causes = []
        if np.isnan(mu_bad).any():
            causes.append("mu holds NaN")
        if np.isinf(mu_bad).any():
            causes.append("mu is infinite")
        if np.isnan(logvar_bad).any():
            causes.append("logvar holds NaN")
        numbers = logvar_bad[~np.isnan(logvar_bad)]
        top = float(numbers.max()) if numbers.size else float("nan")
        with np.errstate(over="ignore"):
            overflows = bool(np.isposinf(np.exp(numbers / 2)).any())
        if overflows:
            causes.append(f"largest logvar there {top:.3g}; exp(logvar / 2) overflows float32 above ~177")
        elif not causes:
            causes.append(
                f"mu + exp(logvar / 2) * eps overflows float32: largest |mu| there "
                f"{float(np.abs(mu_bad).max()):.3g}, largest logvar {top:.3g}"
            )
        raise Internal(
            f"{label}: the encoder's mu/logvar give no finite z to sample for image(s) {rows} "
            f"({'; '.join(causes)})"
        )
    return z


def on_cpu(mv: ModelVersion) -> bool:
    """Whether `mv`'s sessions run on ONNX Runtime's CPU provider (its intermediates in host memory)."""
    return mv.provider == CPU_PROVIDER


def image_working_set(
    card: Card,
    sizes: Sequence[tuple[int, int]],
    padded: Sequence[tuple[int, int]],
    plans: Sequence[Sequence[tiling.Tile]],
    out: OutputSpec,
    batch_rows: int,
    concurrent_batches: int = 1,
    *,
    on_cpu: bool = False,
) -> int:
    """tiling.working_set_bytes of a SuperResolve (its tile plans) or a Translate (a whole_image plan
    an image) of images of `sizes` (h, w) padded to `padded`, batched `batch_rows` rows at most,
    `concurrent_batches` batches at once (the model's instances, Batcher.concurrency): sized before
    they are decoded (declared_sizes). `on_cpu` (the model's sessions run on the CPU
    provider): the card's activation_bytes_per_output_value, where it has one, sizes the model's
    intermediates (tiling.computing_copies), and they stay resident under the blend and the encode
    (tiling.working_set_bytes' intermediates_kept)."""
    in_channels = card.input_channels or card.channels
    return tiling.working_set_bytes(
        plans,
        padded,
        in_channels,
        card.channels,
        card.scale_factor or 1,
        batch_rows,
        # The decoded float32 images, and their padded copies where padding makes new arrays.
        input_bytes=sum(
            4 * in_channels * (h * w + (ph * pw if (ph, pw) != (h, w) else 0))
            for (h, w), (ph, pw) in zip(sizes, padded, strict=True)
        ),
        encode_bytes_per_value=(
            0 if out.format == codecs.ImageFormat.TENSOR_F32 else tiling.ENCODE_BYTES_PER_VALUE
        ),
        computing_copies=tiling.computing_copies(card.activation_bytes_per_output_value, on_cpu),
        concurrent_batches=concurrent_batches,
        # ORT's CPU arena keeps what the model call grew it by while the blend and encode run.
        intermediates_kept=on_cpu,
    )


def padded_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    """(h, w) rounded up to `multiple`: the size pad_to_multiple gives an image."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def pad_to_multiple(chw: np.ndarray, multiple: int) -> np.ndarray:
    """Pad H and W up to a multiple (bottom/right, reflect) so the graph accepts them; crop after."""
    h, w = chw.shape[1:]
    pad_h = -h % multiple
    pad_w = -w % multiple
    if not pad_h and not pad_w:
        return chw
    mode: Literal["reflect", "symmetric"] = "reflect" if pad_h < h and pad_w < w else "symmetric"
    padded: np.ndarray = np.pad(chw, ((0, 0), (0, int(pad_h)), (0, int(pad_w))), mode=mode)
    return padded

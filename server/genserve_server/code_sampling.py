"""Code priors in the core: a prior's step scheduler (step_sampler.py), then its code_decoder's batcher.

`sample_codes` is SampleCodes: the grids (both levels in one call where the prior names a top prior),
then their images in decoder batches shared with every request whose rows finished near the same
step. `sample_codes_stream` is the same with progress: it yields a `CodeProgress` every few steps
(the grids so far, decoded to previews where the decoder takes them) and the `CodeSamples` last.
Previews never hold the prior back: a preview the consumer has not taken when the next one is
ready is replaced by it; the last one untaken when the sampling ends is sent before the result, so
every level that reported shows at least once.

A call holds its rows of the decoder's queue from admission (before its first step) to its end
(`decoder_room`): its grids are queued only once every one is sampled, and a decoder queue that
other traffic filled meanwhile refused them then, the call's work lost. A full queue now refuses
the call at once, as a full row budget does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from genserve_server import validate
from genserve_server.batch_keys import CodeRows
from genserve_server.batch_parts import QueueReservation
from genserve_server.batcher import WITHDRAWN, Lane
from genserve_server.config import Card
from genserve_server.core import Call, GenerationCore
from genserve_server.encoding import EncodedImage
from genserve_server.errors import Unavailable, invalid
from genserve_server.repository import ModelVersion
from genserve_server.step_sampler import SamplingOptions
from genserve_server.validate import OutputSpec

# Progress chunks per level when the request does not say (SampleCodesRequest.preview_every = 0).
DEFAULT_PREVIEWS_PER_LEVEL = 8
TOP_LEVEL = "top"
CODES_LEVEL = "codes"

# (level, positions filled, positions, grids so far int64 [N, H, W], the top grids for a bottom level)
LevelProgress = Callable[[str, int, int, np.ndarray, np.ndarray | None], None]


@dataclass(slots=True)
class CodeSamples:
    """Grids sampled by a code prior and, where it names a decoder, their images."""

    codes: np.ndarray  # int64 [N, H, W]
    images: list[EncodedImage]  # empty without a decoder
    executed_batch_sizes: list[int]  # the decoder's batches
    tops: np.ndarray | None = None  # int64 [N, Ht, Wt]: the top grids (given, or sampled by the top prior)


@dataclass(slots=True)
class CodeProgress:
    """Where a streaming call stands: `filled` of `positions` at `level`, and previews (the grids so
    far decoded; empty at the top level or without a decoder)."""

    level: str
    filled: int
    positions: int
    previews: list[EncodedImage]


def code_decoder(core: GenerationCore, call: Call, mv: ModelVersion) -> ModelVersion | None:
    """The version of the prior's decoder (config.json `decoder`) the call uses, held until it ends
    (GenerationCore.use: the same one for its previews and its result); None when it names none."""
    name = mv.config.decoder
    if not name:
        return None
    decoder = core.use(call, name, mv, "decoder")
    prior, card = mv.card, decoder.card
    assert prior is not None and card is not None
    misfit = decoder_misfit(prior, name, card)
    if misfit is not None:
        raise Unavailable(f"{mv.label}: {misfit}")
    return decoder


def decoder_misfit(prior: Card, name: str, card: Card) -> str | None:
    """Why the code_decoder `name` (its card `card`) cannot decode the grids of a prior (`prior`),
    or None when it fits."""
    decodes_codes = card.kind.takes_codes and card.kind.image_output_name is not None
    if decodes_codes and (card.grid, card.top_grid) == (prior.grid, prior.top_grid):
        return None
    return (
        f"its decoder {name} is a {card.kind} of grid {card.grid} and top grid "
        f"{card.top_grid}; the prior needs a code_decoder of grid {prior.grid} and top grid "
        f"{prior.top_grid} (config.json decoder)"
    )


@contextlib.contextmanager
def decoder_room(
    decoder: ModelVersion | None, call: Call, n: int, *, once: bool = False
) -> Iterator[QueueReservation | None]:
    """The call's `n` rows of its decoder's queue, held until the block ends (Batcher.reserved):
    RESOURCE_EXHAUSTED now where the queue is full (DEADLINE_EXCEEDED where the call's deadline has
    passed, full or not), never once the grids are sampled. `once`: for the call's one decode (a
    unary call), whose rows leave the reservation as they leave the queue, so that they stop taking
    room once they compute; a stream's previews and result decode into it one after another. None
    without a decoder."""
    if decoder is None:
        yield None
        return
    assert decoder.batcher is not None
    with decoder.batcher.reserved(n, call, call.deadline, once=once) as room:
        yield room


def top_prior(core: GenerationCore, call: Call, mv: ModelVersion) -> ModelVersion | None:
    """The version of a bottom prior's top prior (config.json `top_prior`) the call uses, if any,
    held until the call ends (GenerationCore.use: its step scheduler runs on that version's runner)."""
    name = mv.config.top_prior
    prior = mv.card
    assert prior is not None
    if not name or prior.top_grid is None:
        return None
    top = core.use(call, name, mv, "top_prior")
    card = top.card
    assert card is not None
    fits = (
        card.kind.autoregressive
        and card.top_grid is None
        and (card.grid, card.codebook_size) == (prior.top_grid, prior.top_codebook_size)
        # A class-conditional top prior takes the same labels: the same classes as the prior's
        # (fewer would fail the top level's shared step for every request in it).
        and (not card.class_names or card.class_names == prior.class_names)
    )
    if not fits:
        raise Unavailable(
            f"{mv.label}: its top prior {name} is a {card.kind} of grid {card.grid}, codebook "
            f"{card.codebook_size}, top grid {card.top_grid}, classes {len(card.class_names)}; the "
            f"prior needs a code_prior of grid {prior.top_grid} and codebook {prior.top_codebook_size}, "
            "without a top grid, class-conditional only on the prior's own classes (config.json top_prior)"
        )
    return top


def steps_between(every: int, positions: int) -> int:
    """Steps between progress reports: `every`, or about DEFAULT_PREVIEWS_PER_LEVEL per level."""
    return every if every > 0 else max(1, positions // DEFAULT_PREVIEWS_PER_LEVEL)


async def sample_codes(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    seeds: Sequence[int],
    labels: Sequence[int] | None,
    tops: np.ndarray | None,
    options: SamplingOptions,
    out: OutputSpec,
    progress: LevelProgress | None = None,
    every: int = 0,
    decoding: asyncio.Lock | None = None,
    return_codes: bool = False,
    room: QueueReservation | None = None,
) -> CodeSamples:
    """Grids from the prior's step scheduler, then images from its decoder's batcher (rows that
    finish near the same step, of any request, share the decoder's batches). `decoding`: held
    while the grids are in the decoder's queue (a stream's previews hold it too). `return_codes`:
    the response carries the grids besides the images (always where there is no decoder). `room`:
    the call's rows of the decoder's queue (decoder_room), held by the caller; else held here,
    from before the first step to the end."""
    decoder = code_decoder(core, call, mv)
    limit = core.limits.max_send_message_bytes
    expected = 0
    # The images' bytes checked against the send limit before any step: raw and tensor exactly, PNG by
    # its worst case; JPEG and WebP none (checked once encoded, below: their budget reservation,
    # validate.lossy_reservation, is no response size and refused what fits).
    images_bound: int | None = 0
    grid_bytes = grids = 0
    if decoder is not None:
        card = decoder.card
        assert card is not None and card.image_size is not None
        expected = validate.predicted_send_size(out, len(seeds), card.channels, *card.image_size, limit)
        images_bound = validate.response_bound(out, len(seeds), card.channels, *card.image_size)
    if decoder is None or return_codes:  # the grids themselves (int64), the top level's too
        prior = mv.card
        assert prior is not None and prior.grid is not None
        positions = prior.grid[0] * prior.grid[1]
        if prior.top_grid is not None:
            positions += prior.top_grid[0] * prior.top_grid[1]
        grid_bytes = len(seeds) * positions * 8
        # Each image and each grid (a bottom prior's top grid too) is framed on its own.
        grids = len(seeds) * (2 if prior.top_grid is not None else 1)
        framing = (grids + (len(seeds) if decoder is not None else 0)) * validate.ITEM_FRAMING_BYTES
        known = images_bound or 0
        if known + grid_bytes + framing + validate.SEND_OVERHEAD_BYTES > limit:
            # Before any step: sent after every grid was sampled, it failed RESOURCE_EXHAUSTED
            # ("Sent message larger than max"), which clients retry.
            with_images = f" and their images ({known} bytes)" if known else ""
            drop = " or drop return_codes" if decoder is not None else ""
            raise invalid(
                "output",
                f"the response would be {known + grid_bytes} bytes: {len(seeds)} int64 code grids of "
                f"{positions} positions ({grid_bytes} bytes){with_images}, above max_send_message_bytes="
                f"{limit}; request fewer samples{drop}",
            )
        expected += grid_bytes
    await core.reserve_response(call, expected)  # a no-op for the stream (not unary)
    with contextlib.ExitStack() as held:
        if room is None:  # a unary call: one decode
            room = held.enter_context(decoder_room(decoder, call, len(seeds), once=True))
        codes, tops = await _levels(core, mv, call, seeds, labels, tops, options, progress, every)
        if decoder is None:
            return CodeSamples(codes, [], [], tops)
        assert room is not None
        async with decoding or contextlib.nullcontext():
            images, batch_sizes = await _decode(core, decoder, call, codes, tops, out, room)
        if images_bound is None:  # JPEG or WebP: their size is known only now, the grids' beside them
            what = "the response"
            if grid_bytes:
                what = f"the response ({len(images)} images and {grid_bytes} bytes of code grids)"
            core.check_encoded_send_size(images, out.format, grid_bytes, what=what, beside_items=grids)
        return CodeSamples(codes, images, batch_sizes, tops)


async def _levels(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    seeds: Sequence[int],
    labels: Sequence[int] | None,
    tops: np.ndarray | None,
    options: SamplingOptions,
    progress: LevelProgress | None,
    every: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The grids, and the top grids (given, or sampled first by the prior's top prior)."""
    top = top_prior(core, call, mv) if tops is None else None
    if top is not None:  # both levels in one call: the top grids first, same seeds
        assert top.card is not None and top.card.codebook_size is not None and top.card.grid is not None
        top_options = options.top_level(top.card.codebook_size)
        top_labels = labels if top.card.class_names else None
        top_positions = top.card.grid[0] * top.card.grid[1]
        top_report = None
        if progress is not None:
            top_report = functools.partial(_at_level, progress, TOP_LEVEL, top_positions, None)
        top_every = steps_between(every, top_positions)
        # A full bottom budget refuses before the top level; room found is kept while it runs, and
        # the bottom level below takes it with no await in between.
        with core.stepper(mv).reserved(len(seeds), call.deadline, call):
            tops = await core.stepper(top).sample(
                seeds, top_labels, None, top_options, call.deadline, top_report, top_every, caller=call
            )
    stepper = core.stepper(mv)
    report = None
    if progress is not None:
        report = functools.partial(_at_level, progress, CODES_LEVEL, stepper.positions, tops)
    codes = await stepper.sample(
        seeds,
        labels,
        tops,
        options,
        call.deadline,
        report,
        steps_between(every, stepper.positions),
        caller=call,
    )
    return codes, tops


def _at_level(
    progress: LevelProgress,
    level: str,
    positions: int,
    tops: np.ndarray | None,
    filled: int,
    grids: np.ndarray,
) -> None:
    progress(level, filled, positions, grids, tops)


async def _decode(
    core: GenerationCore,
    decoder: ModelVersion,
    call: Call,
    codes: np.ndarray,
    tops: np.ndarray | None,
    out: OutputSpec,
    room: QueueReservation,
) -> tuple[list[EncodedImage], list[int]]:
    """Grids to images through the decoder's batcher, queued into the call's `room` (one decode of
    the call at a time: the `decoding` lock)."""
    assert decoder.card is not None and decoder.batcher is not None
    inputs = {"codes": codes}
    if tops is not None:
        inputs["top_codes"] = tops
    result = await decoder.batcher.submit(
        CodeRows(),
        inputs,
        len(codes),
        lane=Lane.INTERACTIVE,
        deadline=call.deadline,
        caller=call,
        reservation=room,
    )
    images = await core.codec.encode(
        decoder.metrics,
        result.outputs["image"],
        out,
        decoder.card.output_range,
        timing=call.timing,
        computing=call.computing,  # left meanwhile: its response bytes are held until it has ended
    )
    return images, result.executed_batch_sizes


async def sample_codes_stream(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    seeds: Sequence[int],
    labels: Sequence[int] | None,
    tops: np.ndarray | None,
    options: SamplingOptions,
    out: OutputSpec,
    every: int = 0,
    return_codes: bool = False,
) -> AsyncIterator[CodeProgress | CodeSamples]:
    """`sample_codes` with progress: CodeProgress items while the prior steps, the CodeSamples last."""
    latest: list[tuple[str, int, int, np.ndarray, np.ndarray | None]] = []
    ready = asyncio.Event()

    def report(level: str, filled: int, positions: int, grids: np.ndarray, given: np.ndarray | None) -> None:
        latest[:] = [(level, filled, positions, grids, given)]  # a newer report replaces an untaken one
        ready.set()

    decoder = code_decoder(core, call, mv)
    # One decode of this call in the decoder's queue at a time: a preview's rows and the result's,
    # queued together, are twice the request's, which the queue need not hold (sample_limit bounds
    # the request by the queue), and the second was refused 'queue full' on an idle server.
    decoding = asyncio.Lock()
    # The call's rows of the decoder's queue, for its previews and its result, held until the stream
    # ends: a preview still untaken when the sampling ended is decoded after the result's decode.
    held = contextlib.ExitStack()
    room = held.enter_context(decoder_room(decoder, call, len(seeds)))
    sampling = asyncio.ensure_future(
        sample_codes(
            core, mv, call, seeds, labels, tops, options, out, report, every, decoding, return_codes, room
        )
    )
    withdraw: str | None = None  # the message the sampling is cancelled with if the stream ends early
    try:
        while True:
            if sampling.done() and (not latest or sampling.cancelled() or sampling.exception() is not None):
                break  # the result (or a failed call's error) follows; no preview after a failure
            if not latest:
                waiter = asyncio.ensure_future(ready.wait())
                try:
                    await asyncio.wait({waiter, sampling}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                continue
            # A report still untaken when the sampling ended goes out before the result: a level
            # that ran while the consumer took the previous preview still shows (the bottom level of
            # a small prior can run whole while the top level's last preview is being sent).
            ready.clear()
            level, filled, positions, grids, given = latest.pop()
            previews: list[EncodedImage] = []
            if level == CODES_LEVEL and decoder is not None:
                assert room is not None
                async with decoding:
                    previews, _ = await _decode(core, decoder, call, grids, given, out, room)
            yield CodeProgress(level, filled, positions, previews)
        yield sampling.result()
    except Exception:
        # A preview failed: the call ends with that error, and its rows leave the running set as
        # that failure, not as a caller that went away (WITHDRAWN: no drop), as a SampleStream's
        # chunks ahead do.
        withdraw = WITHDRAWN
        raise
    finally:
        try:
            if not sampling.done():  # the caller left: its rows leave the running set at the next step
                sampling.cancel(withdraw)
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            elif not sampling.cancelled():
                sampling.exception()  # it failed while the caller left: retrieved, not logged as lost
        finally:
            held.close()

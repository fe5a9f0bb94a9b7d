"""Style-based generators in the core: z -> w (style_mapping), work in w space, ws -> image (style_generator).

A style_generator (the synthesis graph, ws [N, num_layers, w_dim] -> image) names its style_mapping
(z [N, Z] -> w [N, w_dim]) in config.json `mapping`. Every request goes through both batchers:

1. the mapping's batcher maps the request's latents (drawn from seeds by the runner for the whole
   batch, SeedRows, or given, LatentRows) to w, sharing batches with every other request;
2. here, in w space, per row: truncation toward the card's w_avg (w' = w_avg + psi (w - w_avg),
   StyleGAN's truncation trick) and style mixing (layers [0, crossover) from one w, [crossover,
   num_layers) from another), giving each row its own ws;
3. the synthesis batcher runs the rows' ws (StyleRows): rows of any psi and crossover, of any
   request, share one batch, because everything that differs between them is in their ws.

An image is a pure function of (model versions, seeds, psi, crossover): the mapping row of a seed
is the same in any batch, and the synthesis graph's noise is fixed inside it.

An INTERACTIVE call holds its rows of the synthesis queue from before its mapping request to its
synthesis (`synthesis_room`, Batcher.reserved): its rows were queued there only once mapped, and a
synthesis queue that other traffic filled meanwhile refused them RESOURCE_EXHAUSTED after the
mapping's work. A full synthesis queue now refuses the call before its mapping runs. (A BULK
request waits for room instead of being refused.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from genserve_server import latents, validate
from genserve_server.batch_keys import (
    DRAWN_LATENTS_OUTPUT,
    FINITE_ROWS_OUTPUT,
    PIXELS_OUTPUT,
    SEED_INPUT,
    LatentRows,
    SeedRows,
    StyleRows,
)
from genserve_server.batch_parts import QueueReservation
from genserve_server.batcher import BatchResult, Lane
from genserve_server.config import Card
from genserve_server.encoding import EncodedImage
from genserve_server.errors import Unavailable, invalid
from genserve_server.repository import ModelVersion
from genserve_server.validate import OutputSpec

if TYPE_CHECKING:
    from genserve_server.core import Call, GenerationCore

W_OUTPUT = "w"
WS_INPUT = "ws"


def style_mapping(core: GenerationCore, call: Call, mv: ModelVersion) -> ModelVersion:
    """The version of the generator's style_mapping (config.json `mapping`) the call uses, checked to
    fit and held until the call ends (GenerationCore.use: a bulk submit may wait for room in its
    queue, and a SampleStream maps every chunk with the same version)."""
    card = mv.card
    assert card is not None
    mapping = core.use(call, mv.config.mapping, mv, "mapping")
    assert mapping.card is not None
    misfit = mapping_misfit(card, mv.config.mapping, mapping.card)
    if misfit is not None:
        raise Unavailable(f"{mv.label}: {misfit}")
    return mapping


def mapping_misfit(card: Card, name: str, found: Card) -> str | None:
    """Why the style_mapping `name` (its card `found`) cannot map a style generator's z (`card`),
    or None when it fits."""
    if found.kind.maps_latent and (found.latent_dim, found.w_dim) == (card.latent_dim, card.w_dim):
        return None
    return (
        f"its mapping {name} is a {found.kind} of latent_dim {found.latent_dim} and w_dim {found.w_dim}; "
        f"the generator needs a style_mapping of latent_dim {card.latent_dim} and w_dim {card.w_dim} "
        "(config.json mapping)"
    )


async def map_latents(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    lane: Lane,
    *,
    seeds: Sequence[int] | None = None,
    z: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """w float32 [N, w_dim] of the rows' latents, and the latents (drawn from `seeds`, or `z`), from
    the mapping's batcher (untruncated: truncation is in w space)."""
    mapping = style_mapping(core, call, mv)
    card = mv.card
    assert card is not None and card.w_dim is not None and mapping.batcher is not None
    key: SeedRows | LatentRows
    if z is None:
        assert seeds is not None
        key, inputs = SeedRows(None), {SEED_INPUT: np.asarray(seeds, dtype=np.int64)}
    else:
        key, inputs = LatentRows(), {"z": z}
    n = len(inputs[SEED_INPUT] if z is None else z)
    entered = time.monotonic()
    result = await mapping.batcher.submit(
        key, inputs, n, lane=lane, deadline=call.deadline, caller=call, held=call.response
    )
    call.timing.submitted(entered, result.dispatched_at, time.monotonic())
    w = np.asarray(result.outputs[W_OUTPUT], dtype=np.float32).reshape(n, card.w_dim)
    used = z if z is not None else result.outputs[DRAWN_LATENTS_OUTPUT]
    return w, used


def truncate(w: np.ndarray, w_avg: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """w_avg + psi_i (w_i - w_avg) per row i; rows whose psi is NaN (not given) or 1 (no truncation,
    as documented) stay exactly w_i: in float32 w_avg + 1 * (w - w_avg) is not always w."""
    pulled = w_avg + psi[:, np.newaxis].astype(np.float32) * (w - w_avg)
    untouched = (np.isnan(psi) | (psi == 1.0))[:, np.newaxis]
    out: np.ndarray = np.where(untouched, w, pulled).astype(np.float32)
    return out


def styles(coarse: np.ndarray, fine: np.ndarray, crossover: np.ndarray, num_layers: int) -> np.ndarray:
    """ws float32 [N, num_layers, w_dim]: row i's layers [0, crossover_i) from coarse[i], the rest
    from fine[i] (crossover_i = num_layers: every layer from coarse[i], no mixing)."""
    layer = np.arange(num_layers)[np.newaxis, :, np.newaxis]
    ws: np.ndarray = np.where(
        layer < crossover[:, np.newaxis, np.newaxis], coarse[:, np.newaxis, :], fine[:, np.newaxis, :]
    )
    return np.ascontiguousarray(ws, dtype=np.float32)


def psi_rows(psi: float | None, n: int) -> np.ndarray:
    return np.full(n, np.nan if psi is None else psi, dtype=np.float64)


def w_avg_of(mv: ModelVersion) -> np.ndarray:
    assert mv.card is not None and mv.card.w_avg is not None
    return np.asarray(mv.card.w_avg, dtype=np.float32)


@contextlib.contextmanager
def synthesis_room(mv: ModelVersion, call: Call, n: int, lane: Lane) -> Iterator[QueueReservation | None]:
    """The call's `n` rows of the synthesis queue, held until the block ends (Batcher.reserved):
    RESOURCE_EXHAUSTED now where the queue is full (DEADLINE_EXCEEDED past the call's deadline),
    before the mapping runs, never once the rows are mapped; rows taken into a synthesis batch
    leave it (`once`), so that computing rows do not take the queue. None for a BULK request, which
    waits for room in the queue instead of being refused."""
    if lane != Lane.INTERACTIVE:
        yield None
        return
    assert mv.batcher is not None
    with mv.batcher.reserved(n, call, call.deadline, once=True) as room:
        yield room


async def synthesise(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    ws: np.ndarray,
    lane: Lane,
    room: QueueReservation | None = None,
) -> BatchResult:
    """The synthesis graph's outputs for rows of ws, batched with every request's rows (StyleRows),
    queued into the call's `room` (synthesis_room) where it holds one."""
    return await core.submit(mv, call, StyleRows(), {WS_INPUT: ws}, len(ws), lane, room)


async def generate_batch(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    lane: Lane,
    *,
    seeds: Sequence[int] | None = None,
    psi: float | None = None,
    z: np.ndarray | None = None,
) -> tuple[BatchResult, np.ndarray]:
    """Sample on a style generator: z (from seeds or given) -> w -> truncated toward w_avg by psi ->
    the same w at every layer -> image. Returns the synthesis result and the latents z used."""
    card = mv.card
    assert card is not None and card.num_layers is not None
    n = len(z) if z is not None else len(seeds or ())
    with synthesis_room(mv, call, n, lane) as room:
        w, used = await map_latents(core, mv, call, lane, seeds=seeds, z=z)
        w = truncate(w, w_avg_of(mv), psi_rows(psi, len(w)))
        ws = styles(w, w, np.full(len(w), card.num_layers), card.num_layers)
        return await synthesise(core, mv, call, ws, lane, room), used


async def _encode(
    core: GenerationCore, mv: ModelVersion, call: Call, result: BatchResult, out: OutputSpec
) -> list[EncodedImage]:
    assert mv.card is not None
    return await core.codec.encode(
        mv.metrics,
        result.outputs["image"],
        out,
        mv.card.output_range,
        result.outputs.get(PIXELS_OUTPUT),
        timing=call.timing,
        finite=result.outputs.get(FINITE_ROWS_OUTPUT),
        computing=call.computing,  # left meanwhile: its response bytes are held until it has ended
    )


async def _reserve(core: GenerationCore, mv: ModelVersion, call: Call, out: OutputSpec, n: int) -> int:
    """Refuses what could not be sent, holds the rest against the response budget; returns the bytes
    of the returned w (output.return_latents), which ride beside the images in the same response."""
    card = mv.card
    assert card is not None and card.image_size is not None and card.w_dim is not None
    limit = core.limits.max_send_message_bytes
    latent_bytes = n * card.w_dim * 4 if out.return_latents else 0
    expected = validate.predicted_send_size(out, n, card.channels, *card.image_size, limit, latent_bytes)
    await core.reserve_response(call, expected)
    return latent_bytes


async def mix(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    coarse_seeds: Sequence[int],
    fine_seeds: Sequence[int],
    crossovers: Sequence[int],
    psis: Sequence[float | None],
    out: OutputSpec,
    lane: Lane,
) -> tuple[list[EncodedImage], list[int]]:
    """Style mixing: image i has layers [0, crossovers[i]) from coarse_seeds[i]'s w and the rest from
    fine_seeds[i]'s, each truncated by psis[i]. Every distinct seed is mapped once (one submission),
    and every row is synthesised in one submission. Returns the images and the synthesis batch sizes."""
    card = mv.card
    assert card is not None and card.num_layers is not None
    n = len(coarse_seeds)
    await _reserve(core, mv, call, out, n)
    distinct = sorted(set(coarse_seeds) | set(fine_seeds))
    where = {seed: i for i, seed in enumerate(distinct)}
    with synthesis_room(mv, call, n, lane) as room:
        w, _ = await map_latents(core, mv, call, lane, seeds=distinct)
        psi = np.array([np.nan if p is None else p for p in psis], dtype=np.float64)
        w_avg = w_avg_of(mv)
        coarse = truncate(w[[where[s] for s in coarse_seeds]], w_avg, psi)
        fine = truncate(w[[where[s] for s in fine_seeds]], w_avg, psi)
        ws = styles(coarse, fine, np.asarray(crossovers, dtype=np.int64), card.num_layers)
        result = await synthesise(core, mv, call, ws, lane, room)
    return await _encode(core, mv, call, result, out), result.executed_batch_sizes


async def interpolate(
    core: GenerationCore,
    mv: ModelVersion,
    call: Call,
    start: np.ndarray,
    end: np.ndarray,
    steps: int,
    psi: float | None,
    out: OutputSpec,
) -> tuple[list[EncodedImage], np.ndarray, list[int]]:
    """Interpolate in w space: both ends' z mapped to w (one submission, or one each where the
    mapping's queue holds one row), truncated, then the straight
    line between them (StyleGAN's path; w space is not Gaussian, so no slerp). Returns the images,
    the w of each image [steps, w_dim] and the synthesis batch sizes."""
    card = mv.card
    assert card is not None and card.num_layers is not None
    latent_bytes = await _reserve(core, mv, call, out, steps)
    with synthesis_room(mv, call, steps, Lane.INTERACTIVE) as room:
        ends = np.stack([start, end]).astype(np.float32)
        mapping = style_mapping(core, call, mv)
        if mapping.batcher is not None and mapping.batcher.max_queue_size < len(ends):
            # A queue of one row (max_batch_size 1) refused the pair as too large for it, naming no
            # field: each end on its own there (a row's w is the same in any batch).
            parts = [await map_latents(core, mv, call, Lane.INTERACTIVE, z=ends[i : i + 1]) for i in (0, 1)]
            w = np.concatenate([part[0] for part in parts])
        else:
            w, _ = await map_latents(core, mv, call, Lane.INTERACTIVE, z=ends)
        w = truncate(w, w_avg_of(mv), psi_rows(psi, 2))
        path = latents.interpolate(w[0], w[1], steps, latents.InterpolationMode.LERP)
        ws = styles(path, path, np.full(steps, card.num_layers), card.num_layers)
        result = await synthesise(core, mv, call, ws, Lane.INTERACTIVE, room)
    images = await _encode(core, mv, call, result, out)
    if latent_bytes:  # JPEG and WebP are known only now
        core.check_encoded_send_size(images, out.format, latent_bytes)
    return images, path, result.executed_batch_sizes


def check_crossover(crossover: int, num_layers: int, field: str) -> int:
    """0 < crossover < num_layers: both parts have at least one layer."""
    if not 0 < crossover < num_layers:
        raise invalid(
            field,
            f"must be in 1..{num_layers - 1} (0 < crossover < num_layers = {num_layers}: layers "
            f"[0, crossover) come from the coarse seed, the rest from the fine one), got {crossover}",
        )
    return crossover

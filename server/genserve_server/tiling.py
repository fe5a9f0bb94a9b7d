"""Tiled inference for SuperResolve: plan overlapping tiles, cut them out, blend the outputs back.

Pure numpy; the server batches the tiles of many requests together and calls these three steps.

Why tiling can be exact. A fully convolutional network's output at input position p depends only on
the inputs within its receptive-field radius r of p (see ``receptive_field_radius``). A tile's output
is therefore identical to the untiled output everywhere except within r pixels of a tile edge that
is *inside* the image (at an image border the tile sees the same border as the whole image does).
So each tile discards a ``margin`` >= r at its interior edges, and neighbouring tiles are blended
only where both are exact:

* Tiles along an axis overlap by at least ``overlap`` input pixels. The boundary between tile i-1
  and tile i is the middle of their overlap; the cells between boundaries are the tiles' cores,
  which partition the image.
* Across each boundary the two tiles' weights ramp linearly (complementary, summing to 1) over a
  band of ``2 * feather`` pixels, ``feather = overlap // 2 - margin``. The band lies inside the
  overlap minus a ``margin`` on each side, so every weighted value is exact and the blend of equal
  values is that value: the tiled result equals the untiled one up to float rounding.

The rule: tiling is exact when ``receptive_field_radius <= margin``. The default margin is
``overlap // 4`` (so ``overlap >= 4 * radius``, seams feathered over about half the overlap); a
caller that knows the radius may pass ``margin=radius`` and then needs only ``overlap >= 2 * radius``
(``overlap == 2 * radius`` gives a hard cut at the overlap's middle, still exact).

Where the network is not translation-equivariant at every pixel (stride-2 layers, pooling), tile
starts must be multiples of the network's period: pass it as ``size_multiple``; then ``h`` and
``w`` must already be multiples of it (pad the image first, as the untiled run would).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating]


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile, in input pixels: the window fed to the model and the core it is responsible for.

    ``[y0, y1) x [x0, x1)`` is the input window. ``[cy0, cy1) x [cx0, cx1)`` is the core; the cores
    of a plan partition the image. ``feather_y``/``feather_x`` are the half-widths of the linear
    blend bands centred on the core's interior edges (0 = hard cut).
    """

    y0: int
    x0: int
    y1: int
    x1: int
    cy0: int
    cx0: int
    cy1: int
    cx1: int
    feather_y: int
    feather_x: int

    @property
    def h(self) -> int:
        """Input window height."""
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        """Input window width."""
        return self.x1 - self.x0


@dataclass(frozen=True, slots=True)
class _Span:
    start: int
    stop: int
    core_start: int
    core_stop: int


def _axis_count(length: int, tile: int, overlap: int, multiple: int) -> int:
    """How many windows `_plan_axis` puts along one axis (`tile` already a multiple of `multiple`)."""
    if length <= tile:
        return 1
    tile_units = tile // multiple
    step_units = tile_units - -(-overlap // multiple)
    if step_units < 1:
        raise ValueError(
            f"tile_size {tile} leaves no stride after overlap {overlap} at size_multiple {multiple}"
        )
    return 1 + -(-(length // multiple - tile_units) // step_units)


def count_tiles(h: int, w: int, tile_size: int, overlap: int, size_multiple: int = 1) -> int:
    """``len(plan_tiles(h, w, tile_size, overlap, size_multiple))`` without building the plan: a
    request's tile count is bounded before its tiles cost anything (an 8x8 tile of a 1024x1024
    image is one of 16384)."""
    tile = tile_size - tile_size % size_multiple
    return _axis_count(h, tile, overlap, size_multiple) * _axis_count(w, tile, overlap, size_multiple)


def _plan_axis(length: int, tile: int, overlap: int, multiple: int, margin: int) -> tuple[list[_Span], int]:
    """Windows along one axis (all of one size), their cores, and the axis's feather half-width."""
    count = _axis_count(length, tile, overlap, multiple)
    if count == 1:
        return [_Span(0, length, 0, length)], 0
    units = length // multiple
    tile_units = tile // multiple
    # Evenly spread starts (in units of `multiple`, rounded half up in integers): every gap is
    # floor or ceil of (units - tile_units) / (count - 1) <= step, so every overlap is >= overlap.
    span, gaps = units - tile_units, count - 1
    starts = [multiple * ((2 * i * span + gaps) // (2 * gaps)) for i in range(count)]
    window = tile_units * multiple
    # Boundary between tiles i-1 and i: the middle of their overlap (floor), so >= start_i + overlap // 2.
    bounds = [0] + [(starts[i] + starts[i - 1] + window) // 2 for i in range(1, count)] + [length]
    spans = [_Span(starts[i], starts[i] + window, bounds[i], bounds[i + 1]) for i in range(count)]
    cells = [bounds[i + 1] - bounds[i] for i in range(1, count - 1)]  # interior cells carry two bands
    feather = max(0, min([overlap // 2 - margin, *(c // 2 for c in cells)]))
    return spans, feather


def plan_tiles(
    h: int, w: int, tile_size: int, overlap: int, size_multiple: int = 1, *, margin: int | None = None
) -> list[Tile]:
    """Cover an h x w image with equal-sized tiles of at most tile_size, overlapping >= overlap.

    All tiles of an image have the same shape, so they batch together: tiles at the far border are
    shifted inward rather than shrunk, and an axis shorter than tile_size gets one tile of its full
    length. Row-major order. Tiled inference equals untiled inference when the model's receptive
    field radius is <= margin (default overlap // 4; at most overlap // 2); see the module docstring.
    """
    if h < 1 or w < 1:
        raise ValueError(f"image must be at least 1x1, got {h}x{w}")
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
    if h % size_multiple or w % size_multiple:
        raise ValueError(f"image {h}x{w} must be padded to a multiple of size_multiple {size_multiple} first")
    if tile_size < size_multiple:
        raise ValueError(f"tile_size {tile_size} is smaller than size_multiple {size_multiple}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    margin = overlap // 4 if margin is None else margin
    if not 0 <= margin <= overlap // 2:
        raise ValueError(f"margin must be in 0..overlap // 2 = {overlap // 2}, got {margin}")
    tile = tile_size - tile_size % size_multiple
    rows, feather_y = _plan_axis(h, tile, overlap, size_multiple, margin)
    cols, feather_x = _plan_axis(w, tile, overlap, size_multiple, margin)
    return [
        Tile(
            y0=r.start,
            x0=c.start,
            y1=r.stop,
            x1=c.stop,
            cy0=r.core_start,
            cx0=c.core_start,
            cy1=r.core_stop,
            cx1=c.core_stop,
            feather_y=feather_y,
            feather_x=feather_x,
        )  # fmt: skip
        for r in rows
        for c in cols
    ]


def extract(img: NDArray[np.generic], tile: Tile) -> NDArray[np.generic]:
    """The tile's input window of a [C, H, W] image (a view; np.stack copies it into the batch)."""
    return img[:, tile.y0 : tile.y1, tile.x0 : tile.x1]


def _axis_weights(
    start: int, stop: int, core_start: int, core_stop: int, feather: int, length: int
) -> NDArray[np.float64]:
    """Per input pixel of one window: ramps up across the band at core_start, down at core_stop."""
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    weights = np.ones(stop - start, dtype=np.float64)
    if core_start > 0:
        if feather:
            weights *= np.clip((centres - (core_start - feather)) / (2 * feather), 0.0, 1.0)
        else:
            weights *= centres >= core_start
    if core_stop < length:
        if feather:
            weights *= np.clip(((core_stop + feather) - centres) / (2 * feather), 0.0, 1.0)
        else:
            weights *= centres < core_stop
    return weights


# A batch's model call holds, besides each tile's float32 output, about as many bytes again per
# intermediate tensor at output resolution (upsampling stages, the skip path, the sum): counted as
# this many output-sized copies per tile being computed. An estimate for the working-set budget, for
# a card that does not count its graph's intermediates (activation_bytes_per_output_value) and for
# sessions on a GPU (their intermediates are device memory).
TILE_OUTPUT_COPIES = 4
# On the CPU provider, peak RSS rise of one call / the graph's live intermediates as export counts
# them (card.json's activation_bytes_per_output_value): 1.86 (sr-photos-x4), 2.05 (unet-denoise),
# 2.10 (pix2pix-colorize), the server's session options (full optimisation, the CPU arena), one image
# of 256-512 px. The arena rounds its blocks up and the optimised graph's kernels keep buffers of
# their own (padded copies, im2col) beside the graph's tensors. docs/operations.md, Memory budgets.
ORT_CPU_FACTOR = 2.0
# Encoding one output image to uint8 pixels (codecs.to_uint8) holds a float32 scaled copy of it, its
# uint8 cast and the interleaved uint8 image at once: bytes per output value (C x H x W). TENSOR_F32
# has none: its bytes are the response's, which the response budget holds.
ENCODE_BYTES_PER_VALUE = 6


def whole_image(h: int, w: int) -> list[Tile]:
    """The plan of an image the model takes whole (Translate): one tile, its own core; for
    working_set_bytes."""
    return [Tile(0, 0, h, w, 0, 0, h, w, 0, 0)]


def computing_copies(activation_bytes_per_output_value: float | None, on_cpu: bool) -> float:
    """Output-sized float32 copies a model call holds besides its output (working_set_bytes'
    `computing_copies`): on the CPU provider, where the card counts its graph's intermediates, that
    count times ORT_CPU_FACTOR (at least the constant's); else TILE_OUTPUT_COPIES - 1."""
    constant = float(TILE_OUTPUT_COPIES - 1)
    if activation_bytes_per_output_value is None or not on_cpu:
        return constant
    return max(constant, ORT_CPU_FACTOR * activation_bytes_per_output_value / 4)


def working_set_bytes(
    plans: Sequence[Sequence[Tile]],
    sizes: Sequence[tuple[int, ...]],
    in_channels: int,
    out_channels: int,
    scale: int,
    batch_tiles: int,
    *,
    input_bytes: int = 0,
    encode_bytes_per_value: int = ENCODE_BYTES_PER_VALUE,
    computing_copies: float = TILE_OUTPUT_COPIES - 1,
    concurrent_batches: int = 1,
    intermediates_kept: bool = False,
) -> int:
    """Estimated peak bytes of upscaling images of `sizes` (h, w) cut by `plans` (Translate: `scale`
    1, each image one tile of `whole_image`, as the model takes it). Held throughout:
    the decoded (and padded) input images (`input_bytes`), every tile's float32 input and output (all
    are held until the last is computed). On top of them, the larger of two phases: while tiles are
    computed, the model's intermediates for the largest tiles computed at once: `batch_tiles` tiles a
    batch, `concurrent_batches` batches at once (the model's instances; no more batches than the
    tiles fill, so no more tiles than there are); once
    they are, each tiled image's blend canvas (float32 result and weights; none for an image of one
    tile), all blended before the first encode, and the encode's copies of the largest output image
    (`encode_bytes_per_value` bytes a value: ENCODE_BYTES_PER_VALUE, 0 for TENSOR_F32). Counting
    only the first phase's intermediates and the canvases, the encode's copies went uncounted: with
    a small max_batch_size the allocations measured at the encode were 1.3-1.6x the estimate.
    The intermediates are `computing_copies` output-sized float32 copies a tile (computing_copies:
    the card's count of its graph's on the CPU provider, else TILE_OUTPUT_COPIES - 1). Counting one
    batch's, a tiled 256² SuperResolve on sr-photos-x4 (`instances: 2`) rose the server's peak RSS
    1.4-1.8x what it held: its tiles' batches ran two at once.
    `intermediates_kept` (sessions on ONNX Runtime's CPU provider): the intermediates' memory is not
    handed back once the tiles are computed (the CPU arena keeps the blocks a call grew it by;
    without the arena, glibc keeps ORT's freed buffers), so the blend and the encode allocate on top
    of it: the two phases add instead of the larger counting. Counting the larger, one tiled 256²
    sr-photos-x4 SuperResolve (one instance, batches of one tile) rose the process's peak RSS 88 MiB
    against 67 MiB held: its compute phase's 53 MiB stayed resident under the blend's 18 MiB and
    the encode's 18 MiB."""
    tiles = 0
    canvases = 0
    largest_image = 0
    outputs: list[int] = []
    for plan, (h, w) in zip(plans, sizes, strict=True):
        for tile in plan:
            out_bytes = 4 * out_channels * tile.h * tile.w * scale * scale
            outputs.append(out_bytes)
            tiles += 4 * in_channels * tile.h * tile.w + out_bytes
        if len(plan) > 1:
            canvases += 4 * (out_channels + 1) * h * w * scale * scale
        largest_image = max(largest_image, out_channels * h * w * scale * scale)
    largest = sorted(outputs, reverse=True)[: max(batch_tiles, 1) * max(concurrent_batches, 1)]
    # A card's count may be any finite number (1e308): its product saturates at a working set larger
    # than any budget (which clamps it: the call runs alone), never an OverflowError from inf.
    product = computing_copies * sum(largest)
    computing = math.ceil(product) if math.isfinite(product) else sys.maxsize
    encoding = canvases + encode_bytes_per_value * largest_image
    if intermediates_kept:
        return input_bytes + tiles + computing + encoding
    return input_bytes + tiles + max(computing, encoding)


def blend(
    outputs: Sequence[FloatArray], tiles: Sequence[Tile], h: int, w: int, scale: int
) -> NDArray[np.float32]:
    """Reassemble tile outputs (each [C, >= th*scale, >= tw*scale]) into float32 [C, h*scale, w*scale].

    Each output is weighted per input pixel by its tile's ramps (repeated `scale` times) and the sum
    is divided by the summed weights; weights of a plan sum to 1, so the division only absorbs
    rounding. Extra rows/columns (padding to a size multiple) are ignored.
    """
    if len(outputs) != len(tiles):
        raise ValueError(f"{len(outputs)} outputs for {len(tiles)} tiles")
    if not tiles:
        raise ValueError("no tiles")
    channels = outputs[0].shape[0]
    result = np.zeros((channels, h * scale, w * scale), dtype=np.float32)
    total = np.zeros((h * scale, w * scale), dtype=np.float32)
    for out, tile in zip(outputs, tiles, strict=True):
        if (
            out.ndim != 3
            or out.shape[0] != channels
            or out.shape[1] < tile.h * scale
            or out.shape[2] < tile.w * scale
        ):
            raise ValueError(
                f"tile output of shape {list(out.shape)} does not cover "
                f"[{channels}, {tile.h * scale}, {tile.w * scale}]"
            )
        wy = _axis_weights(tile.y0, tile.y1, tile.cy0, tile.cy1, tile.feather_y, h)
        wx = _axis_weights(tile.x0, tile.x1, tile.cx0, tile.cx1, tile.feather_x, w)
        ys, xs = np.flatnonzero(wy), np.flatnonzero(wx)
        if ys.size == 0 or xs.size == 0:
            continue
        # Only the rows/columns with weight > 0: the core plus the bands, not the discarded margins.
        r0, r1, c0, c1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        weight = np.outer(np.repeat(wy[r0:r1], scale), np.repeat(wx[c0:c1], scale)).astype(np.float32)
        oy, ox = (tile.y0 + r0) * scale, (tile.x0 + c0) * scale
        region = (slice(oy, oy + weight.shape[0]), slice(ox, ox + weight.shape[1]))
        patch = out[:, r0 * scale : r1 * scale, c0 * scale : c1 * scale]
        result[(slice(None), *region)] += weight * patch
        total[region] += weight
    if not np.all(total > 0):
        raise ValueError("the tiles do not cover the image")
    result /= total
    return result


class NotFiniteOutput(ValueError):
    """The model's output on the receptive-field probe held NaN or Inf: how far a change moved it
    cannot be told there (Inf - Inf is NaN), so no radius is measured."""


def receptive_field_radius(
    run: Callable[[NDArray[np.float32]], NDArray[np.floating]],
    channels: int,
    probe_size: int = 64,
    *,
    input_range: tuple[float, float] = (0.0, 1.0),
    trials: int = 2,
    atol: float = 1e-6,
    seed: int = 0,
) -> int | None:
    """Measure how far, in input pixels, content beyond a tile edge changes a model's output.

    `run` maps float32 [N, channels, S, S] to [N, C', S*scale, S*scale]. A random probe image in
    `input_range` is run beside four copies whose left, right, top or bottom half is replaced by
    other random content; the radius is the largest distance from that edge, into the unchanged
    half, at which any output moved by more than `atol`. This is exactly the situation of a tile
    edge (content beyond it replaced by the model's padding), and the effect of the whole half is
    summed, so small per-pixel contributions that add up across an edge are counted. For a
    convolutional network it equals the receptive-field radius r: output at input position p
    depends on inputs within [p - r, p + r]. `trials` random images guard against a ReLU hiding a
    change by chance.

    Returns None when the change reaches the far border of the probe: the model is not local at
    this size (global pooling, image-wide normalisation, attention) and tiling it cannot be exact.
    Call it once at load time; tiling is exact when ``radius <= margin`` (see ``plan_tiles``).
    Raises NotFiniteOutput where any output is NaN or Inf (no change can be measured there).
    """
    if probe_size < 4:
        raise ValueError(f"probe_size must be >= 4, got {probe_size}")
    lo, hi = input_range
    size, half = probe_size, probe_size // 2
    rng = np.random.default_rng(seed)
    base = rng.uniform(lo, hi, (trials, channels, size, size)).astype(np.float32)
    other = rng.uniform(lo, hi, (trials, channels, size, size)).astype(np.float32)
    variants = []
    for sl in (np.s_[..., :, :half], np.s_[..., :, half:], np.s_[..., :half, :], np.s_[..., half:, :]):
        variant = base.copy()
        variant[sl] = other[sl]
        variants.append(variant)
    out = np.asarray(run(np.concatenate([base, *variants])), dtype=np.float64)
    n = 5 * trials
    if out.ndim != 4 or out.shape[0] != n or out.shape[2] % size or out.shape[3] % size:
        raise ValueError(f"run returned shape {list(out.shape)} for {n} probes of {size}x{size}")
    finite = np.isfinite(out)
    if not finite.all():
        raise NotFiniteOutput(
            f"{out.size - int(np.count_nonzero(finite))} of the {out.size} output values of the "
            f"receptive-field probe ({n} random images in {lo:g}..{hi:g}) are NaN/Inf"
        )
    scale = out.shape[2] // size
    reference = out[:trials]
    reaches = []
    for k, axis in enumerate((3, 3, 2, 2)):
        moved = np.abs(out[(k + 1) * trials : (k + 2) * trials] - reference) > atol
        other_axes = tuple(a for a in (0, 1, 2, 3) if a != axis)
        positions = np.flatnonzero(moved.any(axis=other_axes)) // scale  # input rows/columns that moved
        if k % 2 == 0:  # the first half was replaced: how far into [half, size) did it reach?
            kept = positions[positions >= half]
            reach, room = (int(kept.max()) - half + 1 if kept.size else 0), size - half
        else:  # the second half was replaced: how far into [0, half)?
            kept = positions[positions < half]
            reach, room = (half - int(kept.min()) if kept.size else 0), half
        if reach >= room:
            return None
        reaches.append(reach)
    return max(reaches)

"""Pure validators on plain values and arrays, shared by both servicers (genserve.v1 and KServe v2).

Each raises InvalidArgument naming the field (as the client spelled it: `field` arguments) and the
limit; none builds or reads a protocol message. The limits that are not server configuration are
named constants here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from genserve_server import codecs
from genserve_server.codecs import ImageFormat
from genserve_server.config import Card
from genserve_server.errors import invalid

SEED_LIMIT = 2**63  # seeds are in [0, 2^63)
MAX_ABS_LATENT = 1e4  # explicit latents: |z| <= this
MAX_PSI = 10.0  # truncation psi in (0, MAX_PSI]
MAX_TILE = 1024  # SuperResolve tile_size
# Protobuf framing (shapes, seeds, latents, provenance) rides on top of a response's pixel bytes.
SEND_OVERHEAD_BYTES = 64 * 1024
# And each image (or code grid, or latent distribution) carries its own: field tags and lengths,
# index, seed, label, shape, a latent's shape and dtype (~30-80 bytes). 4096 images of 240 bytes
# passed the fixed allowance alone, and their 1.1 MB response failed gRPC's send limit after compute.
ITEM_FRAMING_BYTES = 128
# A two-way translator's directions: the graph's `direction` values (genserve_contract.kinds).
A_TO_B, B_TO_A = 0, 1
DIRECTION_NAMES = ("DIRECTION_A_TO_B", "DIRECTION_B_TO_A")

FORMAT_NAMES: dict[ImageFormat, str] = {
    ImageFormat.UNSPECIFIED: "png",
    ImageFormat.PNG: "png",
    ImageFormat.JPEG: "jpeg",
    ImageFormat.WEBP: "webp",
    ImageFormat.RAW_UINT8: "raw_uint8",
    ImageFormat.TENSOR_F32: "tensor_f32",
}


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """How a response's images are encoded (validated)."""

    format: ImageFormat
    quality: int
    png_compression: int
    return_latents: bool

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.format]


def output_spec(
    fmt: int, quality: int, png_compression: int | None, return_latents: bool, field_prefix: str = "output"
) -> OutputSpec:
    """`png_compression` None: not set by the client (default 1, fast)."""
    try:
        image_format = ImageFormat(fmt)
    except ValueError:
        raise invalid(f"{field_prefix}.format", f"unknown image format {fmt}") from None
    if quality > 100:
        raise invalid(f"{field_prefix}.quality", f"must be in 1..100 (0 = default 90), got {quality}")
    compression = 1 if png_compression is None else png_compression
    if compression > 9:
        raise invalid(f"{field_prefix}.png_compression", f"must be in 0..9, got {compression}")
    if image_format == ImageFormat.UNSPECIFIED:
        image_format = ImageFormat.PNG
    if quality and image_format not in (ImageFormat.JPEG, ImageFormat.WEBP):
        # Refused, not ignored (types.proto): quality=50 with PNG would change nothing, silently.
        raise invalid(
            f"{field_prefix}.quality",
            f"applies to JPEG and WEBP only, got {quality} with format {FORMAT_NAMES[image_format]} "
            "(leave it 0, or ask for JPEG or WEBP)",
        )
    if png_compression is not None and image_format != ImageFormat.PNG:
        # Likewise: a compression level set for a JPEG, WEBP or raw answer would change nothing.
        raise invalid(
            f"{field_prefix}.png_compression",
            f"applies to PNG only, got {png_compression} with format {FORMAT_NAMES[image_format]} "
            "(leave it unset, or ask for PNG)",
        )
    return OutputSpec(image_format, quality or 90, compression, return_latents)


def count(n: int, field: str, limit: int, limit_name: str = "max_images_per_request") -> int:
    if not 1 <= n <= limit:
        raise invalid(field, f"must be in 1..{limit} ({limit_name}), got {n}")
    return n


def psi(
    value: float | None, field: str = "truncation_psi", *, w_space: bool = False, sent: float | None = None
) -> float | None:
    """None when not given; else a finite psi in (0, MAX_PSI], or [0, MAX_PSI] for truncation in w
    space (a style generator: psi 0 is the mean w itself). `sent`: what the client sent when `value`
    is its float32 rounding (KServe's double parameter), named in the refusal."""
    if value is None:
        return None
    allowed = f"[0, {MAX_PSI:g}]" if w_space else f"(0, {MAX_PSI:g}]"
    if math.isnan(value):  # NaN's float32 is NaN too, never equal to `sent`: no "(nan as a float32)"
        raise invalid(field, f"is not a number (NaN); must be in {allowed}")
    if w_space:
        if not (0.0 <= value <= MAX_PSI) or not math.isfinite(value):
            raise invalid(
                field, f"must be in {allowed} (truncation in w space), got {_psi_sent(value, sent)}"
            )
        return float(value)
    if not (0.0 < value <= MAX_PSI) or not math.isfinite(value):
        raise invalid(field, f"must be in {allowed}, got {_psi_sent(value, sent)}")
    return float(value)


def _psi_sent(value: float, sent: float | None) -> str:
    """A refused psi as its client wrote it (built for a refusal only: psi runs on every request).
    genserve.v1's is a proto float: the float32's shortest form (10.0001, not 10.000100135803223).
    KServe's is a double rounded to float32 here: both, the value sent first."""
    if sent is None:
        as_float32 = np.float32(value) if abs(value) <= np.finfo(np.float32).max else None
        return str(as_float32) if as_float32 is not None and float(as_float32) == value else repr(value)
    return repr(value) if sent == value else f"{sent!r} ({value!r} as a float32)"


def seeds(values: Sequence[int], field: str = "seeds") -> list[int]:
    checked = list(values)
    for i, seed in enumerate(checked):
        if not 0 <= seed < SEED_LIMIT:
            raise invalid(f"{field}[{i}]", f"must be in [0, 2^63), got {seed}")
    return checked


def seed(value: int, field: str) -> int:
    if not 0 <= value < SEED_LIMIT:
        raise invalid(field, f"must be in [0, 2^63), got {value}")
    return value


def base_seed(base: int, n: int, field: str = "base_seed", what: str = "count") -> int:
    """The first of n consecutive seeds: base .. base + n - 1 all below 2^63."""
    if not 0 <= base <= SEED_LIMIT - n:
        raise invalid(field, f"must be in [0, 2^63 - {what}], got {base}")
    return base


def request_seeds(
    seeds_given: Sequence[int],
    count_given: int,
    base_given: int | None,
    limit: int,
    random_base: Callable[[int], int],
    limit_name: str = "max_images_per_request",
    counted_by: str = "seeds",
) -> list[int]:
    """The seeds of a request that gives `seeds`, or `count` images from `base_seed` (base_given;
    None: a random base from `random_base(n)`), each field checked where the client set it.
    `counted_by`: the fields that give the count where count is 0, named in its refusal."""
    if seeds_given:
        n = count(len(seeds_given), "seeds", limit, limit_name)
        if count_given not in (0, n):
            raise invalid("count", f"must be 0 or {n} (the number of seeds), got {count_given}")
        if base_given is not None:
            raise invalid("base_seed", "cannot be combined with seeds")
        return seeds(seeds_given)
    if count_given == 0:
        raise invalid(
            "count", f"must be in 1..{limit} ({limit_name}), got 0; 0 only where {counted_by} give the count"
        )
    n = count(count_given, "count", limit, limit_name)
    base = random_base(n) if base_given is None else base_seed(base_given, n)
    return list(range(base, base + n))


def latent_rows(values: np.ndarray, dim: int, field: str) -> np.ndarray:
    """float32 [N, dim] latents, finite and bounded (zero-copy when they already are float32)."""
    if values.ndim != 2 or values.shape[1] != dim:
        raise invalid(
            f"{field}.shape", f"must be [N, {dim}] (the latent size is {dim}), got {list(values.shape)}"
        )
    return _finite_latents(values.astype(np.float32, copy=False), field)


def latent_bytes(
    data: bytes, shape: Sequence[int], dim: int, field: str, *, vector: bool = False
) -> np.ndarray:
    """float32 [N, dim] (or [dim] when `vector`) from little-endian bytes and a declared shape."""
    dims = tuple(shape)
    if any(d < 0 for d in dims):
        raise invalid(f"{field}.shape", f"dimensions must be >= 0, got {list(dims)}")
    if vector:
        if dims not in ((dim,), (1, dim)):
            raise invalid(f"{field}.shape", f"must be [{dim}] (the latent size), got {list(dims)}")
    elif len(dims) != 2 or dims[1] != dim:
        raise invalid(f"{field}.shape", f"must be [N, {dim}] (the latent size is {dim}), got {list(dims)}")
    n_values = math.prod(dims)
    if len(data) != 4 * n_values:
        raise invalid(
            f"{field}.data",
            f"must hold {n_values} float32 values ({4 * n_values} bytes), got {len(data)} bytes",
        )
    values = _finite_latents(np.frombuffer(data, dtype="<f4").reshape(dims), field)
    return values.reshape(dim) if vector else values


def _finite_latents(values: np.ndarray, field: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise invalid(field, "values must be finite")
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > MAX_ABS_LATENT:
        # The float32's shortest repr: `:g` printed the one after 1e4 as 10000, seemingly within the bound.
        raise invalid(field, f"values must satisfy |z| <= {MAX_ABS_LATENT:g}, got {np.float32(peak)}")
    return values


def labels(values: Sequence[int], card: Card, n: int, field: str = "labels") -> np.ndarray | None:
    """int64 [n] for conditional models (one label for all or one per image); None otherwise."""
    if not card.kind.conditional:
        if len(values):
            raise invalid(field, f"only conditional models take labels; {card.name} is a {card.kind}")
        return None
    n_classes = len(card.class_names)
    if not len(values):
        raise invalid(field, f"required for conditional model {card.name} (classes 0..{n_classes - 1})")
    if len(values) not in (1, n):
        expected = "1 value (one image)" if n == 1 else f"1 or {n} values (one per image)"
        raise invalid(field, f"must have {expected}, got {len(values)}")
    if len(values) == 1:  # the usual request: plain Python, no numpy on a 1-element container
        label = int(values[0])
        if not 0 <= label < n_classes:
            raise invalid(f"{field}[0]", f"must be in [0, {n_classes}), got {label}")
        return np.full(n, label, dtype=np.int64)
    array = np.asarray(values, dtype=np.int64)
    bad = np.flatnonzero((array < 0) | (array >= n_classes))
    if bad.size:
        i = int(bad[0])
        raise invalid(f"{field}[{i}]", f"must be in [0, {n_classes}), got {values[i]}")
    return array


def send_size(
    n_bytes: int,
    limit: int,
    what: str,
    fmt: ImageFormat | None = None,
    *,
    worst_case: bool = False,
    items: int = 0,
) -> None:
    """InvalidArgument when a response would exceed max_send_message_bytes (`limit`); `worst_case`:
    `n_bytes` is an upper bound (PNG before compute), so the message says "could be up to";
    `items`: the images (grids, distributions) it holds, each with its own framing.

    Not RESOURCE_EXHAUSTED: that code means "refused at admission, retry" to clients (and the
    project's RetryPolicy), while the same request would be refused again every time.
    """
    n_bytes += items * ITEM_FRAMING_BYTES
    if n_bytes + SEND_OVERHEAD_BYTES <= limit:
        return
    if worst_case:
        hint = "fewer or smaller images or a lossy format (JPEG/WEBP); PNG is admitted by its worst case"
    elif fmt in (ImageFormat.PNG, ImageFormat.UNSPECIFIED):
        hint = "fewer or smaller images, a higher output.png_compression or a lossy format (JPEG/WEBP)"
    elif fmt in (ImageFormat.JPEG, ImageFormat.WEBP):
        hint = "fewer or smaller images or a lower output.quality"
    else:
        hint = "fewer or smaller images or an encoded format (PNG/JPEG/WEBP)"
    size = f"could be up to {n_bytes} bytes (its worst case)" if worst_case else f"would be {n_bytes} bytes"
    raise invalid("output", f"{what} {size}, above max_send_message_bytes={limit}; request {hint}")


def png_bound(n: int, c: int, h: int, w: int) -> int:
    """An upper bound of n 8-bit PNGs of c x h x w: the filtered rows (one filter byte a row) plus
    zlib's worst case over them (deflateBound: ~0.03 %), IDAT chunk framing (12 bytes per 8 KiB
    chunk: 0.15 %) and the header chunks; 1/256 + 4 KiB covers all of it."""
    filtered = h * (w * c + 1)
    return n * (filtered + (filtered >> 8) + 4096)


def response_bound(out: OutputSpec, n: int, c: int, h: int, w: int) -> int | None:
    """Bytes of n encoded images of c x h x w: exact for raw and tensor outputs, an upper bound for
    PNG; None for JPEG and WebP, whose worst case (above the raw pixels at quality 100) would refuse
    what always fits in practice."""
    pixels = n * c * h * w
    if out.format == ImageFormat.TENSOR_F32:
        return 4 * pixels
    if out.format == ImageFormat.RAW_UINT8:
        return pixels
    if out.format in (ImageFormat.PNG, ImageFormat.UNSPECIFIED):
        return png_bound(n, c, h, w)
    return None


# What JPEG and WebP hold against the response budget before they exist: their raw pixels (a photo-like
# image encodes smaller), plus what a small or noise-like image takes above them: headers and tables
# (~0.3-0.6 KiB an image, all of an 8x8 or 28x28 one's excess) and, at quality LOSSY_HIGH_QUALITY and
# above, up to ~2x its pixels (noise at quality 100: 1.3-2.0x the raw pixels;
# tests/server/test_response_reservation_lossy.py).
LOSSY_HEADER_BYTES = 1024
LOSSY_HIGH_QUALITY = 95


def lossy_reservation(out: OutputSpec, n: int, c: int, h: int, w: int) -> int:
    """Bytes to hold for n JPEG or WebP images of c x h x w until they are encoded (then settled)."""
    factor = 2 if out.quality >= LOSSY_HIGH_QUALITY else 1
    return n * (factor * c * h * w + LOSSY_HEADER_BYTES)


def predicted_send_size(
    out: OutputSpec, n: int, c: int, h: int, w: int, limit: int, latent_bytes: int = 0
) -> int:
    """Refuse before compute what could exceed the send limit: raw and tensor outputs exactly, PNG
    by its worst case (JPEG and WebP are checked after encoding). `latent_bytes`: the latents
    returned beside the images (output.return_latents), in the same response, so counted with them.
    Returns the bytes to hold against the response budget: that size, or lossy_reservation for JPEG
    and WebP, latents included."""
    bound = response_bound(out, n, c, h, w)
    if bound is None:
        if latent_bytes:
            send_size(latent_bytes, limit, "the returned latents", items=n)
        return lossy_reservation(out, n, c, h, w) + latent_bytes
    return _admitted(bound, out, limit, latent_bytes, items=n)


def images_that_fit(out: OutputSpec, c: int, h: int, w: int, latent_floats: int, limit: int) -> int | None:
    """The most images of c x h x w (each with `latent_floats` float32 of returned latents when
    out.return_latents) that predicted_send_size admits under `limit`, at least 1 (one that does not
    fit is refused by that check, naming output); None for JPEG and WebP (checked after encoding)."""
    per_image = response_bound(out, 1, c, h, w)
    if per_image is None:
        return None
    per_image += ITEM_FRAMING_BYTES + (4 * latent_floats if out.return_latents else 0)
    return max(1, (limit - SEND_OVERHEAD_BYTES) // per_image)


def with_latents(latent_bytes: int) -> str:
    """What a send-size refusal calls a response whose latents ride beside its images."""
    return (
        f"the response (its images and {latent_bytes} bytes of returned latents)"
        if latent_bytes
        else "the response"
    )


def predicted_images_send_size(out: OutputSpec, c: int, sizes: Sequence[tuple[int, int]], limit: int) -> int:
    """`predicted_send_size` for images of different sizes (height, width), one PNG header each."""
    bounds = [response_bound(out, 1, c, h, w) for h, w in sizes]
    known = [b for b in bounds if b is not None]
    if len(known) < len(bounds):
        return sum(lossy_reservation(out, 1, c, h, w) for h, w in sizes)
    return _admitted(sum(known), out, limit, items=len(sizes))


def _admitted(bound: int, out: OutputSpec, limit: int, latent_bytes: int = 0, *, items: int) -> int:
    # PNG: whatever the compression level, only the worst case is known before the pixels are.
    worst_case = out.format in (ImageFormat.PNG, ImageFormat.UNSPECIFIED)
    what = with_latents(latent_bytes)
    send_size(bound + latent_bytes, limit, what, out.format, worst_case=worst_case, items=items)
    return bound + latent_bytes


def encodable(out: OutputSpec, sizes: Sequence[tuple[int, int]]) -> None:
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


def image_count(
    n: int, limit: int, limit_name: str = "max_images_per_image_request", field: str = "images"
) -> int:
    if not 1 <= n <= limit:
        raise invalid(field, f"must have 1..{limit} images ({limit_name}), got {n}")
    return n


def direction(value: int, card: Card, field: str = "direction") -> int:
    """A Translate direction the model has: both for a two-way translator, A_TO_B for a one-way one."""
    if value not in (A_TO_B, B_TO_A):
        raise invalid(field, f"must be {' or '.join(DIRECTION_NAMES)}, got {value}")
    if value != A_TO_B and not card.kind.two_way:
        raise invalid(
            field,
            f"{card.name} is a one-way {card.kind} model: it translates {DIRECTION_NAMES[A_TO_B]} only "
            f"(the default), got {DIRECTION_NAMES[value]}",
        )
    return value


def input_size(card: Card, height: int, width: int, field: str) -> None:
    """An input image of a model whose card fixes its input size (image_size: a vae_encoder's, or a
    translator's or super-resolution model's exported at one size) must be of that size, never
    resized: both protocols refuse it so (`field`: images[i], or KServe's inputs[image].shape)."""
    if card.image_size is None or not card.kind.takes_image:
        return
    fixed_h, fixed_w = card.image_size
    if (height, width) != (fixed_h, fixed_w):
        raise invalid(
            field,
            f"must be {fixed_h}x{fixed_w} ({card.name}'s input size, its card's image_size; never "
            f"resized), got {height}x{width}",
        )


def input_sizes(sizes: Sequence[tuple[int, int]], card: Card) -> None:
    """input_size of each image of `sizes` (h, w), named images[i]."""
    for i, (h, w) in enumerate(sizes):
        input_size(card, h, w, f"images[{i}]")


def min_size(sizes: Sequence[tuple[int, int]], card: Card) -> None:
    """Each image of `sizes` (h, w) at least card.min_size on each side."""
    for i, (h, w) in enumerate(sizes):
        if min(h, w) < card.min_size:
            raise invalid(
                f"images[{i}]", f"must be at least {card.min_size} pixels on each side, got {h}x{w}"
            )


def input_range(
    values: np.ndarray,
    value_range: tuple[float, float],
    field: str,
    *,
    not_finite: str | None = None,
    datatype: str = "TENSOR_F32",
) -> None:
    """TENSOR_F32 inputs must lie in the card's input_range (1 % slack for rounding): a model fed far
    outside it returns garbage or NaN with OK (a VAE encoder at 3e38 gave NaN latents). `not_finite`:
    the refusal of a NaN or an infinity where the caller has its own (KServe's), found by the same
    min and max, not by a pass of np.isfinite before them (its boolean copy of the values).
    `datatype`: what the refusal calls the values, in the caller's protocol's terms (KServe's FP32)."""
    lo, hi = value_range
    slack = 0.01 * (hi - lo)
    low, high = float(values.min()), float(values.max())
    if not_finite is not None and not (math.isfinite(low) and math.isfinite(high)):
        raise invalid(field, not_finite)
    if math.isnan(low) or math.isnan(high):  # min and max propagate a NaN, which no bound comparison finds
        raise invalid(
            field, f"{datatype} values must be in the model's input_range [{lo:g}, {hi:g}], got a NaN"
        )
    if low < lo - slack or high > hi + slack:
        raise invalid(
            field,
            f"{datatype} values must be in the model's input_range [{lo:g}, {hi:g}], got {low:g}..{high:g}",
        )


def tile_for(card: Card, overlap: int) -> int:
    """The tile_size of a request that sets none: card.json's (128 without one), at least 4 x the
    overlap, at most MAX_TILE."""
    return min(MAX_TILE, max(card.tile_size or 128, 4 * overlap))


def fixed_tile(card: Card, tile_size: int) -> int | None:
    """The tile_size of a super-resolution model of one input size (card.json's image_size), whose
    images, each of that size, are each one tile: the size's longer side; None for a size-free
    model. A request's tile_size (0: none) below it would cut tiles the graph cannot take, and one
    past MAX_TILE is refused as for any model: InvalidArgument naming tile_size and the size."""
    if card.image_size is None:
        return None
    h, w = card.image_size
    side = max(h, w)
    largest = max(side, MAX_TILE)
    if tile_size and not side <= tile_size <= largest:
        raise invalid(
            "tile_size",
            f"must be 0 or in {side}..{largest} ({card.name}'s input size is {h}x{w}, its card's "
            f"image_size: each image is one tile of it), got {tile_size}",
        )
    return side


def default_tiling(card: Card, radius: int | None) -> tuple[int, int]:
    """(tile_size, tile_overlap) of a request that sets neither: card.json's overlap, raised to twice
    the receptive-field radius measured at load (which makes tiling exact), and tile_for's size."""
    overlap = max(card.tile_overlap or 0, 2 * radius if radius is not None else 0)
    return tile_for(card, overlap), overlap


def smallest_tile(overlap: int, size_multiple: int, min_size: int = 1) -> int:
    """The smallest tile_size that tiling() takes with this overlap: every rule at once (2 * overlap
    + 8, 4 * overlap, a whole size multiple past the overlap, min_size), so the bound a tile_size
    refusal names is one the next request passes."""
    overlap_units = -(-overlap // size_multiple)
    return max(
        2 * overlap + 8,
        4 * overlap,
        size_multiple * (overlap_units + 1),
        -(-min_size // size_multiple) * size_multiple,
    )


def largest_overlap(size_multiple: int, min_size: int = 1) -> int:
    """The largest tile_overlap that some tile_size up to MAX_TILE takes (smallest_tile grows with
    the overlap); -1 where none does (a size multiple or min_size above MAX_TILE)."""
    largest = -1
    for overlap in range(MAX_TILE // 4 + 1):
        if smallest_tile(overlap, size_multiple, min_size) > MAX_TILE:
            break
        largest = overlap
    return largest


def tiling(
    tile: int, overlap: int, size_multiple: int, *, overlap_given: bool = True, min_size: int = 1
) -> None:
    """InvalidArgument naming tile_size or tile_overlap unless tiles of that size can be planned.
    `overlap_given`: the client set tile_overlap (else it is the model's default, which a refusal
    must not blame: the tile_size it asked is then what is too small). `min_size`: the model's
    smallest input side (card.json), which every tile is. Each tile_size refusal names
    smallest_tile, which passes every rule here, not only the one it failed."""
    smallest = smallest_tile(overlap, size_multiple, min_size)
    if overlap > MAX_TILE // 4 or smallest > MAX_TILE:
        # No tile_size could hold it: name the overlaps that work, not a derived tile past MAX_TILE.
        limit = largest_overlap(size_multiple, min_size)
        model = f"(size multiple {size_multiple}, min_size {min_size})"
        if limit < 0:
            raise invalid("tile_size", f"no tile_size up to {MAX_TILE} can tile this model {model}")
        if limit == MAX_TILE // 4:
            raise invalid(
                "tile_overlap",
                f"must be in 0..{MAX_TILE // 4} (tile_size / 4, tile_size <= {MAX_TILE}), got {overlap}",
            )
        reason = f"no tile_size up to {MAX_TILE} takes tile_overlap {overlap} for this model {model}"
        if overlap_given:
            raise invalid("tile_overlap", f"must be in 0..{limit}: {reason}, got {overlap}")
        raise invalid("tile_size", f"{reason}, the model's tile_overlap; set a tile_overlap in 0..{limit}")
    if not 2 * overlap + 8 <= tile <= MAX_TILE:
        if overlap_given:
            rule = "(>= 2 * tile_overlap + 8 and >= 4 * tile_overlap)"
        else:
            rule = (
                f"(>= 2 * tile_overlap + 8 and >= 4 * tile_overlap, with the model's tile_overlap {overlap})"
            )
        raise invalid("tile_size", f"must be in {smallest}..{MAX_TILE} {rule}, got {tile}")
    if overlap > tile // 4:
        if not overlap_given:
            raise invalid(
                "tile_size",
                f"must be in {smallest}..{MAX_TILE} (>= 4 * tile_overlap, with the model's "
                f"tile_overlap {overlap}; or set a smaller tile_overlap), got {tile}",
            )
        raise invalid("tile_overlap", f"must be in 0..{tile // 4} (tile_size / 4), got {overlap}")
    # Tiles start and step in whole multiples of the model's size multiple (tiling.plan_tiles).
    overlap_units = -(-overlap // size_multiple)
    if tile // size_multiple <= overlap_units:
        raise invalid(
            "tile_size",
            f"must be at least {smallest} for this model (size multiple {size_multiple}, "
            f"tile_overlap {overlap}), got {tile}",
        )
    # Each tile is one model input, cut to a whole multiple of the size multiple (tiling.plan_tiles):
    # one smaller than the model's min_size failed in the model (INTERNAL), for every tile.
    if tile - tile % size_multiple < min_size:
        raise invalid(
            "tile_size",
            f"must be at least {smallest} for this model (its min_size {min_size}: every tile is a "
            f"model input), got {tile}",
        )

"""Image bytes <-> pixel arrays, and model float tensors <-> uint8 pixels.

Three concerns that every image RPC shares, kept free of protobuf and ONNX:

* ``decode_image``: request bytes -> uint8 HWC (or float32 CHW for TENSOR_F32). Inputs are hostile:
  the declared size is read from the header by this module's own parsers *before* any decoder
  runs, because a 100-byte PNG or WebP can declare 50000x50000 pixels and decoders allocate the
  whole canvas up front (libwebp's does so as soon as the file is opened). Only PNG, JPEG and WebP
  reach Pillow, and Pillow is only asked for the one format the magic bytes name. A JPEG holds at
  most MAX_JPEG_SCANS scans: libjpeg's time grows with scans x pixels, not with the file's size.
  Pillow walks a JPEG's header and a PNG's chunks in Python, one step a segment or chunk, and parses
  EXIF and inflates PNG text and ICC chunks: a file has at most MAX_IMAGE_METADATA_SEGMENTS of them
  (and MAX_PNG_IDAT_CHUNKS pixel-data chunks), and the metadata is cut out before Pillow sees it.
* ``encode_image``: uint8 HWC -> response bytes. PNG, JPEG and WebP go through OpenCV, measured at
  about 4-7x faster than Pillow for PNG here (see /work/shared/FACTS.md); PNG defaults to zlib
  level 1 because higher levels cost several times the CPU for ~10% smaller files.
* ``to_uint8`` / ``from_uint8``: the card's ``output_range``/``input_range`` mapping, vectorised.

The shape reported by ``encode_image`` is always the shape ``decode_image`` gives back for the
bytes, so PNG, RAW_UINT8, TENSOR_F32 and lossless WebP round-trip exactly. WebP has no grayscale
mode: a 1-channel image is stored (and reported) as RGB with equal channels. EXIF orientation is
not applied (pixels are served as stored, as Pillow and OpenCV's IMREAD_UNCHANGED do).

Call these from an executor, never on the event loop: they are CPU-bound (milliseconds at 256x256).
"""

from __future__ import annotations

import enum
import io
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from .errors import Internal, InvalidArgument, invalid

U8Array = NDArray[np.uint8]
F32Array = NDArray[np.float32]

DEFAULT_QUALITY: Final = 90
DEFAULT_PNG_COMPRESSION: Final = 1
# PNG level 1 is the fast profile: one cheap filter (Up) and zlib's run-length matching instead of
# libpng's per-row adaptive filter choice and full LZ77 search. Generated photos are noise-like at
# the byte level, so the search finds little: on 256x256-512x512 photos this is 2-3x faster than
# level 1 with the default filters (5.5 -> 1.9 ms for a 256x256 RGB generation) for sizes within
# -7..+2 %; 28x28 digits are as fast and 2 % larger. Levels 2-9 keep libpng's adaptive filters.
_PNG_FAST_PARAMS: Final = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_UP,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
]

# ITU-R BT.601 luma weights, as in Pillow's convert("L") and OpenCV's RGB2GRAY.
_LUMA_601: Final = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
# JPEG start-of-frame markers that carry the image size (all SOFn except DHT, JPG and DAC).
_JPEG_SOF_MARKERS: Final = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
# Markers Pillow reads with no length field (as the standard does RST0-7, SOI and EOI; JPG and
# JPG0-13, which libjpeg refuses, too): the walk follows Pillow's, so it sees the segments Pillow sees.
_JPEG_STANDALONE: Final = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_JPEG_SOS: Final = 0xDA
_JPEG_EOI: Final = 0xD9
# libjpeg decodes every scan of a JPEG over all of its blocks, and only warns when a scan repeats
# one before it: a 2048x2048 progressive JPEG whose AC scan is repeated costs ~0.35 ms of decoding
# per 16-byte scan (one EOB run covers the whole plane), so 1 MiB held a codec thread ~20 s and
# the 64 MiB message limit ~20 min, uncancellable. Real JPEGs have 1 (baseline) to about 10
# (progressive) scans per image; the limit is libjpeg-turbo's suggested scan limit (djpeg
# -maxscans, TJPARAM_SCANLIMIT) with room for camera files that carry a few embedded JPEGs.
MAX_JPEG_SCANS: Final = 1000
# Start-of-scan markers are counted as the bytes FF DA anywhere in the file: entropy-coded data
# stuffs every FF with 00, so each scan libjpeg can see is counted (an upper bound: marker payloads
# such as EXIF or ICC data may hold the pair by chance, rarely more than a few times).
_JPEG_SOS_BYTES: Final = b"\xff\xda"
# Pillow reads a JPEG's marker segments up to the first scan, and a PNG's chunks before and after
# the pixel data, in Python: ~1.5 us a 4-byte comment segment, ~3 us a 12-byte chunk, ~0.3 us a fill
# or stray byte (skipped one at a time), so ~64 MiB of them (the message limit) held a codec thread
# ~30 s. Real files have tens (tables, EXIF, XMP, ICC profiles in 64 KiB pieces); 1000 segments of
# the most a segment holds (64 KiB) are already the 64 MiB message limit. Each fill or stray byte
# before the first scan counts as a segment. libjpeg walks the markers between scans and ignores
# what follows the end-of-image marker, both in C.
MAX_IMAGE_METADATA_SEGMENTS: Final = 1000
# PNG pixel data (IDAT) is walked the same way, ~1 us a chunk: encoders write chunks of 8 KiB
# (libpng, OpenCV) or more, so 65536 chunks is a 512 MiB PNG, while empty 12-byte ones are refused.
MAX_PNG_IDAT_CHUNKS: Final = 65536
# Pillow also parses a JPEG's quantization tables and frame headers byte by byte (~0.15 us a byte:
# 4 MiB of repeated ones took 0.5-1 s): what it is handed before the first scan, the metadata below
# left out, is at most 128 KiB. Real ones are a few KiB (the tables, the frame header, JFIF and
# Adobe segments), up to ~70 KiB with a JFIF thumbnail.
MAX_JPEG_HEADER_BYTES: Final = 128 * 1024
# Metadata the server never uses (pixels are served as stored: no EXIF orientation, no colour
# management) and Pillow parses in Python, cut out before Pillow sees the file: within the limits
# above, EXIF split over APP1 segments took ~0.5 s a MiB to parse (its values are unpacked one by
# one), and each PNG zTXt, iTXt or iCCP chunk of ~1 KiB inflated to 1 MiB (~3.5 ms). The JPEG
# segments are APP1-APP13, APP15 (EXIF, XMP, ICC, MPF, Photoshop) and comments before the first scan;
# APP0 (JFIF) and APP14 (Adobe) stay, as libjpeg reads the colour space from them.
_JPEG_METADATA: Final = frozenset({*range(0xE1, 0xEE), 0xEF, 0xFE})
_PNG_METADATA: Final = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf"})


class ImageFormat(enum.IntEnum):
    """Mirror of genserve.v1.ImageFormat (same numbers), so this module needs no protobuf."""

    UNSPECIFIED = 0
    PNG = 1
    JPEG = 2
    WEBP = 3
    RAW_UINT8 = 4
    TENSOR_F32 = 5


_ENCODED: Final = (ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP)
# The largest side each lossy format can hold (libjpeg's JPEG_MAX_DIMENSION, WebP's 14-bit size
# fields); PNG's limit (2^31 - 1) is far above any allowed output.
MAX_SIDE: Final[dict[int, int]] = {ImageFormat.JPEG: 65500, ImageFormat.WEBP: 16383}
_PIL_NAME: Final = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}


def _format_name(fmt: ImageFormat) -> str:
    return f"IMAGE_FORMAT_{fmt.name}"


# --------------------------------------------------------------------------------------------------
# Header parsing: the size of an encoded image without decoding it.


def sniff_format(data: bytes) -> ImageFormat | None:
    """PNG, JPEG or WEBP from the magic bytes; None for anything else."""
    if data.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    if data.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    if len(data) >= 16 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # The signature is followed by the IHDR chunk: length 13, "IHDR", width, height (big-endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class _Walk(NamedTuple):
    """What walking an encoded image's segments or chunks found."""

    size: tuple[int, int] | None  # (width, height) from the JPEG frame header
    steps: int  # segments (JPEG: and fill or stray bytes) or non-IDAT chunks, up to one past the limit
    idat: int  # PNG IDAT chunks, up to one past MAX_PNG_IDAT_CHUNKS
    header: int  # JPEG: bytes of the segments before the first scan that Pillow is handed
    kept: list[tuple[int, int]] | None  # the spans to hand Pillow when metadata was found; else None


def _jpeg_walk(data: bytes) -> _Walk:
    """Walk the marker segments before the first scan as Pillow's parser does (so both see the same
    segments), stopping once the steps pass MAX_IMAGE_METADATA_SEGMENTS: the walk costs at most
    that many steps itself (declared_size runs it on the event loop). Where it stops before the
    first scan, Pillow stops too (an error, or the end of the data)."""
    # EXIF thumbnails live inside APP1 and are skipped with it; SOFn holds precision (1 byte),
    # height, width (2 bytes each, big-endian).
    size: tuple[int, int] | None = None
    steps = header = 0
    kept = [(0, 2)]  # SOI
    cut = False  # metadata, fill or stray bytes to leave out
    pos = 2
    end = len(data)
    while pos + 2 <= end and steps <= MAX_IMAGE_METADATA_SEGMENTS:
        if data[pos] != 0xFF:
            if size is None:
                return _Walk(None, steps, 0, header, None)  # stray bytes before the frame header
            # Pillow skips stray bytes one at a time, so each counts.
            found = data.find(b"\xff", pos)
            following = end if found < 0 else found
            steps += following - pos
            pos, cut = following, True
            continue
        marker = data[pos + 1]
        if marker == _JPEG_SOS:
            if size is None:
                break  # the image data began before any frame header
            if cut:
                kept.append((pos, end))
            return _Walk(size, steps, 0, header, kept if cut else None)
        steps += 1
        if marker == 0xFF or marker == 0x00:  # a fill byte; FF 00 is skipped as stray bytes
            pos, cut = pos + (1 if marker == 0xFF else 2), True
            continue
        if marker < 0xC0 or (marker == _JPEG_EOI and size is None):
            break  # Pillow: "no marker found"; or the image ended before any frame header
        if marker in _JPEG_STANDALONE:
            kept.append((pos, pos + 2))
            header += 2
            pos += 2
            continue
        if pos + 4 > end:
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF_MARKERS and size is None:
            if pos + 9 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (width, height)
        following = pos + 2 + max(length, 2)  # Pillow reads a length below 2 as an empty segment
        if marker in _JPEG_METADATA:
            cut = True
        else:
            kept.append((pos, following))
            header += following - pos
        pos = following
    return _Walk(size, steps, 0, header, None)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    return _jpeg_walk(data).size


def _png_walk(data: bytes) -> _Walk:
    """Walk the chunks up to IEND (Pillow reads those after the pixel data too), stopping once
    either count passes its limit (MAX_IMAGE_METADATA_SEGMENTS, MAX_PNG_IDAT_CHUNKS). An animated
    PNG's walk ends, as Pillow's does for the first frame, at the fcTL after the pixel data: the
    frames after it are chunks Pillow never reads."""
    other = idat = 0
    cuts: list[tuple[int, int]] = []
    frames: int | None = None  # acTL's frame count as Pillow keeps it (a second acTL voids it)
    framed = False  # an fcTL before the pixel data: the default image is the first frame
    pos = len(_PNG_MAGIC)
    end = len(data)
    unpack = struct.Struct(">I4s").unpack_from
    while pos + 8 <= end:
        length, kind = unpack(data, pos)
        following = pos + 12 + length  # length, type, payload, CRC
        if kind == b"IDAT":
            idat += 1
            if idat > MAX_PNG_IDAT_CHUNKS:
                break
        else:
            other += 1
            if other > MAX_IMAGE_METADATA_SEGMENTS:
                break
            if kind in _PNG_METADATA and following <= end:
                cuts.append((pos, following))
            if kind == b"IEND":
                break
            if kind == b"fcTL":
                if idat:
                    # Pillow: n_frames is acTL's, one more where the default image is no frame.
                    if (frames or 1) + (frames is not None and not framed) > 1:
                        break
                else:
                    framed = True
            elif kind == b"acTL" and not idat and length >= 8 and pos + 16 <= end:
                count = int.from_bytes(data[pos + 8 : pos + 12], "big")
                frames = None if frames is not None or not 0 < count <= 0x80000000 else count
        pos = following
    if not cuts:
        return _Walk(None, other, idat, 0, None)
    kept, start = [], 0
    for cut_start, cut_end in cuts:
        kept.append((start, cut_start))
        start = cut_end
    kept.append((start, end))
    return _Walk(None, other, idat, 0, kept)


def _checked_walk(data: bytes, fmt: ImageFormat, field: str) -> _Walk | None:
    """A JPEG's or PNG's walk (None for WebP), refused if Pillow would walk more segments or chunks
    than the limits allow."""
    if fmt == ImageFormat.WEBP:
        return None
    limit = MAX_IMAGE_METADATA_SEGMENTS
    walk = _jpeg_walk(data) if fmt == ImageFormat.JPEG else _png_walk(data)
    if fmt == ImageFormat.JPEG and walk.steps > limit:
        raise invalid(
            field,
            f"JPEG with more than {limit} marker segments before the image data (comments, APPn "
            f"metadata, fill or stray bytes) exceeds the limit of {limit} (real files have tens)",
        )
    if fmt == ImageFormat.JPEG and walk.header > MAX_JPEG_HEADER_BYTES:
        raise invalid(
            field,
            f"JPEG with {walk.header} bytes of tables and frame headers before the image data "
            f"(metadata not counted) exceeds the limit of {MAX_JPEG_HEADER_BYTES} bytes (real ones "
            "have a few KiB)",
        )
    if walk.steps > limit:
        raise invalid(
            field,
            f"PNG with more than {limit} chunks besides IDAT (text, metadata or unknown chunks) "
            f"exceeds the limit of {limit} (real files have tens)",
        )
    if walk.idat > MAX_PNG_IDAT_CHUNKS:
        raise invalid(
            field,
            f"PNG with more than {MAX_PNG_IDAT_CHUNKS} IDAT chunks exceeds the limit of "
            f"{MAX_PNG_IDAT_CHUNKS} (encoders write chunks of 8 KiB or more)",
        )
    return walk


def _pixel_data(data: bytes, walk: _Walk | None) -> bytes:
    """The bytes to hand Pillow: `data` without its metadata (_JPEG_METADATA, _PNG_METADATA), which
    its `walk` (_checked_walk) found."""
    if walk is None or walk.kept is None:
        return data
    view = memoryview(data)
    return b"".join(view[start:stop] for start, stop in walk.kept)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    # RIFF container, first chunk VP8 (lossy), VP8L (lossless) or VP8X (extended: canvas size).
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


_SIZE_READERS: Final = {
    ImageFormat.PNG: _png_size,
    ImageFormat.JPEG: _jpeg_size,
    ImageFormat.WEBP: _webp_size,
}


def encoded_size(data: bytes) -> tuple[ImageFormat, int, int] | None:
    """(format, width, height) declared by an encoded image's header, or None if unrecognised."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    size = _SIZE_READERS[fmt](data)
    return None if size is None else (fmt, size[0], size[1])


def declared_size(data: bytes, fmt: int, shape: Sequence[int]) -> tuple[int, int] | None:
    """(height, width) a request image declares (header or `shape`), without decoding; None if unknown."""
    if fmt == ImageFormat.RAW_UINT8 and len(shape) == 3:
        return int(shape[0]), int(shape[1])
    if fmt == ImageFormat.TENSOR_F32 and len(shape) == 3:
        return int(shape[1]), int(shape[2])
    if fmt in (ImageFormat.UNSPECIFIED, *_ENCODED):
        found = encoded_size(data)
        return None if found is None else (found[2], found[1])
    return None


# --------------------------------------------------------------------------------------------------
# Decoding.


def _check_pixels(width: int, height: int, max_pixels: int, field: str, limit_name: str) -> None:
    if width < 1 or height < 1:
        raise invalid(field, f"image size {height}x{width} is empty")
    pixels = width * height
    if pixels > max_pixels:
        raise invalid(field, f"{height}x{width} = {pixels} pixels exceeds {limit_name} {max_pixels}")


def _to_hwc_uint8(im: Image.Image) -> U8Array:
    """Any decoded Pillow mode -> uint8 HWC with 1 (gray) or 3 (RGB) channels; alpha is dropped."""
    mode = im.mode
    if mode == "P":
        # Palette (with or without a transparent entry): expand to the palette's colours.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, -1)
    if mode == "RGBA" or mode == "RGBX":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, :3])
    if mode == "LA":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, :1])
    if mode.startswith("I;16") or mode == "I":
        # 16-bit gray (PNG): scale 0..65535 onto 0..255 with rounding (v / 257), not clipping.
        wide = np.asarray(im).astype(np.int64)
        scaled = (np.clip(wide, 0, 65535) * 255 + 32767) // 65535
        return scaled.astype(np.uint8).reshape(im.height, im.width, 1)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8).reshape(im.height, im.width, 1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)  # CMYK, YCbCr, ...


def _allow_pillow_pixels(max_pixels: int) -> None:
    """Pillow's process-wide bomb guard (a warning above Image.MAX_IMAGE_PIXELS, ~89M pixels, an
    error above twice that) would refuse what a server configured above it allows, as "exceeds
    max_input_pixels" when it does not: raised (never lowered) to the caller's limit, which the
    header and Pillow's own size are checked against before any pixel is decoded."""
    allowed = Image.MAX_IMAGE_PIXELS
    if allowed is not None and max_pixels > allowed:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _detect(data: bytes, fmt: ImageFormat, field: str) -> ImageFormat:
    """The format the magic bytes name, refused where it is none or not the `fmt` the request set."""
    detected = sniff_format(data)
    if detected is None:
        raise invalid(field, f"{_format_name(fmt)}: the data is not a PNG, JPEG or WEBP image")
    if fmt != ImageFormat.UNSPECIFIED and detected != fmt:
        raise invalid(field, f"format is {_format_name(fmt)} but the data is a {detected.name} image")
    return detected


def _no_size(detected: ImageFormat, field: str) -> InvalidArgument:
    return invalid(field, f"corrupt {detected.name} image: no readable size in the header")


def _checked_header(
    data: bytes, fmt: ImageFormat, max_pixels: int, field: str, limit_name: str
) -> tuple[ImageFormat, _Walk | None, tuple[int, int]]:
    """(format, walk, (width, height)) of an encoded image, refused as it is before any decoder
    runs: its format, the segment, chunk and scan limits, the size its header declares."""
    detected = _detect(data, fmt, field)
    walk = _checked_walk(data, detected, field)
    size = _SIZE_READERS[detected](data)
    if size is None:
        raise _no_size(detected, field)
    _check_pixels(size[0], size[1], max_pixels, field, limit_name)
    if detected == ImageFormat.JPEG:
        scans = data.count(_JPEG_SOS_BYTES)
        if scans > MAX_JPEG_SCANS:
            raise invalid(
                field,
                f"JPEG with {scans} scans (start-of-scan markers) exceeds the limit of {MAX_JPEG_SCANS} "
                "scans per image (a progressive JPEG has about 10)",
            )
    return detected, walk, size


def _decode_encoded(data: bytes, fmt: ImageFormat, max_pixels: int, field: str, limit_name: str) -> U8Array:
    detected, walk, size = _checked_header(data, fmt, max_pixels, field, limit_name)
    pixel_data = _pixel_data(data, walk)
    _allow_pillow_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(pixel_data), formats=[_PIL_NAME[detected]]) as im:
            # The decoder's own idea of the size, before it allocates pixels: an image decodes to the
            # size its header declares (checked_size), which callers size their memory from.
            if im.size != size:
                raise invalid(
                    field,
                    f"corrupt {detected.name} image: its header declares {size[1]}x{size[0]} pixels, "
                    f"the decoder reads {im.size[1]}x{im.size[0]}",
                )
            im.load()
            return _to_hwc_uint8(im)
    except Image.DecompressionBombError as exc:
        raise invalid(field, f"image exceeds {limit_name} {max_pixels}") from exc
    except InvalidArgument:
        raise
    except UnidentifiedImageError as exc:
        raise invalid(field, f"corrupt or truncated {detected.name} image (unreadable header)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError) as exc:
        # Truncated or corrupt data. Pillow's message is short and names no server internals.
        raise invalid(field, f"corrupt or truncated {detected.name} image ({exc})") from exc


def _shape_ints(shape: Sequence[int], field: str, layout: str) -> tuple[int, int, int]:
    dims = [int(d) for d in shape]
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise invalid(f"{field}.shape", f"must be {layout} with every dimension >= 1, got {dims}")
    return dims[0], dims[1], dims[2]


def _raw_dims(
    data: bytes, fmt: ImageFormat, shape: Sequence[int], max_pixels: int, field: str, limit_name: str
) -> tuple[int, int, int]:
    """(C, H, W) of a RAW_UINT8 ([H, W, C]) or TENSOR_F32 ([C, H, W]) image, its shape, pixels and
    byte count checked."""
    if fmt == ImageFormat.RAW_UINT8:
        height, width, channels = _shape_ints(shape, field, "[H, W, C]")
        layout, size, dims = "[H, W, C]", 1, [height, width, channels]
    else:
        channels, height, width = _shape_ints(shape, field, "[C, H, W]")
        layout, size, dims = "[C, H, W]", 4, [channels, height, width]
    if channels not in (1, 3):
        raise invalid(f"{field}.shape", f"{fmt.name} needs C in {{1, 3}} in {layout}, got {channels}")
    _check_pixels(width, height, max_pixels, field, limit_name)
    expected = size * channels * height * width
    if len(data) != expected:
        shown = ", ".join(str(d) for d in dims)
        raise invalid(field, f"{fmt.name} shape [{shown}] needs {expected} bytes, got {len(data)}")
    return channels, height, width


def _image_format(fmt: int, field: str) -> ImageFormat:
    try:
        return ImageFormat(fmt)
    except ValueError:
        raise invalid(f"{field}.format", f"unknown image format {fmt}") from None


def checked_size(
    data: bytes,
    fmt: int,
    shape: Sequence[int],
    *,
    max_pixels: int,
    field: str,
    limit_name: str = "max_input_pixels",
) -> tuple[int, int]:
    """(height, width) of a request image as its header (or `shape`) declares it, without decoding,
    refused as decode_image refuses it before decoding (format, shape and byte count, `max_pixels`,
    the segment, chunk and scan limits): what a call sizes the memory its decoded images take from
    before it decodes them. decode_image gives back an image of this size, or refuses it (a header
    its decoder reads otherwise). Walks a PNG's chunks: call it off the event loop."""
    image_format = _image_format(fmt, field)
    if image_format in (ImageFormat.RAW_UINT8, ImageFormat.TENSOR_F32):
        _, height, width = _raw_dims(data, image_format, shape, max_pixels, field, limit_name)
        return height, width
    _, _, size = _checked_header(data, image_format, max_pixels, field, limit_name)
    return size[1], size[0]


def decode_image(
    data: bytes,
    fmt: int,
    shape: Sequence[int],
    *,
    max_pixels: int,
    field: str,
    limit_name: str = "max_input_pixels",
) -> U8Array | F32Array:
    """Decode one request image; every error is an InvalidArgument naming `field` and the limit
    (`limit_name`: the server config field that `max_pixels` comes from).

    * PNG / JPEG / WEBP / UNSPECIFIED (detected from the magic bytes): uint8 [H, W, C], C = 1 for
      gray sources and 3 otherwise (RGBA drops alpha, palettes expand, 16-bit scales to 8-bit).
      The header's size is checked against `max_pixels` before any decoder runs.
    * RAW_UINT8: `shape` [H, W, C] with C in {1, 3}; returns a read-only view of `data`.
    * TENSOR_F32: `shape` [C, H, W] with C in {1, 3}, little-endian float32, all finite; returns
      a read-only float32 [C, H, W] view of `data`.
    """
    image_format = _image_format(fmt, field)
    if image_format in (ImageFormat.UNSPECIFIED, *_ENCODED):
        return _decode_encoded(data, image_format, max_pixels, field, limit_name)
    if image_format == ImageFormat.RAW_UINT8:
        channels, height, width = _raw_dims(data, image_format, shape, max_pixels, field, limit_name)
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    tensor = tensor_view(data, shape, max_pixels=max_pixels, field=field, limit_name=limit_name)
    if not np.isfinite(tensor).all():
        bad = int(np.size(tensor) - np.count_nonzero(np.isfinite(tensor)))
        raise invalid(field, f"TENSOR_F32 must be finite, found {bad} NaN/Inf values")
    return tensor


def tensor_view(
    data: bytes,
    shape: Sequence[int],
    *,
    max_pixels: int,
    field: str,
    limit_name: str = "max_input_pixels",
) -> F32Array:
    """A TENSOR_F32 image as decode_image gives it (a read-only float32 [C, H, W] view of `data`),
    its shape, pixels and byte count refused as there, its values not checked: for bytes whose values
    decode_image has checked already (immutable bytes: no full pass over them a second time)."""
    channels, height, width = _raw_dims(data, ImageFormat.TENSOR_F32, shape, max_pixels, field, limit_name)
    return np.frombuffer(data, dtype="<f4").reshape(channels, height, width).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------
# Encoding.


def _as_hwc_uint8(img: NDArray[np.generic]) -> U8Array:
    if img.dtype != np.uint8:
        raise TypeError(f"encode_image needs uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
    if img.ndim != 3 or img.shape[2] not in (1, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"encode_image needs [H, W, C] with C in {{1, 3}}, got shape {list(img.shape)}")
    return np.ascontiguousarray(img, dtype=np.uint8)


def _check_quality(quality: int) -> int:
    if quality == 0:
        return DEFAULT_QUALITY  # proto: 0 means the default
    if not 1 <= quality <= 100:
        raise invalid("output.quality", f"must be in 1..100 (0 = default {DEFAULT_QUALITY}), got {quality}")
    return quality


def _imencode(ext: str, bgr: NDArray[np.integer[Any] | np.floating[Any]], params: list[int]) -> bytes:
    ok, buffer = cv2.imencode(ext, bgr, params)
    if not ok:
        raise Internal(f"OpenCV could not encode a {list(bgr.shape)} image as {ext}")
    return buffer.tobytes()


def encode_image(
    img: NDArray[np.generic],
    fmt: int,
    *,
    quality: int = DEFAULT_QUALITY,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
) -> tuple[bytes, list[int]]:
    """Encode one response image; returns (bytes, shape to report in Image.shape).

    `img` is uint8 [H, W, C] (C in {1, 3}; a 2-D array is gray) for every format but TENSOR_F32,
    which takes the model's float output [C, H, W] as it left the graph. UNSPECIFIED means PNG.
    JPEG/WEBP `quality` is 1..100 (0 = 90); WEBP at 100 is lossless. `png_compression` is zlib's
    level 0..9; 1, the default, is the fast profile (`_PNG_FAST_PARAMS`). The reported shape is
    [H, W, C] of what the bytes decode to ([C, H, W] for TENSOR_F32).
    """
    try:
        image_format = ImageFormat(fmt)
    except ValueError:
        raise invalid("output.format", f"unknown image format {fmt}") from None
    if image_format == ImageFormat.TENSOR_F32:
        tensor = np.ascontiguousarray(img, dtype="<f4")
        if tensor.ndim != 3:
            raise ValueError(f"TENSOR_F32 needs [C, H, W], got shape {list(tensor.shape)}")
        return tensor.tobytes(), [int(d) for d in tensor.shape]
    hwc = _as_hwc_uint8(img)
    height, width, channels = (int(d) for d in hwc.shape)
    if image_format == ImageFormat.RAW_UINT8:
        return hwc.tobytes(), [height, width, channels]
    # OpenCV wants BGR order for colour images; gray stays single-channel.
    pixels = hwc[:, :, 0] if channels == 1 else cv2.cvtColor(hwc, cv2.COLOR_RGB2BGR)
    if image_format in (ImageFormat.PNG, ImageFormat.UNSPECIFIED):
        if not 0 <= png_compression <= 9:
            raise invalid("output.png_compression", f"must be in 0..9, got {png_compression}")
        params = _PNG_FAST_PARAMS if png_compression == 1 else [cv2.IMWRITE_PNG_COMPRESSION, png_compression]
        return _imencode(".png", pixels, params), [height, width, channels]
    level = _check_quality(quality)
    if image_format == ImageFormat.JPEG:
        return _imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, level]), [height, width, channels]
    # WEBP: OpenCV's encoder is lossless only for quality > 100, so the API's 100 maps to 101.
    # WebP has no gray mode: gray is stored as RGB, which is what a decoder returns.
    if channels == 1:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    webp_quality = 101 if level == 100 else level
    return _imencode(".webp", pixels, [cv2.IMWRITE_WEBP_QUALITY, webp_quality]), [height, width, 3]


# --------------------------------------------------------------------------------------------------
# Float tensors <-> uint8 pixels.


def _range(value_range: tuple[float, float], name: str) -> tuple[float, float]:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"{name} must be finite with hi > lo, got {value_range}")
    return lo, hi


def all_finite(values: NDArray[np.floating]) -> bool:
    """Whether no value is NaN or infinite: two SIMD reductions (min and max: ~8 us for 64 x 28 x 28,
    faster than np.isfinite's boolean copy or a float32 sum, which may overflow); math.isfinite on
    their scalars is ~1 us faster than np.isfinite's ufunc."""
    return values.size == 0 or (math.isfinite(values.min()) and math.isfinite(values.max()))


_ALL_TRUE = np.ones(1024, dtype=bool)
_ALL_TRUE.flags.writeable = False


def finite_rows(batch: NDArray[np.floating]) -> NDArray[np.bool_]:
    """bool [N], read-only: whether each row of `batch` is finite; the per-row pass only when one is
    not (else a view of a shared array of True: no allocation per batch)."""
    n = len(batch)
    if all_finite(batch):
        return _ALL_TRUE[:n] if n <= len(_ALL_TRUE) else np.ones(n, dtype=bool)
    return np.asarray(np.isfinite(batch.reshape(n, -1)).all(axis=1))


# From this many values up, np.clip + a NaN check beats np.fmax + np.fmin (each ~2.7x a clip on
# 256x256 RGB: 68 + 68 us against 25 + 12); below it np.clip's Python wrapper costs more (784: 6 vs 2 us).
_CLIP_MIN_VALUES = 8192


def to_uint8(batch_nchw: NDArray[np.floating], output_range: tuple[float, float]) -> U8Array:
    """Model output float [N, C, H, W] -> uint8 [N, H, W, C]: lo -> 0, hi -> 255, clipped, round half up.

    Computed in float32 as floor((x - lo) * 255 / (hi - lo) + 0.5) with the offset folded into one
    multiply-add; the clip happens before the truncating cast, so truncation is floor. NaN maps to 0,
    so a misbehaving model gives black pixels rather than undefined ones.
    """
    lo, hi = _range(output_range, "output_range")
    x = np.asarray(batch_nchw)
    if x.ndim != 4:
        raise ValueError(f"to_uint8 needs [N, C, H, W], got shape {list(x.shape)}")
    scale = np.float32(255.0 / (hi - lo))
    offset = np.float32(0.5 - lo * 255.0 / (hi - lo))
    y = np.multiply(x, scale, dtype=np.float32)
    np.add(y, offset, out=y)
    if y.size < _CLIP_MIN_VALUES:
        np.fmax(y, np.float32(0.0), out=y)  # fmax/fmin map NaN to the bound
        np.fmin(y, np.float32(255.0), out=y)
    else:
        # np.clip is SIMD but keeps NaN: a min reduction finds the NaN the cast would leave undefined.
        np.clip(y, np.float32(0.0), np.float32(255.0), out=y)
        if np.isnan(np.min(y)):
            np.fmax(y, np.float32(0.0), out=y)
    nchw = y.astype(np.uint8)
    n, c, h, w = nchw.shape
    if c == 1:
        gray: U8Array = nchw.reshape(n, h, w, 1)
        return gray
    # Interleave the planes with cv2.merge (SIMD): a strided numpy transpose of the uint8 result
    # was a third of a GPU-served SuperResolve's CPU per request. Same bytes either way.
    out: U8Array = np.empty((n, h, w, c), dtype=np.uint8)
    for i in range(n):
        out[i] = cv2.merge(list(nchw[i])).reshape(h, w, c)
    return out


def convert_channels(chw: NDArray[np.floating], channels: int) -> F32Array:
    """Float [C, H, W] with C in {1, 3} -> `channels`: gray -> RGB replicates, RGB -> gray is BT.601 luma.

    Luma is affine-invariant (its weights sum to 1), so this works on values in any input_range.
    """
    x = np.asarray(chw, dtype=np.float32)
    have = x.shape[0]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=0)
    if have == 3 and channels == 1:
        # G + 0.299 (R - G) + 0.114 (B - G), the weights' sum being 1: an RGB image of equal channels
        # (a gray picture as lossless WebP, which has no gray mode, or saved as RGB) gives exactly its
        # gray plane, as Pillow's convert("L") does; the float32 weighted sum of three equal values
        # missed it by an ulp for 35 of the 256 levels.
        red, green, blue = x[0], x[1], x[2]
        luma = np.subtract(red, green)
        luma *= _LUMA_601[0]
        other = np.subtract(blue, green)
        other *= _LUMA_601[2]
        luma += other
        luma += green
        gray: F32Array = luma[np.newaxis]
        return gray
    raise ValueError(f"cannot convert {have} channels to {channels}")


def from_uint8(img_hwc: NDArray[np.uint8], input_range: tuple[float, float], channels: int) -> F32Array:
    """uint8 [H, W, C] -> float32 [channels, H, W] with 0 -> lo and 255 -> hi (the model's input)."""
    lo, hi = _range(input_range, "input_range")
    if img_hwc.ndim != 3 or img_hwc.shape[2] not in (1, 3):
        raise ValueError(f"from_uint8 needs [H, W, C] with C in {{1, 3}}, got shape {list(img_hwc.shape)}")
    chw = np.asarray(img_hwc).transpose(2, 0, 1).astype(np.float32)
    chw = convert_channels(chw, channels)
    # (v * (hi - lo)) / 255 + lo rather than v * ((hi - lo) / 255) + lo: 0 and 255 map exactly to lo and hi.
    out = np.multiply(chw, np.float32(hi - lo), dtype=np.float32)
    np.divide(out, np.float32(255.0), out=out)
    np.add(out, np.float32(lo), out=out)
    return np.ascontiguousarray(out)

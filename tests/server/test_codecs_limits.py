"""Image codecs against hostile or outsized inputs: JPEG scan counts, pixel limits above Pillow's guard."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import pytest
from PIL import Image

from genserve_server import codecs
from genserve_server.codecs import ImageFormat, decode_image
from genserve_server.errors import InvalidArgument

MAX_PIXELS = 4_194_304  # the server's default max_input_pixels (2048 x 2048)


def _segments(data: bytes) -> list[bytes]:
    """A Pillow-written JPEG cut into its marker segments (an SOS with its entropy-coded data)."""
    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append(data[pos : pos + 2])
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        out.append(data[pos:end])
        pos = end
    return out


def many_scan_jpeg(scans: int) -> bytes:
    """A valid 2048x2048 progressive JPEG whose first AC scan is repeated `scans` times: ~16 bytes a
    scan (one EOB run covers every block), and libjpeg walks all 65536 blocks for each, only
    warning about the repeated progression."""
    buffer = io.BytesIO()
    Image.new("L", (2048, 2048), 128).save(buffer, "JPEG", progressive=True, quality=90)
    parts, repeated = [b"\xff\xd8"], False
    for segment in _segments(buffer.getvalue()):
        parts.append(segment)
        if segment[1] == 0xDA and not repeated:
            n_comp = segment[4]
            spectral_start, approx_high = segment[5 + 2 * n_comp], segment[7 + 2 * n_comp] >> 4
            if spectral_start >= 1 and approx_high == 0:
                parts.append(segment * scans)
                repeated = True
    assert repeated
    return b"".join(parts)


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding() -> None:
    """~16 bytes of input cost ~0.35 ms of decoding each: a 1 MiB file held a codec thread ~20 s
    (a 64 MiB one, the message limit, ~20 min), uncancellable. It is refused from its marker count."""
    data = many_scan_jpeg(20_000)  # 320 KB: ~7 s of libjpeg before the fix
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as excinfo:
        decode_image(data, ImageFormat.UNSPECIFIED, [], max_pixels=MAX_PIXELS, field="images[0]")
    assert time.monotonic() - started < 1.0
    assert excinfo.value.field == "images[0]"
    assert str(codecs.MAX_JPEG_SCANS) in str(excinfo.value) and "scans" in str(excinfo.value)


def test_ordinary_progressive_jpegs_still_decode() -> None:
    for mode in ("L", "RGB"):
        buffer = io.BytesIO()
        Image.new(mode, (64, 48), 90).save(buffer, "JPEG", progressive=True)
        assert decode_image(buffer.getvalue(), 0, [], max_pixels=MAX_PIXELS, field="x").shape[:2] == (48, 64)
    assert decode_image(many_scan_jpeg(100), 0, [], max_pixels=MAX_PIXELS, field="x").shape == (2048, 2048, 1)


def test_a_pixel_limit_above_pillows_own_guard_is_the_one_that_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """max_input_pixels = 256M (16000 x 16000) refused a 20000 x 10000 PNG (200M pixels, within it)
    as "image exceeds max_input_pixels 256000000": Pillow's process-wide guard fired (~179M)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    width, height = 20_000, 10_000
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress((b"\x00" * (width + 1)) * height, 1)
    data = codecs._PNG_MAGIC + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        decoded = decode_image(data, 0, [], max_pixels=256_000_000, field="images[0]")
    assert decoded.shape == (height, width, 1)
    del decoded
    with pytest.raises(
        InvalidArgument, match=r"20000x10000 = 200000000 pixels exceeds max_input_pixels 4194304"
    ):
        decode_image(data, 0, [], max_pixels=MAX_PIXELS, field="images[0]")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

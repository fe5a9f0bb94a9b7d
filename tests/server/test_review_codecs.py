"""Review findings on image codecs: decoding hostile inputs."""

from __future__ import annotations

import io
import struct
import time

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

"""Image codecs against hostile or outsized inputs: JPEG scan counts, metadata segments and PNG
chunks that Pillow walks in Python, pixel limits above Pillow's guard."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from genserve_server import codecs
from genserve_server.codecs import (
    MAX_IMAGE_METADATA_SEGMENTS,
    MAX_JPEG_HEADER_BYTES,
    MAX_PNG_IDAT_CHUNKS,
    ImageFormat,
    declared_size,
    decode_image,
    encode_image,
)
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
        InvalidArgument, match=r"10000x20000 = 200000000 pixels exceeds max_input_pixels 4194304"
    ):
        decode_image(data, 0, [], max_pixels=MAX_PIXELS, field="images[0]")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# ------------------------------------------------------------------------------------------------
# Metadata segments and chunks: Pillow walks each in Python (~1.5-3 us), so ~64 MiB of 4-byte JPEG
# comments or 12-byte PNG chunks (the message limit) held a codec thread ~30 s. The inputs here
# are one segment past the limit: refused, and never handed to Pillow.


def small_jpeg(**params: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "JPEG", **params)
    return buffer.getvalue()


def small_png(**params: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "PNG", **params)
    return buffer.getvalue()


COMMENT = b"\xff\xfe\x00\x02"  # an empty COM segment: 4 bytes
TOO_MANY = MAX_IMAGE_METADATA_SEGMENTS + 1


def pillow_decodes(data: bytes) -> bool:
    """The file is valid: Pillow (walking every segment) decodes it."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size == (64, 48)


def _jpeg_padded(where: str) -> bytes:
    data = small_jpeg()
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    if where == "comments after SOI":
        return data[:2] + COMMENT * TOO_MANY + data[2:]
    if where == "APP15 segments between SOF and SOS":
        return data[:sof] + b"\xff\xef\x00\x02" * TOO_MANY + data[sof:]
    if where == "comments after an EOI before SOS":  # Pillow reads on past it
        return data[:sos] + b"\xff\xd9" + COMMENT * TOO_MANY + data[sos:]
    if where == "fill bytes before SOS":
        return data[:sos] + b"\xff" * TOO_MANY + data[sos:]
    assert where == "stray bytes before SOS"
    return data[:sos] + b"\x00" * TOO_MANY + data[sos:]


def _refuse_without_pillow(monkeypatch: pytest.MonkeyPatch, data: bytes) -> InvalidArgument:
    def pillow_must_not_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("handed to Pillow")

    monkeypatch.setattr(Image, "open", pillow_must_not_parse)
    with pytest.raises(InvalidArgument) as excinfo:
        decode_image(data, ImageFormat.UNSPECIFIED, [], max_pixels=MAX_PIXELS, field="images[2]")
    assert excinfo.value.field == "images[2]"
    return excinfo.value


@pytest.mark.parametrize(
    "where",
    [
        "comments after SOI",
        "APP15 segments between SOF and SOS",
        "comments after an EOI before SOS",
        "fill bytes before SOS",
        "stray bytes before SOS",
    ],
)
def test_a_jpeg_header_of_tiny_segments_is_refused_before_pillow_walks_it(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    data = _jpeg_padded(where)
    if "EOI" not in where:  # libjpeg refuses that one, after Pillow walked it all
        assert pillow_decodes(data)
    error = _refuse_without_pillow(monkeypatch, data)
    assert f"more than {MAX_IMAGE_METADATA_SEGMENTS} marker segments before the image data" in str(error)
    assert f"limit of {MAX_IMAGE_METADATA_SEGMENTS}" in str(error)


def test_the_header_size_reader_stops_at_the_segment_limit() -> None:
    """declared_size runs on the event loop (Encode checks the input size before decoding): it
    walked every segment before the frame header, ~1 s of a stalled server per 4 MiB of comments."""
    data = small_jpeg()
    within = data[:2] + COMMENT * (MAX_IMAGE_METADATA_SEGMENTS - 20) + data[2:]
    assert declared_size(within, 0, []) == (48, 64)
    assert declared_size(data[:2] + COMMENT * TOO_MANY + data[2:], 0, []) is None


def test_jpeg_metadata_after_the_first_scan_is_left_to_libjpeg() -> None:
    """Markers between scans and bytes after EOI are read (or ignored) by libjpeg in C: not limited."""
    data = small_jpeg(progressive=True)
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    for padded in (data[:second_scan] + COMMENT * TOO_MANY + data[second_scan:], data + COMMENT * TOO_MANY):
        assert decode_image(padded, 0, [], max_pixels=MAX_PIXELS, field="x").shape == (48, 64, 3)


def _png_padded(where: str) -> bytes:
    data = small_png()
    idat, iend = data.index(b"IDAT") - 4, len(data) - 12
    if where == "text before IDAT":
        return data[:idat] + png_chunk(b"tEXt", b"k\x00v") * TOO_MANY + data[idat:]
    if where == "unknown chunks before IDAT":
        return data[:idat] + png_chunk(b"abCd", b"") * TOO_MANY + data[idat:]
    assert where == "text after IDAT"
    return data[:iend] + png_chunk(b"tEXt", b"k\x00v") * TOO_MANY + data[iend:]


@pytest.mark.parametrize("where", ["text before IDAT", "unknown chunks before IDAT", "text after IDAT"])
def test_a_png_of_tiny_metadata_chunks_is_refused_before_pillow_walks_them(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    data = _png_padded(where)
    assert pillow_decodes(data)
    error = _refuse_without_pillow(monkeypatch, data)
    assert f"more than {MAX_IMAGE_METADATA_SEGMENTS} chunks besides IDAT" in str(error)
    assert f"limit of {MAX_IMAGE_METADATA_SEGMENTS}" in str(error)


def test_a_png_of_empty_idat_chunks_is_refused_before_pillow_walks_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = small_png()
    idat = data.index(b"IDAT") - 4
    at_limit = data[:idat] + png_chunk(b"IDAT", b"") * (MAX_PNG_IDAT_CHUNKS - 1) + data[idat:]
    assert decode_image(at_limit, 0, [], max_pixels=MAX_PIXELS, field="x").shape == (48, 64, 3)
    over = data[:idat] + png_chunk(b"IDAT", b"") * MAX_PNG_IDAT_CHUNKS + data[idat:]
    error = _refuse_without_pillow(monkeypatch, over)
    limit = MAX_PNG_IDAT_CHUNKS
    assert f"more than {limit} IDAT chunks exceeds the limit of {limit}" in str(error)


def _handed_to_pillow(monkeypatch: pytest.MonkeyPatch, data: bytes) -> tuple[np.ndarray, bytes]:
    handed: list[bytes] = []
    real_open = Image.open

    def spy(fp: io.BytesIO, *args: object, **kwargs: object) -> Image.Image:
        handed.append(fp.getvalue())
        return real_open(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    decoded = decode_image(data, 0, [], max_pixels=MAX_PIXELS, field="images[0]")
    assert len(handed) == 1
    return decoded, handed[0]


def test_jpeg_exif_is_cut_out_before_pillow_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow joins every EXIF APP1 segment and unpacks the values of the resolution tags one by one:
    a 1 MiB XResolution of 131072 rationals over 17 segments took ~0.5 s (16 MiB, ~8 s)."""
    count = 131_072
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 2)
    tiff += struct.pack(">HHII", 0x011A, 5, count, 38) + struct.pack(">HHIHH", 0x0128, 3, 1, 2, 0)
    tiff += struct.pack(">I", 0) + struct.pack(">II", 72, 1) * count
    segments = b""
    for start in range(0, len(tiff), 65_000):
        payload = b"Exif\x00\x00" + tiff[start : start + 65_000]
        segments += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    plain = small_jpeg()
    decoded, handed = _handed_to_pillow(monkeypatch, plain[:2] + segments + plain[2:])
    assert handed == plain
    assert decoded.shape == (48, 64, 3)


@pytest.mark.parametrize("kind", [b"iCCP", b"zTXt", b"iTXt"])
def test_compressed_png_metadata_is_cut_out_before_pillow_inflates_it(
    monkeypatch: pytest.MonkeyPatch, kind: bytes
) -> None:
    """Pillow inflates each zTXt, compressed iTXt and iCCP chunk up to 1 MiB: 1000 chunks of ~1 KiB
    (a 1 MiB image) took ~3.4 s as iCCP (whose total Pillow does not bound) and ~0.4 s as text."""
    bomb = zlib.compress(b"a" * 1_000_000, 9)
    prefix = {b"iCCP": b"icc\x00\x00", b"zTXt": b"k\x00\x00", b"iTXt": b"k\x00\x01\x00\x00\x00"}[kind]
    plain = small_png()
    idat, iend = plain.index(b"IDAT") - 4, len(plain) - 12
    chunks = png_chunk(kind, prefix + bomb) * 100
    data = plain[:idat] + chunks + plain[idat:iend] + chunks + plain[iend:]
    decoded, handed = _handed_to_pillow(monkeypatch, data)
    assert handed == plain
    assert decoded.shape == (48, 64, 3)


def test_a_jpeg_of_outsized_tables_is_refused_before_pillow_parses_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pillow unpacks each quantization table (and each frame header's components) in Python:
    4 MiB of repeated tables took ~0.5 s, 64 MiB ~8 s; they are not metadata, so not cut out."""
    plain = small_jpeg()
    sof = plain.index(b"\xff\xc0")
    start = plain.index(b"\xff\xdb") + 4
    tables = plain[start : start + 65] * 1000
    dqt = b"\xff\xdb" + struct.pack(">H", len(tables) + 2) + tables
    data = plain[:sof] + dqt * 3 + plain[sof:]
    assert pillow_decodes(data)
    error = _refuse_without_pillow(monkeypatch, data)
    assert "bytes of tables and frame headers before the image data" in str(error)
    assert f"limit of {MAX_JPEG_HEADER_BYTES} bytes" in str(error)


def test_real_world_metadata_is_within_the_limits() -> None:
    """A camera-like JPEG (EXIF with a thumbnail, a 600 KiB ICC profile in 10 APP2 pieces, XMP, a
    comment), a JPEG whose header is exactly at the limit, and PNGs as the server and Pillow write them."""
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    exif[0x0110] = "Model"
    thumbnail = small_jpeg()
    icc = bytes(range(256)) * 2400
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * 30_000 + b"</x:xmpmeta>"
    camera = small_jpeg(exif=exif.tobytes() + thumbnail, icc_profile=icc, xmp=xmp, comment=b"c" * 1000)
    assert decode_image(camera, 0, [], max_pixels=MAX_PIXELS, field="x").shape == (48, 64, 3)

    plain = small_jpeg()
    header_segments = next(i for i, segment in enumerate(_segments(plain)) if segment[1] == 0xDA)
    at_limit = plain[:2] + COMMENT * (MAX_IMAGE_METADATA_SEGMENTS - header_segments) + plain[2:]
    assert decode_image(at_limit, 0, [], max_pixels=MAX_PIXELS, field="x").shape == (48, 64, 3)

    info = PngInfo()
    for i in range(20):
        info.add_text(f"key{i}", "value " * 100, zip=i % 2 == 1)
    annotated = small_png(pnginfo=info, icc_profile=icc)
    assert decode_image(annotated, 0, [], max_pixels=MAX_PIXELS, field="x").shape == (48, 64, 3)

    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    served, _ = encode_image(noise, ImageFormat.PNG, png_compression=9)  # 8 KiB IDAT chunks, ~380
    np.testing.assert_array_equal(decode_image(served, 0, [], max_pixels=MAX_PIXELS, field="x"), noise)


@pytest.mark.parametrize("default_image", [False, True])
def test_a_long_animated_png_decodes_its_first_frame(default_image: bool) -> None:
    """An APNG of 600 frames (1200 fcTL/fdAT chunks after the first frame's pixel data): Pillow
    reads the first frame and stops at the next frame's fcTL, so the frames after it are no chunks
    it walks, and the file decodes as it did before the chunk limit (frame 0, as Pillow gives it)."""
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(600)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], default_image=default_image)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert im.is_animated
        expected = np.asarray(im.convert("RGB"))
    decoded = decode_image(data, 0, [], max_pixels=MAX_PIXELS, field="images[0]")
    np.testing.assert_array_equal(decoded, expected)


def test_an_image_its_decoder_reads_larger_than_its_header_declares_is_refused_before_decoding() -> None:
    """A call sizes its decoded images' memory from the size their headers declare (checked_size):
    a JPEG with a second frame header of 4000x4000 declares 48x64 to the server's parser (the first)
    and 4000x4000 to Pillow's (the last). It was checked against the pixel limit only and handed to
    the decoder; it is refused before any pixel is decoded, naming both sizes."""
    data = encode_image(np.zeros((48, 64, 3), np.uint8), ImageFormat.JPEG)[0]
    start = data.index(b"\xff\xc0")
    (length,) = struct.unpack(">H", data[start + 2 : start + 4])
    frame = bytearray(data[start : start + 2 + length])
    frame[5:9] = struct.pack(">HH", 4000, 4000)
    two_frames = data[: start + 2 + length] + bytes(frame) + data[start + 2 + length :]
    assert codecs.checked_size(
        two_frames, ImageFormat.JPEG, [], max_pixels=MAX_PIXELS, field="images[0]"
    ) == (
        48,
        64,
    )
    with pytest.raises(InvalidArgument, match=r"header declares 48x64 pixels, the decoder reads 4000x4000"):
        decode_image(two_frames, ImageFormat.JPEG, [], max_pixels=MAX_PIXELS, field="images[0]")


def test_checked_size_refuses_what_decode_image_refuses_before_decoding() -> None:
    """checked_size (what SuperResolve and Translate size their working sets from, before decoding)
    gives the declared (height, width) and refuses, with decode_image's own message, what
    decode_image refuses before it decodes."""
    png = encode_image(np.zeros((30, 20, 3), np.uint8), ImageFormat.PNG)[0]
    raw = bytes(30 * 20 * 3)
    tensor = np.zeros((1, 30, 20), "<f4").tobytes()
    assert codecs.checked_size(png, ImageFormat.UNSPECIFIED, [], max_pixels=600, field="f") == (30, 20)
    assert codecs.checked_size(raw, ImageFormat.RAW_UINT8, [30, 20, 3], max_pixels=600, field="f") == (30, 20)
    assert codecs.checked_size(tensor, ImageFormat.TENSOR_F32, [1, 30, 20], max_pixels=600, field="f") == (
        30,
        20,
    )
    refused = [
        (png, ImageFormat.PNG, [], 599),  # above the pixel limit
        (png, ImageFormat.JPEG, [], 600),  # not the format set
        (png[:20], ImageFormat.PNG, [], 600),  # no size in the header
        (b"not an image", ImageFormat.UNSPECIFIED, [], 600),
        (raw, ImageFormat.RAW_UINT8, [30, 20], 600),  # not [H, W, C]
        (raw, ImageFormat.RAW_UINT8, [30, 20, 2], 600),
        (raw[:-1], ImageFormat.RAW_UINT8, [30, 20, 3], 600),
        (tensor, ImageFormat.TENSOR_F32, [1, 30, 20], 599),
        (tensor, 99, [1, 30, 20], 600),
    ]
    for data, fmt, shape, max_pixels in refused:
        with pytest.raises(InvalidArgument) as decoding:
            decode_image(data, fmt, shape, max_pixels=max_pixels, field="f")
        with pytest.raises(InvalidArgument) as sizing:
            codecs.checked_size(data, fmt, shape, max_pixels=max_pixels, field="f")
        assert str(sizing.value) == str(decoding.value)

"""Tests for genserve_server.codecs: decoding hostile inputs, encoding outputs, range mapping."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from genserve_server import codecs
from genserve_server.codecs import (
    ImageFormat,
    all_finite,
    convert_channels,
    decode_image,
    encode_image,
    encoded_size,
    finite_rows,
    from_uint8,
    to_uint8,
)
from genserve_server.errors import InvalidArgument

MAX_PIXELS = 4_194_304  # the server's default max_input_pixels (2048 x 2048)


def photo(height: int = 37, width: int = 53, channels: int = 3) -> NDArray[np.uint8]:
    """A smooth image with some texture (odd sizes on purpose), like a small photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [
        127 + 100 * np.sin(x / 7.0 + c) * np.cos(y / 5.0 - c) + 20 * np.sin((x + y) / 2.0)
        for c in range(channels)
    ]
    img: NDArray[np.uint8] = np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)
    return img


def noise(height: int = 31, width: int = 29, channels: int = 3, seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def decode(data: bytes, fmt: int = ImageFormat.UNSPECIFIED, shape: list[int] | None = None, **kw: Any) -> Any:
    return decode_image(
        data, fmt, shape or [], max_pixels=kw.get("max_pixels", MAX_PIXELS), field="images[0]"
    )


def pil_bytes(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def crafted_png(width: int, height: int, rows_of_data: int) -> bytes:
    """A real 8-bit gray PNG declaring width x height whose IDAT holds the first rows of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw_rows = b"\x00" * ((width + 1) * rows_of_data)  # filter byte 0 + zero pixels per row
    return (
        codecs._PNG_MAGIC
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fmt", [ImageFormat.PNG, ImageFormat.UNSPECIFIED, ImageFormat.RAW_UINT8])
@pytest.mark.parametrize("make", [photo, noise])
def test_lossless_round_trip(channels: int, fmt: ImageFormat, make: Any) -> None:
    img = make(channels=channels)
    data, shape = encode_image(img, fmt)
    assert shape == list(img.shape)
    out = decode(data, fmt, shape)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)


def test_png_is_rgb_order_not_bgr() -> None:
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    data, _ = encode_image(red, ImageFormat.PNG)
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (255, 0, 0)


def test_unspecified_output_is_png() -> None:
    data, _ = encode_image(photo(), ImageFormat.UNSPECIFIED)
    assert data.startswith(b"\x89PNG")


@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_compression_levels_round_trip(level: int) -> None:
    img = photo()
    data, _ = encode_image(img, ImageFormat.PNG, png_compression=level)
    np.testing.assert_array_equal(decode(data), img)


def _png_row_filters(data: bytes, row_bytes: int) -> set[int]:
    """The filter type byte of every row of a non-interlaced 8-bit PNG."""
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return {raw[i] for i in range(0, len(raw), row_bytes + 1)}


@pytest.mark.parametrize("channels", [1, 3])
def test_default_png_is_the_fast_profile_with_the_up_filter(channels: int) -> None:
    img = noise() if channels == 3 else noise()[:, :, :1]
    data, _ = encode_image(img, ImageFormat.PNG)
    assert _png_row_filters(data, img.shape[1] * channels) == {2}  # Up on every row
    np.testing.assert_array_equal(decode(data).reshape(img.shape), img)


def test_higher_png_levels_choose_filters_per_row() -> None:
    # A smooth gradient: libpng's adaptive choice picks Sub/Up/Avg/Paeth, not Up everywhere.
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    img = np.stack([ramp, ramp.T, ramp // 2], axis=-1)
    data, _ = encode_image(img, ImageFormat.PNG, png_compression=6)
    assert _png_row_filters(data, 64 * 3) != {2}
    np.testing.assert_array_equal(decode(data), img)


def test_webp_quality_100_is_lossless() -> None:
    img = noise()
    data, shape = encode_image(img, ImageFormat.WEBP, quality=100)
    assert shape == [31, 29, 3]
    np.testing.assert_array_equal(decode(data, ImageFormat.WEBP), img)


def test_webp_gray_comes_back_as_rgb_with_reported_shape() -> None:
    img = noise(channels=1)
    data, shape = encode_image(img, ImageFormat.WEBP, quality=100)
    out = decode(data)
    assert shape == list(out.shape) == [31, 29, 3]
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], img[..., 0])


@pytest.mark.parametrize("fmt", [ImageFormat.JPEG, ImageFormat.WEBP])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossy_formats(fmt: ImageFormat, channels: int) -> None:
    img = photo(64, 80, channels)
    data, shape = encode_image(img, fmt, quality=90)
    out = decode(data, fmt)
    assert list(out.shape) == shape
    reference = img if out.shape[2] == channels else np.repeat(img, 3, axis=2)
    assert np.abs(out.astype(np.int16) - reference).mean() < 4.0
    small, _ = encode_image(img, fmt, quality=10)
    assert len(small) < len(data)


def test_quality_zero_means_default() -> None:
    img = photo()
    assert encode_image(img, ImageFormat.JPEG, quality=0) == encode_image(img, ImageFormat.JPEG, quality=90)


def test_tensor_f32_round_trip() -> None:
    tensor = np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32)
    data, shape = encode_image(tensor, ImageFormat.TENSOR_F32)
    assert shape == [3, 5, 7]
    assert len(data) == 4 * 3 * 5 * 7
    out = decode(data, ImageFormat.TENSOR_F32, shape)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, tensor)
    assert data == tensor.astype("<f4").tobytes()  # little-endian, C order, as types.proto says


def test_encode_accepts_2d_gray_and_non_contiguous() -> None:
    img = photo()
    data, shape = encode_image(img[:, :, 0], ImageFormat.RAW_UINT8)
    assert shape == [37, 53, 1]
    view = img[::2, ::3]
    data, shape = encode_image(view, ImageFormat.PNG)
    np.testing.assert_array_equal(decode(data), view)


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        encode_image(photo(), ImageFormat.JPEG, quality=101)
    assert excinfo.value.field == "output.quality"
    with pytest.raises(InvalidArgument) as excinfo:
        encode_image(photo(), ImageFormat.PNG, png_compression=10)
    assert excinfo.value.field == "output.png_compression"
    with pytest.raises(InvalidArgument) as excinfo:
        encode_image(photo(), 42)
    assert excinfo.value.field == "output.format"
    with pytest.raises(TypeError):
        encode_image(photo().astype(np.float32), ImageFormat.PNG)
    with pytest.raises(ValueError, match="C in"):
        encode_image(noise(channels=4), ImageFormat.PNG)


# ------------------------------------------------------------------------------------------------
# Inputs in every mode a client may send.


def test_gray_png_stays_one_channel() -> None:
    img = photo(channels=1)
    out = decode(pil_bytes(Image.fromarray(img[:, :, 0], "L"), "PNG"))
    assert out.shape == (37, 53, 1)
    np.testing.assert_array_equal(out, img)


def test_rgba_png_drops_alpha() -> None:
    rgba = noise(channels=4)
    out = decode(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_la_png_drops_alpha() -> None:
    la = noise(channels=2)
    out = decode(pil_bytes(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(out, la[:, :, :1])


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png_expands(transparency: bool) -> None:
    rgb = photo()
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    params = {"transparency": 0} if transparency else {}
    out = decode(pil_bytes(palette_image, "PNG", **params))
    np.testing.assert_array_equal(out, np.asarray(palette_image.convert("RGB")))


def test_sixteen_bit_gray_png_scales_to_eight_bits() -> None:
    values = np.array([[0, 257, 32768, 65535, 128]], dtype=np.uint16)
    out = decode(pil_bytes(Image.fromarray(values), "PNG"))
    assert out.shape == (1, 5, 1)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 0]


def test_sixteen_bit_rgb_png() -> None:
    rgb16 = photo().astype(np.uint16) * 257
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(decode(buffer.tobytes()), photo())


def test_bilevel_png() -> None:
    bits = noise(channels=1)[:, :, 0] > 127
    out = decode(pil_bytes(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(out[:, :, 0], bits.astype(np.uint8) * 255)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes(mode: str) -> None:
    source = Image.fromarray(photo(40, 48)).convert(mode)
    out = decode(pil_bytes(source, "JPEG", quality=95), ImageFormat.JPEG)
    assert out.shape == (40, 48, 1 if mode == "L" else 3)


def test_rgba_webp_drops_alpha() -> None:
    rgba = noise(channels=4)
    # exact=True: otherwise libwebp zeroes the colour of fully transparent pixels.
    out = decode(pil_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True))
    np.testing.assert_array_equal(out, rgba[:, :, :3])


@pytest.mark.parametrize(
    ("fmt", "params"), [("PNG", {}), ("JPEG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 50})]
)
def test_header_size_matches_pillow(fmt: str, params: dict[str, Any]) -> None:
    data = pil_bytes(Image.fromarray(photo(37, 53)), fmt, **params)
    size = encoded_size(data)
    assert size is not None
    assert size[1:] == (53, 37)


def test_jpeg_size_skips_exif_thumbnail_segment() -> None:
    thumbnail = pil_bytes(Image.fromarray(photo(8, 8)), "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "description"
    data = pil_bytes(Image.fromarray(photo(37, 53)), "JPEG", exif=exif.tobytes() + thumbnail)
    assert encoded_size(data) == (ImageFormat.JPEG, 53, 37)


# ------------------------------------------------------------------------------------------------
# Hostile and broken inputs.


def test_png_bomb_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = crafted_png(50_000, 50_000, rows_of_data=4)
    assert len(bomb) < 1000

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decoder must not run for an over-limit image")

    monkeypatch.setattr(Image, "open", no_decoding)
    with pytest.raises(InvalidArgument) as excinfo:
        decode(bomb, ImageFormat.PNG)
    assert str(excinfo.value) == "images[0]: 50000x50000 = 2500000000 pixels exceeds max_input_pixels 4194304"
    assert excinfo.value.field == "images[0]"


def test_valid_png_over_the_limit_refused_and_decodes_under_a_higher_one() -> None:
    big = crafted_png(3000, 3000, rows_of_data=3000)  # a complete, valid 9-megapixel PNG of ~9 KB
    assert len(big) < 50_000
    with pytest.raises(InvalidArgument, match="3000x3000 = 9000000 pixels exceeds max_input_pixels 4194304"):
        decode(big)
    assert decode(big, max_pixels=9_000_000).shape == (3000, 3000, 1)


def test_webp_canvas_bomb_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # An extended (VP8X) WebP header declaring a 16384 x 16384 canvas; libwebp would allocate it at open.
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    monkeypatch.setattr(Image, "open", None)
    with pytest.raises(InvalidArgument, match="16384x16384 = 268435456 pixels exceeds max_input_pixels"):
        decode(data)


def test_jpeg_bomb_refused() -> None:
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60_000, 60_000, 1) + b"\x01\x11\x00"
    data = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + sof0 + b"\xff\xd9"
    with pytest.raises(InvalidArgument, match="60000x60000 = 3600000000 pixels"):
        decode(data, ImageFormat.JPEG)


def test_decompression_bomb_error_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's own global guard, should it ever fire, becomes an InvalidArgument too."""

    def bomb(*args: object, **kwargs: object) -> None:
        raise Image.DecompressionBombError("Image size exceeds limit")

    monkeypatch.setattr(Image, "open", bomb)
    with pytest.raises(InvalidArgument, match="max_input_pixels"):
        decode(encode_image(photo(), ImageFormat.PNG)[0])


@pytest.mark.parametrize("fmt", [ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP])
def test_truncated_images(fmt: ImageFormat) -> None:
    data, _ = encode_image(noise(64, 64), fmt, quality=90)
    with pytest.raises(InvalidArgument) as excinfo:
        decode(data[: len(data) // 2], fmt)
    assert excinfo.value.field == "images[0]"
    assert "corrupt or truncated" in str(excinfo.value)


def test_corrupt_png_data() -> None:
    data = bytearray(encode_image(noise(), ImageFormat.PNG)[0])
    data[60:80] = b"\x55" * 20  # inside the IDAT stream
    with pytest.raises(InvalidArgument, match=r"images\[0\]: corrupt"):
        decode(bytes(data))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        pil_bytes(Image.new("RGB", (4, 4)), "GIF"),
        pil_bytes(Image.new("RGB", (4, 4)), "BMP"),
    ],
)
def test_unsupported_bytes(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"images\[0\]: .*not a PNG, JPEG or WEBP"):
        decode(data)


def test_declared_format_must_match_bytes() -> None:
    jpeg, _ = encode_image(photo(), ImageFormat.JPEG)
    with pytest.raises(InvalidArgument, match="format is IMAGE_FORMAT_PNG but the data is a JPEG"):
        decode(jpeg, ImageFormat.PNG)


def test_png_header_without_ihdr() -> None:
    with pytest.raises(InvalidArgument, match="no readable size"):
        decode(codecs._PNG_MAGIC + b"\x00" * 20)


def test_zero_sized_png_header() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        decode(crafted_png(0, 10, rows_of_data=0))


def test_unknown_format_number() -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        decode(b"x", 9)
    assert excinfo.value.field == "images[0].format"


class TestRaw:
    def test_view_of_the_bytes(self) -> None:
        img = noise(3, 4, 3)
        out = decode(img.tobytes(), ImageFormat.RAW_UINT8, [3, 4, 3])
        np.testing.assert_array_equal(out, img)

    def test_wrong_length(self) -> None:
        with pytest.raises(InvalidArgument, match=r"shape \[2, 2, 3\] needs 12 bytes, got 11") as excinfo:
            decode(b"\x00" * 11, ImageFormat.RAW_UINT8, [2, 2, 3])
        assert excinfo.value.field == "images[0]"

    @pytest.mark.parametrize("shape", [[], [2, 2], [2, 2, 3, 1], [0, 2, 3], [2, -1, 3]])
    def test_bad_shape(self, shape: list[int]) -> None:
        with pytest.raises(InvalidArgument) as excinfo:
            decode(b"\x00" * 12, ImageFormat.RAW_UINT8, shape)
        assert excinfo.value.field == "images[0].shape"

    @pytest.mark.parametrize("channels", [2, 4])
    def test_bad_channels(self, channels: int) -> None:
        with pytest.raises(InvalidArgument, match=r"C in \{1, 3\}"):
            decode(b"\x00" * 4 * channels, ImageFormat.RAW_UINT8, [2, 2, channels])

    def test_pixel_limit(self) -> None:
        with pytest.raises(
            InvalidArgument, match="2000x3000 = 6000000 pixels exceeds max_input_pixels 4194304"
        ):
            decode(b"", ImageFormat.RAW_UINT8, [2000, 3000, 1])


class TestTensorF32:
    def test_nan_and_inf_rejected(self) -> None:
        for bad in (np.nan, np.inf, -np.inf):
            tensor = np.zeros((1, 2, 2), dtype=np.float32)
            tensor[0, 1, 1] = bad
            with pytest.raises(InvalidArgument, match="finite, found 1 NaN/Inf"):
                decode(tensor.tobytes(), ImageFormat.TENSOR_F32, [1, 2, 2])

    def test_wrong_length(self) -> None:
        with pytest.raises(InvalidArgument, match=r"\[3, 2, 2\] needs 48 bytes, got 47"):
            decode(b"\x00" * 47, ImageFormat.TENSOR_F32, [3, 2, 2])

    def test_bad_channels(self) -> None:
        with pytest.raises(InvalidArgument) as excinfo:
            decode(b"\x00" * 64, ImageFormat.TENSOR_F32, [4, 2, 2])
        assert excinfo.value.field == "images[0].shape"


# ------------------------------------------------------------------------------------------------
# Float <-> uint8.


def test_to_uint8_maps_range_and_rounds_half_up() -> None:
    x = np.array([-1.0, 1.0, 0.0, -2.0, 3.0, np.nan, -1.0 + 1 / 127.5], dtype=np.float32).reshape(1, 1, 1, 7)
    assert to_uint8(x, (-1.0, 1.0))[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 0, 1]
    y = np.array([0.5, 1.5, 2.5, 1.49, 254.5, 255.4], dtype=np.float32).reshape(1, 1, 1, 6)
    assert to_uint8(y, (0.0, 255.0))[0, 0, :, 0].tolist() == [1, 2, 3, 1, 255, 255]


def test_to_uint8_layout_and_reference() -> None:
    batch = np.random.default_rng(2).uniform(-1.2, 1.2, (3, 3, 5, 4)).astype(np.float32)
    out = to_uint8(batch, (-1.0, 1.0))
    assert out.shape == (3, 5, 4, 3)
    assert out.flags.c_contiguous
    reference = np.floor(np.clip((batch.astype(np.float64) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(out, reference.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_rows_names_each_row_that_holds_a_nan_or_an_infinity(bad: float) -> None:
    batch = np.random.default_rng(4).uniform(-1.0, 1.0, (5, 3, 4, 4)).astype(np.float32)
    assert finite_rows(batch).tolist() == [True] * 5 and all_finite(batch)
    batch[1, 2, 3, 0] = bad
    batch[4, 0, 0, 0] = bad
    assert finite_rows(batch).tolist() == [True, False, True, True, False]
    assert not all_finite(batch) and not all_finite(batch[4:])
    assert all_finite(batch[:0]) and finite_rows(batch[:0]).tolist() == []
    # Finite values as large as float32 holds are finite (no sum that could overflow).
    assert all_finite(np.full((2, 1, 2, 2), np.finfo(np.float32).max, np.float32))


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (1, 3, 64, 64), (2, 3, 256, 256)])
def test_to_uint8_same_bytes_whatever_the_size(shape: tuple[int, ...]) -> None:
    # Small and large outputs clip by different numpy calls: NaN, infinities and every other value
    # must come out as a one-row-at-a-time conversion (the small path) gives them.
    x = np.random.default_rng(3).uniform(-1.5, 1.5, shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[:6] = [np.nan, np.inf, -np.inf, -1.0, 1.0, 0.0]
    flat[-1] = np.nan
    with np.errstate(invalid="raise"):  # a NaN left to the cast would be undefined (and raise here)
        out = to_uint8(x, (-1.0, 1.0))
    by_rows = np.concatenate([to_uint8(x[:, :, r : r + 1, :], (-1.0, 1.0)) for r in range(shape[2])], axis=1)
    np.testing.assert_array_equal(out, by_rows)
    first = out.reshape(-1, shape[1])[:6, 0] if shape[1] == 1 else out[0].transpose(2, 0, 1).reshape(-1)[:6]
    assert first.tolist() == [0, 255, 0, 0, 255, 128]
    assert out[-1, -1, -1, -1] == 0
    wide = np.nan_to_num(x.astype(np.float64), nan=-1.0, posinf=2.0, neginf=-2.0)
    reference = np.floor(np.clip((wide + 1.0) * 127.5 + 0.5, 0, 255)).transpose(0, 2, 3, 1)
    assert np.abs(out.astype(np.float64) - reference).max() <= 1  # float32 arithmetic at the .5 edges


def test_to_uint8_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        to_uint8(np.zeros((3, 4, 4), dtype=np.float32), (0.0, 1.0))
    with pytest.raises(ValueError, match="hi > lo"):
        to_uint8(np.zeros((1, 3, 4, 4), dtype=np.float32), (1.0, 1.0))


def test_from_uint8_maps_ends_exactly() -> None:
    img = np.array([[[0], [255], [51]]], dtype=np.uint8)
    out = from_uint8(img, (-1.0, 1.0), 1)
    assert out.shape == (1, 1, 3)
    assert out.dtype == np.float32
    assert out[0, 0].tolist() == [-1.0, 1.0, pytest.approx(-0.6)]


def test_from_uint8_channel_conversion() -> None:
    gray = noise(channels=1)
    rgb = from_uint8(gray, (0.0, 1.0), 3)
    assert rgb.shape == (3, 31, 29)
    np.testing.assert_array_equal(rgb[0], rgb[2])
    colour = noise(channels=3)
    luma = from_uint8(colour, (0.0, 255.0), 1)
    expected = colour @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(luma[0], expected, atol=1e-3)


def test_an_rgb_image_of_equal_channels_converts_to_exactly_its_gray_plane() -> None:
    """A gray picture stored as RGB (lossless WebP has no gray mode; a digit saved as RGB PNG)
    reaches a gray model as exactly the values the gray picture gives: the BT.601 weights sum to 1,
    as Pillow's convert("L") keeps gray, and a float32 weighted sum of three equal values did not
    (35 of the 256 levels moved by an ulp, so an Encode's mu differed with the format)."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    for value_range in ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)):
        gray = from_uint8(levels, value_range, 1)
        as_rgb = from_uint8(np.repeat(levels, 3, axis=2), value_range, 1)
        np.testing.assert_array_equal(as_rgb, gray)
    plane = np.random.default_rng(4).uniform(-1, 1, (1, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(convert_channels(np.repeat(plane, 3, axis=0), 1), plane)


def test_uint8_float_round_trip() -> None:
    img = noise()
    chw = from_uint8(img, (-1.0, 1.0), 3)
    np.testing.assert_array_equal(to_uint8(chw[np.newaxis], (-1.0, 1.0))[0], img)


def test_convert_channels_on_float_tensors() -> None:
    x = np.random.default_rng(3).uniform(-1, 1, (3, 4, 5)).astype(np.float32)
    assert convert_channels(x, 3) is not None
    assert convert_channels(x, 1).shape == (1, 4, 5)
    assert convert_channels(x[:1], 3).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="cannot convert"):
        convert_channels(x, 2)


def test_proto_enum_numbers_match() -> None:
    pb2 = pytest.importorskip("genserve.v1.types_pb2")
    for member in ImageFormat:
        assert pb2.ImageFormat.Value(f"IMAGE_FORMAT_{member.name}") == member.value


def test_to_uint8_of_a_cropped_fp16_view_equals_the_contiguous_float32_result() -> None:
    # SuperResolve encodes a crop (a strided view) of a batch row; fp16 graphs hand over float16.
    batch = np.random.default_rng(5).uniform(-0.2, 1.2, (2, 3, 9, 11)).astype(np.float16)
    view = batch[1:, :, :7, 2:]
    expected = to_uint8(np.ascontiguousarray(view, dtype=np.float32), (0.0, 1.0))
    out = to_uint8(view, (0.0, 1.0))
    assert out.shape == (1, 7, 9, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


class _Observed:
    def observe(self, value: float) -> None:
        self.value = value


def test_small_raw_inputs_decode_on_the_loop_and_large_or_compressed_on_the_pool() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from types import SimpleNamespace

    from genserve_server.config import load_card
    from genserve_server.encoding import Codec, decode_sync, decodes_inline

    card = load_card(Path(__file__).parents[2] / "models" / "sr-photos-x4" / "1" / "card.json")
    pixels = photo(64, 64)
    small = SimpleNamespace(format=ImageFormat.RAW_UINT8, data=pixels.tobytes(), shape=list(pixels.shape))
    big_pixels = photo(256, 256)
    big = SimpleNamespace(format=ImageFormat.RAW_UINT8, data=big_pixels.tobytes(), shape=[256, 256, 3])
    png = SimpleNamespace(format=ImageFormat.PNG, data=encode_image(pixels, ImageFormat.PNG)[0], shape=[])
    assert decodes_inline([small]) and not decodes_inline([big]) and not decodes_inline([png])
    assert not decodes_inline([small] * 8)  # many small images together still go to the pool
    metrics: Any = SimpleNamespace(decode_duration=_Observed())

    async def decode(codec: Codec, images: list[Any]) -> list[np.ndarray]:
        return await codec.decode(metrics, images, card, MAX_PIXELS)

    pool = ThreadPoolExecutor(1)
    pool.shutdown()  # a hop to this pool would raise: only an inline decode succeeds
    closed = Codec(pool, 1, 1 << 30)
    inline = asyncio.run(decode(closed, [small]))
    np.testing.assert_array_equal(inline[0], decode_sync([small], card, MAX_PIXELS, "images")[0])
    with pytest.raises(RuntimeError):
        asyncio.run(decode(closed, [big]))
    with ThreadPoolExecutor(1) as open_pool:
        pooled = asyncio.run(decode(Codec(open_pool, 1, 1 << 30), [small, big]))
    np.testing.assert_array_equal(pooled[0], inline[0])
    assert pooled[1].shape == (3, 256, 256)

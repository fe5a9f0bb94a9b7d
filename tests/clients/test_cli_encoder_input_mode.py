"""`genserve-client edit` converts its picture to the encoder's channels as the server reads the card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genserve.v1 import genserve_pb2
from genserve_client.cli import load_for_encoder


def _info(card: dict[str, object]) -> genserve_pb2.ModelInfo:
    version = genserve_pb2.ModelVersionInfo(
        version="1", state=genserve_pb2.MODEL_STATE_READY, card_json=json.dumps(card)
    )
    return genserve_pb2.ModelInfo(name="enc", versions=[version])


@pytest.mark.parametrize(
    ("card", "shape"),
    [
        # No input_channels: the server's card reader takes 3 (config.py), so the picture is RGB.
        ({"image_size": [4, 4]}, (4, 4, 3)),
        ({"image_size": [4, 4], "input_channels": 1}, (4, 4)),
        ({"image_size": [4, 4], "input_channels": 3}, (4, 4, 3)),
        # 4 (RGBA): no genserve.v1 image has 4 channels; RGB, which the server refuses naming them.
        ({"image_size": [4, 4], "input_channels": 4}, (4, 4, 3)),
    ],
)
def test_the_picture_has_the_channels_the_server_reads_the_card_as(
    tmp_path: Path, card: dict[str, object], shape: tuple[int, ...]
) -> None:
    path = tmp_path / "in.png"
    Image.new("RGB", (4, 4), (10, 200, 30)).save(path)
    assert load_for_encoder(path, _info(card)).shape == shape


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_the_picture_for_any_cards_input_channels_is_one_the_client_library_can_send(
    tmp_path: Path, channels: int
) -> None:
    """A genserve.v1 image has 1 or 3 channels (the library refuses others with 'image arrays must
    be HW or HWC with C in (1, 3)', naming no flag of `edit`); a 2- or 4-channel encoder is the
    server's to refuse, naming its input_channels and KServe ModelInfer."""
    from genserve_client.convert import to_image_message

    path = tmp_path / "in.png"
    Image.new("RGBA", (4, 4), (10, 200, 30, 255)).save(path)
    picture = load_for_encoder(path, _info({"image_size": [4, 4], "input_channels": channels}))
    to_image_message(picture)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_gray_picture_is_scaled_to_8_bits_as_the_server_reads_it_not_clipped_white(
    tmp_path: Path, channels: int
) -> None:
    """A 16-bit gray PNG (Pillow's I;16) is read by the server as v * 255 / 65535, rounded
    (codecs._to_hwc_uint8); Pillow's convert('L') or convert('RGB') clips every value above 255 to
    white, so `edit` encoded a blank white picture instead of the one `encode` of the file reads."""
    wide = np.full((4, 4), 1000, dtype=np.uint16)
    wide[1:3, 1:3] = 50000
    path = tmp_path / "in16.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # 4 and 195
    picture = load_for_encoder(path, _info({"image_size": [4, 4], "input_channels": channels}))
    if channels == 1:
        assert picture.tolist() == expected.tolist()
    else:
        assert picture.tolist() == np.repeat(expected[:, :, None], 3, axis=2).tolist()


def test_a_picture_declaring_more_pixels_than_pillow_decodes_is_a_usage_error_naming_it(
    tmp_path: Path,
) -> None:
    """A ~70-byte PNG declaring 50000x50000 pixels (a decompression bomb): Pillow refuses it with
    DecompressionBombError, which is no OSError or ValueError, so `edit` ended in a traceback."""
    import struct
    import zlib

    from genserve_client.cli import UsageError

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 100))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b""))
    with pytest.raises(UsageError, match=r"bomb\.png.*2500000000 pixels"):
        load_for_encoder(path, _info({"image_size": [4, 4], "input_channels": 1}))


def _truncated_png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    path = tmp_path / "cut.png"
    path.write_bytes(whole.read_bytes()[:300])
    return path


def test_edit_reads_a_float_tiff_in_0_to_1_as_its_grays_not_black(tmp_path: Path) -> None:
    """A 32-bit float TIFF (Pillow's mode F) in 0..1 went through convert('L'), which truncates
    every value to 0: `edit` encoded a black picture. It is converted as the library converts a
    PIL image of mode F (0..1 onto 0..255, rounded as the server's PNG of a [0, 1] tensor)."""
    values = np.full((4, 4), 0.5, np.float32)
    values[0, 0] = 1.0
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    picture = load_for_encoder(path, _info({"image_size": [4, 4], "input_channels": 1}))
    assert picture[0, 0] == 255 and picture[1, 1] == 128


def test_a_picture_edit_cannot_read_is_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    """A truncated file printed Pillow's 'image file is truncated' naming no file (exit 1); a float
    picture outside 0..1 has no agreed meaning: both are refused naming the file (exit 2)."""
    from genserve_client.cli import UsageError

    with pytest.raises(UsageError, match=r"cut\.png.*truncated"):
        load_for_encoder(_truncated_png(tmp_path), _info({"image_size": [64, 64]}))
    path = tmp_path / "float255.tif"
    Image.fromarray(np.full((4, 4), 200.0, np.float32)).save(path)
    with pytest.raises(UsageError, match=r"float255\.tif.*mode F.*0\.\.1"):
        load_for_encoder(path, _info({"image_size": [4, 4], "input_channels": 1}))


@pytest.mark.parametrize("kind", ["gif", "truncated"])
def test_edit_closes_the_picture_it_reads(tmp_path: Path, kind: str) -> None:
    """Pillow keeps a multi-frame format's file (GIF) open after decoding, and a truncated one's
    too: load_for_encoder left them to the garbage collector (a ResourceWarning)."""
    import gc
    import warnings

    from genserve_client.cli import UsageError

    if kind == "truncated":
        path = _truncated_png(tmp_path)
    else:
        path = tmp_path / f"in.{kind}"
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_for_encoder(path, _info({"image_size": [64, 64]}))
        except UsageError:
            pass
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed

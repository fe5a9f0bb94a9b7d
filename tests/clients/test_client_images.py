"""The client's image handling: PNG provenance text (pngmeta), request images from PIL (convert)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from genserve_client.convert import array_to_pil
from genserve_client.pngmeta import pnginfo, with_png_text
from genserve_server import codecs


def test_spliced_png_text_keeps_values_that_latin_1_cannot_hold() -> None:
    """`translate --input фото.png --output out.png` wrote source = "????.png": tEXt is Latin-1 and
    the splice replaced the rest, while the same text through Pillow (pnginfo, the grids' path)
    becomes an iTXt chunk that keeps it."""
    text = {"Software": "genserve-client", "source": "фото/猫.png", "psi": "0.7"}
    spliced = with_png_text(codecs.encode_image(np.zeros((4, 5, 3), np.uint8), 1)[0], text)
    with Image.open(io.BytesIO(spliced)) as im:
        assert im.text == text
        im.load()
        assert im.size == (5, 4)
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4)).save(buffer, "PNG", pnginfo=pnginfo(text))
    with Image.open(buffer) as im:
        assert im.text == text  # what Pillow's own writer keeps


def test_a_source_file_name_that_is_not_utf_8_is_written_with_its_bytes_escaped() -> None:
    """`upscale caf\\xe9.png out.png` (a Latin-1 name: Python's argv holds the byte as the lone
    surrogate \\udce9) failed after the server's answer with "'utf-8' codec can't encode character
    '\\udce9'" (exit 2, nothing written), in the spliced chunks and in Pillow's (edit's) alike."""
    from genserve_client.pngmeta import png_text

    text = png_text(None, source="caf\udce9.png", direction="b_to_a")
    expected = {"Software": "genserve-client", "source": "caf\\xe9.png", "direction": "b_to_a"}
    spliced = with_png_text(codecs.encode_image(np.zeros((4, 5, 3), np.uint8), 1)[0], text)
    with Image.open(io.BytesIO(spliced)) as im:
        assert im.text == expected
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4)).save(buffer, "PNG", pnginfo=pnginfo(text))
    with Image.open(buffer) as im:
        assert im.text == expected


def test_a_sixteen_bit_pil_image_travels_as_the_server_reads_the_same_file() -> None:
    """`client.translate(m, [Image.open("scan16.png")])` sent RGB with every non-zero pixel at 255
    (Pillow's I;16 -> RGB conversion clips), while the same file sent as a path is decoded by the
    server as gray scaled from 0..65535 to 0..255."""
    from genserve_client.convert import to_image_message

    levels = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG")
    as_file = codecs.decode_image(buffer.getvalue(), 0, [], max_pixels=100, field="images[0]")
    with Image.open(buffer) as picture:
        assert picture.mode.startswith("I;16")
        sent = to_image_message(picture)
    pixels = np.frombuffer(sent.data, np.uint8).reshape(tuple(sent.shape))
    np.testing.assert_array_equal(pixels, as_file)
    assert as_file[..., 0].ravel().tolist() == list(range(0, 256, 17))


def test_a_32_bit_integer_pil_image_travels_as_the_server_reads_its_mode_not_clipped() -> None:
    """Pillow's mode I (a 16-bit PNG opened by an older Pillow, or convert('I')) is gray the server
    scales from 0..65535 to 0..255 (codecs._to_hwc_uint8); the library's convert('L') clipped every
    value above 255 to white."""
    from genserve_client.convert import to_image_message

    levels = np.linspace(0, 65535, 16).astype(np.int32).reshape(4, 4)
    picture = Image.fromarray(levels)
    assert picture.mode == "I"
    sent = to_image_message(picture)
    pixels = np.frombuffer(sent.data, np.uint8).reshape(tuple(sent.shape))
    np.testing.assert_array_equal(pixels, codecs._to_hwc_uint8(picture))
    assert pixels[..., 0].ravel().tolist() == list(range(0, 256, 17))


def test_a_float_pil_image_in_0_to_1_travels_as_the_servers_png_of_it_and_others_are_refused() -> None:
    """Pillow's mode F (a 32-bit float TIFF): values in 0..1 are the picture's 0..255, as the
    server writes a [0, 1] tensor to a PNG (codecs.to_uint8); Pillow's convert('L') truncated them
    to 0 (a black picture). Values outside 0..1 (or NaN) have no agreed meaning: refused naming
    the mode, never clipped."""
    from genserve_client.convert import to_image_message

    values = (np.arange(16, dtype=np.float32) / 15).reshape(4, 4)
    sent = to_image_message(Image.fromarray(values))
    pixels = np.frombuffer(sent.data, np.uint8).reshape(tuple(sent.shape))
    expected = codecs.to_uint8(values[np.newaxis, np.newaxis], (0.0, 1.0))[0]  # [1, H, W] -> HWC
    np.testing.assert_array_equal(pixels, expected.reshape(4, 4, 1))
    assert pixels[..., 0].ravel().tolist() == list(range(0, 256, 17))
    for bad in (values * 255, values - 0.5, np.full((4, 4), np.nan, np.float32)):
        with pytest.raises(ValueError, match=r"mode F .*0\.\.1"):
            to_image_message(Image.fromarray(bad.astype(np.float32)))


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_a_tensor_made_a_picture_here_is_the_servers_png_pixel_for_pixel(
    value_range: tuple[float, float],
) -> None:
    """A TENSOR_F32 answer turned into a picture by the client matches what the server's PNG of the
    same output holds: round half up as the server does (np.rint rounded exact halves to even, +-1),
    out-of-range values clipped, NaN black (it was an undefined byte)."""
    lo, hi = value_range
    rng = np.random.default_rng(5)
    halves = lo + (np.arange(256, dtype=np.float32) + 0.5) * np.float32((hi - lo) / 255.0)  # k + 0.5 exactly
    tail = np.array([np.nan, -np.inf, np.inf, lo - 3, hi + 3, lo, hi], np.float32)
    noise = rng.uniform(lo - 0.1, hi + 0.1, 3 * 16 * 16 - len(halves) - len(tail)).astype(np.float32)
    chw = np.concatenate([halves, tail, noise]).reshape(3, 16, 16)
    server = codecs.to_uint8(chw[np.newaxis], value_range)[0]
    client = np.asarray(array_to_pil(chw, value_range))
    np.testing.assert_array_equal(client, server)


def test_png_text_names_the_card_of_the_model_and_of_each_model_used() -> None:
    """A card edited beside the same graph (a style generator's w_avg, a decoder's output_range)
    changes a seed's images under the same model_sha256: the server reports each card's sha256
    (Provenance.card_sha256, UsedModel.card_sha256), and a PNG's text must carry them as it carries
    the model's and weights' digests, else a file cannot say which card made it."""
    from genserve.v1 import types_pb2
    from genserve_client.cli import through
    from genserve_client.pngmeta import png_text
    from genserve_client.results import Provenance

    proto = types_pb2.Provenance(
        model="style-gen",
        version="1",
        model_sha256="a" * 64,
        card_sha256="c" * 64,
        used_models=[
            types_pb2.UsedModel(model="mapping", version="2", model_sha256="b" * 64, card_sha256="d" * 64),
            types_pb2.UsedModel(model="old", version="1", model_sha256="e" * 64),  # an older server
        ],
    )
    provenance = Provenance.from_proto(proto)
    assert provenance.card_sha256 == "c" * 64
    assert provenance.used_card_sha256 == (("mapping", "d" * 64),)
    text = png_text(provenance, seed=7)
    assert text["card_sha256"] == "c" * 64
    assert text["used_models"] == (
        f"mapping version 2 sha256 {'b' * 64} card_sha256 {'d' * 64}; old version 1 sha256 {'e' * 64}"
    )
    assert "card_sha256" not in png_text(Provenance.from_proto(types_pb2.Provenance(model="m", version="1")))
    # edit: the decoder's images went through the encoder first, which is named with its card too.
    encoder = Provenance.from_proto(
        types_pb2.Provenance(model="enc", version="3", model_sha256="f" * 64, card_sha256="9" * 64)
    )
    edited = png_text(through(Provenance.from_proto(types_pb2.Provenance(model="dec", version="1")), encoder))
    assert edited["used_models"] == f"enc version 3 sha256 {'f' * 64} card_sha256 {'9' * 64}"

"""The client's image handling: PNG provenance text (pngmeta), request images from PIL (convert)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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

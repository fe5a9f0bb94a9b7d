"""Review findings on the client's PNG provenance (pngmeta)."""

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

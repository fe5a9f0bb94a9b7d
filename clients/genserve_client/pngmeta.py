"""Provenance in PNG files the CLI writes: tEXt chunks (iTXt for text beyond Latin-1) with seed(s),
model, version and sha256 (and the card's, card_sha256), and the other models the images went
through (`used_models`).

Read them back with Pillow (`Image.open(path).text`) or `exiftool`. Images the server encoded are
not re-encoded: the chunks are spliced in after IHDR, so the pixel data stays byte for byte.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL.PngImagePlugin import PngInfo

from genserve_client.results import Provenance

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4  # length, type, 13 data bytes, CRC
SOFTWARE = "genserve-client"


def png_text(provenance: Provenance | None, **fields: object) -> dict[str, str]:
    """Text chunks for one PNG: the given fields (None skipped) and the model's provenance."""
    text = {"Software": SOFTWARE}
    text.update({k: _text_value(str(v)) for k, v in fields.items() if v is not None})
    if provenance is not None:
        for key, value in (
            ("model", provenance.model),
            ("version", provenance.version),
            ("model_sha256", provenance.model_sha256),
            ("weights_sha256", provenance.weights_sha256),
            ("card_sha256", provenance.card_sha256),
        ):
            if value:
                text[key] = value
        # A code prior's sampling as it ran, its config.json defaults filled in: the command's own
        # flags are None where left unset, and a replay needs these to get the same images.
        if provenance.temperature is not None:
            text["temperature"] = float32_text(provenance.temperature)
            text["top_k"] = str(provenance.top_k)
            # A two-level prior's top level, sampled at its top prior's own settings: with these as
            # --top-temperature and --top-top-k, a replay samples both levels as they ran.
            for _, temperature, top_k in provenance.used_sampling[:1]:
                text["top_temperature"] = float32_text(temperature)
                text["top_top_k"] = str(top_k)
        # The other models the images went through (a style generator's mapping, a code prior's
        # decoder and top prior): a reload of one changes the images, not `model` (types.proto).
        weights = dict(provenance.used_weights_sha256)
        cards = dict(provenance.used_card_sha256)
        sampling = {m: f" temperature {float32_text(t)} top_k {k}" for m, t, k in provenance.used_sampling}
        used = "; ".join(
            f"{m} version {v} sha256 {h}"
            + (f" weights_sha256 {weights[m]}" if m in weights else "")
            + (f" card_sha256 {cards[m]}" if m in cards else "")
            + sampling.get(m, "")
            for m, v, h in provenance.used_models
        )
        if used:
            text["used_models"] = used
    return text


def float32_text(value: float) -> str:
    """A float32 field's value as the shortest text that gives it back (0.3, not 0.30000001192...):
    passed to --temperature, it is the same float32."""
    return np.format_float_positional(np.float32(value), trim="0")


def _text_value(value: str) -> str:
    """`value` as text a PNG can hold: a file name whose bytes are not UTF-8 (`caf\\xe9.png`, held by
    Python as the lone surrogate \\udce9) has those bytes written as \\xNN; neither tEXt (Latin-1)
    nor iTXt (UTF-8) can encode a surrogate."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no undecodable byte gave
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return raw.decode("utf-8", "backslashreplace")


def pnginfo(text: dict[str, str]) -> PngInfo:
    """The same chunks for a picture Pillow encodes (`picture.save(path, pnginfo=...)`)."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt (Latin-1), or uncompressed iTXt (UTF-8) for a value Latin-1 cannot hold, as Pillow's
    PngInfo.add_text writes it: a file path such as фото.png is kept, not turned into ????.png."""
    keyword = key.encode("latin-1")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0 and method 0, empty language tag and translated keyword.
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def with_png_text(data: bytes, text: dict[str, str]) -> bytes:
    """PNG bytes with text chunks added after IHDR; anything that is not a PNG is returned as is."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return data
    chunks = b"".join(_text_chunk(key, value) for key, value in text.items())
    return data[:_IHDR_END] + chunks + data[_IHDR_END:]

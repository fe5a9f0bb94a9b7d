"""SuperResolve and Translate wait for their working set (sr_working_set_bytes /
translate_working_set_bytes) before they decode their images. An image that no wait could make valid
(a TENSOR_F32 with NaN or values outside the card's input_range, a JPEG or PNG past the segment and
chunk and scan limits that decoding checks before any decoder runs) is INVALID_ARGUMENT at once, as it was
when the images were decoded first (DESIGN.md: bad input is answered INVALID_ARGUMENT; overload
RESOURCE_EXHAUSTED): never a RESOURCE_EXHAUSTED "retry with backoff" after waiting for a budget that
other calls hold, which the client retries."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from server_support import image_to_image_graph, run_with_core, super_resolution_graph, write_model

from genserve.v1 import types_pb2 as tpb
from genserve_server import codecs, validate
from genserve_server.core import Call, GenerationCore, Upscaled
from genserve_server.errors import InvalidArgument
from genserve_server.repository import Repository

JPEG, PNG, TENSOR = tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_PNG, tpb.IMAGE_FORMAT_TENSOR_F32
SIDE = 16


def tensor(values: np.ndarray) -> tpb.Image:
    return tpb.Image(format=TENSOR, data=values.astype("<f4").tobytes(), shape=list(values.shape))


def jpeg_with_comments(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (10, 20, 30)).save(out, "JPEG")
    data = out.getvalue()
    comment = b"\xff\xfe\x00\x03x"
    sos = data.index(b"\xff\xda")  # after the frame header: the size is readable, the limit passed
    return data[:sos] + comment * n + data[sos:]


def png_with_text_chunks(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (10, 20, 30)).save(out, "PNG")
    data = out.getvalue()
    body = b"k\x00v"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    ihdr_end = 8 + 25
    return data[:ihdr_end] + chunk * n + data[ihdr_end:]


def bad_images(input_range: tuple[float, float]) -> list[tuple[str, tpb.Image, str]]:
    nan = np.full((3, SIDE, SIDE), input_range[0], np.float32)
    nan[0, 0, 0] = np.nan
    outside = np.full((3, SIDE, SIDE), input_range[1] + 5.0, np.float32)
    limit = codecs.MAX_IMAGE_METADATA_SEGMENTS
    return [
        ("nan", tensor(nan), "must be finite"),
        ("outside input_range", tensor(outside), "input_range"),
        ("jpeg segments", tpb.Image(format=JPEG, data=jpeg_with_comments(limit + 1)), "marker segments"),
        (
            "jpeg scans",
            tpb.Image(format=JPEG, data=jpeg_with_comments(0) + b"\xff\xda" * codecs.MAX_JPEG_SCANS),
            "scans",
        ),
        ("png chunks", tpb.Image(format=PNG, data=png_with_text_chunks(limit + 1)), "chunks besides IDAT"),
    ]


def write_image_model(root: Path, rpc: str) -> tuple[str, dict[str, Any]]:
    """Model "m" that `rpc` (SuperResolve or Translate) serves: its kind and card."""
    if rpc == "SuperResolve":
        kind, graph = "super_resolution", super_resolution_graph(2)
        card: dict[str, Any] = {
            "channels": 3,
            "input_channels": 3,
            "input_range": [0.0, 1.0],
            "scale_factor": 2,
            "min_size": 4,
        }
    else:
        kind, graph = "image_to_image", image_to_image_graph(4)
        card = {
            "channels": 3,
            "input_channels": 3,
            "input_range": [-1.0, 1.0],
            "size_multiple": 4,
            "min_size": 4,
        }
    write_model(root, "m", kind, graph, card, config={"batching": {"max_batch_size": 4}})
    return kind, card


@pytest.mark.parametrize("rpc", ["SuperResolve", "Translate"])
def test_an_image_no_wait_could_make_valid_is_refused_while_the_working_set_is_held(
    tmp_path: Path, rpc: str
) -> None:
    kind, card = write_image_model(tmp_path, rpc)
    out = validate.output_spec(PNG, 0, None, False)
    low, high = card["input_range"]
    cases = bad_images((low, high))

    async def body(repo: Repository, core: GenerationCore) -> None:
        budget = core.sr_working_set if rpc == "SuperResolve" else core.translate_working_set
        budget.max_wait_s = 0.3
        blocker = await budget.acquire(budget.limit, None, "the test")  # other calls hold it all
        got = {}
        try:
            for name, image, expected in cases:
                call = Call(rpc, "test", time.monotonic(), core.metrics.unresolved(), unary=True)
                mv = core.resolve(call, "m", "", (kind,), rpc)
                run: Coroutine[Any, Any, Upscaled] = (
                    core.upscale(mv, call, [image], 0, None, out)
                    if rpc == "SuperResolve"
                    else core.translate(mv, call, [image], out)
                )
                try:
                    await run
                    got[name] = "ok"
                except Exception as exc:
                    fine = isinstance(exc, InvalidArgument) and expected in str(exc)
                    got[name] = "refused" if fine else f"{type(exc).__name__}: {exc}"
                finally:
                    if call.response is not None:
                        call.response.release()
        finally:
            budget.release(blocker)
        assert got == {name: "refused" for name, _, _ in cases}, "\n".join(
            f"{k}: {v}" for k, v in got.items()
        )

    run_with_core(tmp_path, body)


@pytest.mark.parametrize("side", [SIDE, 128], ids=["inline", "on the pool"])
@pytest.mark.parametrize("rpc", ["SuperResolve", "Translate"])
def test_a_tensor_f32_image_is_checked_once_before_the_working_set_not_again_when_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rpc: str, side: int
) -> None:
    """declared_sizes checks a TENSOR_F32's values (finite, in input_range) before the call waits for
    its working set; the decode after the wait reads the same immutable bytes and does not pass over
    them again (each check is a full pass over the tensor)."""
    kind, card = write_image_model(tmp_path, rpc)
    out = validate.output_spec(TENSOR, 0, None, False)
    low, high = card["input_range"]
    values = np.linspace(low, high, 3 * side * side, dtype=np.float32).reshape(3, side, side)
    finite_checks: list[str] = []
    range_checks: list[str] = []
    decode_image, input_range = codecs.decode_image, validate.input_range

    def counted_decode(data: bytes, fmt: int, shape: Any, **kwargs: Any) -> Any:
        if fmt == TENSOR:  # decode_image checks a TENSOR_F32 is finite
            finite_checks.append(kwargs["field"])
        return decode_image(data, fmt, shape, **kwargs)

    def counted_range(tensor: np.ndarray, value_range: tuple[float, float], field: str) -> None:
        range_checks.append(field)
        input_range(tensor, value_range, field)

    monkeypatch.setattr(codecs, "decode_image", counted_decode)
    monkeypatch.setattr(validate, "input_range", counted_range)

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call(rpc, "test", time.monotonic(), core.metrics.unresolved(), unary=True)
        mv = core.resolve(call, "m", "", (kind,), rpc)
        try:
            done = (
                await core.upscale(mv, call, [tensor(values)], 0, None, out)
                if rpc == "SuperResolve"
                else await core.translate(mv, call, [tensor(values)], out)
            )
        finally:
            if call.response is not None:
                call.response.release()
        scale = card.get("scale_factor", 1)
        assert list(done.images[0].shape) == [3, side * scale, side * scale]

    run_with_core(tmp_path, body)
    assert (finite_checks, range_checks) == (["images[0]"], ["images[0]"])

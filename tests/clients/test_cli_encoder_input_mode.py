"""`genserve-client edit` converts its picture to the encoder's channels as the server reads the card."""

from __future__ import annotations

import json
from pathlib import Path

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
        ({"image_size": [4, 4], "input_channels": 4}, (4, 4, 4)),
    ],
)
def test_the_picture_has_the_channels_the_server_reads_the_card_as(
    tmp_path: Path, card: dict[str, object], shape: tuple[int, ...]
) -> None:
    path = tmp_path / "in.png"
    Image.new("RGB", (4, 4), (10, 200, 30)).save(path)
    assert load_for_encoder(path, _info(card)).shape == shape

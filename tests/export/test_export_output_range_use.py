"""export warns of an output_range whose one half the module never reaches: the server maps the
range's lo to 0 and hi to 255, so a sigmoid generator exported with the README's example card
(`"output_range": [-1, 1]`) loads READY and serves washed-out images (grey levels 128..255 only),
while every other check passes (its outputs do lie inside [-1, 1]). A warning, since an
undertrained model's outputs may also sit in one half."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from genserve_export import export_model


class SigmoidGenerator(nn.Module):
    """z [N, 8] -> Linear -> sigmoid -> [N, 3, 4, 4] in (0, 1), as many users' generators end."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 48)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2.0 * self.body(z)).view(-1, 3, 4, 4)


def _export(tmp_path: Path, output_range: list[float]) -> Path:
    return export_model(
        SigmoidGenerator(),
        kind="generator",
        name="sigmoid-gen",
        out_dir=tmp_path,
        example_inputs={"z": torch.randn(4, 8)},
        card={"description": "a sigmoid generator", "output_range": output_range},
        fp16=False,
    )


def test_sigmoid_output_under_a_minus_one_to_one_card_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="genserve_export.export"):
        _export(tmp_path, [-1, 1])
    warned = [r.getMessage() for r in caplog.records if "half of the card's output_range" in r.getMessage()]
    assert warned and "upper half" in warned[0] and "128..255" in warned[0] and "[0, 1]" in warned[0], warned


def test_sigmoid_output_under_its_own_range_exports_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="genserve_export.export"):
        assert (_export(tmp_path, [0, 1]) / "model.onnx").is_file()
    assert not [r for r in caplog.records if "half of the card's output_range" in r.getMessage()]

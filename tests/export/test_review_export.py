"""Review findings for genserve_export (verify, CLI, build-defaults)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from genserve_export import export_model, verify_repository


class SkewedTwoWay(nn.Module):
    """A two-way translator whose B->A generator leaves the card's output_range [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 1, 3, padding=1)
        self.b = nn.Conv2d(1, 1, 3, padding=1)

    def a_to_b(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a(x))

    def b_to_a(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.b(x)) * 4.0 - 1.5  # [-1.5, 2.5]: outside [0, 1]

    def forward(self, image: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return self.b_to_a(image) if int(direction[0]) == 1 else self.a_to_b(image)
        out: torch.Tensor = torch.cond(
            direction[0] == 1, lambda x: self.b_to_a(x), lambda x: self.a_to_b(x), (image,)
        )
        return out


def test_verify_checks_a_two_way_translators_b_to_a_direction_too(tmp_path: Path) -> None:
    """verify promises finite outputs inside output_range (and fp16 within fp16_atol) for every
    graph; a two_way_translator's second generator (direction 1) must be run too, not only A->B."""
    image = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    export_model(
        SkewedTwoWay(),
        kind="two_way_translator",
        name="skewed",
        out_dir=tmp_path,
        fp16=False,
        example_inputs={"image": image, "direction": np.zeros(2, np.int64)},
        card={
            "description": "B->A out of range",
            "output_range": [0, 1],
            "input_range": [0, 1],
            "domains": ["a", "b"],
        },
    )
    report = verify_repository(tmp_path, recompute_quality=False)
    assert not report.ok, report.format()
    assert any("outside output_range" in e and "direction" in e for e in report.models[0].errors), (
        report.format()
    )
